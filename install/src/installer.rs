//! Puts the plugin binary and its conflist entry on the node, keeps them there, checks them,
//! and takes them away. Every write is a temporary file in the same directory renamed over
//! the target, so a runtime never reads a half-written configuration or binary.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Map, Value};

use crate::config::{Config, Mode};
use crate::conflist::{self, ConflistError, CONVERTED_FROM_KEY};
use crate::plugin_check::{self, NotRunnable};

/// How long the plugin may take to answer VERSION before it is refused.
const VERSION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Conflist(#[from] ConflistError),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path} (is the host directory mounted read-write?)")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("plugin binary {path} is missing from the image")]
    NoSource {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("our file {own} does not sort before the primary configuration {primary}: the runtime would not use it (choose a smaller --own-file-name)")]
    OwnFileNotFirst { own: String, primary: String },
    #[error("no CNI configuration in {0} yet (is the primary CNI installed?)")]
    NoPrimary(PathBuf),
    #[error("{path}: the plugin is not the last entry of the chain, or its settings differ")]
    NotChained { path: PathBuf },
    #[error("plugin binary {path} is missing or differs from the image's")]
    BinaryMissing { path: PathBuf },
    #[error("plugin binary {path} would not run on this host; not installed")]
    PluginNotRunnable {
        path: PathBuf,
        #[source]
        source: NotRunnable,
    },
}

/// Writes `bytes` to `path` through a hidden temporary file in the same directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    write_checked(path, bytes, mode, |_| Ok(()))
}

