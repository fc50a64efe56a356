//! `CNI_ARGS`: a `;`-separated list of `KEY=VALUE` pairs, in any order. The keys the
//! Kubernetes runtimes send are kept; every other key is ignored (whatever `IgnoreUnknown`
//! says, because this plugin is last in a chain it does not own).

use ambient_common::agent_api::PodRef;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("CNI_ARGS pair {pair:?} is not KEY=VALUE")]
    Malformed { pair: String },
    #[error("CNI_ARGS gives {key} twice")]
    Duplicate { key: String },
}

/// The keys of `CNI_ARGS` this plugin understands. Empty values count as absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub ignore_unknown: bool,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub infra_container_id: Option<String>,
}

impl CniArgs {
    /// The Kubernetes pod, when both its namespace and name were given. Runtimes that are not
    /// Kubernetes (podman sends only `K8S_POD_NAME`) yield `None`.
    pub fn pod(&self) -> Option<PodRef> {
        Some(PodRef {
            namespace: self.pod_namespace.clone()?,
            name: self.pod_name.clone()?,
            uid: self.pod_uid.clone(),
        })
    }
}

/// Parses `CNI_ARGS`. Empty segments (a trailing `;`) are skipped; a pair without `=` or with
/// an empty key is an error, and so is a known key given twice.
pub fn parse_cni_args(s: &str) -> Result<CniArgs, ArgsError> {
    let mut args = CniArgs::default();
    for pair in s.split(';') {
        if pair.is_empty() {
            continue;
        }
        let Some((key, value)) = pair.split_once('=') else {
            return Err(ArgsError::Malformed { pair: pair.into() });
        };
        if key.is_empty() {
            return Err(ArgsError::Malformed { pair: pair.into() });
        }
        let slot = match key {
            "IgnoreUnknown" => {
                args.ignore_unknown = matches!(value, "1" | "true" | "True" | "TRUE");
                continue;
            }
            "K8S_POD_NAMESPACE" => &mut args.pod_namespace,
            "K8S_POD_NAME" => &mut args.pod_name,
            "K8S_POD_UID" => &mut args.pod_uid,
            "K8S_POD_INFRA_CONTAINER_ID" => &mut args.infra_container_id,
            _ => continue,
        };
        if slot.is_some() {
            return Err(ArgsError::Duplicate { key: key.into() });
        }
        if !value.is_empty() {
            *slot = Some(value.to_owned());
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CONTAINERD: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=e2e-ns;K8S_POD_NAME=e2e-pod-3542;K8S_POD_INFRA_CONTAINER_ID=822df9e2;K8S_POD_UID=42e71882-08fe";

    #[test]
    fn parses_containerd_args() {
        let a = parse_cni_args(CONTAINERD).unwrap();
        assert!(a.ignore_unknown);
        let pod = a.pod().unwrap();
        assert_eq!(pod.namespace, "e2e-ns");
        assert_eq!(pod.name, "e2e-pod-3542");
        assert_eq!(pod.uid.as_deref(), Some("42e71882-08fe"));
        assert_eq!(a.infra_container_id.as_deref(), Some("822df9e2"));
    }

    #[test]
    fn order_does_not_matter() {
        let mut pairs: Vec<&str> = CONTAINERD.split(';').collect();
        let want = parse_cni_args(CONTAINERD).unwrap();
        for _ in 0..pairs.len() {
            pairs.rotate_left(1);
            assert_eq!(parse_cni_args(&pairs.join(";")).unwrap(), want);
        }
        pairs.reverse();
        assert_eq!(parse_cni_args(&pairs.join(";")).unwrap(), want);
    }

    #[test]
    fn podman_args_are_not_a_kubernetes_pod() {
        let a = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=hpod1").unwrap();
        assert_eq!(a.pod_name.as_deref(), Some("hpod1"));
        assert_eq!(a.pod(), None);
    }

    #[test]
    fn unknown_keys_and_empty_segments_are_ignored() {
        let a = parse_cni_args(";FOO=bar;K8S_POD_NAMESPACE=ns;;K8S_POD_NAME=p;X=a=b;").unwrap();
        assert_eq!(a.pod().unwrap().name, "p");
        assert_eq!(parse_cni_args("").unwrap(), CniArgs::default());
    }

    #[test]
    fn empty_values_count_as_absent() {
        let a = parse_cni_args("K8S_POD_NAMESPACE=;K8S_POD_NAME=p").unwrap();
        assert_eq!(a.pod(), None);
    }

    #[test]
    fn malformed_pairs_are_named() {
        assert_eq!(
            parse_cni_args("K8S_POD_NAME=p;garbage").unwrap_err(),
            ArgsError::Malformed {
                pair: "garbage".into()
            }
        );
        assert!(matches!(
            parse_cni_args("=v").unwrap_err(),
            ArgsError::Malformed { .. }
        ));
        assert_eq!(
            parse_cni_args("K8S_POD_NAME=a;K8S_POD_NAME=b").unwrap_err(),
            ArgsError::Duplicate {
                key: "K8S_POD_NAME".into()
            }
        );
        let msg = parse_cni_args("a;b").unwrap_err().to_string();
        assert!(msg.contains("\"a\""), "{msg}");
    }

    #[test]
    fn every_prefix_parses_or_fails_cleanly() {
        for end in 0..=CONTAINERD.len() {
            let _ = parse_cni_args(&CONTAINERD[..end]);
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in ".*") {
            let _ = parse_cni_args(&s);
        }

        #[test]
        fn known_keys_round_trip_in_any_order(
            ns in "[a-z0-9-]{1,20}",
            name in "[a-z0-9.-]{1,30}",
            uid in "[a-f0-9-]{1,36}",
            junk in proptest::collection::vec("[A-Z_]{1,8}=[^;]{0,8}", 0..4),
            seed in any::<u64>(),
        ) {
            let mut pairs = vec![
                format!("K8S_POD_NAMESPACE={ns}"),
                format!("K8S_POD_NAME={name}"),
                format!("K8S_POD_UID={uid}"),
            ];
            pairs.extend(junk.into_iter().filter(|p| !p.starts_with("K8S_POD") && !p.starts_with("IgnoreUnknown")));
            let n = pairs.len();
            pairs.rotate_left((seed as usize) % n);
            let a = parse_cni_args(&pairs.join(";")).unwrap();
            let pod = a.pod().unwrap();
            prop_assert_eq!(pod.namespace, ns);
            prop_assert_eq!(pod.name, name);
            prop_assert_eq!(pod.uid, Some(uid));
        }
    }
}
