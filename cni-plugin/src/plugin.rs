//! The commands: what each one asks the agent and prints. Pure of I/O except through the
//! [`AgentClient`] and [`HostLinks`] it is given; returns what `main` should print.

use std::io::Read;
use std::path::Path;

use ambient_common::agent_api::{
    AgentOp, AgentReply, AgentRequest, Attachment, AttachmentKey, AttachmentRef, PodRef,
};
use serde_json::{json, Value};
use tracing::{debug, info, info_span, warn};

use crate::agent::{AgentCallError, AgentClient};
use crate::args::CniArgs;
use crate::config::{parse_netconf, NetConf, PluginConfig, UnreachablePolicy};
use crate::discovery::{host_interface, HostLinks};
use crate::env::{parse_env, AttachmentEnv, CniEnv, Command, EnvError};
use crate::error::{chain, PluginError, MAX_STDIN};
use crate::result::PrevResult;
use crate::version::CniVersion;

/// One parsed invocation: the command with what it needs (VERSION reads no configuration).
#[derive(Debug, Clone)]
pub enum Invocation {
    Version,
    Add { att: AttachmentEnv, conf: NetConf },
    Check { att: AttachmentEnv, conf: NetConf },
    Del { att: AttachmentEnv, conf: NetConf },
    Status { conf: NetConf },
    Gc { conf: NetConf },
}

impl Invocation {
    pub fn command(&self) -> Command {
        match self {
            Invocation::Version => Command::Version,
            Invocation::Add { .. } => Command::Add,
            Invocation::Check { .. } => Command::Check,
            Invocation::Del { .. } => Command::Del,
            Invocation::Status { .. } => Command::Status,
            Invocation::Gc { .. } => Command::Gc,
        }
    }

    pub fn conf(&self) -> Option<&NetConf> {
        match self {
            Invocation::Version => None,
            Invocation::Add { conf, .. }
            | Invocation::Check { conf, .. }
            | Invocation::Del { conf, .. }
            | Invocation::Status { conf }
            | Invocation::Gc { conf } => Some(conf),
        }
    }

    fn attachment(&self) -> Option<&AttachmentEnv> {
        match self {
            Invocation::Add { att, .. }
            | Invocation::Check { att, .. }
            | Invocation::Del { att, .. } => Some(att),
            _ => None,
        }
    }

    /// The plugin's configuration (defaults for VERSION, which reads none).
    pub fn plugin_config(&self) -> PluginConfig {
        self.conf().map(|c| c.plugin.clone()).unwrap_or_default()
    }

    /// The version responses are written at.
    pub fn response_version(&self) -> CniVersion {
        self.conf().map_or(CniVersion::LATEST, |c| c.cni_version)
    }
}

/// What `main` prints on success.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Print(Value),
    Nothing,
}

/// Reads stdin up to [`MAX_STDIN`] bytes.
pub fn read_stdin(mut r: impl Read) -> Result<Vec<u8>, PluginError> {
    let mut buf = Vec::new();
    (&mut r)
        .take(MAX_STDIN + 1)
        .read_to_end(&mut buf)
        .map_err(PluginError::StdinRead)?;
    if buf.len() as u64 > MAX_STDIN {
        return Err(PluginError::StdinTooLarge);
    }
    Ok(buf)
}

