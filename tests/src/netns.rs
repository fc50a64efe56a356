//! Network namespaces owned by a test: [`NetNs`] creates one with a unique name and its `Drop`
//! undoes everything it did (processes it started or was handed, links it created, the
//! namespace itself), also when the test panics. Plus [`eventually`], the polling helper every
//! test uses instead of sleeping.

use std::fmt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where `ip netns add` puts its bind mounts.
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// How long a registered process gets to exit after SIGTERM before it is killed.
pub const TERM_GRACE: Duration = Duration::from_secs(2);

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("cannot start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("network namespace tests need root (run the tests as root)")]
    NotRoot,
    #[error("interface name {0:?} is longer than 15 characters")]
    IfNameTooLong(String),
}

/// Runs `cmd` to completion; a non-zero exit is an error carrying its stderr.
pub fn run(cmd: &mut Command) -> Result<Output, NetNsError> {
    let command = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetNsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetNsError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// A command line as a human reads it, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// A unique namespace name: `<tag>-<pid>-<n>`. The tag is cut to keep names readable.
pub fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tag: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(24)
        .collect();
    format!("{tag}-{}-{n}", std::process::id())
}

/// A network namespace created by this process, named `<tag>-<pid>-<n>`.
///
/// Dropping it sends SIGTERM to every process registered with it (then SIGKILL after
/// [`TERM_GRACE`]), deletes the links it created and then the namespace. Errors in `Drop` are
/// printed, never raised.
pub struct NetNs {
    name: String,
    created: bool,
    children: Mutex<Vec<Child>>,
    pids: Mutex<Vec<i32>>,
    links: Mutex<Vec<(String, String)>>,
}

impl fmt::Debug for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetNs").field("name", &self.name).finish()
    }
}

impl NetNs {
    /// Creates the namespace and brings its loopback up.
    pub fn new(tag: &str) -> Result<Self, NetNsError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(NetNsError::NotRoot);
        }
        // The guard exists before the first side effect, so a failure below is cleaned up.
        let mut ns = NetNs {
            name: unique_name(tag),
            created: false,
            children: Mutex::new(Vec::new()),
            pids: Mutex::new(Vec::new()),
            links: Mutex::new(Vec::new()),
        };
        run(Command::new("ip").args(["netns", "add", &ns.name]))?;
        ns.created = true;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, as `CNI_NETNS` names it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(&self.name)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`), to be completed
    /// by the caller (args, env, stdin).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program args` inside the namespace to completion; stdout on success.
    pub fn exec<S: AsRef<std::ffi::OsStr>>(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[S],
    ) -> Result<String, NetNsError> {
        let out = run(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -n <ns> args...`; stdout on success.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetNsError> {
        let out = run(Command::new("ip").args(["-n", &self.name]).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sets a sysctl inside the namespace, e.g. `("net.ipv4.ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetNsError> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Reads a sysctl inside the namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String, NetNsError> {
        Ok(self.exec("sysctl", &["-n", key])?.trim().to_owned())
    }

    /// Starts `cmd` (usually from [`NetNs::command`]) and registers it: `Drop` stops it.
    pub fn spawn(&self, cmd: &mut Command) -> Result<u32, NetNsError> {
        self.spawn_with(cmd, |_| {})
    }

    /// [`NetNs::spawn`], letting `take` grab the child's pipes before it is registered.
    pub fn spawn_with(
        &self,
        cmd: &mut Command,
        take: impl FnOnce(&mut Child),
    ) -> Result<u32, NetNsError> {
        let mut child = cmd.spawn().map_err(|source| NetNsError::Spawn {
            command: describe(cmd),
            source,
        })?;
        take(&mut child);
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        Ok(pid)
    }

    /// Registers a process this test started by other means (for instance through a daemon it
    /// owns); `Drop` stops it by PID.
    pub fn register_pid(&self, pid: u32) {
        self.pids.lock().unwrap().push(pid as i32);
    }

    /// Stops one registered child now (SIGTERM, then SIGKILL) and reaps it.
    pub fn stop(&self, pid: u32) {
        let child = {
            let mut children = self.children.lock().unwrap();
            children
                .iter()
                .position(|c| c.id() == pid)
                .map(|i| children.swap_remove(i))
        };
        if let Some(child) = child {
            terminate_children(vec![child]);
        }
    }

    /// Records a link this guard created in namespace `ns`, deleted on drop.
    pub fn own_link(&self, ns: &str, ifname: &str) {
        self.links
            .lock()
            .unwrap()
            .push((ns.to_owned(), ifname.to_owned()));
    }

    /// Creates a veth pair `a_if` (in `a`) <-> `b_if` (in `b`), assigns the addresses (CIDR
    /// notation, optional) and brings both ends up. `a` owns the pair.
    pub fn veth_pair(
        a: &NetNs,
        a_if: &str,
        a_addr: Option<&str>,
        b: &NetNs,
        b_if: &str,
        b_addr: Option<&str>,
    ) -> Result<(), NetNsError> {
        for n in [a_if, b_if] {
            if n.len() > 15 {
                return Err(NetNsError::IfNameTooLong(n.to_owned()));
            }
        }
        a.ip(&[
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
        ])?;
        a.own_link(&a.name, a_if);
        for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
            if let Some(addr) = addr {
                ns.ip(&["addr", "add", addr, "dev", ifname])?;
            }
            ns.ip(&["link", "set", ifname, "up"])?;
        }
        Ok(())
    }

    /// The namespace's IPv4 addresses on `ifname` (without prefix length).
    pub fn ipv4_addrs(&self, ifname: &str) -> Result<Vec<String>, NetNsError> {
        let out = self.ip(&["-4", "-o", "addr", "show", "dev", ifname])?;
        Ok(parse_ip_o_addrs(&out))
    }
}

