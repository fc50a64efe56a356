//! `perf` attached to running proxies: counted events (CPU time, context switches, syscalls
//! by kind) and a flat CPU profile, for the side-by-side benchmark's profile mode.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The events counted: CPU time, scheduling, and the syscalls a relay makes.
pub const EVENTS: &[&str] = &[
    "task-clock",
    "context-switches",
    "syscalls:sys_enter_read",
    "syscalls:sys_enter_readv",
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_recvmsg",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_sendmsg",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_epoll_pwait",
    "syscalls:sys_enter_futex",
];

/// Whether `perf` can count the events here.
pub fn available() -> bool {
    Command::new("perf")
        .args(["stat", "-x,", "-e", &EVENTS.join(","), "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A `perf` process attached to one PID until [`Attached::finish`].
pub struct Attached {
    child: Child,
    out: PathBuf,
}

impl Attached {
    /// Counts [`EVENTS`] in every thread of `pid`.
    pub fn stat(pid: u32, out: &Path) -> Attached {
        Self::spawn(
            &[
                "stat",
                "-x,",
                "-e",
                &EVENTS.join(","),
                "-p",
                &pid.to_string(),
                "-o",
                out.to_str().unwrap(),
            ],
            out,
        )
    }

    /// Samples `pid`'s threads (all CPU time, kernel included) at 999 Hz.
    pub fn record(pid: u32, out: &Path) -> Attached {
        Self::spawn(
            &[
                "record",
                "-q",
                "-F",
                "999",
                "-p",
                &pid.to_string(),
                "-o",
                out.to_str().unwrap(),
            ],
            out,
        )
    }

    fn spawn(args: &[&str], out: &Path) -> Attached {
        let child = Command::new("perf")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("perf");
        // perf needs a moment to attach to every thread.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Attached {
            child,
            out: out.to_owned(),
        }
    }

    /// Stops perf (SIGINT: it writes what it has) and returns its output file.
    pub fn finish(mut self) -> PathBuf {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        self.out.clone()
    }
}

/// `perf stat -x,` output: event -> count (task-clock in ms).
pub fn parse_stat(path: &Path) -> BTreeMap<String, f64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 3 {
            continue;
        }
        if let Ok(v) = f[0].parse::<f64>() {
            out.insert(f[2].to_owned(), v);
        }
    }
    out
}

/// Counts of one load, grouped: CPU ms, context switches, reads, writes, epoll waits, futex.
#[derive(Debug, Clone, Copy, Default)]
pub struct Costs {
    pub cpu_ms: f64,
    pub switches: f64,
    pub reads: f64,
    pub writes: f64,
    pub polls: f64,
    pub futex: f64,
}

impl Costs {
    pub fn from_stat(m: &BTreeMap<String, f64>) -> Costs {
        let sum = |names: &[&str]| {
            names
                .iter()
                .map(|n| m.get(&format!("syscalls:sys_enter_{n}")).unwrap_or(&0.0))
                .sum()
        };
        Costs {
            cpu_ms: m.get("task-clock").copied().unwrap_or(0.0),
            switches: m.get("context-switches").copied().unwrap_or(0.0),
            reads: sum(&["read", "readv", "recvfrom", "recvmsg"]),
            writes: sum(&["write", "writev", "sendto", "sendmsg"]),
            polls: sum(&["epoll_wait", "epoll_pwait"]),
            futex: sum(&["futex"]),
        }
    }

    /// Every count divided by `units` (MiB relayed, exchanges, requests).
    pub fn per(self, units: f64) -> Costs {
        let d = units.max(1e-9);
        Costs {
            cpu_ms: self.cpu_ms / d,
            switches: self.switches / d,
            reads: self.reads / d,
            writes: self.writes / d,
            polls: self.polls / d,
            futex: self.futex / d,
        }
    }
}

/// The top of a flat profile (`perf report --sort dso,sym`), lines of at least `min_pct`.
pub fn report(path: &Path, min_pct: f64) -> String {
    let out = Command::new("perf")
        .args([
            "report",
            "-i",
            path.to_str().unwrap(),
            "--stdio",
            "--no-children",
            "--sort",
            "dso,sym",
            "--percent-limit",
            &min_pct.to_string(),
        ])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}
