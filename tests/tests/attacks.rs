//! The attack suite (issue 11), link layer and capture edges: each test is an attack a pod with
//! ordinary privileges can run (CAP_NET_RAW, as containerd and Docker grant it), played against
//! the real `node-agent` and `ztunnel` in the lab, asserting that the attack's packets never
//! reach their target and that no plaintext of an ambient pod crossed where it must not. Frames
//! the attacker's own kernel would not send are written with `netprobe frame` (a packet
//! socket); where the kernel's stack can send them (a VLAN device, a static neighbour), the
//! test configures the attacker's namespace, which changes nothing on the wire.
//!
//! Each test owns a cluster in a leased `10.<octet>.0.0/16` (`ambient_tests::addrs`). Run as root after
//! `cargo build --workspace`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ambient_tests::bins;
use ambient_tests::capture::Capture;
use ambient_tests::cluster::Cluster;
use ambient_tests::cluster::{test_cluster as cluster, test_pod as pod};
use ambient_tests::cni::Attach;
use ambient_tests::topo::{gateway_of, Node, NodeSpec, PodMeta};
use ambient_tests::{eventually, NetNs};

const WAIT: Duration = Duration::from_secs(15);

fn sh(ns: &NetNs, program: &str, args: &[&str]) -> String {
    ns.exec(program, args)
        .unwrap_or_else(|e| panic!("{program} {args:?} in {}: {e}", ns.name()))
}

