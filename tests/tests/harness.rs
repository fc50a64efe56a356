//! Root tests of the harness itself: namespaces, the chain runner with the Debian plugins and a
//! recording stand-in for `ambient-cni`, nodes and pods with bridge and ptp attachment, and
//! traffic between pods with `netprobe`. Each test leases its own address block
//! (`ambient_tests::addrs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_tests::addrs::Block;
use ambient_tests::capture::{payload_contains, Capture};
use ambient_tests::cni::{Attach, CniError};
use ambient_tests::netns::{eventually, NetNs};
use ambient_tests::recorder::{read_calls, Call};
use ambient_tests::topo::{Node, NodeSpec, PodMeta};

const NETPROBE: &str = env!("CARGO_BIN_EXE_netprobe");
const RECORDER: &str = env!("CARGO_BIN_EXE_cni-recorder");

/// A recording of the calls the chain's last plugin received; the file goes with it.
struct Calls {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

/// A node whose `ambient-cni` entry is the recorder; `tweak` adjusts the spec.
fn recording_node_with(
    tag: &str,
    cidr: &str,
    attach: Attach,
    tweak: impl FnOnce(&mut NodeSpec),
) -> (Node, Calls) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calls.jsonl");
    let mut spec = NodeSpec::new(tag, cidr, attach).agent_socket("/nonexistent/agent.sock");
    spec.ambient_cni = Some(PathBuf::from(RECORDER));
    spec.ambient_extra
        .insert("recordFile".into(), path.to_string_lossy().into());
    tweak(&mut spec);
    (Node::new(&spec).unwrap(), Calls { _dir: dir, path })
}

fn recording_node(tag: &str, cidr: &str, attach: Attach) -> (Node, Calls) {
    recording_node_with(tag, cidr, attach, |_| {})
}

/// Starts `netprobe listen-echo` in `ns` on `port` (all IPv4 addresses) and waits until it
/// listens.
fn echo_server(ns: &NetNs, port: u16, dir: &Path) {
    echo_server_on(ns, "0.0.0.0", port, dir)
}

fn echo_server_on(ns: &NetNs, addr: &str, port: u16, dir: &Path) {
    let ready = dir.join(format!("ready-{}-{port}", ns.name()));
    ns.spawn(
        ns.command(NETPROBE)
            .args(["listen-echo", "--addr", addr, "--port", &port.to_string()])
            .arg("--ready-file")
            .arg(&ready),
    )
    .unwrap();
    eventually(Duration::from_secs(5), || std::fs::metadata(&ready)).unwrap();
}

