//! Runs a CNI chain the way a container runtime does (libcni's semantics), so tests exercise
//! `ambient-cni` exactly as containerd or CRI-O would call it.
//!
//! - ADD: each plugin in order; its stdin is the plugin's own conf plus the list's `name` and
//!   `cniVersion`, `runtimeConfig` filtered by the plugin's `capabilities`, and (after the first)
//!   `prevResult` = the previous plugin's result.
//! - DEL: in reverse order; every plugin gets the chain's final ADD result as `prevResult`.
//! - CHECK: in order, with the same cached result.
//! - A plugin that exits non-zero has its stdout parsed as the spec's error object.
//!
//! Plugins run inside a "node" network namespace (`ip netns exec <node> <plugin>`), so what they
//! create (bridge, host-side veths, routes, rules) lands in that namespace and `/sys` is the
//! node's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::bins;

/// The Debian plugins linked into every assembled `CNI_PATH`.
pub const DEBIAN_PLUGINS: &[&str] = &["bridge", "ptp", "host-local", "loopback"];

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("conflist is invalid: {0}")]
    InvalidConf(String),
    #[error("plugin {plugin:?} is not in CNI_PATH {cni_path}")]
    PluginNotFound { plugin: String, cni_path: PathBuf },
    #[error("cannot run plugin {plugin}")]
    Spawn {
        plugin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("plugin {plugin} {command} failed with code {code}: {msg} ({details})")]
    Plugin {
        plugin: String,
        command: String,
        code: u32,
        msg: String,
        details: String,
    },
    #[error("plugin {plugin} {command} exited {status} without a valid error object; stdout {stdout:?}, stderr {stderr:?}")]
    Crashed {
        plugin: String,
        command: String,
        status: String,
        stdout: String,
        stderr: String,
    },
    #[error("plugin {plugin} {command} printed an invalid result: {stdout:?}")]
    BadResult {
        plugin: String,
        command: String,
        stdout: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("plugin {plugin} {command} still running after {after:?}: killed")]
    Timeout {
        plugin: String,
        command: String,
        after: Duration,
    },
    #[error("cannot assemble CNI_PATH in {dir}")]
    Assemble {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bin(#[from] bins::BinError),
}

impl CniError {
    /// The spec's error code, when the plugin returned one.
    pub fn code(&self) -> Option<u32> {
        match self {
            CniError::Plugin { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The spec's error object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginError {
    pub code: u32,
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

/// A network configuration list, as in a `.conflist` file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfList {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Map<String, Value>>,
}

impl ConfList {
    /// Reads the fields libcni reads; every plugin must be an object with a `type`.
    pub fn from_json(v: &Value) -> Result<Self, CniError> {
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| CniError::InvalidConf(format!("missing string field {k:?}")))
        };
        let name = field("name")?;
        let cni_version = field("cniVersion")?;
        let plugins = v
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or_else(|| CniError::InvalidConf("missing array \"plugins\"".into()))?;
        if plugins.is_empty() {
            return Err(CniError::InvalidConf("\"plugins\" is empty".into()));
        }
        let plugins = plugins
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let obj = p
                    .as_object()
                    .ok_or_else(|| CniError::InvalidConf(format!("plugin {i} is not an object")))?;
                if !obj.get("type").is_some_and(Value::is_string) {
                    return Err(CniError::InvalidConf(format!("plugin {i} has no \"type\"")));
                }
                Ok(obj.clone())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name,
            cni_version,
            plugins,
        })
    }

    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "name": self.name,
            "cniVersion": self.cni_version,
            "plugins": self.plugins,
        })
    }

    /// The stdin of plugin `index` (libcni's `buildOneConfig` + `injectRuntimeConfig`).
    pub fn plugin_stdin(
        &self,
        index: usize,
        prev_result: Option<&Value>,
        runtime_config: &Map<String, Value>,
    ) -> Value {
        let mut conf = self.plugins[index].clone();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        if let Some(prev) = prev_result {
            conf.insert("prevResult".into(), prev.clone());
        }
        let caps = conf.get("capabilities").and_then(Value::as_object);
        let rc: Map<String, Value> = runtime_config
            .iter()
            .filter(|(k, _)| {
                caps.and_then(|c| c.get(k.as_str()))
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        Value::Object(conf)
    }
}

/// The Kubernetes arguments a CRI runtime passes in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CniArgs {
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub infra_container_id: String,
}