/// Extracts the addresses from `ip -o addr show` output.
pub fn parse_ip_o_addrs(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            it.find(|w| *w == "inet" || *w == "inet6")?;
            let cidr = it.next()?;
            Some(cidr.split('/').next()?.to_owned())
        })
        .collect()
}

fn terminate_children(mut children: Vec<Child>) {
    for c in &children {
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + TERM_GRACE;
    while !children.is_empty() {
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
        if Instant::now() >= deadline {
            for c in &mut children {
                let _ = c.kill();
                let _ = c.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Terminates processes that are not our children (no reaping possible): SIGTERM, wait for
/// them to disappear, SIGKILL the rest.
pub fn terminate_pids(pids: &[i32]) {
    for &p in pids {
        let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
    }
    let alive = |p: i32| kill(Pid::from_raw(p), None).is_ok() && !is_zombie(p);
    let deadline = Instant::now() + TERM_GRACE;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    for &p in pids {
        if alive(p) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let (_, rest) = s.rsplit_once(')')?;
            rest.split_whitespace().next().map(|st| st == "Z")
        })
        .unwrap_or(true)
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let children = std::mem::take(&mut *self.children.lock().unwrap());
        terminate_children(children);
        let pids = std::mem::take(&mut *self.pids.lock().unwrap());
        terminate_pids(&pids);
        for (ns, link) in self.links.lock().unwrap().drain(..).rev() {
            // The link may already be gone with its peer's namespace: that is fine.
            let _ = Command::new("ip")
                .args(["-n", &ns, "link", "del", &link])
                .stderr(Stdio::null())
                .status();
        }
        if self.created {
            if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Polling gave up: the condition was still false at the deadline.
#[derive(Debug, thiserror::Error)]
#[error("condition still unmet after {waited:?} ({attempts} attempts); last: {last}")]
pub struct TimedOut {
    pub waited: Duration,
    pub attempts: u32,
    pub last: String,
}

/// Calls `f` until it returns `Ok`, with a short growing pause between attempts, for at most
/// `deadline`. The error keeps the last failure's message.
pub fn eventually<T, E: fmt::Display>(
    deadline: Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> Result<T, TimedOut> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match f() {
            Ok(v) => return Ok(v),
            Err(e) => {
                let waited = start.elapsed();
                if waited >= deadline {
                    return Err(TimedOut {
                        waited,
                        attempts,
                        last: e.to_string(),
                    });
                }
                std::thread::sleep(pause.min(deadline - waited));
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }
}

/// [`eventually`] for a condition that is simply met or not yet (`Some` or `None`): returns
/// the value, or panics naming `what` after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    eventually(deadline, || f().ok_or("not yet"))
        .unwrap_or_else(|e| panic!("timed out waiting for {what}: {e}"))
}

/// [`wait_for`] for a condition with no value: returns once `f` is true, or panics naming
/// `what` after `deadline`.
pub fn wait_until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    wait_for(what, deadline, || f().then_some(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_tagged() {
        let a = unique_name("my test!");
        let b = unique_name("my test!");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("my-test--{}-", std::process::id())));
    }

    #[test]
    fn eventually_returns_first_success_or_last_error() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(5), || {
            n += 1;
            if n < 3 {
                Err(format!("try {n}"))
            } else {
                Ok(n)
            }
        })
        .unwrap();
        assert_eq!(v, 3);
        let err = eventually(Duration::from_millis(30), || Err::<(), _>("nope")).unwrap_err();
        assert_eq!(err.last, "nope");
        assert!(err.attempts >= 2);
    }

    #[test]
    fn parses_ip_o_addr_output() {
        let out = "2: eth0    inet 10.9.0.2/24 brd 10.9.0.255 scope global eth0\\       valid_lft forever\n";
        assert_eq!(parse_ip_o_addrs(out), vec!["10.9.0.2".to_owned()]);
        assert!(parse_ip_o_addrs("").is_empty());
    }
}
