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

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_allocator_thresholds() {
        assert!(super::tune_allocator());
    }
}
