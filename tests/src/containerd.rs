//! Debian's containerd as a test fixture: its config, root, state, sockets, CNI directories and
//! netns mounts all in one directory, the daemon running inside a node network namespace, so
//! that pod networking never touches the host's.
//!
//! containerd is started as
//! `nsenter --net=<node> unshare --mount --propagation slave sh -c '<remount /sys>; exec containerd'`
//! rather than `ip netns exec`: like `ip netns exec` it gets the node's `/sys` (so CNI plugins
//! see the node's interfaces), but it keeps the host's cgroup hierarchies mounted under the new
//! `/sys`, which runc needs. Everything containerd mounts (pod netns, shm) stays in its private
//! mount namespace; to look into it (the node agent must open the pods' netns paths) use
//! [`Containerd::enter`].
//!
//! `Drop` stops the sandboxes' processes and shims (by the PIDs in the state directory), then
//! containerd, and removes the cgroups under the test's cgroup parent.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::netns::{eventually, run, terminate_pids, NetNsError, NETNS_RUN_DIR};

/// containerd's task directory (runtime v2) inside its state directory.
const TASK_DIR: &str = "io.containerd.runtime.v2.task";
/// Where the cgroup v1/v2 hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start containerd")]
    Spawn(#[source] std::io::Error),
    #[error("containerd did not come up: {reason}; log tail:\n{log}")]
    NotReady { reason: String, log: String },
    #[error("ctr failed")]
    Ctr(#[source] NetNsError),
}

/// Everything that locates one containerd instance. [`ContainerdConfig::in_dir`] puts it all
/// under one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdConfig {
    pub base: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    /// Where CRI bind-mounts pod network namespaces: `<state>/io.containerd.grpc.v1.cri/netns`
    /// (`netns_mounts_under_state_dir`, containerd 1.6).
    pub netns_dir: PathBuf,
    /// runc's `--root` (state of the containers).
    pub runc_root: PathBuf,
    pub sandbox_image: String,
    /// `native` works everywhere; `overlayfs` where the filesystem allows it.
    pub snapshotter: String,
    /// cgroup parent for the test's sandboxes (pass it in the sandbox config), relative to each
    /// hierarchy's root; `Drop` removes what is left under it.
    pub cgroup_parent: String,
    pub log_level: String,
}

