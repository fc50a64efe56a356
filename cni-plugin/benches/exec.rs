//! What the runtime pays per pod: wall time of exec'ing the plugin binary (process start,
//! parse, agent round trip to an in-process fake agent that answers at once, print), for
//! VERSION, ADD and DEL. Prints a table; see benches/README.md.
//!
//!   cargo bench -p ambient-cni --bench exec            (release build)
//!   ACNI_BENCH_RUNS=1000 cargo bench -p ambient-cni --bench exec

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ambient_common::agent_api::{AddOutcome, AgentOp, AgentReply};
use serde_json::json;
use support::*;

fn measure(runs: usize, env: &HashMap<String, String>, stdin: &[u8]) -> Vec<Duration> {
    // Warm the page cache and the dynamic loader first.
    for _ in 0..10 {
        assert_eq!(run(env, stdin).status, 0);
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let ran = run(env, stdin);
        times.push(start.elapsed());
        assert_eq!(ran.status, 0, "{ran:?}");
    }
    times.sort();
    times
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn main() {
    let runs: usize = std::env::var("ACNI_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let sb = Sandbox::new();
    let agent = FakeAgent::answering(&sb.socket(), |req| {
        Answer::Reply(match req.op {
            AgentOp::Add(_) => AgentReply::Added(AddOutcome::Captured),
            AgentOp::Del(_) => AgentReply::Released,
            AgentOp::Check(_) => AgentReply::Checked,
            AgentOp::Status => AgentReply::Ready,
            AgentOp::Gc { .. } => AgentReply::Collected { released: 0 },
        })
    })
    .expect("fake agent");
    // No log file, info level: what a default install does.
    let mut conf = sb.conf(
        "1.0.0",
        json!({"prevResult": bridge_result("1.0.0"), "logLevel": "warn"}),
    );
    conf.as_object_mut().unwrap().remove("logFile");
    let conf = serde_json::to_vec(&conf).unwrap();

    println!("ambient-cni exec cost, {runs} runs each (microseconds, wall clock incl. fork/exec)");
    println!(
        "{:<28} {:>8} {:>8} {:>8} {:>8}",
        "command", "mean", "p50", "p90", "p99"
    );
    for (label, env, stdin) in [
        ("VERSION", command_env("VERSION"), &b""[..]),
        ("ADD (fake agent)", attach_env("ADD"), &conf[..]),
        ("DEL (fake agent)", attach_env("DEL"), &conf[..]),
    ] {
        let t = measure(runs, &env, stdin);
        let mean = t.iter().sum::<Duration>() / t.len() as u32;
        let pct = |p: f64| t[((t.len() as f64 * p) as usize).min(t.len() - 1)];
        println!(
            "{:<28} {:>8} {:>8} {:>8} {:>8}",
            label,
            us(mean),
            us(pct(0.5)),
            us(pct(0.9)),
            us(pct(0.99))
        );
    }
    println!("agent requests served: {}", agent.requests().len());
}
