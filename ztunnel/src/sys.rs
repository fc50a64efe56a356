//! The one place with `unsafe`: process-wide settings made through libc at start, raising the
//! open-file limit (a proxy holds two descriptors per connection) and tuning the allocator.
#![allow(unsafe_code)]

/// Largest allocation glibc's malloc serves from its heaps rather than with a fresh `mmap`.
pub const MALLOC_MMAP_THRESHOLD: usize = 1 << 20;
/// Free memory at the top of a malloc heap that glibc keeps instead of returning it.
pub const MALLOC_TRIM_THRESHOLD: usize = 4 << 20;

/// Stops glibc's malloc from handing relay buffers back to the kernel between bursts. A
/// stream's buffers grow to 128 KiB and are freed when reads come up short; by default glibc
/// then trims or unmaps that memory, and the next burst faults fresh zeroed pages in: 7% of
/// ztunnel's CPU in a single-stream transfer. With these thresholds (fixed values, which also
/// turn off glibc's dynamic adjustment) a busy ztunnel keeps up to 4 MiB free per malloc
/// arena; idle memory is unchanged. Returns false when the allocator refused a setting or
/// is not glibc's.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only reads its two integer arguments and takes malloc's own lock;
        // the settings apply to later allocations and frees.
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD as i32) };
        // SAFETY: as above.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD as i32) };
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit read above, with cur <= max.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// `CAP_NET_ADMIN`: `SO_MARK` and `IP_TRANSPARENT` on ztunnel's sockets, all it needs.
pub const CAP_NET_ADMIN: u32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "ztunnel is already multi-threaded; privileges must be dropped before any thread starts"
    )]
    Threads,
    #[error("{step} failed (does the container grant CAP_SETUID and CAP_SETGID?)")]
    Syscall {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The capability sets of the calling thread, as `capget(2)`/`capset(2)` exchange them
/// (version 3: two 32-bit words per set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Becomes `uid`:`gid` (no supplementary groups) keeping only `keep` among the capabilities,
/// effective and permitted; nothing inheritable. Sockets created afterwards belong to `uid`,
/// so a reuseport group of ztunnel's can be joined only by ztunnel (a root process of the
/// node, capabilities or not, gets EADDRINUSE). Must run while the process has a single
/// thread: `capset` and the keep-caps flag are per thread.
pub fn drop_privileges(uid: u32, gid: u32, keep: &[u32]) -> Result<(), PrivilegeError> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1);
    if threads != 1 {
        return Err(PrivilegeError::Threads);
    }
    let fail =
        |step: &'static str| move |source: std::io::Error| PrivilegeError::Syscall { step, source };
    let check = |rc: libc::c_long, step: &'static str| {
        if rc < 0 {
            Err(fail(step)(std::io::Error::last_os_error()))
        } else {
            Ok(())
        }
    };
    // SAFETY: prctl with an integer option and constant integer arguments.
    check(
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) }.into(),
        "prctl(PR_SET_KEEPCAPS)",
    )?;
    nix::unistd::setgroups(&[]).map_err(|e| fail("setgroups")(e.into()))?;
    let g = nix::unistd::Gid::from_raw(gid);
    nix::unistd::setresgid(g, g, g).map_err(|e| fail("setresgid")(e.into()))?;
    let u = nix::unistd::Uid::from_raw(uid);
    nix::unistd::setresuid(u, u, u).map_err(|e| fail("setresuid")(e.into()))?;
    let mut data = [CapData::default(); 2];
    for cap in keep {
        let (word, bit) = ((cap / 32) as usize, cap % 32);
        data[word].effective |= 1 << bit;
        data[word].permitted |= 1 << bit;
    }
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads one header and two data structs laid out as the kernel's
    // `__user_cap_header_struct` / `__user_cap_data_struct` (repr(C), version 3), valid for
    // the call; pid 0 is the calling thread, the only one.
    check(
        unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) },
        "capset",
    )?;
    // SAFETY: as for PR_SET_KEEPCAPS above.
    check(
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) }.into(),
        "prctl(PR_SET_KEEPCAPS)",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_allocator_thresholds() {
        assert!(super::tune_allocator());
    }
}
