//! Will the plugin run on this host? The container runtime execs `ambient-cni` from the
//! host's CNI binary directory, so it must not depend on the host's libc: hosts run glibc
//! versions older than the image's (RHEL 8, Ubuntu 20.04, Amazon Linux 2), or none. Two
//! checks before the plugin goes into the chain: its ELF file names no program interpreter
//! (a static executable: only the kernel, which every container of the node shares, is
//! needed), and it answers VERSION when exec'd from the host path.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How an executable file is linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linkage {
    /// An ELF executable without a program interpreter (static, or static-pie).
    Static,
    /// An ELF executable loaded by `interpreter` (the dynamic loader of some libc).
    Dynamic { interpreter: String },
    /// A script: it needs `interpreter` on the host.
    Script { interpreter: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an executable: neither an ELF file nor a script")]
    NotExecutable,
    #[error("unsupported ELF file: {0}")]
    Unsupported(&'static str),
    #[error("truncated ELF file: {0} extends past the end")]
    Truncated(&'static str),
}

const PT_INTERP: u32 = 3;

fn u16_at(b: &[u8], off: usize, le: bool) -> Option<u16> {
    let s: [u8; 2] = b.get(off..off.checked_add(2)?)?.try_into().ok()?;
    Some(if le {
        u16::from_le_bytes(s)
    } else {
        u16::from_be_bytes(s)
    })
}

fn u32_at(b: &[u8], off: usize, le: bool) -> Option<u32> {
    let s: [u8; 4] = b.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(if le {
        u32::from_le_bytes(s)
    } else {
        u32::from_be_bytes(s)
    })
}

fn u64_at(b: &[u8], off: usize, le: bool) -> Option<u64> {
    let s: [u8; 8] = b.get(off..off.checked_add(8)?)?.try_into().ok()?;
    Some(if le {
        u64::from_le_bytes(s)
    } else {
        u64::from_be_bytes(s)
    })
}

/// Reads an executable's program headers (ELF32 or ELF64, either byte order) and tells
/// whether it needs a program interpreter. Pure: the file's bytes in, a verdict out.
pub fn linkage(bytes: &[u8]) -> Result<Linkage, ElfError> {
    if let Some(rest) = bytes.strip_prefix(b"#!") {
        let line = rest.split(|&c| c == b'\n').next().unwrap_or_default();
        let interpreter = String::from_utf8_lossy(line)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        return Ok(Linkage::Script { interpreter });
    }
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Err(ElfError::NotExecutable);
    }
    let wide = match bytes.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err(ElfError::Unsupported("unknown class")),
    };
    let le = match bytes.get(5) {
        Some(1) => true,
        Some(2) => false,
        _ => return Err(ElfError::Unsupported("unknown byte order")),
    };
    let header = ElfError::Truncated("the header");
    // e_phoff, e_phentsize, e_phnum.
    let (phoff, phentsize, phnum) = if wide {
        (
            u64_at(bytes, 32, le).ok_or(header.clone())?,
            u16_at(bytes, 54, le).ok_or(header.clone())?,
            u16_at(bytes, 56, le).ok_or(header)?,
        )
    } else {
        (
            u64::from(u32_at(bytes, 28, le).ok_or(header.clone())?),
            u16_at(bytes, 42, le).ok_or(header.clone())?,
            u16_at(bytes, 44, le).ok_or(header)?,
        )
    };
    let min = if wide { 56 } else { 32 };
    if phnum > 0 && usize::from(phentsize) < min {
        return Err(ElfError::Unsupported("program header entries too small"));
    }
    let table = ElfError::Truncated("the program header table");
    let phoff = usize::try_from(phoff).map_err(|_| table.clone())?;
    for i in 0..usize::from(phnum) {
        let ph = i
            .checked_mul(usize::from(phentsize))
            .and_then(|o| o.checked_add(phoff))
            .ok_or(table.clone())?;
        // The whole entry must be in the file.
        if ph
            .checked_add(usize::from(phentsize))
            .is_none_or(|end| end > bytes.len())
        {
            return Err(table);
        }
        let p_type = u32_at(bytes, ph, le).ok_or(table.clone())?;
        if p_type != PT_INTERP {
            continue;
        }
        // p_offset and p_filesz of the interpreter's path.
        let (off, size) = if wide {
            (
                u64_at(bytes, ph.saturating_add(8), le),
                u64_at(bytes, ph.saturating_add(32), le),
            )
        } else {
            (
                u32_at(bytes, ph.saturating_add(4), le).map(u64::from),
                u32_at(bytes, ph.saturating_add(16), le).map(u64::from),
            )
        };
        let interp = ElfError::Truncated("the interpreter path");
        let (off, size) = (off.ok_or(table.clone())?, size.ok_or(table.clone())?);
        let start = usize::try_from(off).map_err(|_| interp.clone())?;
        let end = usize::try_from(size)
            .ok()
            .and_then(|s| start.checked_add(s))
            .ok_or(interp.clone())?;
        let path = bytes.get(start..end).ok_or(interp)?;
        let path = path.split(|&c| c == 0).next().unwrap_or_default();
        return Ok(Linkage::Dynamic {
            interpreter: String::from_utf8_lossy(path).into_owned(),
        });
    }
    Ok(Linkage::Static)
}