impl CniArgs {
    /// `IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;K8S_POD_INFRA_CONTAINER_ID=..;K8S_POD_UID=..`,
    /// the order containerd uses; empty when no field is set.
    pub fn render(&self) -> String {
        if *self == Self::default() {
            return String::new();
        }
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.pod_namespace, self.pod_name, self.infra_container_id, self.pod_uid
        )
    }
}

/// One attachment: what the runtime passes in the `CNI_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConf {
    pub container_id: String,
    /// `CNI_NETNS`; empty for a DEL after the sandbox is gone.
    pub netns: String,
    pub ifname: String,
    pub args: CniArgs,
    /// Offered to plugins that declare the matching capability.
    pub runtime_config: Map<String, Value>,
}

impl RuntimeConf {
    /// No attachment: what STATUS and GC run with (every `CNI_*` but the command and path
    /// empty).
    pub fn empty() -> Self {
        Self {
            container_id: String::new(),
            netns: String::new(),
            ifname: String::new(),
            args: CniArgs::default(),
            runtime_config: Map::new(),
        }
    }
}

/// Timing of one plugin call, for benchmarks and reports.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginTiming {
    pub plugin: String,
    pub elapsed: Duration,
}

/// Executes plugins from `cni_path`, inside the network namespace `exec_netns` if given.
#[derive(Debug, Clone)]
pub struct CniRunner {
    pub cni_path: PathBuf,
    pub exec_netns: Option<String>,
    /// Extra environment for every plugin call (e.g. a log level).
    pub env: Vec<(String, String)>,
    /// A plugin call still running after this is killed and reported as [`CniError::Timeout`].
    pub timeout: Duration,
    /// Where to cache each successful ADD's result as libcni does (containerd, CRI-O:
    /// `/var/lib/cni/results/<network>-<container id>-<ifname>`, `cniCacheV1`), removed at
    /// DEL; `None` caches nothing.
    pub cache_dir: Option<PathBuf>,
}

/// Default per-plugin-call limit of [`CniRunner`].
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);

enum WaitError {
    Io(std::io::Error),
    TimedOut,
}