impl ContainerdConfig {
    pub fn in_dir(base: &Path, sandbox_image: &str, cgroup_parent: &str) -> Self {
        Self {
            base: base.to_path_buf(),
            root: base.join("root"),
            state: base.join("state"),
            socket: base.join("containerd.sock"),
            cni_bin_dir: base.join("cni-bin"),
            cni_conf_dir: base.join("cni-conf"),
            netns_dir: base
                .join("state")
                .join("io.containerd.grpc.v1.cri")
                .join("netns"),
            runc_root: base.join("runc"),
            sandbox_image: sandbox_image.to_owned(),
            snapshotter: "native".to_owned(),
            cgroup_parent: cgroup_parent.to_owned(),
            log_level: "info".to_owned(),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.base.join("containerd.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.base.join("containerd.log")
    }

    /// The config file (containerd 1.6, version 2 format).
    pub fn render(&self) -> String {
        let q = |p: &Path| toml_str(&p.to_string_lossy());
        let mut s = String::new();
        let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
        let _ = writeln!(s, "version = 2");
        let _ = writeln!(s, "root = {}", q(&self.root));
        let _ = writeln!(s, "state = {}", q(&self.state));
        let _ = writeln!(
            s,
            "disabled_plugins = [\"io.containerd.snapshotter.v1.aufs\", \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.zfs\"]"
        );
        let _ = writeln!(s, "\n[grpc]\n  address = {}", q(&self.socket));
        let _ = writeln!(
            s,
            "\n[ttrpc]\n  address = {}",
            toml_str(&format!("{}.ttrpc", self.socket.to_string_lossy()))
        );
        let _ = writeln!(s, "\n[debug]\n  level = {}", toml_str(&self.log_level));
        let _ = writeln!(
            s,
            "\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = {}",
            q(&self.base.join("opt"))
        );
        let _ = writeln!(s, "\n[{cri}]");
        let _ = writeln!(s, "  sandbox_image = {}", toml_str(&self.sandbox_image));
        let _ = writeln!(s, "  restrict_oom_score_adj = true");
        let _ = writeln!(s, "  disable_apparmor = true");
        let _ = writeln!(s, "  netns_mounts_under_state_dir = true");
        let _ = writeln!(s, "  stream_server_address = \"127.0.0.1\"");
        let _ = writeln!(s, "  stream_server_port = \"0\"");
        let _ = writeln!(s, "\n[{cri}.containerd]");
        let _ = writeln!(s, "  snapshotter = {}", toml_str(&self.snapshotter));
        let _ = writeln!(s, "  default_runtime_name = \"runc\"");
        let _ = writeln!(s, "\n[{cri}.containerd.runtimes.runc]");
        let _ = writeln!(s, "  runtime_type = \"io.containerd.runc.v2\"");
        let _ = writeln!(s, "\n[{cri}.containerd.runtimes.runc.options]");
        let _ = writeln!(s, "  Root = {}", q(&self.runc_root));
        let _ = writeln!(s, "  SystemdCgroup = false");
        let _ = writeln!(s, "\n[{cri}.cni]");
        let _ = writeln!(s, "  bin_dir = {}", q(&self.cni_bin_dir));
        let _ = writeln!(s, "  conf_dir = {}", q(&self.cni_conf_dir));
        let _ = writeln!(s, "  max_conf_num = 1");
        s
    }
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The shell script that runs containerd with the node's `/sys` and the host's cgroups.
const WRAPPER: &str = "exec 3</sys/fs/cgroup; mount -t sysfs sysfs /sys; \
mount -c --rbind /proc/self/fd/3 /sys/fs/cgroup; exec 3<&-; exec containerd --config \"$0\"";

/// A task (sandbox or container) as the state directory records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    pub namespace: String,
    pub id: String,
    pub init_pid: Option<i32>,
    /// Found in `/proc` (containerd 1.6 writes no `shim.pid`): the shim started for this task
    /// by this containerd (`-address <our socket> ... -id <id>`).
    pub shim_pid: Option<i32>,
    /// The shim's socket (`unix://...` in the `address` file).
    pub shim_address: Option<String>,
}

/// A running containerd.
#[derive(Debug)]
pub struct Containerd {
    cfg: ContainerdConfig,
    node_netns: String,
    child: Option<Child>,
}

impl Containerd {
    /// Creates the directories, writes the config and starts containerd in `node_netns` (a
    /// name under /run/netns); returns once `ctr version` answers. The CNI conf and bin dirs
    /// must be filled by the caller before (CRI reads them at start and on change).
    pub fn start(node_netns: &str, cfg: ContainerdConfig) -> Result<Self, ContainerdError> {
        for d in [
            &cfg.base,
            &cfg.root,
            &cfg.state,
            &cfg.cni_bin_dir,
            &cfg.cni_conf_dir,
            &cfg.netns_dir,
            &cfg.runc_root,
        ] {
            std::fs::create_dir_all(d).map_err(|source| ContainerdError::Prepare {
                path: d.clone(),
                source,
            })?;
        }
        let conf = cfg.config_path();
        std::fs::write(&conf, cfg.render()).map_err(|source| ContainerdError::Prepare {
            path: conf.clone(),
            source,
        })?;
        let log =
            std::fs::File::create(cfg.log_path()).map_err(|source| ContainerdError::Prepare {
                path: cfg.log_path(),
                source,
            })?;
        let log2 = log.try_clone().map_err(ContainerdError::Spawn)?;
        // The guard exists before the process does.
        let mut me = Self {
            cfg,
            node_netns: node_netns.to_owned(),
            child: None,
        };
        let child = Command::new("nsenter")
            .arg(format!("--net={NETNS_RUN_DIR}/{node_netns}"))
            .args(["--", "unshare", "--mount", "--propagation", "slave", "--"])
            .args(["sh", "-ec", WRAPPER])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(ContainerdError::Spawn)?;
        me.child = Some(child);
        let ready = eventually(Duration::from_secs(20), || {
            if let Some(c) = me.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Ok(Err(format!("containerd exited: {st}")));
                }
            }
            me.ctr(&["version"]).map(Ok)
        });
        match ready {
            Ok(Ok(_)) => Ok(me),
            Ok(Err(reason)) => Err(me.not_ready(reason)),
            Err(e) => Err(me.not_ready(e.to_string())),
        }
    }