/// Why a plugin binary was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotRunnable {
    #[error("{0}")]
    Elf(#[from] ElfError),
    #[error(
        "dynamically linked (program interpreter {interpreter}): it needs the libc it was built \
         against on every host; ship the static build (or pass --allow-dynamic-plugin on hosts \
         known to have it)"
    )]
    Dynamic { interpreter: String },
    #[error(
        "a script run by {interpreter}, which the host may not have (pass \
         --allow-dynamic-plugin on hosts known to have it)"
    )]
    Script { interpreter: String },
    #[error("VERSION could not be run: {0}")]
    Exec(String),
    #[error("VERSION did not answer within {0:?}")]
    Timeout(Duration),
    #[error("VERSION failed ({status}): {output}")]
    Failed { status: String, output: String },
    #[error("VERSION answered something that is not a CNI version result: {0}")]
    Answer(String),
}

/// The first check: the plugin's linkage allows it to run on any host (or the operator
/// said that the host has what it needs).
pub fn portable(bytes: &[u8], allow_dynamic: bool) -> Result<Linkage, NotRunnable> {
    let l = linkage(bytes)?;
    match &l {
        Linkage::Static => Ok(l),
        _ if allow_dynamic => Ok(l),
        Linkage::Dynamic { interpreter } => Err(NotRunnable::Dynamic {
            interpreter: interpreter.clone(),
        }),
        Linkage::Script { interpreter } => Err(NotRunnable::Script {
            interpreter: interpreter.clone(),
        }),
    }
}

