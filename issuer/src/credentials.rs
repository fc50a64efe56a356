//! `ambient-issuer credential add`: mints a bearer token for the credentials file that the
//! issuer's `--source manifests` mode authenticates against (labs and clusters without a
//! Kubernetes API). Only the token's SHA-256 is stored; the token goes to one file, mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ambient_common::duration::parse_duration;
use clap::Args;

use crate::auth::{token_hash, Credential, CredentialFile};
use crate::authz::ServiceAccount;

#[derive(Debug, Clone, Args)]
pub struct AddArgs {
    /// The credentials file (created if missing).
    #[arg(long)]
    pub file: PathBuf,
    /// Where the new token is written (mode 0600).
    #[arg(long)]
    pub token_out: PathBuf,
    /// `namespace/name` the token authenticates as.
    #[arg(long, default_value = ambient_common::constants::ZTUNNEL_SERVICE_ACCOUNT)]
    pub service_account: String,
    /// The node this credential belongs to (a node proxy's credential).
    #[arg(long)]
    pub node: Option<String>,
    /// `namespace/name` of the pod the token is bound to (a workload's credential).
    #[arg(long)]
    pub pod: Option<String>,
    #[arg(long = "audience", default_values_t = [String::from(ambient_common::ca_api::TOKEN_AUDIENCE)])]
    pub audiences: Vec<String>,
    /// Lifetime; none: until removed from the file.
    #[arg(long, value_parser = parse_duration)]
    pub expires_in: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("--service-account {0:?}: want namespace/name")]
    ServiceAccount(String),
    #[error("--pod {0:?}: want namespace/name")]
    Pod(String),
    #[error("a credential needs --node or --pod")]
    Unbound,
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a credentials file")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<ambient_common::yaml::Error>,
    },
    #[error("cannot write {path}")]
    Encode {
        path: PathBuf,
        #[source]
        source: ambient_common::yaml::SerializeError,
    },
    #[error("no randomness for the token")]
    Random,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CredentialError + '_ {
    move |source| CredentialError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Mints a token, appends its credential to the file (rewritten atomically), writes the token.
pub fn add(a: &AddArgs) -> Result<(), CredentialError> {
    if ServiceAccount::parse(&a.service_account).is_none() {
        return Err(CredentialError::ServiceAccount(a.service_account.clone()));
    }
    if let Some(p) = &a.pod {
        if ServiceAccount::parse(p).is_none() {
            return Err(CredentialError::Pod(p.clone()));
        }
    }
    if a.node.is_none() && a.pod.is_none() {
        return Err(CredentialError::Unbound);
    }
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| CredentialError::Random)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = match std::fs::read_to_string(&a.file) {
        Ok(text) => ambient_common::yaml::from_str::<CredentialFile>(&text).map_err(|source| {
            CredentialError::Parse {
                path: a.file.clone(),
                source: Box::new(source),
            }
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => CredentialFile::default(),
        Err(e) => return Err(io(&a.file)(e)),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    file.credentials.push(Credential {
        sha256: token_hash(&token),
        service_account: a.service_account.clone(),
        pod: a.pod.clone(),
        pod_uid: None,
        node: a.node.clone(),
        audiences: a.audiences.clone(),
        expires_unix: a.expires_in.map(|d| now + d.as_secs()),
    });
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&a.token_out)
        .map_err(io(&a.token_out))?;
    out.write_all(token.as_bytes()).map_err(io(&a.token_out))?;
    let text =
        ambient_common::yaml::to_string(&file).map_err(|source| CredentialError::Encode {
            path: a.file.clone(),
            source,
        })?;
    let tmp = a.file.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &a.file).map_err(io(&a.file))?;
    Ok(())
}
