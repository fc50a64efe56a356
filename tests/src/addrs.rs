//! The one allocator of the address ranges system tests build their networks in.
//!
//! Every test that creates interfaces leases a [`Block`]: `10.<octet>.0.0/16` and
//! `fd00:<octet hex>::/32`, for as long as it holds the lease. A lease is an exclusive
//! `flock` on `/run/ambient-tests/blocks/<octet>.lock`, so it is honoured between the test
//! processes nextest runs side by side and between threads of one `cargo test` process (each
//! lease opens its own file description), and the kernel releases it when the holder exits,
//! even by a crash: no stale lease survives a failed run.
//!
//! The pool, [`POOL`], leaves out `10.244.0.0/16`, where the long-lived `lab` cluster lives.

use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// The second octets the allocator hands out.
pub const POOL: RangeInclusive<u8> = 100..=239;
/// Where the lease files live (tmpfs: emptied at boot).
pub const LOCK_DIR: &str = "/run/ambient-tests/blocks";

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot use the lease directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("every address block of 10.{first}-{last}.0.0/16 is leased by a running test")]
    Exhausted { first: u8, last: u8 },
}

/// A leased `10.<octet>.0.0/16` (and `fd00:<octet hex>::/32`); dropping it ends the lease.
#[derive(Debug)]
pub struct Block {
    octet: u8,
    _lease: Flock<File>,
}

impl Block {
    /// Leases a free block, or panics with the reason (what a test wants).
    pub fn lease() -> Block {
        Self::try_lease_in(Path::new(LOCK_DIR)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Leases a free block, with lease files in `dir`. The search starts at an offset
    /// derived from the process id, so parallel test processes rarely contend for one file.
    pub fn try_lease_in(dir: &Path) -> Result<Block, LeaseError> {
        std::fs::create_dir_all(dir).map_err(|source| LeaseError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let (first, last) = (*POOL.start(), *POOL.end());
        let span = u32::from(last - first) + 1;
        let start = std::process::id() % span;
        for i in 0..span {
            let octet = first + ((start + i) % span) as u8;
            let path = dir.join(format!("{octet}.lock"));
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| LeaseError::Dir {
                    path: path.clone(),
                    source,
                })?;
            if let Ok(lease) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                return Ok(Block {
                    octet,
                    _lease: lease,
                });
            }
        }
        Err(LeaseError::Exhausted { first, last })
    }

    /// The second octet: the block is `10.<octet>.0.0/16`.
    pub fn octet(&self) -> u8 {
        self.octet
    }

    /// `10.<octet>.<c>.<d>`.
    pub fn v4(&self, c: u8, d: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, c, d)
    }

    /// `10.<octet>.<c>.0/24`.
    pub fn net24(&self, c: u8) -> String {
        format!("10.{}.{c}.0/24", self.octet)
    }

    /// `fd00:<octet hex>:<c>::<d>`.
    pub fn v6(&self, c: u16, d: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, u16::from(self.octet), c, 0, 0, 0, 0, d)
    }

    /// `fd00:<octet hex>:<c>::/64`.
    pub fn net64(&self, c: u16) -> String {
        format!("fd00:{:x}:{c:x}::/64", self.octet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_exclusive_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = Block::try_lease_in(dir.path()).unwrap();
        let b = Block::try_lease_in(dir.path()).unwrap();
        assert_ne!(a.octet(), b.octet());
        let freed = a.octet();
        drop(a);
        // Every other block is taken: the next lease must be the one just freed.
        let held: Vec<Block> = std::iter::from_fn(|| Block::try_lease_in(dir.path()).ok())
            .take(POOL.len())
            .collect();
        assert_eq!(held.len(), POOL.len() - 1, "all but b's block");
        assert!(held.iter().any(|h| h.octet() == freed));
        assert!(matches!(
            Block::try_lease_in(dir.path()),
            Err(LeaseError::Exhausted { .. })
        ));
    }

    #[test]
    fn addresses_of_a_block() {
        let dir = tempfile::tempdir().unwrap();
        let b = Block::try_lease_in(dir.path()).unwrap();
        let o = b.octet();
        assert_eq!(b.v4(1, 2).to_string(), format!("10.{o}.1.2"));
        assert_eq!(b.net24(3), format!("10.{o}.3.0/24"));
        assert_eq!(b.v6(2, 5).to_string(), format!("fd00:{o:x}:2::5"));
        assert_eq!(b.net64(2), format!("fd00:{o:x}:2::/64"));
        assert!(POOL.contains(&o));
    }
}