/// The second check: exec `path` as a runtime would for VERSION (empty environment but
/// `CNI_COMMAND`, the request on stdin) and expect exit 0 with `supportedVersions`.
/// Returns the versions the plugin supports.
pub fn answers_version(path: &Path, timeout: Duration) -> Result<Vec<String>, NotRunnable> {
    let spawn = || {
        Command::new(path)
            .env_clear()
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    // A file just written may still be open for writing in a child forked meanwhile
    // (ETXTBSY); that passes within moments.
    let mut tries = 0;
    let mut child = loop {
        match spawn() {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(26) && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                let hint = if e.kind() == std::io::ErrorKind::NotFound && path.exists() {
                    " (the file exists: its program interpreter is missing)"
                } else if e.kind() == std::io::ErrorKind::PermissionDenied {
                    " (is the directory mounted noexec?)"
                } else {
                    ""
                };
                return Err(NotRunnable::Exec(format!("{e}{hint}")));
            }
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin may exit without reading its stdin.
        let _ = stdin.write_all(br#"{"cniVersion":"1.0.0"}"#);
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NotRunnable::Timeout(timeout));
            }
            Err(e) => return Err(NotRunnable::Exec(e.to_string())),
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    let clip = |s: &str| s.trim().chars().take(300).collect::<String>();
    if !status.success() {
        return Err(NotRunnable::Failed {
            status: status.to_string(),
            output: clip(&format!("{out} {err}")),
        });
    }
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|_| NotRunnable::Answer(clip(&out)))?;
    let versions: Vec<String> = v["supportedVersions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if versions.is_empty() {
        return Err(NotRunnable::Answer(clip(&out)));
    }
    Ok(versions)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 little-endian executable header with one program header of type
    /// `p_type` whose content is `payload` (placed right after the table).
    pub(crate) fn elf64(p_type: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // 64-bit
        b[5] = 1; // little-endian
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&p_type.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes()); // p_filesz
        b.extend(ph);
        b.extend(payload);
        b
    }

    #[test]
    fn linkage_of_each_kind_of_file() {
        let interp = b"/lib64/ld-linux-x86-64.so.2\0";
        let cases: Vec<(&str, Vec<u8>, Result<Linkage, ElfError>)> = vec![
            ("static", elf64(1, b"code"), Ok(Linkage::Static)),
            (
                "dynamic",
                elf64(PT_INTERP, interp),
                Ok(Linkage::Dynamic {
                    interpreter: "/lib64/ld-linux-x86-64.so.2".into(),
                }),
            ),
            (
                "script",
                b"#!/bin/sh -e\necho hi\n".to_vec(),
                Ok(Linkage::Script {
                    interpreter: "/bin/sh".into(),
                }),
            ),
            ("text", b"hello".to_vec(), Err(ElfError::NotExecutable)),
            ("empty", Vec::new(), Err(ElfError::NotExecutable)),
            (
                "header cut",
                elf64(1, b"")[..40].to_vec(),
                Err(ElfError::Truncated("the header")),
            ),
            (
                "table cut",
                elf64(1, b"")[..80].to_vec(),
                Err(ElfError::Truncated("the program header table")),
            ),
            (
                "interpreter past the end",
                elf64(PT_INTERP, interp)[..125].to_vec(),
                Err(ElfError::Truncated("the interpreter path")),
            ),
            (
                "bad class",
                {
                    let mut b = elf64(1, b"");
                    b[4] = 9;
                    b
                },
                Err(ElfError::Unsupported("unknown class")),
            ),
        ];
        for (what, bytes, want) in cases {
            assert_eq!(linkage(&bytes), want, "{what}");
        }
    }

    #[test]
    fn huge_offsets_are_errors_not_panics() {
        let mut b = elf64(PT_INTERP, b"/x\0");
        b[64 + 8..64 + 16].copy_from_slice(&u64::MAX.to_le_bytes()); // p_offset
        assert!(linkage(&b).is_err());
        let mut b = elf64(1, b"");
        b[32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // e_phoff
        assert!(linkage(&b).is_err());
    }

    proptest::proptest! {
        /// Any bytes, and any mutation of a valid header, give a verdict, never a panic.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                        at in 0usize..200, v in proptest::num::u8::ANY) {
            let _ = linkage(&bytes);
            let mut b = elf64(PT_INTERP, b"/lib/ld.so\0");
            if at < b.len() {
                b[at] = v;
            }
            let _ = linkage(&b);
        }
    }

    #[test]
    fn only_static_passes_unless_allowed() {
        assert_eq!(portable(&elf64(1, b""), false), Ok(Linkage::Static));
        let dynamic = elf64(PT_INTERP, b"/lib/ld.so\0");
        assert!(matches!(
            portable(&dynamic, false),
            Err(NotRunnable::Dynamic { interpreter }) if interpreter == "/lib/ld.so"
        ));
        assert!(portable(&dynamic, true).is_ok());
        assert!(matches!(
            portable(b"#!/bin/bash\n", false),
            Err(NotRunnable::Script { .. })
        ));
        assert!(portable(b"#!/bin/bash\n", true).is_ok());
        assert!(portable(b"junk", true).is_err());
    }
}
