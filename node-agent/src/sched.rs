//! Scheduling of the agent's background work. Besides the libnftables binding, the only
//! unsafe code of the crate: one syscall nix does not wrap.
#![allow(unsafe_code)]

/// Gives the calling thread the weakest priority (nice 19), for periodic background work
/// (the drift observer's kernel listing: tens of ms of CPU with hundreds of pods) that must
/// never take a core from ADD handling on a small node.
pub fn lower_current_thread_priority() -> std::io::Result<()> {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority only reads its three integer arguments. On Linux, PRIO_PROCESS
    // with a thread id changes that thread's nice value alone.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    fn nice_of(tid: i32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // Field 19 is the nice value; counting starts after the parenthesised name (field 3).
        let fields = stat.rsplit_once(')').unwrap().1;
        fields.split_whitespace().nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn lowers_only_the_calling_thread() {
        let me = nix::unistd::gettid().as_raw();
        let before = nice_of(me);
        std::thread::spawn(|| {
            super::lower_current_thread_priority().unwrap();
            assert_eq!(nice_of(nix::unistd::gettid().as_raw()), 19);
        })
        .join()
        .unwrap();
        assert_eq!(nice_of(me), before);
    }
}
