//! Who is calling: a bearer token turned into a [`Caller`]. In a cluster the Kubernetes API
//! says (TokenReview, with the audience the issuer requires); in the lab a credentials file
//! written by the lab says, with the same checks (audience, expiry) done here.

use ambient_common::sync::Mutex;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use serde::{Deserialize, Serialize};

use crate::authz::{BoundPod, Caller, ServiceAccount};

/// The token review's extra keys for a token bound to a pod.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token in the request's authorization header")]
    Missing,
    #[error("the token was not accepted: {0}")]
    Rejected(String),
    #[error("the token is not meant for audience {0}")]
    Audience(String),
    #[error("the token expired")]
    Expired,
    #[error("the token does not name a service account ({0})")]
    NotServiceAccount(String),
    #[error("the credential store cannot be read: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "no_token",
            AuthError::Rejected(_) => "token_rejected",
            AuthError::Audience(_) => "token_audience",
            AuthError::Expired => "token_expired",
            AuthError::NotServiceAccount(_) => "not_service_account",
            AuthError::Unavailable(_) => "authenticator_unavailable",
        }
    }
}

pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>>;

/// Turns a bearer token into the caller it proves.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a>;
}

/// The token of an `authorization: Bearer <token>` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let v = header.ok_or(AuthError::Missing)?;
    let (scheme, token) = v.trim().split_once(' ').ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token.trim())
}

/// Kubernetes: one TokenReview per request, for the required audience.
pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audience: &str) -> Self {
        Self {
            client,
            audience: audience.to_owned(),
        }
    }
}

/// The caller a successful token review names.
pub fn caller_from_review(review: &TokenReview, audience: &str) -> Result<Caller, AuthError> {
    let status = review
        .status
        .as_ref()
        .ok_or_else(|| AuthError::Rejected("the review has no status".into()))?;
    if status.authenticated != Some(true) {
        return Err(AuthError::Rejected(
            status
                .error
                .clone()
                .unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    // An API server that ignores the requested audiences answers without them; only an
    // explicit match counts.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|x| x == audience))
    {
        return Err(AuthError::Audience(audience.to_owned()));
    }
    let user = status
        .user
        .as_ref()
        .ok_or_else(|| AuthError::Rejected("the review names no user".into()))?;
    let username = user.username.clone().unwrap_or_default();
    let sa = ServiceAccount::from_username(&username)
        .ok_or_else(|| AuthError::NotServiceAccount(username.clone()))?;
    let extra = |k: &str| {
        user.extra
            .as_ref()
            .and_then(|e| e.get(k))
            .and_then(|v| v.first())
            .filter(|s| !s.is_empty())
            .cloned()
    };
    let pod = extra(EXTRA_POD_NAME).map(|name| BoundPod {
        namespace: sa.namespace.clone(),
        name,
        uid: extra(EXTRA_POD_UID),
    });
    Ok(Caller {
        service_account: sa,
        pod,
        node: extra(EXTRA_NODE_NAME),
    })
}

impl Authenticator for TokenReviewer {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_owned()),
                    audiences: Some(vec![self.audience.clone()]),
                },
                ..Default::default()
            };
            let api = kube::Api::<TokenReview>::all(self.client.clone());
            let done = api
                .create(&kube::api::PostParams::default(), &review)
                .await
                .map_err(|e| AuthError::Unavailable(format!("TokenReview failed: {e}")))?;
            caller_from_review(&done, &self.audience)
        })
    }
}

/// One lab credential: what a token proves, stored by the SHA-256 of the token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credential {
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// `namespace/name`.
    pub service_account: String,
    /// `namespace/name` of the pod the token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The node a node credential belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub audiences: Vec<String>,
    /// Unix seconds after which the token is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CredentialFile {
    pub credentials: Vec<Credential>,
}

