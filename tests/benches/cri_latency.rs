//! Pod creation latency through the CNI chain, with and without a container runtime.
//!
//! `cargo build --workspace && cargo bench -p ambient-tests --bench cri_latency [-- N]`
//! (as root; N pods per row, default 20). Prints one table:
//! - chain rows: `bridge` + `host-local` + last plugin driven by the harness's libcni-style
//!   runner (each plugin exec'd through `ip netns exec <node>`), per plugin and in total;
//! - CRI rows: containerd's RunPodSandbox and StopPodSandbox+RemovePodSandbox with the same
//!   chain, pause image built locally.
//!
//! A baseline row gives the cost of `ip netns exec` alone, paid by every plugin call of the
//! harness's runner (a runtime already inside the node namespace does not pay it).
//!
//! The last plugin is either the `cni-recorder` stand-in (the cost of exec'ing a trivial chained
//! plugin) or the real `ambient-cni` talking to a fake agent (the plugin's own cost, without the
//! agent's rule programming).

use std::time::{Duration, Instant};

use ambient_tests::addrs::Block;
use ambient_tests::cni::Attach;
use ambient_tests::fake_agent::FakeAgent;
use ambient_tests::topo::{Node, NodeSpec, PodMeta};

#[path = "../tests/support/cri.rs"]
mod cri;
use cri::{run_sandbox, stop_and_remove, CriLab, Last, PodIdentity, RECORDER};

struct Row {
    name: String,
    samples: Vec<Duration>,
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn print(rows: &[Row]) {
    println!(
        "{:<58} {:>4} {:>8} {:>8} {:>8} {:>8}",
        "what", "n", "min ms", "p50 ms", "p90 ms", "max ms"
    );
    for r in rows {
        let mut s = r.samples.clone();
        s.sort();
        if s.is_empty() {
            continue;
        }
        let q = |f: f64| s[((s.len() - 1) as f64 * f).round() as usize];
        println!(
            "{:<58} {:>4} {:>8} {:>8} {:>8} {:>8}",
            r.name,
            s.len(),
            ms(s[0]),
            ms(q(0.5)),
            ms(q(0.9)),
            ms(s[s.len() - 1])
        );
    }
}

fn chain_rows(n: usize, label: &str, cidr: &str, recorder: bool, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("cni.sock");
    let _agent = FakeAgent::start(&sock).unwrap();
    let mut spec =
        NodeSpec::new(&format!("bench-{label}"), cidr, Attach::Bridge).agent_socket(&sock);
    if recorder {
        spec.ambient_cni = Some(RECORDER.into());
        spec.ambient_extra.insert(
            "recordFile".into(),
            dir.path().join("calls.jsonl").to_string_lossy().into(),
        );
    }
    let node = Node::new(&spec).unwrap();
    if recorder {
        let mut base = vec![];
        for _ in 0..n {
            let start = Instant::now();
            ambient_tests::netns::run(&mut node.ns().command("/bin/true")).unwrap();
            base.push(start.elapsed());
        }
        rows.push(Row {
            name: "baseline: ip netns exec <node> /bin/true".to_owned(),
            samples: base,
        });
    }
    let (mut primary, mut last, mut total, mut del) = (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let start = Instant::now();
        let (mut pod, timings) = node
            .add_pod_timed(&PodMeta::new("bench", &format!("p{i}")))
            .unwrap();
        total.push(start.elapsed());
        primary.push(timings[0].elapsed);
        last.push(timings[timings.len() - 1].elapsed);
        let start = Instant::now();
        pod.detach().unwrap();
        del.push(start.elapsed());
    }
    let last_name = if recorder {
        "cni-recorder"
    } else {
        "ambient-cni (fake agent)"
    };
    rows.push(Row {
        name: "chain ADD: bridge+host-local (first plugin)".to_owned(),
        samples: primary,
    });
    rows.push(Row {
        name: format!("chain ADD: {last_name} (last plugin)"),
        samples: last,
    });
    rows.push(Row {
        name: format!("chain ADD total, last = {last_name}"),
        samples: total,
    });
    rows.push(Row {
        name: format!("chain DEL total, last = {last_name}"),
        samples: del,
    });
}

async fn cri_rows(n: usize, last: Last, label: &str, rows: &mut Vec<Row>) {
    let fake = matches!(last, Last::AmbientCni);
    let lab = CriLab::new(&format!("bench-{label}"), last);
    let _agent = fake.then(|| FakeAgent::start(&lab.agent_socket()).unwrap());
    let mut client = lab.client().await;
    let (mut run, mut stop) = (vec![], vec![]);
    for i in 0..n {
        let pod = PodIdentity::new("bench", &format!("cri-{i}"));
        let (id, _, latency) = run_sandbox(&lab, &mut client, &pod).await;
        run.push(latency);
        let start = Instant::now();
        stop_and_remove(&mut client, &id).await;
        stop.push(start.elapsed());
    }
    let last_name = if fake {
        "ambient-cni (fake agent)"
    } else {
        "cni-recorder"
    };
    rows.push(Row {
        name: format!("CRI RunPodSandbox, last = {last_name}"),
        samples: run,
    });
    rows.push(Row {
        name: format!("CRI Stop+RemovePodSandbox, last = {last_name}"),
        samples: stop,
    });
}

fn main() {
    let n = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(20);
    let mut rows = Vec::new();
    let block = Block::lease();
    chain_rows(n, "rec", &block.net24(1), true, &mut rows);
    chain_rows(n, "amb", &block.net24(2), false, &mut rows);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let calls = tempfile::tempdir().unwrap();
        cri_rows(
            n,
            Last::Recorder(calls.path().join("calls.jsonl")),
            "crirec",
            &mut rows,
        )
        .await;
        cri_rows(n, Last::AmbientCni, "criamb", &mut rows).await;
    });
    print(&rows);
}