fn mac_of(ns: &NetNs, ifname: &str) -> [u8; 6] {
    let text = sh(ns, "cat", &[&format!("/sys/class/net/{ifname}/address")]);
    parse_mac(text.trim())
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (b, part) in out.iter_mut().zip(s.split(':')) {
        *b = u8::from_str_radix(part, 16).unwrap_or_else(|_| panic!("MAC {s:?}"));
    }
    out
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends `frame` from inside `ns` on `dev`, as a pod with CAP_NET_RAW can.
fn send_frame(ns: &NetNs, dev: &str, frame: &[u8], count: u32) {
    sh(
        ns,
        bins::binary(bins::NETPROBE).to_str().unwrap(),
        &[
            "frame",
            "--dev",
            dev,
            "--hex",
            &hex(frame),
            "--count",
            &count.to_string(),
        ],
    );
}

/// An ARP request `sender_ip is-at sender_mac, who has target_ip`, optionally behind an
/// 802.1Q tag with VLAN id 0 (a priority tag, read as untagged by the receiver).
fn arp_request(
    src_mac: [u8; 6],
    sender_mac: [u8; 6],
    sender_ip: Ipv4Addr,
    target_ip: Ipv4Addr,
    vlan0: bool,
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend([0xff; 6]);
    f.extend(src_mac);
    if vlan0 {
        f.extend([0x81, 0x00, 0x00, 0x00]);
    }
    f.extend([0x08, 0x06]);
    f.extend([0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    f.extend(sender_mac);
    f.extend(sender_ip.octets());
    f.extend([0; 6]);
    f.extend(target_ip.octets());
    f
}

/// An unsolicited neighbour advertisement (override flag set) for `target` at `mac`, to all
/// nodes, from `src` (the attacker's link-local address).
fn neighbour_advert(mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend(target.octets());
    icmp.extend([2, 1]); // option: target link-layer address, 1 x 8 bytes
    icmp.extend(mac);
    let sum = icmpv6_checksum(src, dst, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = Vec::new();
    f.extend([0x33, 0x33, 0, 0, 0, 1]);
    f.extend(mac);
    f.extend([0x86, 0xdd]);
    f.extend([0x60, 0, 0, 0]);
    f.extend((icmp.len() as u16).to_be_bytes());
    f.extend([58, 255]);
    f.extend(src.octets());
    f.extend(dst.octets());
    f.extend(icmp);
    f
}

fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, body: &[u8]) -> u16 {
    let mut data = Vec::new();
    data.extend(src.octets());
    data.extend(dst.octets());
    data.extend((body.len() as u32).to_be_bytes());
    data.extend([0, 0, 0, 58]);
    data.extend(body);
    if data.len() % 2 == 1 {
        data.push(0);
    }
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The link-local address of `ifname` in `ns`.
fn link_local(ns: &NetNs, ifname: &str) -> Ipv6Addr {
    eventually(WAIT, || {
        let out = ns
            .exec(
                "ip",
                &["-6", "-o", "addr", "show", "dev", ifname, "scope", "link"],
            )
            .map_err(|e| e.to_string())?;
        out.split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .filter(|_| !out.contains("tentative"))
            .ok_or_else(|| format!("no usable link-local address on {ifname}: {out:?}"))
    })
    .unwrap()
}

fn ifindex(ns: &NetNs, ifname: &str) -> u32 {
    sh(ns, "cat", &[&format!("/sys/class/net/{ifname}/ifindex")])
        .trim()
        .parse()
        .unwrap()
}

/// `netprobe connect` from `ns`; Ok(echo) or Err(reason).
fn connect_from(ns: &NetNs, to: SocketAddr, payload: &str) -> Result<String, String> {
    ns.exec(
        bins::binary(bins::NETPROBE),
        &[
            "connect",
            "--to",
            &to.to_string(),
            "--send",
            payload,
            "--timeout-ms",
            "2000",
        ],
    )
    .map_err(|e| e.to_string())
}

/// The node's neighbour entry for `ip` on `dev`: the MAC it holds, if any.
fn node_neighbour(ns: &NetNs, ip: IpAddr, dev: &str) -> Option<[u8; 6]> {
    let out = ns
        .exec("ip", &["neigh", "show", &ip.to_string(), "dev", dev])
        .ok()?;
    out.split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .map(parse_mac)
}

/// The bridge port the node's forwarding database holds `mac` on.
fn fdb_port(ns: &NetNs, mac: [u8; 6]) -> Option<String> {
    let out = ns.exec("bridge", &["fdb", "show", "br", "cni0"]).ok()?;
    out.lines()
        .find(|l| l.starts_with(&mac_str(mac)) && !l.contains("permanent"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "dev").nth(1))
        .map(str::to_owned)
}

fn host_veth(c: &Cluster, pod: usize) -> String {
    let p = &c.pods[pod];
    let rows =
        ambient_tests::agent::pods(&c.bin(bins::NODE_AGENT), &c.nodes[p.node].run_dir()).unwrap();
    rows.into_iter()
        .find(|r| r.name == p.name())
        .map(|r| r.host_interface)
        .unwrap_or_else(|| panic!("the agent does not list {}", p.name()))
}

/// Stops an underlay capture and asserts that no plaintext TCP of an ambient pod, and none
/// of `markers`, crossed it.
fn assert_underlay_clean(c: &Cluster, cap: Capture, markers: &[&str]) {
    let packets =
        ambient_tests::cluster::finish_quiet(cap, &c.underlay, Duration::from_millis(700), WAIT)
            .unwrap();
    let leaks = ambient_tests::cluster::ambient_plaintext(
        &packets,
        &c.ambient_ips(),
        ambient_common::constants::HBONE_PORT,
    );
    assert!(
        leaks.is_empty(),
        "plaintext of ambient pods on the underlay: {:?}",
        leaks.iter().take(3).collect::<Vec<_>>()
    );
    for m in markers {
        assert!(
            !ambient_tests::capture::payload_contains(&packets, m.as_bytes()),
            "{m} crossed the underlay in plaintext"
        );
    }
}

/// Gives `ns` an interface `v0` whose frames leave `eth0` behind an 802.1Q tag with VLAN id
/// 0 (this kernel has no VLAN devices: `v0` is a veth whose peer `netprobe vlan-relay` reads
/// and re-sends tagged). Replies come back untagged to `eth0`, whose MAC `v0` borrows.
fn tagged_path(ns: &NetNs) -> u32 {
    let mac = mac_str(mac_of(ns, "eth0"));
    for args in [
        vec!["link", "add", "v0", "type", "veth", "peer", "name", "v0p"],
        vec!["link", "set", "v0", "address", &mac],
    ] {
        sh(ns, "ip", &args);
    }
    for dev in ["v0", "v0p"] {
        sh(
            ns,
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=1")],
        );
        sh(ns, "ip", &["link", "set", dev, "up"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("relay.ready");
    let mut cmd = ns.command(bins::binary(bins::NETPROBE));
    cmd.args([
        "vlan-relay",
        "--from",
        "v0p",
        "--to",
        "eth0",
        "--ready-file",
    ])
    .arg(&ready);
    let pid = ns.spawn(&mut cmd).unwrap();
    eventually(WAIT, || {
        if ready.exists() {
            Ok(())
        } else {
            Err("relay not ready")
        }
    })
    .unwrap();
    pid
}

fn strict(namespace: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": format!("strict-{namespace}"), "namespace": namespace},
        "spec": {"mtls": {"mode": "STRICT"}},
    })
}

/// Attack 1: 802.1Q frames with VLAN id 0 went past every bridge guard (they matched no
/// `ether type ip`/`arp` rule) and were read as untagged by the node and by pods.
/// (a) An ambient attacker poisons the node's neighbour entry for an ambient victim with a
/// tagged ARP, then opens a tagged TCP connection with the victim's address: ztunnel would
/// carry it with the victim's certificate. (b) A plain pod sends a tagged SYN straight to an
/// ambient pod's MAC, past 15006 (STRICT mTLS).
#[test]
fn vlan_tagged_frames_take_no_identity_and_skip_no_capture() {
    let mut c = cluster("atvl", Attach::Bridge);
    let victim = pod(&mut c, 0, "ambient-demo", "victim");
    let attacker = pod(&mut c, 0, "ambient-demo", "attacker");
    let legacy = pod(&mut c, 0, "legacy", "legacy");
    let server = pod(&mut c, 1, "ambient-demo", "server");
    c.write_manifest("strict", &[strict("ambient-demo")])
        .unwrap();
    c.wait_converged(WAIT).unwrap();
    let node = c.nodes[0].ns();
    let gw = gateway_of(c.nodes[0].node.pod_cidr()).unwrap();
    let bridge_mac = mac_of(node, "cni0");
    let victim_ip = c.pods[victim].ip;
    let victim_mac = mac_of(c.pods[victim].ns(), "eth0");
    // The legitimate path works: the victim reaches the server through the mesh.
    let to = c.pods[server].echo_addr();
    c.connect(victim, to, "legit").unwrap();

    let cap = c.capture_underlay("vlan").unwrap();
    // (a) Identity theft from an ambient pod.
    let a = c.pods[attacker].ns();
    let attacker_mac = mac_of(a, "eth0");
    let relay = tagged_path(a);
    for args in [
        vec!["addr", "add", &format!("{victim_ip}/32"), "dev", "v0"],
        vec![
            "neigh",
            "add",
            &gw.to_string(),
            "lladdr",
            &mac_str(bridge_mac),
            "dev",
            "v0",
        ],
        vec!["route", "add", &format!("{gw}/32"), "dev", "v0"],
    ] {
        sh(a, "ip", &args);
    }
    let route_to_server = format!("{}/32", c.pods[server].ip);
    sh(
        a,
        "ip",
        &[
            "route",
            "add",
            &route_to_server,
            "via",
            &gw.to_string(),
            "dev",
            "v0",
            "src",
            &victim_ip.to_string(),
        ],
    );
    let poison = arp_request(attacker_mac, attacker_mac, victim_ip, gw, true);
    let seen_before = c.pods[server].accepted().len();
    let mut stolen = Vec::new();
    for i in 0..3 {
        send_frame(a, "eth0", &poison, 2);
        if let Ok(echo) = connect_from(a, to, &format!("stolen-{i}")) {
            stolen.push(echo);
        }
    }
    assert!(
        node_neighbour(node, IpAddr::V4(victim_ip), "cni0") != Some(attacker_mac),
        "a tagged ARP moved the node's neighbour entry for {victim_ip} to the attacker"
    );
    assert!(
        stolen.is_empty(),
        "tagged TCP with the victim's address reached the server through the mesh: {stolen:?}"
    );
    let from_victim = c.pods[server].accepted()[seen_before..]
        .iter()
        .filter(|r| r.peer.ip() == IpAddr::V4(victim_ip))
        .count();
    assert_eq!(
        from_victim, 0,
        "the server accepted a connection as the victim"
    );
    sh(a, "ip", &["link", "del", "v0"]);
    a.stop(relay);

    // (b) A plain pod's tagged SYN to the ambient victim's MAC, around 15006.
    let l = c.pods[legacy].ns();
    let legacy_ip = c.pods[legacy].ip;
    tagged_path(l);
    for args in [
        vec![
            "neigh",
            "add",
            &victim_ip.to_string(),
            "lladdr",
            &mac_str(victim_mac),
            "dev",
            "v0",
        ],
        vec![
            "route",
            "add",
            &format!("{victim_ip}/32"),
            "dev",
            "v0",
            "src",
            &legacy_ip.to_string(),
        ],
    ] {
        sh(l, "ip", &args);
    }
    let seen_before = c.pods[victim].accepted().len();
    let bypass = connect_from(l, c.pods[victim].echo_addr(), "tagged-bypass");
    assert!(
        bypass.is_err(),
        "a tagged SYN reached the STRICT ambient pod's app: {bypass:?}"
    );
    let arrived = c.pods[victim].accepted()[seen_before..]
        .iter()
        .filter(|r| r.peer.ip() == IpAddr::V4(legacy_ip))
        .count();
    assert_eq!(
        arrived, 0,
        "the ambient pod accepted a plaintext connection"
    );
    // The legitimate path is still refused by STRICT, and the victim still works.
    assert!(c
        .connect(legacy, c.pods[victim].echo_addr(), "plain")
        .is_err());
    c.connect(victim, to, "legit-after").unwrap();
    assert_underlay_clean(&c, cap, &["stolen-", "tagged-bypass", "legit"]);
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

/// Attack 2: one frame from a plain pod with an ambient pod's MAC as source moved that MAC to
/// the attacker's port in the bridge's forwarding database, and the plaintext ztunnel
/// delivers after HBONE went to the attacker.
#[test]
fn source_mac_spoofing_steals_no_node_to_pod_hop() {
    let mut c = cluster("atmc", Attach::Bridge);
    let victim = pod(&mut c, 0, "ambient-demo", "victim");
    let thief = pod(&mut c, 0, "legacy", "thief");
    let client = pod(&mut c, 1, "ambient-demo", "client");
    c.wait_converged(WAIT).unwrap();
    let node = c.nodes[0].ns();
    let gw = gateway_of(c.nodes[0].node.pod_cidr()).unwrap();
    let victim_mac = mac_of(c.pods[victim].ns(), "eth0");
    let victim_port = host_veth(&c, victim);
    let to = c.pods[victim].echo_addr();
    c.connect(client, to, "warm-up").unwrap();
    assert_eq!(
        fdb_port(node, victim_mac).as_deref(),
        Some(victim_port.as_str())
    );

    let t = c.pods[thief].ns();
    let dir = tempfile::tempdir().unwrap();
    let cap = Capture::start(t, "eth0", "tcp", &dir.path().join("thief.pcap")).unwrap();
    // The thief's frame: its own ARP request, sent with the victim's MAC as source (and as
    // sender hardware address), then the same with only the Ethernet source spoofed.
    let thief_ip = c.pods[thief].ip;
    let thief_mac = mac_of(t, "eth0");
    send_frame(
        t,
        "eth0",
        &arp_request(victim_mac, victim_mac, thief_ip, gw, false),
        3,
    );
    send_frame(
        t,
        "eth0",
        &arp_request(victim_mac, thief_mac, thief_ip, gw, false),
        3,
    );
    let moved = fdb_port(node, victim_mac);
    let marker = format!("MAC-THEFT-{}", std::process::id());
    let underlay = c.capture_underlay("mac").unwrap();
    let reply = c.connect(client, to, &marker);
    assert_underlay_clean(&c, underlay, &[&marker]);
    let packets = cap.finish(t).unwrap();
    let stolen: Vec<_> = packets
        .iter()
        .filter(|p| p.dst == IpAddr::V4(c.pods[victim].ip))
        .collect();
    assert_eq!(
        moved.as_deref(),
        Some(victim_port.as_str()),
        "the spoofed frame moved the victim's MAC in the bridge's forwarding database"
    );
    assert!(
        stolen.is_empty(),
        "the node sent the victim's traffic to the thief: {} packets, first {:?}",
        stolen.len(),
        stolen.first()
    );
    assert_eq!(reply.unwrap(), marker, "the victim is still reachable");
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

/// Attack 3: IPv6 link-local addresses exist on IPv4-only pods; TCP to an ambient pod's
/// link-local address reached its app (no 15006), and an ambient pod's link-local TCP left
/// uncaptured. No capability needed.
#[test]
fn link_local_tcp_neither_reaches_nor_leaves_an_ambient_pod() {
    let mut c = cluster("atll", Attach::Bridge);
    let amb = pod(&mut c, 0, "ambient-demo", "amb");
    let legacy = pod(&mut c, 0, "legacy", "legacy");
    let legacy2 = pod(&mut c, 0, "legacy", "legacy2");
    c.wait_converged(WAIT).unwrap();
    let port = 7777u16;
    for p in [amb, legacy] {
        let ns = c.pods[p].ns();
        let mut cmd = ns.command(bins::binary(bins::NETPROBE));
        cmd.args(["listen-echo", "--addr", "::", "--port", &port.to_string()]);
        ns.spawn(&mut cmd).unwrap();
    }
    let amb_ll = link_local(c.pods[amb].ns(), "eth0");
    let legacy_ll = link_local(c.pods[legacy].ns(), "eth0");
    let scoped = |ip: Ipv6Addr, from: usize| {
        SocketAddr::V6(std::net::SocketAddrV6::new(
            ip,
            port,
            0,
            ifindex(c.pods[from].ns(), "eth0"),
        ))
    };
    // Link-local TCP between two plain pods works (the probe is sound, nothing is broken)...
    let plain = connect_from(c.pods[legacy2].ns(), scoped(legacy_ll, legacy2), "ll-plain");
    assert!(
        plain.is_ok(),
        "link-local TCP between plain pods: {plain:?}"
    );
    // ...but neither direction between an ambient pod and its neighbour over link-local: not
    // even the SYN reaches the ambient pod.
    let dir = tempfile::tempdir().unwrap();
    let cap = Capture::start(
        c.pods[amb].ns(),
        "eth0",
        "ip6 and tcp",
        &dir.path().join("amb.pcap"),
    )
    .unwrap();
    let inbound = connect_from(c.pods[legacy].ns(), scoped(amb_ll, legacy), "ll-in");
    assert!(
        inbound.is_err(),
        "TCP to the ambient pod's link-local address reached its app: {inbound:?}"
    );
    let outbound = connect_from(c.pods[amb].ns(), scoped(legacy_ll, amb), "ll-out");
    assert!(
        outbound.is_err(),
        "the ambient pod's link-local TCP left uncaptured: {outbound:?}"
    );
    let reached: Vec<_> = cap
        .finish(c.pods[amb].ns())
        .unwrap()
        .into_iter()
        .filter(|p| p.dst == IpAddr::V6(amb_ll) && p.dport == port)
        .collect();
    assert!(
        reached.is_empty(),
        "TCP to the ambient pod's link-local address reached it: {reached:?}"
    );
    // ICMPv6 and neighbour discovery keep working: the neighbour entry resolves.
    let amb_ll_s = amb_ll.to_string();
    eventually(WAIT, || {
        let out = c.pods[legacy]
            .ns()
            .exec("ip", &["-6", "neigh", "show", &amb_ll_s, "dev", "eth0"])
            .map_err(|e| e.to_string())?;
        if out.contains("lladdr") {
            Ok(())
        } else {
            Err(format!("no neighbour entry for {amb_ll}: {out:?}"))
        }
    })
    .unwrap();
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

/// Attack 4, capture side: TCP from an ambient pod to the node's own addresses (and to
/// 127.0.0.1 forged onto the wire) used to be redirected to ztunnel, which connected from the
/// node's network namespace. Now node-local destinations are not captured: the node's
/// listener sees the pod's own address, exactly as without the mesh, and loopback stays
/// unreachable from a pod.
fn node_local_destinations(tag: &str, attach: Attach) {
    let mut c = cluster(tag, attach);
    let amb = pod(&mut c, 0, "ambient-demo", "amb");
    c.wait_converged(WAIT).unwrap();
    let node = c.nodes[0].ns();
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("kubelet.jsonl");
    let ready = dir.path().join("kubelet.ready");
    let mut cmd = node.command(bins::binary(bins::NETPROBE));
    cmd.args(["listen-origdst", "--port", "10250", "--out"])
        .arg(&records)
        .arg("--ready-file")
        .arg(&ready);
    node.spawn(&mut cmd).unwrap();
    eventually(WAIT, || {
        if ready.exists() {
            Ok(())
        } else {
            Err("not ready")
        }
    })
    .unwrap();
    let node_ip = c.nodes[0].underlay_ip;
    let reply = c.connect(amb, SocketAddr::from((node_ip, 10250)), "to-kubelet");
    assert_eq!(reply.unwrap(), "to-kubelet");
    let recs = ambient_tests::probe::read_records(&records).unwrap();
    assert_eq!(
        recs.last().map(|r| r.peer.ip()),
        Some(IpAddr::V4(c.pods[amb].ip)),
        "the node's listener must see the pod's address, not ztunnel's: {recs:?}"
    );
    // ztunnel's admin port on loopback: a pod's SYN to 127.0.0.1 reaches nothing.
    let a = c.pods[amb].ns();
    let gw = match attach {
        Attach::Bridge => gateway_of(c.nodes[0].node.pod_cidr()).map(|g| g.to_string()),
        // Calico's gateway, answered by the node's proxy ARP.
        Attach::Routed => Some("169.254.1.1".to_owned()),
        Attach::Ptp => None,
    };
    if let Some(gw) = gw {
        // Forge 127.0.0.1 onto the wire: route it out of eth0 via the gateway.
        sh(a, "sysctl", &["-qw", "net.ipv4.conf.all.route_localnet=1"]);
        sh(a, "sysctl", &["-qw", "net.ipv4.conf.eth0.route_localnet=1"]);
        sh(
            a,
            "ip",
            &[
                "route",
                "del",
                "local",
                "127.0.0.1",
                "dev",
                "lo",
                "table",
                "local",
            ],
        );
        sh(
            a,
            "ip",
            &[
                "route",
                "add",
                "127.0.0.1/32",
                "via",
                &gw.to_string(),
                "dev",
                "eth0",
            ],
        );
        let admin = connect_from(a, SocketAddr::from(([127, 0, 0, 1], 15000)), "GET");
        assert!(
            admin.is_err(),
            "a pod reached 127.0.0.1:15000 on the node: {admin:?}"
        );
    }
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

#[test]
fn node_local_destinations_are_not_proxied_bridge() {
    node_local_destinations("atnb", Attach::Bridge);
}

#[test]
fn node_local_destinations_are_not_proxied_ptp() {
    node_local_destinations("atnp", Attach::Ptp);
}

#[test]
fn node_local_destinations_are_not_proxied_calico() {
    node_local_destinations("atnc", Attach::Routed);
}

/// Attack 2, IPv6: an unsolicited neighbour advertisement from a plain pod claiming an
/// ambient pod's IPv6 address moved the node's neighbour entry to the attacker. Dual-stack
/// node with the real agent (ztunnel plays no part in the neighbour cache).
#[test]
fn neighbour_advertisement_claims_no_ambient_address() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = ambient_tests::manifests::ManifestDir::new(&dir.path().join("m")).unwrap();
    manifests
        .write(
            "namespaces",
            &[
                ambient_tests::manifests::ambient_namespace("amb"),
                ambient_tests::manifests::namespace("plain", &[]),
            ],
        )
        .unwrap();
    let run_dir = dir.path().join("run");
    let block = ambient_tests::addrs::Block::lease();
    let spec = NodeSpec::new("atna", &block.net24(1), Attach::Bridge)
        .dual_stack(&block.net64(1))
        .agent_socket(run_dir.join("cni.sock"));
    let node = Node::new(&spec).unwrap();
    let opts = ambient_tests::agent::AgentOptions {
        binary: bins::binary(bins::NODE_AGENT),
        node_name: "node-1".into(),
        manifest_dir: manifests.path().to_path_buf(),
        run_dir: run_dir.clone(),
        log_file: dir.path().join("agent.log"),
        extra_args: vec!["--metrics-addr".into(), "127.0.0.1:0".into()],
    };
    ambient_tests::agent::start(node.ns(), &opts).unwrap();
    let mut pods = Vec::new();
    for (ns, name) in [("amb", "victim"), ("plain", "thief")] {
        let meta = PodMeta::new(ns, name);
        manifests
            .write(
                &format!("pod-{ns}-{name}"),
                &[ambient_tests::manifests::pod(
                    &meta,
                    "node-1",
                    "default",
                    &[],
                )],
            )
            .unwrap();
        pods.push(
            node.add_pod(&meta)
                .unwrap_or_else(|e| panic!("ADD {name}: {e:?}\n{}", opts.log())),
        );
    }
    let (victim, thief) = (&pods[0], &pods[1]);
    let victim6 = victim.ip6().expect("dual-stack pod");
    // The node resolves the victim (as it does before delivering to it).
    let mut probe = node.ns().command(bins::binary(bins::NETPROBE));
    probe.args([
        "connect",
        "--to",
        &format!("[{victim6}]:9"),
        "--timeout-ms",
        "500",
    ]);
    let _ = probe.output();
    let victim_mac = mac_of(victim.ns(), "eth0");
    eventually(WAIT, || {
        match node_neighbour(node.ns(), IpAddr::V6(victim6), "cni0") {
            Some(m) if m == victim_mac => Ok(()),
            other => Err(format!("node's entry for {victim6}: {other:?}")),
        }
    })
    .unwrap();
    let thief_mac = mac_of(thief.ns(), "eth0");
    let thief_ll = link_local(thief.ns(), "eth0");
    send_frame(
        thief.ns(),
        "eth0",
        &neighbour_advert(thief_mac, thief_ll, victim6),
        3,
    );
    std::thread::sleep(Duration::from_millis(300)); // the NA is processed at once, or never
    assert_eq!(
        node_neighbour(node.ns(), IpAddr::V6(victim6), "cni0"),
        Some(victim_mac),
        "a plain pod's neighbour advertisement took the ambient pod's IPv6 address"
    );
    drop(pods);
}

/// A pod enrolled while running (its namespace labelled) must not keep talking in plaintext
/// on a connection it opened before: packets of a flow that never passed capture are reset.
#[test]
fn enrolment_ends_plaintext_flows_opened_before_it_bridge() {
    enrolment_ends_plaintext_flows("atfb", Attach::Bridge);
}

#[test]
fn enrolment_ends_plaintext_flows_opened_before_it_ptp() {
    enrolment_ends_plaintext_flows("atfp", Attach::Ptp);
}

#[test]
fn enrolment_ends_plaintext_flows_opened_before_it_calico() {
    enrolment_ends_plaintext_flows("atfc", Attach::Routed);
}

fn enrolment_ends_plaintext_flows(tag: &str, attach: Attach) {
    use std::io::{Read, Write};
    let mut c = cluster(tag, attach);
    c.set_namespace("flip", false).unwrap();
    let client = pod(&mut c, 0, "flip", "client");
    let server = pod(&mut c, 1, "legacy", "server");
    c.wait_converged(WAIT).unwrap();
    let to = c.pods[server].echo_addr();
    let mut stream = ambient_tests::inns::in_ns(&c.pods[client].ns().path(), || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
    })
    .unwrap()
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let echo = |s: &mut std::net::TcpStream, m: &str| -> std::io::Result<String> {
        s.write_all(m.as_bytes())?;
        let mut buf = vec![0u8; m.len()];
        s.read_exact(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    assert_eq!(echo(&mut stream, "before-flip").unwrap(), "before-flip");

    c.set_namespace("flip", true).unwrap();
    c.wait_converged(WAIT).unwrap();
    // The agent has enrolled it (its rules are in the kernel), not only ztunnel's view.
    eventually(WAIT, || {
        let rows = ambient_tests::agent::pods(&c.bin(bins::NODE_AGENT), &c.nodes[0].run_dir())
            .map_err(|e| e.to_string())?;
        match rows.iter().find(|p| p.name == "client") {
            Some(p) if p.state == "captured" => Ok(()),
            other => Err(format!("client not captured yet: {other:?}")),
        }
    })
    .unwrap();
    let cap = c.capture_underlay("flip").unwrap();
    let marker = format!("AFTER-FLIP-{}", std::process::id());
    let after = echo(&mut stream, &marker);
    let packets =
        ambient_tests::cluster::finish_quiet(cap, &c.underlay, Duration::from_millis(700), WAIT)
            .unwrap();
    assert!(
        !ambient_tests::capture::payload_contains(&packets, marker.as_bytes()),
        "the pre-enrolment connection carried plaintext after the flip"
    );
    assert!(
        after.is_err(),
        "the pre-enrolment connection still works: {after:?}"
    );
    // New connections of the enrolled pod go through the mesh.
    assert_eq!(c.connect(client, to, "new-conn").unwrap(), "new-conn");
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

/// Attack 7, agent side: the CNI socket believed anyone who could open it; a GC naming no
/// valid attachment released every pod of the node. Here the socket is made world-writable
/// (as a careless hostPath mount would) and a uid-1000 process sends that GC through the real
/// plugin: refused by the peer check. Root's empty GC is refused too while the source still
/// places the pods on the node.
#[test]
fn control_socket_refuses_other_uids_and_an_empty_gc() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut c = cluster("atcs", Attach::Bridge);
    let amb = pod(&mut c, 0, "ambient-demo", "amb");
    let server = pod(&mut c, 1, "ambient-demo", "server");
    c.wait_converged(WAIT).unwrap();
    let sock = c.nodes[0].run_dir().join("cni.sock");
    let run_dir = c.nodes[0].run_dir();
    for p in [run_dir.as_path(), run_dir.parent().unwrap(), sock.as_path()] {
        sh(c.nodes[0].ns(), "chmod", &["o+rwx", p.to_str().unwrap()]);
    }
    let conf = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "attack",
        "type": "ambient-cni",
        "agentSocket": sock,
        "cni.dev/valid-attachments": [],
    });
    let gc = |as_uid: Option<u32>| {
        let mut cmd = match as_uid {
            Some(uid) => {
                let mut cmd = Command::new("setpriv");
                cmd.args([
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".into(),
                ])
                .arg(c.bin("ambient-cni"));
                cmd
            }
            None => Command::new(c.bin("ambient-cni")),
        };
        let mut child = cmd
            .env("CNI_COMMAND", "GC")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let captured = |c: &Cluster| {
        ambient_tests::agent::pods(&c.bin(bins::NODE_AGENT), &c.nodes[0].run_dir())
            .unwrap()
            .iter()
            .any(|p| p.name == "amb" && p.state == "captured")
    };
    for who in [Some(1000), None] {
        let out = gc(who);
        assert!(
            !out.status.success(),
            "GC with no valid attachment as {who:?} was accepted: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(captured(&c), "the GC as {who:?} released the ambient pod");
    }
    assert_eq!(
        c.connect(amb, c.pods[server].echo_addr(), "still-meshed")
            .unwrap(),
        "still-meshed"
    );
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

/// Attack 6: ztunnel ran as uid 0 with SO_REUSEPORT on every listener, so any uid-0 process
/// of the node, even with every capability dropped (a root hostNetwork container), could join
/// the capture listeners' reuseport group and receive captured connections. ztunnel now runs
/// as its own uid: the kernel refuses another uid's socket in the group.
#[test]
fn a_capless_root_process_cannot_join_the_capture_listeners() {
    let mut c = cluster("atrp", Attach::Bridge);
    let client = pod(&mut c, 0, "ambient-demo", "client");
    let server = pod(&mut c, 1, "ambient-demo", "server");
    c.wait_converged(WAIT).unwrap();
    let node = c.nodes[0].ns();
    // ztunnel runs as its own uid with CAP_NET_ADMIN alone.
    let zt = c.nodes[0].ztunnel_pid.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{zt}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), "1337 1337 1337 1337", "{status}");
    assert_eq!(field("Gid:"), "1337 1337 1337 1337", "{status}");
    assert_eq!(field("CapEff:"), "0000000000001000", "only CAP_NET_ADMIN");
    assert_eq!(field("CapPrm:"), "0000000000001000", "only CAP_NET_ADMIN");
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("thief.jsonl");
    let ready = dir.path().join("thief.ready");
    let mut cmd = node.command("setpriv");
    cmd.args([
        "--reuid=0",
        "--regid=0",
        "--clear-groups",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--",
    ])
    .arg(bins::binary(bins::NETPROBE))
    .args([
        "listen-reuseport",
        "--addr",
        "0.0.0.0",
        "--port",
        "15001",
        "--out",
    ])
    .arg(&records)
    .arg("--ready-file")
    .arg(&ready);
    let pid = node.spawn(&mut cmd).unwrap();
    // Either the bind is refused (the process exits) or it listens.
    let joined = eventually(Duration::from_secs(5), || {
        if ready.exists() {
            Ok(true)
        } else if node
            .exec("cat", &[&format!("/proc/{pid}/status")])
            .map(|s| s.contains("State:\tZ"))
            .unwrap_or(true)
        {
            Ok(false)
        } else {
            Err("neither listening nor refused yet")
        }
    })
    .unwrap();
    // Captured connections all reach ztunnel, whatever the reuseport hash picks.
    let to = c.pods[server].echo_addr();
    for i in 0..16 {
        let m = format!("conn-{i}");
        assert_eq!(c.connect(client, to, &m).unwrap(), m);
    }
    let stolen = ambient_tests::probe::read_records(&records).unwrap_or_default();
    assert!(
        !joined && stolen.is_empty(),
        "a capability-less root process joined ztunnel's 15001 group (listening: {joined}) and \
         accepted {} captured connections",
        stolen.len()
    );
    node.stop(pid);
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

/// Attack 3 on a routed node (ptp): an ambient pod's link-local TCP (to the node's end of its
/// veth, the only link-local neighbour it has) is dropped like on a bridge, never carried
/// uncaptured.
#[test]
fn link_local_tcp_does_not_leave_a_routed_ambient_pod() {
    let mut c = cluster("atlr", Attach::Ptp);
    let amb = pod(&mut c, 0, "ambient-demo", "amb");
    let legacy = pod(&mut c, 0, "legacy", "legacy");
    c.wait_converged(WAIT).unwrap();
    let port = 7777u16;
    let node = c.nodes[0].ns();
    let mut cmd = node.command(bins::binary(bins::NETPROBE));
    cmd.args(["listen-echo", "--addr", "::", "--port", &port.to_string()]);
    node.spawn(&mut cmd).unwrap();
    let to_node = |p: usize| {
        let veth = host_veth(&c, p);
        let ll = link_local(node, &veth);
        SocketAddr::V6(std::net::SocketAddrV6::new(
            ll,
            port,
            0,
            ifindex(c.pods[p].ns(), "eth0"),
        ))
    };
    // The probe is sound: a plain pod reaches the node over link-local.
    let plain = eventually(WAIT, || {
        connect_from(c.pods[legacy].ns(), to_node(legacy), "ll")
    });
    assert!(plain.is_ok(), "link-local TCP from a plain pod: {plain:?}");
    let ambient = connect_from(c.pods[amb].ns(), to_node(amb), "ll-amb");
    assert!(
        ambient.is_err(),
        "the routed ambient pod's link-local TCP left uncaptured: {ambient:?}"
    );
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}