/// Collects a child's output, killing it at the deadline.
fn wait_with_deadline(
    mut child: std::process::Child,
    timeout: Duration,
) -> Result<std::process::Output, WaitError> {
    use std::io::Read;
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(WaitError::Io)? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(WaitError::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

impl CniRunner {
    pub fn new(cni_path: impl Into<PathBuf>, exec_netns: Option<String>) -> Self {
        Self {
            cni_path: cni_path.into(),
            exec_netns,
            env: Vec::new(),
            timeout: PLUGIN_TIMEOUT,
            cache_dir: None,
        }
    }

    fn cache_path(&self, list: &ConfList, rt: &RuntimeConf) -> Option<PathBuf> {
        self.cache_dir
            .as_ref()
            .map(|d| d.join(format!("{}-{}-{}", list.name, rt.container_id, rt.ifname)))
    }

    /// Caches an ADD result in libcni's format.
    fn cache(&self, list: &ConfList, rt: &RuntimeConf, result: &Value) {
        let Some(path) = self.cache_path(list, rt) else {
            return;
        };
        let a = &rt.args;
        let entry = serde_json::json!({
            "kind": "cniCacheV1",
            "containerId": rt.container_id,
            "config": "",
            "ifName": rt.ifname,
            "networkName": list.name,
            "cniArgs": [
                ["K8S_POD_NAMESPACE", a.pod_namespace],
                ["K8S_POD_NAME", a.pod_name],
                ["K8S_POD_INFRA_CONTAINER_ID", a.infra_container_id],
                ["K8S_POD_UID", a.pod_uid],
                ["IgnoreUnknown", "1"],
            ],
            "capabilityArgs": {},
            "result": result,
        });
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, entry.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }

    /// ADD through the whole chain; the final result (what the runtime caches).
    pub fn add(&self, list: &ConfList, rt: &RuntimeConf) -> Result<Value, CniError> {
        self.add_timed(list, rt).map(|(v, _)| v)
    }

    /// ADD, also returning each plugin's wall time.
    pub fn add_timed(
        &self,
        list: &ConfList,
        rt: &RuntimeConf,
    ) -> Result<(Value, Vec<PluginTiming>), CniError> {
        let mut prev: Option<Value> = None;
        let mut timings = Vec::new();
        for i in 0..list.plugins.len() {
            let stdin = list.plugin_stdin(i, prev.as_ref(), &rt.runtime_config);
            let start = Instant::now();
            let out = self.exec(list, i, "ADD", rt, &stdin)?;
            timings.push(PluginTiming {
                plugin: plugin_type(&list.plugins[i]),
                elapsed: start.elapsed(),
            });
            let result: Value =
                serde_json::from_str(&out).map_err(|source| CniError::BadResult {
                    plugin: plugin_type(&list.plugins[i]),
                    command: "ADD".into(),
                    stdout: out.clone(),
                    source,
                })?;
            prev = Some(result);
        }
        let result = prev.unwrap_or(Value::Null);
        self.cache(list, rt, &result);
        Ok((result, timings))
    }

    /// DEL in reverse order, each plugin given `cached` (the ADD result) when there is one.
    pub fn del(
        &self,
        list: &ConfList,
        rt: &RuntimeConf,
        cached: Option<&Value>,
    ) -> Result<(), CniError> {
        for i in (0..list.plugins.len()).rev() {
            let stdin = list.plugin_stdin(i, cached, &rt.runtime_config);
            self.exec(list, i, "DEL", rt, &stdin)?;
        }
        if let Some(p) = self.cache_path(list, rt) {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    /// DEL through every plugin even when some fail (for cleanup): the errors, in call order.
    pub fn del_best_effort(
        &self,
        list: &ConfList,
        rt: &RuntimeConf,
        cached: Option<&Value>,
    ) -> Vec<CniError> {
        let errors = (0..list.plugins.len())
            .rev()
            .filter_map(|i| {
                let stdin = list.plugin_stdin(i, cached, &rt.runtime_config);
                self.exec(list, i, "DEL", rt, &stdin).err()
            })
            .collect();
        if let Some(p) = self.cache_path(list, rt) {
            let _ = std::fs::remove_file(p);
        }
        errors
    }

    /// CHECK in order, each plugin given the cached ADD result.
    pub fn check(&self, list: &ConfList, rt: &RuntimeConf, cached: &Value) -> Result<(), CniError> {
        for i in 0..list.plugins.len() {
            let stdin = list.plugin_stdin(i, Some(cached), &rt.runtime_config);
            self.exec(list, i, "CHECK", rt, &stdin)?;
        }
        Ok(())
    }

    /// STATUS (CNI 1.1): each plugin in order, with its conf only; the first error stops.
    pub fn status(&self, list: &ConfList) -> Result<(), CniError> {
        let rt = RuntimeConf::empty();
        for i in 0..list.plugins.len() {
            let stdin = list.plugin_stdin(i, None, &Map::new());
            self.exec(list, i, "STATUS", &rt, &stdin)?;
        }
        Ok(())
    }

    /// GC (CNI 1.1): each plugin in order, told the attachments that are still valid
    /// (`cni.dev/valid-attachments`).
    pub fn gc(&self, list: &ConfList, valid: &[(String, String)]) -> Result<(), CniError> {
        let rt = RuntimeConf::empty();
        let attachments: Vec<Value> = valid
            .iter()
            .map(|(id, ifname)| serde_json::json!({"containerID": id, "ifname": ifname}))
            .collect();
        for i in 0..list.plugins.len() {
            let mut stdin = list.plugin_stdin(i, None, &Map::new());
            if let Some(o) = stdin.as_object_mut() {
                o.insert(
                    "cni.dev/valid-attachments".into(),
                    Value::Array(attachments.clone()),
                );
            }
            self.exec(list, i, "GC", &rt, &stdin)?;
        }
        Ok(())
    }

    /// Runs one plugin with `command`; its stdout on success.
    pub fn exec(
        &self,
        list: &ConfList,
        index: usize,
        command: &str,
        rt: &RuntimeConf,
        stdin: &Value,
    ) -> Result<String, CniError> {
        let plugin = plugin_type(&list.plugins[index]);
        let path = self.cni_path.join(&plugin);
        if !path.exists() {
            return Err(CniError::PluginNotFound {
                plugin,
                cni_path: self.cni_path.clone(),
            });
        }
        let mut cmd = match &self.exec_netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &rt.container_id)
            .env("CNI_NETNS", &rt.netns)
            .env("CNI_IFNAME", &rt.ifname)
            .env("CNI_ARGS", rt.args.render())
            .env("CNI_PATH", &self.cni_path)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_err = |source| CniError::Spawn {
            plugin: plugin.clone(),
            source,
        };
        // Like libcni, retry while the binary is busy being written (ETXTBSY): a plugin
        // installed just now may still be open for writing in another process.
        let mut attempts = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => break r.map_err(spawn_err)?,
            }
        };
        let body = serde_json::to_vec(stdin).expect("a JSON value always serializes");
        if let Some(mut w) = child.stdin.take() {
            // A plugin that exits without reading its stdin is judged by its exit status.
            let _ = w.write_all(&body);
        }
        let out = wait_with_deadline(child, self.timeout).map_err(|e| match e {
            WaitError::Io(source) => CniError::Spawn {
                plugin: plugin.clone(),
                source,
            },
            WaitError::TimedOut => CniError::Timeout {
                plugin: plugin.clone(),
                command: command.into(),
                after: self.timeout,
            },
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return Ok(stdout);
        }
        match serde_json::from_str::<PluginError>(&stdout) {
            Ok(e) => Err(CniError::Plugin {
                plugin,
                command: command.into(),
                code: e.code,
                msg: e.msg,
                details: e.details,
            }),
            Err(_) => Err(CniError::Crashed {
                plugin,
                command: command.into(),
                status: out.status.to_string(),
                stdout,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }),
        }
    }
}

fn plugin_type(conf: &Map<String, Value>) -> String {
    conf.get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Fills `dir` with symlinks to the Debian plugins ([`DEBIAN_PLUGINS`]), the lab's
/// [`bins::ROUTED_CNI`] and `ambient_cni` (as `ambient-cni`), making it a `CNI_PATH`.
pub fn assemble_cni_path(dir: &Path, ambient_cni: Option<&Path>) -> Result<(), CniError> {
    let io = |source| CniError::Assemble {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    for p in DEBIAN_PLUGINS {
        let target = bins::debian_cni_plugin(p)?;
        std::os::unix::fs::symlink(target, dir.join(p)).map_err(io)?;
    }
    // Built with the workspace; a checkout that has not built it just lacks the routed mode.
    if let Ok(routed) = bins::BinDir::current().and_then(|d| d.find(bins::ROUTED_CNI)) {
        std::os::unix::fs::symlink(routed, dir.join(bins::ROUTED_CNI)).map_err(io)?;
    }
    if let Some(a) = ambient_cni {
        std::os::unix::fs::symlink(a, dir.join(bins::AMBIENT_CNI)).map_err(io)?;
    }
    Ok(())
}

/// How the primary plugin attaches pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// `bridge`: veths enslaved to a bridge that is the pods' gateway.
    Bridge,
    /// `ptp`: each veth an L3 interface with a host route to the pod.
    Ptp,
    /// Calico's shape (`routed-cni`): each veth an L3 interface *without any address*, the
    /// pod's gateway 169.254.1.1 answered by proxy ARP, a /32 route per pod.
    Routed,
}

/// Parameters of the standard chain `bridge|ptp` + `host-local` + `ambient-cni`.
#[derive(Debug, Clone)]
pub struct ChainSpec {
    pub network: String,
    pub cni_version: String,
    pub attach: Attach,
    /// Bridge name (for [`Attach::Bridge`]), unique within the node namespace.
    pub bridge: String,
    pub subnet: String,
    /// An IPv6 range for dual-stack pods (a second host-local range set).
    pub subnet6: Option<String>,
    /// host-local's `dataDir`: keep it inside the test's tempdir.
    pub ipam_data_dir: PathBuf,
    /// `agentSocket` of the `ambient-cni` entry; `None` leaves the plugin out.
    pub agent_socket: Option<PathBuf>,
    /// Extra keys merged into the `ambient-cni` entry (log file, exclusions...).
    pub ambient_extra: Map<String, Value>,
    /// Extra keys merged into the primary plugin's entry.
    pub primary_extra: Map<String, Value>,
}

impl ChainSpec {
    pub fn conflist(&self) -> Value {
        let mut ranges = vec![serde_json::json!([{ "subnet": self.subnet }])];
        let mut routes = vec![serde_json::json!({ "dst": "0.0.0.0/0" })];
        if let Some(s6) = &self.subnet6 {
            ranges.push(serde_json::json!([{ "subnet": s6 }]));
            routes.push(serde_json::json!({ "dst": "::/0" }));
        }
        let ipam = serde_json::json!({
            "type": "host-local",
            "ranges": ranges,
            "routes": routes,
            "dataDir": self.ipam_data_dir,
        });
        let primary = match self.attach {
            Attach::Bridge => serde_json::json!({
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": ipam,
            }),
            Attach::Ptp => serde_json::json!({
                "type": "ptp",
                "ipMasq": false,
                "ipam": ipam,
            }),
            Attach::Routed => serde_json::json!({
                "type": bins::ROUTED_CNI,
                "ipam": ipam,
            }),
        };
        let mut primary = primary;
        if let Value::Object(o) = &mut primary {
            o.extend(self.primary_extra.clone());
        }
        let mut plugins = vec![primary];
        if let Some(sock) = &self.agent_socket {
            let mut ambient = Map::new();
            ambient.insert("type".into(), bins::AMBIENT_CNI.into());
            ambient.insert("agentSocket".into(), sock.to_string_lossy().into());
            for (k, v) in &self.ambient_extra {
                ambient.insert(k.clone(), v.clone());
            }
            plugins.push(Value::Object(ambient));
        }
        serde_json::json!({
            "cniVersion": self.cni_version,
            "name": self.network,
            "plugins": plugins,
        })
    }
}

/// The pod's addresses in a CNI result (`ips[].address`), any version >= 0.3.0.
pub fn result_ips(result: &Value) -> Vec<String> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip.get("address").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list() -> ConfList {
        ConfList::from_json(&json!({
            "name": "net", "cniVersion": "1.0.0",
            "plugins": [
                {"type": "bridge", "capabilities": {"portMappings": true}},
                {"type": "ambient-cni", "agentSocket": "/x.sock"}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn stdin_carries_name_version_and_prev_result() {
        let l = list();
        let rc: Map<String, Value> = [("portMappings".to_owned(), json!([]))]
            .into_iter()
            .collect();
        let first = l.plugin_stdin(0, None, &rc);
        assert_eq!(first["name"], "net");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none());
        assert_eq!(first["runtimeConfig"], json!({"portMappings": []}));
        let prev = json!({"ips": [{"address": "10.1.0.2/24"}]});
        let second = l.plugin_stdin(1, Some(&prev), &rc);
        assert_eq!(second["prevResult"], prev);
        assert_eq!(second["agentSocket"], "/x.sock");
        assert!(
            second.get("runtimeConfig").is_none(),
            "no capability declared"
        );
    }

    #[test]
    fn invalid_conflists_are_refused_precisely() {
        for (v, want) in [
            (json!({}), "name"),
            (json!({"name": "n", "cniVersion": "1.0.0"}), "plugins"),
            (
                json!({"name": "n", "cniVersion": "1.0.0", "plugins": []}),
                "empty",
            ),
            (
                json!({"name": "n", "cniVersion": "1.0.0", "plugins": [1]}),
                "not an object",
            ),
            (
                json!({"name": "n", "cniVersion": "1.0.0", "plugins": [{}]}),
                "type",
            ),
        ] {
            let e = ConfList::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }

    #[test]
    fn cni_args_in_containerd_order() {
        let a = CniArgs {
            pod_namespace: "ns".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            infra_container_id: "c".into(),
        };
        assert_eq!(CniArgs::default().render(), "");
        assert_eq!(
            a.render(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=c;K8S_POD_UID=u"
        );
    }

    #[test]
    fn chain_spec_renders_both_attachments() {
        let mut spec = ChainSpec {
            network: "n".into(),
            cni_version: "1.0.0".into(),
            attach: Attach::Bridge,
            bridge: "cni0".into(),
            subnet: "10.70.1.0/24".into(),
            subnet6: Some("fd00:70:1::/64".into()),
            ipam_data_dir: "/tmp/x".into(),
            agent_socket: Some("/tmp/a.sock".into()),
            ambient_extra: Map::new(),
            primary_extra: Map::new(),
        };
        let v = spec.conflist();
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][0]["ipam"]["dataDir"], "/tmp/x");
        assert_eq!(v["plugins"][1]["agentSocket"], "/tmp/a.sock");
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][1][0]["subnet"],
            "fd00:70:1::/64"
        );
        assert_eq!(v["plugins"][0]["ipam"]["routes"][1]["dst"], "::/0");
        spec.attach = Attach::Ptp;
        spec.agent_socket = None;
        let v = spec.conflist();
        assert_eq!(v["plugins"][0]["type"], "ptp");
        assert_eq!(v["plugins"].as_array().unwrap().len(), 1);
        ConfList::from_json(&v).unwrap();
    }

    #[test]
    fn result_ips_reads_any_version() {
        let r = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24", "interface": 2}]});
        assert_eq!(result_ips(&r), vec!["10.1.0.5/24".to_owned()]);
        assert!(result_ips(&json!({})).is_empty());
    }

    #[test]
    fn a_hanging_plugin_is_killed_at_the_deadline() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("hang");
        std::fs::write(&plugin, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let list = ConfList::from_json(&json!({
            "name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "hang"}]
        }))
        .unwrap();
        let mut runner = CniRunner::new(dir.path(), None);
        runner.timeout = Duration::from_millis(200);
        let rt = RuntimeConf {
            container_id: "c".into(),
            netns: String::new(),
            ifname: "eth0".into(),
            args: CniArgs::default(),
            runtime_config: Map::new(),
        };
        let err = runner.add(&list, &rt).unwrap_err();
        assert!(matches!(err, CniError::Timeout { .. }), "{err}");
    }

    #[test]
    fn plugin_errors_and_crashes_are_told_apart() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in [
            (
                "coded",
                "#!/bin/sh\necho '{\"code\":11,\"msg\":\"later\"}'\nexit 1\n",
            ),
            ("crash", "#!/bin/sh\necho boom >&2\nexit 2\n"),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let runner = CniRunner::new(dir.path(), None);
        let rt = RuntimeConf {
            container_id: "c".into(),
            netns: String::new(),
            ifname: "eth0".into(),
            args: CniArgs::default(),
            runtime_config: Map::new(),
        };
        let list = |t: &str| {
            ConfList::from_json(
                &json!({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": t}]}),
            )
            .unwrap()
        };
        let e = runner.add(&list("coded"), &rt).unwrap_err();
        assert_eq!(e.code(), Some(11), "{e}");
        let e = runner.add(&list("crash"), &rt).unwrap_err();
        assert!(
            matches!(&e, CniError::Crashed { stderr, .. } if stderr.contains("boom")),
            "{e}"
        );
        let e = runner.add(&list("missing"), &rt).unwrap_err();
        assert!(matches!(e, CniError::PluginNotFound { .. }), "{e}");
    }

    #[test]
    fn plugin_error_object_parses() {
        let e: PluginError =
            serde_json::from_str(r#"{"cniVersion":"1.0.0","code":11,"msg":"try again"}"#).unwrap();
        assert_eq!(e.code, 11);
        assert_eq!(e.details, "");
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-zA-Z]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("name".to_owned()),
                        Just("cniVersion".to_owned()),
                        Just("plugins".to_owned()),
                        Just("type".to_owned()),
                        "[a-z]{1,4}"
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Any JSON is either a valid list (whose plugins all have a type) or a precise error.
        #[test]
        fn conflist_parsing_never_panics(v in json_value()) {
            if let Ok(l) = ConfList::from_json(&v) {
                proptest::prop_assert!(!l.plugins.is_empty());
                for i in 0..l.plugins.len() {
                    let stdin = l.plugin_stdin(i, None, &Map::new());
                    proptest::prop_assert!(stdin["type"].is_string());
                    proptest::prop_assert_eq!(&stdin["name"], &json!(l.name));
                }
            }
        }
    }
}