/// Parses the environment (through `get`) and stdin. VERSION reads no configuration.
pub fn parse_invocation(
    get: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Invocation, PluginError> {
    let CniEnv {
        command,
        attachment,
    } = parse_env(get)?;
    if command == Command::Version {
        return Ok(Invocation::Version);
    }
    let conf = parse_netconf(stdin)?;
    let floor = match command {
        Command::Check => Some(CniVersion::V0_4_0),
        Command::Status | Command::Gc => Some(CniVersion::V1_1_0),
        _ => None,
    };
    if let Some(since) = floor.filter(|since| conf.cni_version < *since) {
        return Err(PluginError::NotInVersion {
            command,
            version: conf.cni_version,
            since,
        });
    }
    // parse_env returns the attachment variables for exactly these three commands.
    let att = || attachment.ok_or(EnvError::Missing("CNI_CONTAINERID"));
    Ok(match command {
        Command::Add => Invocation::Add { att: att()?, conf },
        Command::Check => Invocation::Check { att: att()?, conf },
        Command::Del => Invocation::Del { att: att()?, conf },
        Command::Status => Invocation::Status { conf },
        Command::Gc => Invocation::Gc { conf },
        Command::Version => Invocation::Version,
    })
}

/// Runs the invocation.
pub fn execute(
    inv: &Invocation,
    agent: &dyn AgentClient,
    links: &dyn HostLinks,
) -> Result<Output, PluginError> {
    let att = inv.attachment();
    let span = info_span!(
        "cni",
        command = %inv.command(),
        container_id = att.map(|a| a.container_id.as_str()),
        ifname = att.map(|a| a.ifname.as_str()),
        pod = att.and_then(|a| pod_label(&a.args)).as_deref(),
    );
    let _enter = span.enter();
    if let Some(conf) = inv.conf() {
        debug!(config = ?conf.plugin, cni_version = %conf.cni_version, "effective configuration");
    }
    match inv {
        Invocation::Version => Ok(version()),
        Invocation::Add { att, conf } => add(att, conf, agent, links),
        Invocation::Check { att, conf } => check(att, conf, agent, links),
        Invocation::Del { att, .. } => del(att, agent),
        Invocation::Status { .. } => status(agent),
        Invocation::Gc { conf } => gc(agent, conf),
    }
}

fn version() -> Output {
    Output::Print(json!({
        "cniVersion": CniVersion::LATEST.as_str(),
        "supportedVersions": CniVersion::supported(),
    }))
}

fn pod_label(args: &CniArgs) -> Option<String> {
    args.pod().map(|p| format!("{}/{}", p.namespace, p.name))
}

/// Why an attachment is not a Kubernetes pod (logged when passing it through; called when
/// [`CniArgs::pod`] is `None`).
fn not_a_pod_reason(args: &CniArgs) -> &'static str {
    match (args.pod_namespace.is_some(), args.pod_name.is_some()) {
        (false, true) => "CNI_ARGS has K8S_POD_NAME but no K8S_POD_NAMESPACE (podman does this)",
        (true, false) => "CNI_ARGS has K8S_POD_NAMESPACE but no K8S_POD_NAME",
        _ => "CNI_ARGS has neither K8S_POD_NAMESPACE nor K8S_POD_NAME",
    }
}

fn add(
    att: &AttachmentEnv,
    conf: &NetConf,
    agent: &dyn AgentClient,
    links: &dyn HostLinks,
) -> Result<Output, PluginError> {
    let prev = prev_result(Command::Add, conf)?;
    let out = Output::Print(prev.to_version(conf.cni_version));
    let Some(pod) = att.args.pod() else {
        info!(
            reason = not_a_pod_reason(&att.args),
            "not a Kubernetes pod: passing through"
        );
        return Ok(out);
    };
    let attachment = attachment(att, &prev, pod, links)?;
    let namespace = attachment.pod.namespace.clone();
    match agent.call(&AgentRequest::new(AgentOp::Add(attachment))) {
        Ok(AgentReply::Added(outcome)) => {
            info!(?outcome, "node agent handled ADD");
            Ok(out)
        }
        Ok(reply) => Err(refusal(Command::Add, reply)),
        Err(e) if e.is_unavailable() => {
            tolerate_unavailable(Command::Add, e, &namespace, &conf.plugin).map(|()| out)
        }
        Err(source) => Err(PluginError::AgentExchange {
            command: Command::Add,
            source,
        }),
    }
}

fn check(
    att: &AttachmentEnv,
    conf: &NetConf,
    agent: &dyn AgentClient,
    links: &dyn HostLinks,
) -> Result<Output, PluginError> {
    let prev = prev_result(Command::Check, conf)?;
    let Some(pod) = att.args.pod() else {
        info!(
            reason = not_a_pod_reason(&att.args),
            "not a Kubernetes pod: nothing to check"
        );
        return Ok(Output::Nothing);
    };
    let attachment = attachment(att, &prev, pod, links)?;
    let namespace = attachment.pod.namespace.clone();
    match agent.call(&AgentRequest::new(AgentOp::Check(attachment))) {
        Ok(AgentReply::Checked) => Ok(Output::Nothing),
        Ok(reply) => Err(refusal(Command::Check, reply)),
        Err(e) if e.is_unavailable() => {
            tolerate_unavailable(Command::Check, e, &namespace, &conf.plugin)
                .map(|()| Output::Nothing)
        }
        Err(source) => Err(PluginError::AgentExchange {
            command: Command::Check,
            source,
        }),
    }
}

