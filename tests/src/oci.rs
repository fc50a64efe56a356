//! A pause image built locally, so the containerd test needs no registry: a tiny static binary
//! (C, `gcc -static -Os`) that sleeps in `pause()` until SIGTERM or SIGINT, packed into an OCI
//! image-layout archive (`oci-layout`, `index.json`, `blobs/sha256/...` with one manifest, one
//! config and one uncompressed layer) that `ctr images import` accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::netns::{run, NetNsError};

/// The C source of the pause binary.
pub const PAUSE_C: &str = r#"#include <signal.h>
#include <unistd.h>
static void done(int sig) { (void)sig; _exit(0); }
int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = done;
    sigaction(SIGTERM, &sa, 0);
    sigaction(SIGINT, &sa, 0);
    for (;;) pause();
}
"#;

const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("compiling the pause binary failed (is gcc with static libc installed?)")]
    Compile(#[source] NetNsError),
    #[error("tar entry name {0:?} is longer than 100 bytes")]
    NameTooLong(String),
}

/// Compiles [`PAUSE_C`] into `dir/pause` (static, stripped).
pub fn build_pause_binary(dir: &Path) -> Result<PathBuf, OciError> {
    let src = dir.join("pause.c");
    std::fs::write(&src, PAUSE_C).map_err(|source| OciError::Write {
        path: src.clone(),
        source,
    })?;
    let out = dir.join("pause");
    run(Command::new("gcc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(&out)
        .arg(&src))
    .map_err(OciError::Compile)?;
    Ok(out)
}

/// A minimal ustar writer: regular files and directories, owned by root, mtime 0.
#[derive(Debug, Default)]
pub struct Tar {
    buf: Vec<u8>,
}

impl Tar {
    pub fn dir(&mut self, name: &str) -> Result<(), OciError> {
        self.entry(name, 0o755, b'5', &[])
    }

    pub fn file(&mut self, name: &str, mode: u32, body: &[u8]) -> Result<(), OciError> {
        self.entry(name, mode, b'0', body)
    }

    fn entry(&mut self, name: &str, mode: u32, kind: u8, body: &[u8]) -> Result<(), OciError> {
        if name.len() > 100 {
            return Err(OciError::NameTooLong(name.to_owned()));
        }
        self.buf
            .extend_from_slice(&header(name, mode, kind, body.len() as u64));
        self.buf.extend_from_slice(body);
        let pad = (512 - body.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
        Ok(())
    }

    /// The archive with its two end-of-archive blocks.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend(std::iter::repeat_n(0u8, 1024));
        self.buf
    }
}

/// One 512-byte ustar header.
pub fn header(name: &str, mode: u32, kind: u8, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], off: usize, s: &[u8]| h[off..off + s.len()].copy_from_slice(s);
    put(&mut h, 0, name.as_bytes());
    put(&mut h, 100, format!("{mode:07o}\0").as_bytes());
    put(&mut h, 108, b"0000000\0"); // uid
    put(&mut h, 116, b"0000000\0"); // gid
    put(&mut h, 124, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, b"00000000000\0"); // mtime
    put(&mut h, 148, b"        "); // checksum placeholder
    h[156] = kind;
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    put(&mut h, 265, b"root");
    put(&mut h, 297, b"root");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    h
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The OCI architecture name of this machine.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// What [`image_archive`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageArchive {
    pub bytes: Vec<u8>,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digest: String,
}

/// An OCI image-layout archive holding one image, `reference` (e.g.
/// `localhost/ambient-test/pause:v1`), whose only layer holds `/pause` (= `binary`) and
/// whose entrypoint is `/pause`.
pub fn image_archive(binary: &[u8], reference: &str) -> Result<ImageArchive, OciError> {
    let mut layer = Tar::default();
    layer.file("pause", 0o755, binary)?;
    let layer = layer.finish();
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    let config = serde_json::to_vec(&json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": { "Entrypoint": ["/pause"], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        "history": [{ "created_by": "ambient-tests oci::image_archive" }],
    }))
    .expect("a JSON value always serializes");
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": { "mediaType": MT_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": MT_LAYER, "digest": layer_digest, "size": layer.len() }],
    }))
    .expect("a JSON value always serializes");
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
    let tag = reference.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": oci_arch(), "os": "linux" },
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))
    .expect("a JSON value always serializes");

    let mut tar = Tar::default();
    tar.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    tar.file("index.json", 0o644, &index)?;
    tar.dir("blobs/")?;
    tar.dir("blobs/sha256/")?;
    for (digest, body) in [
        (&layer_digest, &layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        let hex = digest.trim_start_matches("sha256:");
        tar.file(&format!("blobs/sha256/{hex}"), 0o644, body)?;
    }
    Ok(ImageArchive {
        bytes: tar.finish(),
        manifest_digest,
        config_digest,
        layer_digest,
    })
}

/// Builds the pause binary in `dir` and writes `dir/pause-image.tar`; returns its path.
pub fn build_pause_image(dir: &Path, reference: &str) -> Result<PathBuf, OciError> {
    let bin = build_pause_binary(dir)?;
    let body = std::fs::read(&bin).map_err(|source| OciError::Read {
        path: bin.clone(),
        source,
    })?;
    let archive = image_archive(&body, reference)?;
    let out = dir.join("pause-image.tar");
    std::fs::write(&out, &archive.bytes).map_err(|source| OciError::Write {
        path: out.clone(),
        source,
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checksum_is_valid() {
        let h = header("pause", 0o755, b'0', 1234);
        let mut copy = h;
        copy[148..156].copy_from_slice(b"        ");
        let sum: u32 = copy.iter().map(|&b| u32::from(b)).sum();
        let stored = std::str::from_utf8(&h[148..154]).unwrap();
        assert_eq!(u32::from_str_radix(stored, 8).unwrap(), sum);
        assert_eq!(&h[124..135], b"00000002322");
    }

    #[test]
    fn long_names_are_refused() {
        let mut t = Tar::default();
        assert!(matches!(
            t.file(&"x".repeat(101), 0o644, b""),
            Err(OciError::NameTooLong(_))
        ));
    }

    #[test]
    fn archive_is_readable_by_tar_and_digests_match() {
        let a = image_archive(b"not really a binary", "localhost/t/pause:v1").unwrap();
        assert_eq!(a.bytes.len() % 512, 0);
        let dir = tempfile::tempdir().unwrap();
        let tar_path = dir.path().join("img.tar");
        std::fs::write(&tar_path, &a.bytes).unwrap();
        run(Command::new("tar")
            .arg("-xf")
            .arg(&tar_path)
            .arg("-C")
            .arg(dir.path()))
        .unwrap();
        let blob = |d: &str| {
            std::fs::read(
                dir.path()
                    .join("blobs/sha256")
                    .join(d.trim_start_matches("sha256:")),
            )
            .unwrap()
        };
        for d in [&a.manifest_digest, &a.config_digest, &a.layer_digest] {
            assert_eq!(format!("sha256:{}", sha256_hex(&blob(d))), *d);
        }
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], a.manifest_digest.as_str());
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            "localhost/t/pause:v1"
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(&a.manifest_digest)).unwrap();
        assert_eq!(manifest["layers"][0]["digest"], a.layer_digest.as_str());
        // The layer itself is a tar holding the binary.
        let layer_path = dir.path().join("layer.tar");
        std::fs::write(&layer_path, blob(&a.layer_digest)).unwrap();
        let list = run(Command::new("tar").arg("-tvf").arg(&layer_path)).unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(
            list.contains("rwxr-xr-x") && list.contains("pause"),
            "{list}"
        );
    }
}