    fn not_ready(&self, reason: String) -> ContainerdError {
        ContainerdError::NotReady {
            reason,
            log: self.log_tail(40),
        }
    }

    /// The last `n` lines of containerd's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.cfg.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn config(&self) -> &ContainerdConfig {
        &self.cfg
    }

    pub fn socket(&self) -> &Path {
        &self.cfg.socket
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `ctr -a <socket> args...`; stdout.
    pub fn ctr(&self, args: &[&str]) -> Result<String, ContainerdError> {
        let out = run(Command::new("ctr")
            .arg("-a")
            .arg(&self.cfg.socket)
            .args(["--timeout", "10s"])
            .args(args))
        .map_err(ContainerdError::Ctr)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports an image archive into the CRI namespace (`k8s.io`).
    pub fn import_image(&self, archive: &Path) -> Result<(), ContainerdError> {
        let archive = archive.to_string_lossy();
        self.ctr(&["-n", "k8s.io", "images", "import", &archive])
            .map(drop)
    }

    /// A command run in containerd's mount namespace (where the pod netns mounts are) and the
    /// node network namespace: how the node agent must be started.
    pub fn enter(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        if let Some(pid) = self.pid() {
            cmd.arg(format!("--mount=/proc/{pid}/ns/mnt"));
        }
        cmd.arg(format!("--net={NETNS_RUN_DIR}/{}", self.node_netns))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program args` through [`Containerd::enter`]; stdout.
    pub fn exec_entered(&self, program: &str, args: &[&str]) -> Result<String, NetNsError> {
        let out = run(self.enter(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The tasks recorded in the state directory, with their shims' PIDs.
    pub fn tasks(&self) -> Vec<TaskInfo> {
        let shims = shims_of(&self.cfg.socket);
        let mut tasks = list_tasks(&self.cfg.state.join(TASK_DIR));
        for t in &mut tasks {
            if t.shim_pid.is_none() {
                t.shim_pid = shims.iter().find(|(id, _)| *id == t.id).map(|(_, p)| *p);
            }
        }
        tasks
    }
}

/// Reads `<task dir>/<namespace>/<id>/{init.pid,shim.pid,address}`.
pub fn list_tasks(task_dir: &Path) -> Vec<TaskInfo> {
    let mut out = Vec::new();
    let Ok(namespaces) = std::fs::read_dir(task_dir) else {
        return out;
    };
    for ns in namespaces.flatten() {
        let Ok(ids) = std::fs::read_dir(ns.path()) else {
            continue;
        };
        for id in ids.flatten() {
            let read = |f: &str| {
                std::fs::read_to_string(id.path().join(f))
                    .ok()
                    .map(|s| s.trim().to_owned())
            };
            out.push(TaskInfo {
                namespace: ns.file_name().to_string_lossy().into_owned(),
                id: id.file_name().to_string_lossy().into_owned(),
                init_pid: read("init.pid").and_then(|s| s.parse().ok()),
                shim_pid: read("shim.pid").and_then(|s| s.parse().ok()),
                shim_address: read("address"),
            });
        }
    }
    out
}

/// The shims started by the containerd listening on `socket`: `(task id, pid)` of every
/// process whose command line has `-address <socket>` and `-id <id>`.
pub fn shims_of(socket: &Path) -> Vec<(String, i32)> {
    let socket = socket.to_string_lossy();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if let Some(id) = shim_id(&args, &socket) {
            out.push((id, pid));
        }
    }
    out
}

/// The task id of a shim command line started for the containerd at `socket`.
pub fn shim_id(args: &[String], socket: &str) -> Option<String> {
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    let is_shim = args.first().is_some_and(|a| a.contains("containerd-shim"));
    (is_shim && value("-address").is_some_and(|a| a == socket))
        .then(|| value("-id").cloned())
        .flatten()
}

/// Removes the cgroup directories under `parent` in every hierarchy, deepest first (only
/// empty cgroups can go; that is the point: it fails for anything still running).
pub fn remove_cgroups(parent: &str) {
    let parent = parent.trim_start_matches('/');
    if parent.is_empty() {
        return;
    }
    let Ok(hierarchies) = std::fs::read_dir(CGROUP_ROOT) else {
        return;
    };
    for h in hierarchies.flatten() {
        remove_cgroup_tree(&h.path().join(parent));
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for c in children.flatten() {
            if c.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&c.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
}

/// Removes libcni's cached results (`<network>-<container id>-<ifname>`) of these containers.
fn forget_cni_results<'a>(dir: &Path, ids: impl Iterator<Item = &'a str>) {
    let ids: Vec<String> = ids.map(|id| format!("-{id}-")).collect();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if ids.iter().any(|id| name.contains(id.as_str())) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let tasks = self.tasks();
        // Container processes first (a killed shim would orphan them), then the shims.
        let inits: Vec<i32> = tasks.iter().filter_map(|t| t.init_pid).collect();
        for &p in &inits {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let shims: Vec<i32> = tasks.iter().filter_map(|t| t.shim_pid).collect();
        terminate_pids(&shims);
        for t in &tasks {
            if let Some(sock) = t
                .shim_address
                .as_deref()
                .and_then(|a| a.strip_prefix("unix://"))
            {
                let _ = std::fs::remove_file(sock);
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if std::time::Instant::now() >= deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        remove_cgroups(&self.cfg.cgroup_parent);
        // libcni caches each ADD result in the host's /var/lib/cni/results until the DEL that
        // a killed sandbox never got: remove this containerd's sandboxes' entries.
        forget_cni_results(
            Path::new(ambient_common::constants::CNI_CACHE_DIR),
            tasks.iter().map(|t| t.id.as_str()),
        );
        if !tasks.is_empty() {
            let ids: Vec<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
            eprintln!("cleanup: containerd left tasks behind, killed them: {ids:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_puts_everything_in_the_base_dir() {
        let c = ContainerdConfig::in_dir(Path::new("/tmp/t"), "localhost/p:1", "/ambient-t");
        let s = c.render();
        assert!(s.contains("root = \"/tmp/t/root\""));
        assert!(s.contains("address = \"/tmp/t/containerd.sock\""));
        assert!(s.contains("restrict_oom_score_adj = true"));
        assert!(s.contains("sandbox_image = \"localhost/p:1\""));
        assert!(s.contains("netns_mounts_under_state_dir = true"));
        assert!(c.netns_dir.starts_with("/tmp/t/state"));
        assert!(s.contains("Root = \"/tmp/t/runc\""));
        assert!(s.contains("bin_dir = \"/tmp/t/cni-bin\""));
        assert!(!s.contains("/run/containerd/containerd.sock"));
    }

    #[test]
    fn shim_command_lines_are_matched_by_socket() {
        let args: Vec<String> = [
            "/usr/bin/containerd-shim-runc-v2",
            "-namespace",
            "k8s.io",
            "-id",
            "abc",
            "-address",
            "/tmp/x/containerd.sock",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            shim_id(&args, "/tmp/x/containerd.sock").as_deref(),
            Some("abc")
        );
        assert_eq!(shim_id(&args, "/run/containerd/containerd.sock"), None);
        assert_eq!(shim_id(&args[1..], "/tmp/x/containerd.sock"), None);
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    #[test]
    fn tasks_are_read_from_the_state_dir() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("k8s.io/abc");
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(t.join("init.pid"), "123").unwrap();
        std::fs::write(t.join("shim.pid"), "456\n").unwrap();
        std::fs::write(t.join("address"), "unix:///run/containerd/s/ff").unwrap();
        let tasks = list_tasks(d.path());
        assert_eq!(
            tasks,
            vec![TaskInfo {
                namespace: "k8s.io".into(),
                id: "abc".into(),
                init_pid: Some(123),
                shim_pid: Some(456),
                shim_address: Some("unix:///run/containerd/s/ff".into()),
            }]
        );
        assert!(list_tasks(&d.path().join("missing")).is_empty());
    }
}