fn del(att: &AttachmentEnv, agent: &dyn AgentClient) -> Result<Output, PluginError> {
    // DEL reads no prevResult and needs no netns: containerd's RemovePodSandbox sends neither.
    let request = AttachmentRef {
        key: AttachmentKey {
            container_id: att.container_id.clone(),
            ifname: att.ifname.clone(),
        },
        pod: att.args.pod(),
    };
    match agent.call(&AgentRequest::new(AgentOp::Del(request))) {
        Ok(AgentReply::Released) => {
            info!("node agent released the attachment");
            Ok(Output::Nothing)
        }
        Ok(reply) => Err(refusal(Command::Del, reply)),
        Err(e) => {
            // DEL must not block pod removal on a missing agent: the agent's reconcile
            // releases whatever it holds for pods that are gone.
            warn!(error = %chain(&e), "no answer from the node agent for DEL: succeeding; the agent releases the pod when it reconciles");
            Ok(Output::Nothing)
        }
    }
}

fn status(agent: &dyn AgentClient) -> Result<Output, PluginError> {
    match agent.call(&AgentRequest::new(AgentOp::Status)) {
        Ok(AgentReply::Ready) => Ok(Output::Nothing),
        Ok(reply) => Err(refusal(Command::Status, reply)),
        Err(source) if source.is_unreachable() => Err(PluginError::AgentUnreachable {
            command: Command::Status,
            source,
        }),
        Err(source) => Err(PluginError::AgentExchange {
            command: Command::Status,
            source,
        }),
    }
}

fn gc(agent: &dyn AgentClient, conf: &NetConf) -> Result<Output, PluginError> {
    let valid = conf
        .valid_attachments
        .clone()
        .ok_or(PluginError::NoValidAttachments)?;
    let count = valid.len();
    let valid = valid
        .into_iter()
        .map(|key| AttachmentRef { key, pod: None })
        .collect();
    match agent.call(&AgentRequest::new(AgentOp::Gc { valid })) {
        Ok(AgentReply::Collected { released }) => {
            info!(
                valid = count,
                released, "node agent collected stale attachments"
            );
            Ok(Output::Nothing)
        }
        Ok(reply) => Err(refusal(Command::Gc, reply)),
        Err(e) => {
            // Nothing can be collected until the agent is back, and it reconciles on start.
            warn!(error = %chain(&e), "no answer from the node agent for GC: succeeding, nothing collected");
            Ok(Output::Nothing)
        }
    }
}

fn prev_result(command: Command, conf: &NetConf) -> Result<PrevResult, PluginError> {
    let raw = conf
        .prev_result
        .as_ref()
        .ok_or(PluginError::NotChained { command })?;
    Ok(PrevResult::parse(raw)?)
}

/// Everything the agent needs about a new attachment. When the host interface cannot be found
/// it is sent empty (logged): the agent decides, so a pod that is not ambient is never failed
/// for it, and an ambient one is refused by the agent rather than half-enrolled.
fn attachment(
    att: &AttachmentEnv,
    prev: &PrevResult,
    pod: PodRef,
    links: &dyn HostLinks,
) -> Result<Attachment, PluginError> {
    let netns = att.netns.clone().unwrap_or_default();
    let host = match host_interface(prev, &netns, &att.ifname, links) {
        Ok((name, how)) => {
            debug!(host_interface = %name, ?how, "found the host-side interface");
            name
        }
        Err(e) => {
            warn!(error = %chain(&e), "host-side interface not found: asking the agent without it");
            String::new()
        }
    };
    // The container's MAC pins its bridge port (anti-spoofing at L2): from the result, else
    // from the namespace. Without one the agent still enrols the pod, unpinned (logged there).
    let mac = prev.container_mac(&att.ifname).or_else(|| {
        if netns.is_empty() {
            return None;
        }
        links
            .container_mac(Path::new(&netns), &att.ifname)
            .map_err(|e| warn!(error = %chain(&e), "container MAC not found"))
            .ok()
    });
    Ok(Attachment {
        key: AttachmentKey {
            container_id: att.container_id.clone(),
            ifname: att.ifname.clone(),
        },
        pod,
        netns,
        host_interface: host,
        ips: prev.pod_ips()?,
        mac,
    })
}

