//! Scheduling of the agent's background work. Besides the libnftables binding and the tcx
//! query in `bypass`, the only unsafe code of the crate: two syscalls nix does not wrap.
#![allow(unsafe_code)]

/// Moves the calling thread to the idle scheduling class (`SCHED_IDLE`), for periodic
/// background work (the drift observer's kernel listing: milliseconds of CPU with hundreds of
/// pods) that must never take a core from ADD handling on a small node.
///
/// Why not only nice 19: a normal thread woken on a core that runs a `SCHED_IDLE` thread
/// preempts it at once, and wake-up placement counts that core as idle. A nice-19 thread is
/// preempted only when the woken thread is far enough behind it in virtual time, and one
/// that just woke from its 10 s sleep is not: in a scheduler trace of the ADD benchmark
/// (`perf record -e sched:*`), the agent's core thread, woken onto the core where the
/// nice-19 observer had just started its listing, waited 1 ms to run, which was a third of
/// that plugin ADD. If the class cannot be changed (a seccomp profile that refuses the
/// call), nice 19 is the fallback.
pub fn lower_current_thread_priority() -> std::io::Result<()> {
    let tid = nix::unistd::gettid().as_raw();
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads its integer arguments and the sched_param we pass by
    // reference, which outlives the call. On Linux a thread id names that thread alone.
    let rc = unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) };
    if rc == 0 {
        return Ok(());
    }
    let idle_err = std::io::Error::last_os_error();
    // SAFETY: setpriority only reads its three integer arguments. On Linux, PRIO_PROCESS
    // with a thread id changes that thread's nice value alone.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
    if rc == 0 {
        tracing::debug!(error = %idle_err, "SCHED_IDLE refused; running at nice 19 instead");
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    /// The scheduling policy of a thread of this process (`/proc/.../stat` field 41).
    fn policy_of(tid: i32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // Counting starts after the parenthesised name (field 2): field 41 is index 38.
        let fields = stat.rsplit_once(')').unwrap().1;
        fields.split_whitespace().nth(38).unwrap().parse().unwrap()
    }

    #[test]
    fn moves_only_the_calling_thread_to_the_idle_class() {
        let me = nix::unistd::gettid().as_raw();
        let before = policy_of(me);
        std::thread::spawn(|| {
            super::lower_current_thread_priority().unwrap();
            assert_eq!(policy_of(nix::unistd::gettid().as_raw()), libc::SCHED_IDLE);
        })
        .join()
        .unwrap();
        assert_eq!(policy_of(me), before);
        assert_ne!(before, libc::SCHED_IDLE);
    }
}
