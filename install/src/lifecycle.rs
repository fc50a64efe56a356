//! Uninstall or upgrade? When the installer is told to stop, it asks the API server about
//! the DaemonSet that runs it:
//! - gone (404) or carrying a `deletionTimestamp`: the operator is removing the data plane;
//! - 401 or 403: our service account or its Role is gone, which happens only when the
//!   install itself is being deleted (`kubectl delete -k` removes the namespace, the
//!   service account and the RBAC together, in no guaranteed order);
//!
//! in those cases the plugin comes out of the chain. Anything else (the DaemonSet is there: a
//! rolling upgrade or a restart; or the API is unreachable, slow or failing) leaves the plugin
//! in place, so new pods wait for the next agent instead of starting unprotected.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;

pub use ambient_kube_watch::{client, ApiCall, ClientError};

/// Every API call of this crate (granted by a Role in the install namespace).
pub const API_CALLS: &[ApiCall] = &[ApiCall::new("apps", "daemonsets", "get")];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitDecision {
    Uninstall(String),
    Keep(String),
}

/// The decision for what a GET of the DaemonSet returned.
pub fn decide(result: Result<DaemonSet, kube::Error>) -> ExitDecision {
    match result {
        Ok(ds) if ds.metadata.deletion_timestamp.is_some() => {
            ExitDecision::Uninstall("the DaemonSet is being deleted".into())
        }
        Ok(_) => ExitDecision::Keep("the DaemonSet still exists (upgrade or restart)".into()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            ExitDecision::Uninstall("the DaemonSet is gone".into())
        }
        Err(kube::Error::Api(s)) if s.code == 401 || s.code == 403 => {
            ExitDecision::Uninstall(format!(
                "our service account or its Role is gone ({}): the install is being deleted",
                s.code
            ))
        }
        Err(e) => ExitDecision::Keep(format!(
            "cannot tell whether the DaemonSet is being deleted ({e}); leaving the plugin in place"
        )),
    }
}

/// Asks the API server, bounded by `timeout` (a stopping pod has a grace period).
pub async fn daemonset_decision(
    client: kube::Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> ExitDecision {
    let api: kube::Api<DaemonSet> = kube::Api::namespaced(client, namespace);
    match tokio::time::timeout(timeout, api.get(name)).await {
        Ok(r) => decide(r),
        Err(_) => ExitDecision::Keep(format!(
            "the API server did not answer within {timeout:?}; leaving the plugin in place"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> kube::Error {
        let mut s = kube::core::Status::failure("x", "y");
        s.code = code;
        kube::Error::Api(Box::new(s))
    }

    #[test]
    fn only_a_deleted_daemonset_uninstalls() {
        assert!(matches!(
            decide(Err(status(404))),
            ExitDecision::Uninstall(_)
        ));
        let mut ds = DaemonSet::default();
        assert!(matches!(decide(Ok(ds.clone())), ExitDecision::Keep(_)));
        ds.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert!(matches!(decide(Ok(ds)), ExitDecision::Uninstall(_)));
        for code in [401, 403] {
            assert!(
                matches!(decide(Err(status(code))), ExitDecision::Uninstall(_)),
                "{code}"
            );
        }
        for code in [409, 429, 500, 503] {
            assert!(
                matches!(decide(Err(status(code))), ExitDecision::Keep(_)),
                "{code}"
            );
        }
    }
}