/// An agent answer that is not the success reply for `command`.
fn refusal(command: Command, reply: AgentReply) -> PluginError {
    match reply {
        AgentReply::Error(source) => PluginError::AgentRefused { command, source },
        other => PluginError::UnexpectedReply {
            command,
            reply: format!("{other:?}"),
        },
    }
}

/// The failure policy when no answer can be had from the agent at ADD or CHECK:
/// excluded namespaces pass, `agentUnreachable: allow` passes, anything else fails with
/// "try again later". An agent that is reached but stays silent past `timeoutMs` counts as
/// unavailable too, so a stuck agent cannot keep `kube-system` pods from starting.
fn tolerate_unavailable(
    command: Command,
    source: AgentCallError,
    namespace: &str,
    cfg: &PluginConfig,
) -> Result<(), PluginError> {
    if cfg.is_excluded(namespace) {
        warn!(error = %chain(&source), namespace, "node agent unavailable; namespace is excluded: passing through");
        Ok(())
    } else if cfg.agent_unreachable == UnreachablePolicy::Allow {
        warn!(error = %chain(&source), "node agent unavailable; agentUnreachable is allow: passing through UNENROLLED");
        Ok(())
    } else if source.is_unreachable() {
        Err(PluginError::AgentUnreachable { command, source })
    } else {
        Err(PluginError::AgentExchange { command, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::to_cni_error;
    use crate::sys::SysError;
    use ambient_common::agent_api::{AddOutcome, AgentError, ErrorKind};
    use ambient_common::net::Mac;
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::path::PathBuf;

    /// Answers with a fixed reply (or unreachable) and records the requests.
    struct FakeAgent {
        reply: Option<AgentReply>,
        seen: RefCell<Vec<AgentRequest>>,
    }

    impl FakeAgent {
        fn answering(reply: AgentReply) -> Self {
            Self {
                reply: Some(reply),
                seen: RefCell::default(),
            }
        }
        fn down() -> Self {
            Self {
                reply: None,
                seen: RefCell::default(),
            }
        }
    }

    impl AgentClient for FakeAgent {
        fn call(&self, request: &AgentRequest) -> Result<AgentReply, AgentCallError> {
            self.seen.borrow_mut().push(request.clone());
            self.reply.clone().ok_or_else(|| AgentCallError::NoSocket {
                socket: PathBuf::from("/run/test.sock"),
                source: std::io::ErrorKind::NotFound.into(),
            })
        }
    }

    struct Links;
    impl HostLinks for Links {
        fn is_bridge(&self, name: &str) -> bool {
            name == "cni0" || name == "cni-hpod0"
        }
        fn container_mac(&self, _: &Path, ifname: &str) -> Result<Mac, SysError> {
            Err(SysError::NoSuchLink(ifname.into()))
        }
        fn veth_peer(&self, _: &Path, ifname: &str) -> Result<String, SysError> {
            Err(SysError::NoPeer(ifname.into()))
        }
    }

    fn fixture(name: &str) -> (HashMap<String, String>, Vec<u8>) {
        let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let env = serde_json::from_value(v["env"].clone()).unwrap();
        (env, serde_json::to_vec(&v["stdin"]).unwrap())
    }

    fn run(
        env: &HashMap<String, String>,
        stdin: &[u8],
        agent: &FakeAgent,
    ) -> Result<Output, PluginError> {
        let inv = parse_invocation(|k| env.get(k).cloned(), stdin)?;
        execute(&inv, agent, &Links)
    }

    #[test]
    fn containerd_add_enrols_and_passes_the_result_through() {
        let (env, stdin) = fixture("containerd-add");
        let agent = FakeAgent::answering(AgentReply::Added(AddOutcome::Captured));
        let out = run(&env, &stdin, &agent).unwrap();
        let Output::Print(v) = out else { panic!() };
        let stdin: Value = serde_json::from_slice(&stdin).unwrap();
        assert_eq!(v, stdin["prevResult"]);
        let seen = agent.seen.borrow();
        let AgentOp::Add(a) = &seen[0].op else {
            panic!("{seen:?}")
        };
        assert_eq!(a.host_interface, "vetha15f5011");
        assert_eq!(a.pod.namespace, "e2e-ns");
        assert_eq!(a.pod.name, "e2e-pod-3542");
        assert_eq!(
            a.pod.uid.as_deref(),
            Some("42e71882-08fe-492e-9d18-bb343610e639")
        );
        assert_eq!(
            a.netns,
            "/var/run/netns/cni-a3b633bd-93ee-a67f-8711-de9a0b9bdb27"
        );
        assert_eq!(a.ips, vec!["10.244.77.2/24".parse().unwrap()]);
        assert_eq!(a.key.ifname, "eth0");
    }

    #[test]
    fn podman_add_passes_through_without_the_agent() {
        let (env, stdin) = fixture("podman-add-pod");
        let agent = FakeAgent::down();
        assert!(matches!(
            run(&env, &stdin, &agent).unwrap(),
            Output::Print(_)
        ));
        assert!(agent.seen.borrow().is_empty());
    }

    #[test]
    fn containerd_remove_del_succeeds_without_netns_or_agent() {
        let (env, stdin) = fixture("containerd-remove-del");
        let agent = FakeAgent::down();
        assert_eq!(run(&env, &stdin, &agent).unwrap(), Output::Nothing);
        let seen = agent.seen.borrow();
        let AgentOp::Del(r) = &seen[0].op else {
            panic!()
        };
        assert_eq!(r.pod.as_ref().unwrap().name, "e2e-pod-3542");
    }

    #[test]
    fn cnitool_check_asks_the_agent() {
        let (env, stdin) = fixture("cnitool-check");
        let agent = FakeAgent::answering(AgentReply::Checked);
        assert_eq!(run(&env, &stdin, &agent).unwrap(), Output::Nothing);
        assert!(matches!(agent.seen.borrow()[0].op, AgentOp::Check(_)));
        let bad = FakeAgent::answering(AgentReply::Error(AgentError::new(
            ErrorKind::CheckFailed,
            "rules missing",
        )));
        let err = run(&env, &stdin, &bad).unwrap_err();
        assert_eq!(to_cni_error(&err).code, 101);
    }

    #[test]
    fn agent_down_at_add_fails_unless_excluded_or_allowed() {
        let (mut env, stdin) = fixture("containerd-add");
        let err = run(&env, &stdin, &FakeAgent::down()).unwrap_err();
        assert_eq!(to_cni_error(&err).code, 11);
        env.insert(
            "CNI_ARGS".into(),
            "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns".into(),
        );
        assert!(run(&env, &stdin, &FakeAgent::down()).is_ok());
        let (env, stdin) = fixture("containerd-add");
        let mut conf: Value = serde_json::from_slice(&stdin).unwrap();
        conf["agentUnreachable"] = json!("allow");
        assert!(run(
            &env,
            &serde_json::to_vec(&conf).unwrap(),
            &FakeAgent::down()
        )
        .is_ok());
    }

    #[test]
    fn wrong_reply_is_a_protocol_error() {
        let (env, stdin) = fixture("containerd-add");
        let err = run(&env, &stdin, &FakeAgent::answering(AgentReply::Ready)).unwrap_err();
        assert_eq!(to_cni_error(&err).code, 102);
    }

    #[test]
    fn version_needs_no_stdin() {
        let env: HashMap<String, String> =
            [("CNI_COMMAND".to_string(), "VERSION".to_string())].into();
        let Output::Print(v) = run(&env, b"", &FakeAgent::down()).unwrap() else {
            panic!()
        };
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn stdin_is_bounded() {
        assert_eq!(read_stdin(&b"{}"[..]).unwrap(), b"{}");
        let big = vec![b' '; (MAX_STDIN + 1) as usize];
        assert!(matches!(
            read_stdin(&big[..]),
            Err(PluginError::StdinTooLarge)
        ));
    }
}
