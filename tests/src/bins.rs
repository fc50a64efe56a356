//! Where the binaries under test are: the workspace's own (`ambient-cni`, `node-agent`,
//! `ztunnel`, `ambient-issuer`, `netprobe`) in the cargo target directory of the running test executable
//! (`target/<profile>/`), and Debian's CNI plugins in [`DEBIAN_CNI_DIR`].

use std::path::{Path, PathBuf};

/// Debian's `containernetworking-plugins`.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";
/// The workspace binaries the harness knows by name.
pub const AMBIENT_CNI: &str = "ambient-cni";
pub const NODE_AGENT: &str = "node-agent";
pub const ZTUNNEL: &str = "ztunnel";
pub const NETPROBE: &str = "netprobe";
/// The lab's Calico-shaped primary plugin (`src/bin/routed-cni.rs`).
pub const ROUTED_CNI: &str = "routed-cni";
pub const ISSUER: &str = "ambient-issuer";

#[derive(Debug, thiserror::Error)]
pub enum BinError {
    #[error("cannot find the running executable")]
    CurrentExe(#[source] std::io::Error),
    #[error(
        "{name} not found at {path}: run `cargo build --workspace` (same profile as the tests) first"
    )]
    Missing { name: String, path: PathBuf },
    #[error("Debian CNI plugin {0} not found: install containernetworking-plugins")]
    MissingCniPlugin(PathBuf),
}

/// A cargo profile directory (`target/debug`, `target/release`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinDir(PathBuf);

impl BinDir {
    /// The profile directory holding `exe`: its parent, or the parent's parent when `exe` is
    /// a test executable in `deps/`.
    pub fn from_exe(exe: &Path) -> Option<Self> {
        let parent = exe.parent()?;
        let dir = if parent.file_name().is_some_and(|n| n == "deps") {
            parent.parent()?
        } else {
            parent
        };
        Some(Self(dir.to_path_buf()))
    }

    /// The profile directory of the running executable.
    pub fn current() -> Result<Self, BinError> {
        let exe = std::env::current_exe().map_err(BinError::CurrentExe)?;
        Self::from_exe(&exe).ok_or_else(|| {
            BinError::CurrentExe(std::io::Error::other(format!(
                "{} has no parent directory",
                exe.display()
            )))
        })
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The binary `name` in this directory, if it was built.
    pub fn find(&self, name: &str) -> Result<PathBuf, BinError> {
        let path = self.0.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(BinError::Missing {
                name: name.to_owned(),
                path,
            })
        }
    }
}

/// The workspace binary `name` next to the running test, or a panic that says how to build it.
pub fn binary(name: &str) -> PathBuf {
    match BinDir::current().and_then(|d| d.find(name)) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// A Debian CNI plugin (`bridge`, `ptp`, `host-local`, `loopback`, ...).
pub fn debian_cni_plugin(name: &str) -> Result<PathBuf, BinError> {
    let path = Path::new(DEBIAN_CNI_DIR).join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(BinError::MissingCniPlugin(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_dir_from_test_and_bin_executables() {
        let t = BinDir::from_exe(Path::new("/w/target/debug/deps/containerd-1234")).unwrap();
        assert_eq!(t.path(), Path::new("/w/target/debug"));
        let b = BinDir::from_exe(Path::new("/w/target/release/netprobe")).unwrap();
        assert_eq!(b.path(), Path::new("/w/target/release"));
    }

    #[test]
    fn missing_binary_says_how_to_build_it() {
        let d = BinDir(PathBuf::from("/nonexistent-dir"));
        let msg = d.find("node-agent").unwrap_err().to_string();
        assert!(msg.contains("cargo build --workspace"), "{msg}");
    }
}