/// [`write_atomic`], with `check` run on the complete temporary file before it replaces
/// `path`; a refusal leaves `path` as it was.
fn write_checked(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    check: impl FnOnce(&Path) -> Result<(), InstallError>,
) -> Result<(), InstallError> {
    let wrap = |source| InstallError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.ambient-tmp.{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()
    })();
    let result = written
        .map_err(wrap)
        .and_then(|()| check(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(wrap));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn read(path: &Path) -> Result<Vec<u8>, InstallError> {
    std::fs::read(path).map_err(|source| InstallError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The permission bits of an existing file, to keep them when we rewrite it (0644 otherwise).
fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644)
}

fn remove_if_present(path: &Path) -> Result<bool, InstallError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(InstallError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

/// What one pass of [`Installer::ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    pub binary_written: bool,
    pub chain: ChainState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainState {
    /// No configuration file yet: the primary CNI has not written one.
    WaitingForPrimary,
    /// The configuration already carries the plugin.
    Unchanged(PathBuf),
    /// We wrote the plugin into this file (first install, or a repair).
    Written(PathBuf),
}

/// What [`Installer::uninstall`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    pub restored: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
}

/// Identity of the binary file we last wrote or verified, to notice replacement cheaply.
type FileId = (u64, u64, u64, i64);

fn file_id(m: &std::fs::Metadata) -> FileId {
    (
        m.dev(),
        m.ino(),
        m.len(),
        m.mtime_nsec() + m.mtime() * 1_000_000_000,
    )
}

pub struct Installer {
    cfg: Config,
    entry: Map<String, Value>,
    binary_seen: Option<FileId>,
    repairs: VecDeque<Instant>,
    installed_once: bool,
}

impl Installer {
    pub fn new(cfg: Config) -> Self {
        let entry = cfg.plugin.entry();
        Self {
            cfg,
            entry,
            binary_seen: None,
            repairs: VecDeque::new(),
            installed_once: false,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Copies the plugin binary unless the host already has this exact file.
    pub fn ensure_binary(&mut self) -> Result<bool, InstallError> {
        let dest = self.cfg.plugin_dest();
        if let (Ok(m), Some(seen)) = (std::fs::metadata(&dest), self.binary_seen) {
            if file_id(&m) == seen {
                return Ok(false);
            }
        }
        let src =
            std::fs::read(&self.cfg.plugin_source).map_err(|source| InstallError::NoSource {
                path: self.cfg.plugin_source.clone(),
                source,
            })?;
        // Refused before anything on the host changes: a plugin the runtime cannot exec
        // fails every pod's ADD on the node, kube-system's included.
        let refused = |path: &Path, source| InstallError::PluginNotRunnable {
            path: path.to_owned(),
            source,
        };
        plugin_check::portable(&src, self.cfg.allow_dynamic_plugin)
            .map_err(|e| refused(&self.cfg.plugin_source, e))?;
        // Exec'd from the host's directory, as the runtime will (a noexec mount, another
        // architecture, a broken copy show here).
        let runs = |path: &Path| {
            plugin_check::answers_version(path, VERSION_TIMEOUT)
                .map(drop)
                .map_err(|e| refused(&dest, e))
        };
        let same = std::fs::read(&dest).map(|d| d == src).unwrap_or(false);
        if same {
            runs(&dest)?;
        } else {
            write_checked(&dest, &src, 0o755, runs)?;
        }
        self.binary_seen = std::fs::metadata(&dest).ok().map(|m| file_id(&m));
        Ok(!same)
    }

    fn own_name(&self) -> &str {
        &self.cfg.own_file_name
    }

    /// The document the runtime should read, and where, given the primary file's content.
    fn desired(
        &self,
        primary: &Path,
        doc: &Map<String, Value>,
    ) -> Result<(PathBuf, Map<String, Value>), InstallError> {
        match self.cfg.mode {
            Mode::Chain => {
                let out = conflist::with_entry(primary, doc, &self.entry)?;
                Ok((conflist::chain_name(primary, doc), out))
            }
            Mode::OwnFile => {
                // A leftover entry from chain mode would put the plugin in twice.
                let base = match conflist::without_entry(primary, doc)? {
                    Some(r) => r.doc,
                    None => doc.clone(),
                };
                let mut out = conflist::with_entry(primary, &base, &self.entry)?;
                if let Some(Value::Array(list)) = out.get_mut("plugins") {
                    if let Some(Value::Object(last)) = list.last_mut() {
                        last.remove(CONVERTED_FROM_KEY);
                    }
                }
                let own = self.own_name().to_owned();
                let primary_name = primary
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if own >= primary_name {
                    return Err(InstallError::OwnFileNotFirst {
                        own,
                        primary: primary_name,
                    });
                }
                Ok((self.cfg.cni_conf_dir.join(own), out))
            }
        }
    }

    fn primary(&self) -> Result<Option<PathBuf>, InstallError> {
        // Our own file is never the primary, in either mode.
        Ok(conflist::find_primary(
            &self.cfg.cni_conf_dir,
            Some(self.own_name()),
        )?)
    }

    /// Whether the runtime's configuration already carries the plugin as wanted.
    fn in_place(&self, primary: &Path, doc: &Map<String, Value>) -> Result<bool, InstallError> {
        match self.cfg.mode {
            Mode::Chain => Ok(conflist::has_entry_last(doc, &self.entry)),
            Mode::OwnFile => {
                let (path, want) = self.desired(primary, doc)?;
                let have = std::fs::read(&path).ok();
                Ok(have.is_some_and(|h| conflist::parse(&path, &h).is_ok_and(|m| m == want)))
            }
        }
    }

    /// One pass: the binary, then the configuration. Idempotent; writes only what differs.
    pub fn ensure(&mut self) -> Result<Pass, InstallError> {
        let binary_written = self.ensure_binary()?;
        let dir = self.cfg.cni_conf_dir.clone();
        if self.cfg.mode == Mode::Chain {
            // A file left by an earlier own-file install would shadow the primary.
            if remove_if_present(&dir.join(self.own_name()))? {
                tracing::info!(file = %self.own_name(), "removed the own-file configuration (now in chain mode)");
            }
        }
        let Some(primary) = self.primary()? else {
            return Ok(Pass {
                binary_written,
                chain: ChainState::WaitingForPrimary,
            });
        };
        let doc = conflist::parse(&primary, &read(&primary)?)?;
        if self.in_place(&primary, &doc)? {
            self.installed_once = true;
            return Ok(Pass {
                binary_written,
                chain: ChainState::Unchanged(primary),
            });
        }
        let (target, out) = self.desired(&primary, &doc)?;
        write_atomic(&target, &conflist::render(&out), mode_of(&primary))?;
        if self.cfg.mode == Mode::Chain && target != primary {
            // A converted single-plugin file: the chain replaces it (it would sort first).
            remove_if_present(&primary)?;
        }
        if self.installed_once {
            self.note_repair(&target);
        }
        self.installed_once = true;
        Ok(Pass {
            binary_written,
            chain: ChainState::Written(target),
        })
    }

    fn note_repair(&mut self, path: &Path) {
        let now = Instant::now();
        self.repairs.push_back(now);
        while self
            .repairs
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.cfg.repair_window)
        {
            self.repairs.pop_front();
        }
        tracing::warn!(file = %path.display(), "the plugin was missing from the CNI configuration; put it back");
        if self.repairs.len() >= self.cfg.repair_alarm {
            tracing::error!(
                file = %path.display(),
                repairs = self.repairs.len(),
                window = ?self.cfg.repair_window,
                "the primary CNI keeps rewriting its configuration; consider AMBIENT_CNI_MODE=own-file"
            );
        }
    }

    /// Repairs within the current window (what `ready` and the logs report).
    pub fn recent_repairs(&self) -> usize {
        self.repairs.len()
    }

    /// Read-only check behind readiness: binary present and equal to the image's, and the
    /// runtime's configuration carries the plugin as wanted.
    pub fn check(&self) -> Result<PathBuf, InstallError> {
        let dest = self.cfg.plugin_dest();
        let src =
            std::fs::read(&self.cfg.plugin_source).map_err(|source| InstallError::NoSource {
                path: self.cfg.plugin_source.clone(),
                source,
            })?;
        if std::fs::read(&dest).ok().as_deref() != Some(&src[..]) {
            return Err(InstallError::BinaryMissing { path: dest });
        }
        let primary = self
            .primary()?
            .ok_or_else(|| InstallError::NoPrimary(self.cfg.cni_conf_dir.clone()))?;
        let doc = conflist::parse(&primary, &read(&primary)?)?;
        if self.in_place(&primary, &doc)? {
            Ok(match self.cfg.mode {
                Mode::Chain => primary,
                Mode::OwnFile => self.cfg.cni_conf_dir.join(self.own_name()),
            })
        } else {
            Err(InstallError::NotChained { path: primary })
        }
    }

    /// Removes our entry from every configuration file (writing converted files back as the
    /// single plugin they were), our own file, and the binary.
    pub fn uninstall(&self) -> Result<Removal, InstallError> {
        let mut out = Removal::default();
        let dir = &self.cfg.cni_conf_dir;
        let own = dir.join(self.own_name());
        if remove_if_present(&own)? {
            out.removed.push(own);
        }
        for path in conflist::config_files(dir, Some(self.own_name()))? {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            // A file we cannot parse is not one we wrote into: leave it.
            let Ok(doc) = conflist::parse(&path, &bytes) else {
                continue;
            };
            let Some(removed) = conflist::without_entry(&path, &doc)? else {
                continue;
            };
            match removed.restore_as {
                Some(name) => {
                    let original = dir.join(&name);
                    write_atomic(&original, &conflist::render(&removed.doc), mode_of(&path))?;
                    if original != path {
                        remove_if_present(&path)?;
                    }
                    out.restored.push(original);
                }
                None => {
                    write_atomic(&path, &conflist::render(&removed.doc), mode_of(&path))?;
                    out.restored.push(path);
                }
            }
        }
        let bin = self.cfg.plugin_dest();
        if remove_if_present(&bin)? {
            out.removed.push(bin);
        }
        Ok(out)
    }
}