fn probe(ns: &NetNs, to: &str) -> Result<String, ambient_tests::netns::NetNsError> {
    let out = ambient_tests::netns::run(
        ns.command(NETPROBE)
            .args(["connect", "--to", to, "--send", "hello"])
            .env("RUST_LIB_BACKTRACE", "0"),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn netns_guard_removes_namespace_processes_and_links() {
    let dir = tempfile::tempdir().unwrap();
    let blk = Block::lease();
    let (name_a, pid);
    {
        let a = NetNs::new("guard-a").unwrap();
        let b = NetNs::new("guard-b").unwrap();
        NetNs::veth_pair(
            &a,
            "va",
            Some(format!("{}/30", blk.v4(0, 1)).as_str()),
            &b,
            "vb",
            Some(format!("{}/30", blk.v4(0, 2)).as_str()),
        )
        .unwrap();
        a.sysctl("net.ipv4.ip_forward", "1").unwrap();
        assert_eq!(a.sysctl_get("net.ipv4.ip_forward").unwrap(), "1");
        assert_eq!(b.ipv4_addrs("vb").unwrap(), vec![blk.v4(0, 2).to_string()]);
        echo_server(&b, 7001, dir.path());
        let out = probe(&a, &format!("{}:7001", blk.v4(0, 2))).unwrap();
        assert!(out.contains("\"received\":\"hello\""), "{out}");
        name_a = a.name().to_owned();
        pid = b.spawn(b.command("sleep").arg("600")).unwrap();
        assert!(Path::new("/run/netns").join(&name_a).exists());
        assert!(
            NetNs::veth_pair(&a, "a-name-that-is-too-long", None, &b, "x", None).is_err(),
            "interface names over 15 characters are refused"
        );
    }
    assert!(!Path::new("/run/netns").join(&name_a).exists());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "sleep was killed and reaped"
    );
}

#[test]
fn bridge_chain_runs_with_libcni_semantics() {
    let blk = Block::lease();
    let (node, calls) = recording_node("chain-br", &blk.net24(1), Attach::Bridge);
    let meta = PodMeta::new("ns-a", "pod-a");
    let pod = node.add_pod(&meta).unwrap();
    let ip = pod.ip().unwrap();
    assert!(ip.starts_with(&format!("10.{}.1.", blk.octet())), "{ip}");
    assert_eq!(pod.ns().ipv4_addrs("eth0").unwrap(), vec![ip.clone()]);
    // The bridge landed in the node namespace, not the host's.
    node.ns().ip(&["link", "show", "cni0"]).unwrap();
    assert!(std::process::Command::new("ip")
        .args(["link", "show", "cni0"])
        .output()
        .unwrap()
        .stdout
        .is_empty());

    let c = read_calls(&calls.path);
    assert_eq!(c.len(), 1);
    let add: &Call = &c[0];
    assert_eq!(add.command, "ADD");
    assert_eq!(add.env["CNI_NETNS"], pod.ns().path().to_string_lossy());
    assert_eq!(add.env["CNI_IFNAME"], "eth0");
    let args = &add.env["CNI_ARGS"];
    assert!(args.starts_with("IgnoreUnknown=1;"), "{args}");
    assert!(
        args.contains(&format!("K8S_POD_UID={}", meta.uid)),
        "{args}"
    );
    assert!(args.contains("K8S_POD_NAME=pod-a") && args.contains("K8S_POD_NAMESPACE=ns-a"));
    assert_eq!(add.stdin["agentSocket"], "/nonexistent/agent.sock");
    assert_eq!(add.stdin["name"], node.conflist().name.as_str());
    assert_eq!(add.stdin["cniVersion"], "1.0.0");
    assert_eq!(add.stdin["prevResult"], *pod.result());
    let ifaces = add.stdin["prevResult"]["interfaces"].as_array().unwrap();
    assert!(ifaces.iter().any(|i| i["name"] == "cni0"));

    pod.check().unwrap();
    let c = read_calls(&calls.path);
    assert_eq!(c.last().unwrap().command, "CHECK");
    assert_eq!(c.last().unwrap().stdin["prevResult"], *pod.result());

    drop(pod);
    let c = read_calls(&calls.path);
    let del = c.last().unwrap();
    assert_eq!(del.command, "DEL");
    assert_eq!(
        del.stdin["prevResult"]["ips"][0]["address"],
        format!("{ip}/24")
    );
    // host-local released the address.
    let lease = node
        .dir()
        .join("ipam")
        .join(&node.conflist().name)
        .join(&ip);
    assert!(!lease.exists(), "{} still leased", lease.display());
}

#[test]
fn pods_on_one_bridge_talk() {
    let blk = Block::lease();
    let dir = tempfile::tempdir().unwrap();
    let (node, _calls) = recording_node("talk-br", &blk.net24(1), Attach::Bridge);
    let server = node.add_pod(&PodMeta::new("ns", "server")).unwrap();
    let client = node.add_pod(&PodMeta::new("ns", "client")).unwrap();
    echo_server(server.ns(), 8080, dir.path());
    let out = probe(client.ns(), &format!("{}:8080", server.ip().unwrap())).unwrap();
    assert!(out.contains(&client.ip().unwrap()), "{out}");
    drop((server, client));
}

#[test]
fn ptp_pods_on_two_linked_nodes_talk() {
    let blk = Block::lease();
    let dir = tempfile::tempdir().unwrap();
    let (n1, c1) = recording_node("two-ptp1", &blk.net24(1), Attach::Ptp);
    let (n2, _c2) = recording_node("two-ptp2", &blk.net24(2), Attach::Ptp);
    Node::link(
        &n1,
        "ul0",
        &format!("{}/30", blk.v4(0, 1)),
        &n2,
        "ul0",
        &format!("{}/30", blk.v4(0, 2)),
    )
    .unwrap();
    let p1 = n1.add_pod(&PodMeta::new("ns", "p1")).unwrap();
    let p2 = n2.add_pod(&PodMeta::new("ns", "p2")).unwrap();
    echo_server(p2.ns(), 9090, dir.path());
    let cap = Capture::start(n1.ns(), "ul0", "tcp", &dir.path().join("ul0.pcap")).unwrap();
    let out = probe(p1.ns(), &format!("{}:9090", p2.ip().unwrap())).unwrap();
    assert!(out.contains(&p1.ip().unwrap()), "{out}");
    // Without the mesh, the underlay carries the bytes in plaintext, pod to pod.
    let packets = cap
        .finish_when(n1.ns(), Duration::from_secs(5), |p| {
            payload_contains(p, b"hello")
        })
        .unwrap();
    assert!(packets
        .iter()
        .any(|p| p.dport == 9090 && p.src.to_string() == p1.ip().unwrap()));
    // ptp gives every pod its own host-side veth, named in prevResult.
    let add = &read_calls(&c1.path)[0];
    let host_if = add.stdin["prevResult"]["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i.get("sandbox").is_none())
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_owned();
    n1.ns().ip(&["link", "show", &host_if]).unwrap();
    drop((p1, p2));
}

#[test]
fn failed_add_is_a_typed_error_and_is_cleaned_with_del() {
    let blk = Block::lease();
    let (node, calls) = recording_node_with("fail-add", &blk.net24(1), Attach::Bridge, |s| {
        s.ambient_extra.insert("failAdd".into(), 11.into());
    });
    let err = node.add_pod(&PodMeta::new("ns", "p")).unwrap_err();
    let ambient_tests::topo::TopoError::Cni(e) = &err else {
        panic!("{err}")
    };
    assert_eq!(e.code(), Some(11), "{e}");
    assert!(matches!(e, CniError::Plugin { plugin, .. } if plugin == "ambient-cni"));
    let cmds: Vec<String> = read_calls(&calls.path)
        .into_iter()
        .map(|c| c.command)
        .collect();
    assert_eq!(cmds, ["ADD", "DEL"]);
    // host-local's reservation was released by the DEL: the directory holds no address.
    let ipam = node.dir().join("ipam").join(&node.conflist().name);
    let leased = std::fs::read_dir(&ipam)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("10."))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(leased, 0);
}

#[test]
fn dual_stack_pods_talk_over_ipv6() {
    let blk = Block::lease();
    let dir = tempfile::tempdir().unwrap();
    let (node, _calls) = recording_node_with("ds-br", &blk.net24(1), Attach::Bridge, |s| {
        s.pod_cidr6 = Some(blk.net64(1));
    });
    let server = node.add_pod(&PodMeta::new("ns", "server6")).unwrap();
    let client = node.add_pod(&PodMeta::new("ns", "client6")).unwrap();
    let (s6, c6) = (server.ip6().unwrap(), client.ip6().unwrap());
    assert!(
        s6.to_string()
            .starts_with(&format!("fd00:{:x}:1:", blk.octet())),
        "{s6}"
    );
    assert!(server
        .ip()
        .unwrap()
        .starts_with(&format!("10.{}.1.", blk.octet())));
    // `::` with IPV6_V6ONLY off also takes IPv4: one server for both families.
    echo_server_on(server.ns(), "::", 8086, dir.path());
    // IPv6 addresses are usable only after duplicate address detection: poll.
    let out = eventually(Duration::from_secs(10), || {
        probe(client.ns(), &format!("[{s6}]:8086"))
    })
    .unwrap();
    assert!(out.contains(&c6.to_string()), "{out}");
    probe(client.ns(), &format!("{}:8086", server.ip().unwrap())).unwrap();
}

#[test]
fn status_and_gc_follow_cni_1_1() {
    use ambient_tests::cni::{CniRunner, ConfList};
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(RECORDER, bin.join("rec")).unwrap();
    let calls = dir.path().join("calls.jsonl");
    let list = ConfList::from_json(&serde_json::json!({
        "name": "n", "cniVersion": "1.1.0",
        "plugins": [{"type": "rec", "recordFile": calls}]
    }))
    .unwrap();
    let runner = CniRunner::new(&bin, None);
    runner.status(&list).unwrap();
    runner
        .gc(&list, &[("c1".to_owned(), "eth0".to_owned())])
        .unwrap();
    let c = read_calls(&calls);
    assert_eq!(c[0].command, "STATUS");
    assert_eq!(c[0].env["CNI_ARGS"], "");
    assert!(c[0].stdin.get("prevResult").is_none());
    assert_eq!(c[1].command, "GC");
    assert_eq!(
        c[1].stdin["cni.dev/valid-attachments"],
        serde_json::json!([{"containerID": "c1", "ifname": "eth0"}])
    );
}

/// The real plugin through the harness: STATUS fails with code 50 while no agent listens, and
/// passes once the (fake) agent is up. (Debian's plugins stop at CNI 1.0.0, so the 1.1.0 list
/// holds `ambient-cni` alone.)
#[test]
fn ambient_cni_status_follows_the_agent() {
    let blk = Block::lease();
    use ambient_tests::cni::ConfList;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("cni.sock");
    let node =
        Node::new(&NodeSpec::new("acni-status", &blk.net24(1), Attach::Bridge).agent_socket(&sock))
            .unwrap();
    let list = ConfList::from_json(&serde_json::json!({
        "name": "status", "cniVersion": "1.1.0",
        "plugins": [{"type": "ambient-cni", "agentSocket": sock}]
    }))
    .unwrap();
    let err = node.runner().status(&list).unwrap_err();
    assert_eq!(err.code(), Some(50), "{err}");
    let _agent = ambient_tests::fake_agent::FakeAgent::start(&sock).unwrap();
    node.runner().status(&list).unwrap();
}

#[test]
fn dropping_a_pod_runs_every_del_even_when_one_fails() {
    let blk = Block::lease();
    let (node, calls) = recording_node_with("del-fail", &blk.net24(1), Attach::Bridge, |s| {
        s.ambient_extra.insert("failDel".into(), 11.into());
    });
    let pod = node.add_pod(&PodMeta::new("ns", "p")).unwrap();
    let ip = pod.ip().unwrap();
    let lease = node
        .dir()
        .join("ipam")
        .join(&node.conflist().name)
        .join(&ip);
    assert!(lease.exists());
    drop(pod);
    assert_eq!(read_calls(&calls.path).last().unwrap().command, "DEL");
    assert!(
        !lease.exists(),
        "host-local's DEL ran after the failing one"
    );
}