/// Hex SHA-256 of a token, as the credentials file stores it.
pub fn token_hash(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a token against the credentials; pure (the clock is an argument).
pub fn check_credential(
    file: &CredentialFile,
    token: &str,
    audience: &str,
    now_unix: u64,
) -> Result<Caller, AuthError> {
    let hash = token_hash(token);
    let c = file
        .credentials
        .iter()
        .find(|c| c.sha256.eq_ignore_ascii_case(&hash))
        .ok_or_else(|| AuthError::Rejected("unknown token".into()))?;
    if !c.audiences.iter().any(|a| a == audience) {
        return Err(AuthError::Audience(audience.to_owned()));
    }
    if c.expires_unix.is_some_and(|e| now_unix >= e) {
        return Err(AuthError::Expired);
    }
    let sa = ServiceAccount::parse(&c.service_account)
        .ok_or_else(|| AuthError::NotServiceAccount(c.service_account.clone()))?;
    let pod = match &c.pod {
        Some(p) => {
            let (ns, name) = p.split_once('/').ok_or_else(|| {
                AuthError::Rejected(format!("credential pod {p:?} is not namespace/name"))
            })?;
            Some(BoundPod {
                namespace: ns.to_owned(),
                name: name.to_owned(),
                uid: c.pod_uid.clone(),
            })
        }
        None => None,
    };
    Ok(Caller {
        service_account: sa,
        pod,
        node: c.node.clone(),
    })
}

/// The lab's credentials file, re-read when it changes.
pub struct CredentialsFile {
    path: PathBuf,
    audience: String,
    cache: Mutex<Option<(SystemTime, CredentialFile)>>,
}

impl CredentialsFile {
    pub fn new(path: &Path, audience: &str) -> Self {
        Self {
            path: path.to_owned(),
            audience: audience.to_owned(),
            cache: Mutex::new(None),
        }
    }

    fn load(&self) -> Result<CredentialFile, AuthError> {
        let unavailable =
            |e: String| AuthError::Unavailable(format!("{}: {e}", self.path.display()));
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(|e| unavailable(e.to_string()))?;
        let mut cache = self.cache.lock();
        if let Some((t, f)) = cache.as_ref() {
            if *t == mtime {
                return Ok(f.clone());
            }
        }
        let text = std::fs::read_to_string(&self.path).map_err(|e| unavailable(e.to_string()))?;
        let file: CredentialFile =
            ambient_common::yaml::from_str(&text).map_err(|e| unavailable(e.to_string()))?;
        *cache = Some((mtime, file.clone()));
        Ok(file)
    }
}

impl Authenticator for CredentialsFile {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let file = self.load()?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            check_credential(&file, token, &self.audience, now)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
    use std::collections::BTreeMap;

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Ok("abc"));
        for bad in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer  "),
            Some("Basic abc"),
        ] {
            assert_eq!(bearer(bad), Err(AuthError::Missing), "{bad:?}");
        }
    }

    fn cred(token: &str) -> Credential {
        Credential {
            sha256: token_hash(token),
            service_account: "istio-system/ztunnel".into(),
            pod: None,
            pod_uid: None,
            node: Some("node-a".into()),
            audiences: vec!["istio-ca".into()],
            expires_unix: Some(1000),
        }
    }

    #[test]
    fn credentials_check_audience_and_expiry() {
        let mut wrong_aud = cred("t2");
        wrong_aud.audiences = vec!["kube-apiserver".into()];
        let mut bound = cred("t3");
        bound.service_account = "shop/web".into();
        bound.pod = Some("shop/web-1".into());
        bound.node = None;
        let f = CredentialFile {
            credentials: vec![cred("t1"), wrong_aud, bound],
        };
        let c = check_credential(&f, "t1", "istio-ca", 999).unwrap();
        assert_eq!(c.node.as_deref(), Some("node-a"));
        assert_eq!(
            check_credential(&f, "t1", "istio-ca", 1000),
            Err(AuthError::Expired)
        );
        assert!(matches!(
            check_credential(&f, "nope", "istio-ca", 1),
            Err(AuthError::Rejected(_))
        ));
        assert!(matches!(
            check_credential(&f, "t2", "istio-ca", 1),
            Err(AuthError::Audience(_))
        ));
        let c = check_credential(&f, "t3", "istio-ca", 1).unwrap();
        assert_eq!(c.pod.unwrap().name, "web-1");
    }

    fn review(
        authenticated: bool,
        audiences: Option<Vec<&str>>,
        user: &str,
        extra: &[(&str, &str)],
    ) -> TokenReview {
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                audiences: audiences.map(|a| a.into_iter().map(Into::into).collect()),
                user: Some(UserInfo {
                    username: Some(user.into()),
                    extra: Some(
                        extra
                            .iter()
                            .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                            .collect::<BTreeMap<_, _>>(),
                    ),
                    ..Default::default()
                }),
                error: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn token_reviews() {
        let sa = "system:serviceaccount:istio-system:ztunnel";
        let ok = review(
            true,
            Some(vec!["istio-ca"]),
            sa,
            &[
                (EXTRA_POD_NAME, "zt-1"),
                (EXTRA_POD_UID, "u1"),
                (EXTRA_NODE_NAME, "node-a"),
            ],
        );
        let c = caller_from_review(&ok, "istio-ca").unwrap();
        assert_eq!(
            c.service_account,
            ServiceAccount::new("istio-system", "ztunnel")
        );
        assert_eq!(c.pod.as_ref().unwrap().uid.as_deref(), Some("u1"));
        assert_eq!(c.node.as_deref(), Some("node-a"));
        assert!(matches!(
            caller_from_review(&review(false, Some(vec!["istio-ca"]), sa, &[]), "istio-ca"),
            Err(AuthError::Rejected(_))
        ));
        assert!(matches!(
            caller_from_review(&review(true, None, sa, &[]), "istio-ca"),
            Err(AuthError::Audience(_))
        ));
        assert!(matches!(
            caller_from_review(&review(true, Some(vec!["api"]), sa, &[]), "istio-ca"),
            Err(AuthError::Audience(_))
        ));
        assert!(matches!(
            caller_from_review(
                &review(true, Some(vec!["istio-ca"]), "alice", &[]),
                "istio-ca"
            ),
            Err(AuthError::NotServiceAccount(_))
        ));
    }
}
