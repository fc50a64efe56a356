//! `routed-cni`: a lab primary CNI plugin that attaches pods exactly as Calico (and the AWS VPC
//! CNI) do, which neither `bridge` nor `ptp` reproduces:
//! - the host side of the veth (`cali<hash>`) has no IP address at all, MAC
//!   `ee:ee:ee:ee:ee:ee`, proxy ARP on;
//! - the pod's address is a /32 (/128), its default route goes via `169.254.1.1` (IPv6: the
//!   host veth's link-local address), which the node answers by proxy ARP;
//! - the node routes each pod's /32 (/128) to its veth;
//! - the result names the host interface only and gives the addresses without an interface
//!   index, as Calico's does.
//!
//! With `"ebpf": true` it also attaches a tc classifier (classic BPF, passes everything) at
//! the ingress of each host veth, where Cilium and Calico's eBPF dataplane attach theirs: what
//! the node agent sees of such a dataplane.
//!
//! Addresses come from the `ipam` plugin of the configuration (`host-local` in the lab), run
//! from `CNI_PATH` as any CNI plugin runs its IPAM. The node must route `169.254.1.1` out of
//! some other interface (proxy ARP answers only for addresses routed elsewhere); the lab's
//! routed nodes do. Lab only: commands are `ip` and `nsenter`, errors are CNI error JSON.

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Calico's gateway address for every pod.
const GATEWAY_V4: &str = "169.254.1.1";
/// Calico's host-side MAC for every veth.
const HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The link-local address the kernel derives from [`HOST_MAC`] (EUI-64): the pods' IPv6
/// gateway.
const GATEWAY_V6: &str = "fe80::ecee:eeff:feee:eeee";

struct Fail {
    code: u32,
    msg: String,
}

fn fail(msg: impl Into<String>) -> Fail {
    Fail {
        code: 999,
        msg: msg.into(),
    }
}

fn env(name: &str) -> Result<String, Fail> {
    std::env::var(name).map_err(|_| Fail {
        code: 4,
        msg: format!("{name} is not set"),
    })
}

fn run(cmd: &mut Command) -> Result<String, Fail> {
    let out = cmd.output().map_err(|e| fail(format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, Fail> {
    run(Command::new("ip").args(args))
}

/// `ip args` inside the pod's namespace.
fn pod_ip(netns: &str, args: &[&str]) -> Result<String, Fail> {
    run(Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .arg("ip")
        .args(args))
}

fn sysctl(path: &str, value: &str) -> Result<(), Fail> {
    std::fs::write(format!("/proc/sys/{path}"), value).map_err(|e| fail(format!("{path}: {e}")))
}

/// Calico's naming: a fixed prefix and a hash of the pod's identity, 15 characters.
fn host_ifname(container_id: &str, ifname: &str) -> String {
    let h = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
    format!("cali{}", &hex[..11])
}

/// Runs the configuration's IPAM plugin with the same request.
fn ipam(conf: &Value, stdin: &[u8]) -> Result<Value, Fail> {
    let kind = conf["ipam"]["type"]
        .as_str()
        .ok_or_else(|| fail("ipam.type is required"))?;
    let path = env("CNI_PATH")?;
    let bin = path
        .split(':')
        .map(|d| std::path::Path::new(d).join(kind))
        .find(|p| p.exists())
        .ok_or_else(|| fail(format!("IPAM plugin {kind} not in CNI_PATH")))?;
    let mut child = Command::new(&bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("{}: {e}", bin.display())))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin)
        .map_err(|e| fail(format!("IPAM stdin: {e}")))?;
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("IPAM: {e}")))?;
    let v: Value = if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).map_err(|e| fail(format!("IPAM output: {e}")))?
    };
    if !out.status.success() {
        return Err(fail(format!("IPAM {kind} failed: {v}")));
    }
    Ok(v)
}

fn add(conf: &Value, stdin: &[u8]) -> Result<Value, Fail> {
    let container = env("CNI_CONTAINERID")?;
    let netns = env("CNI_NETNS")?;
    let ifname = env("CNI_IFNAME")?;
    let host = host_ifname(&container, &ifname);
    let tmp = format!("tmp{}", &host[4..]);
    let allocated = ipam(conf, stdin)?;
    let addrs: Vec<std::net::IpAddr> = allocated["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect();
    if addrs.is_empty() {
        return Err(fail(format!("IPAM gave no address: {allocated}")));
    }
    ip(&["link", "add", &host, "type", "veth", "peer", "name", &tmp])?;
    let attach = || -> Result<(), Fail> {
        ip(&["link", "set", &tmp, "netns", &netns])?;
        ip(&["link", "set", &host, "address", HOST_MAC])?;
        sysctl(&format!("net/ipv4/conf/{host}/proxy_arp"), "1")?;
        sysctl(&format!("net/ipv4/neigh/{host}/proxy_delay"), "0")?;
        ip(&["link", "set", &host, "up"])?;
        if conf["ebpf"].as_bool() == Some(true) {
            run(Command::new("tc").args(["qdisc", "add", "dev", &host, "clsact"]))?;
            run(Command::new("tc").args([
                "filter",
                "add",
                "dev",
                &host,
                "ingress",
                "bpf",
                "bytecode",
                "1,6 0 0 4294967295,",
            ]))?;
        }
        pod_ip(&netns, &["link", "set", &tmp, "name", &ifname])?;
        pod_ip(&netns, &["link", "set", &ifname, "up"])?;
        for a in &addrs {
            match a {
                std::net::IpAddr::V4(v4) => {
                    pod_ip(
                        &netns,
                        &["addr", "add", &format!("{v4}/32"), "dev", &ifname],
                    )?;
                    ip(&[
                        "route",
                        "add",
                        &format!("{v4}/32"),
                        "dev",
                        &host,
                        "scope",
                        "link",
                    ])?;
                }
                std::net::IpAddr::V6(v6) => {
                    pod_ip(
                        &netns,
                        &[
                            "-6",
                            "addr",
                            "add",
                            &format!("{v6}/128"),
                            "dev",
                            &ifname,
                            "nodad",
                        ],
                    )?;
                    ip(&["-6", "route", "add", &format!("{v6}/128"), "dev", &host])?;
                }
            }
        }
        if addrs.iter().any(|a| a.is_ipv4()) {
            pod_ip(
                &netns,
                &["route", "add", GATEWAY_V4, "dev", &ifname, "scope", "link"],
            )?;
            pod_ip(
                &netns,
                &["route", "add", "default", "via", GATEWAY_V4, "dev", &ifname],
            )?;
        }
        if addrs.iter().any(|a| a.is_ipv6()) {
            pod_ip(
                &netns,
                &[
                    "-6", "route", "add", "default", "via", GATEWAY_V6, "dev", &ifname,
                ],
            )?;
        }
        Ok(())
    };
    if let Err(e) = attach() {
        let _ = ip(&["link", "del", &host]);
        return Err(e);
    }
    let ips: Vec<Value> = addrs
        .iter()
        .map(|a| match a {
            std::net::IpAddr::V4(v4) => json!({ "address": format!("{v4}/32") }),
            std::net::IpAddr::V6(v6) => json!({ "address": format!("{v6}/128") }),
        })
        .collect();
    Ok(json!({
        "cniVersion": conf["cniVersion"],
        "interfaces": [{ "name": host }],
        "ips": ips,
        "routes": [{ "dst": "0.0.0.0/0" }],
    }))
}

fn del(conf: &Value, stdin: &[u8]) -> Result<(), Fail> {
    let container = env("CNI_CONTAINERID")?;
    let ifname = env("CNI_IFNAME")?;
    let host = host_ifname(&container, &ifname);
    // Gone already is fine: DEL is idempotent.
    if std::path::Path::new("/sys/class/net").join(&host).exists() {
        ip(&["link", "del", &host])?;
    }
    ipam(conf, stdin).map(drop)
}

fn main() {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let conf: Value = serde_json::from_slice(&stdin).unwrap_or(Value::Null);
    let version = conf["cniVersion"].as_str().unwrap_or("1.0.0").to_owned();
    let res = match command.as_str() {
        "VERSION" => Ok(json!({
            "cniVersion": version,
            "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"],
        })),
        "ADD" => add(&conf, &stdin),
        "DEL" => del(&conf, &stdin).map(|()| Value::Null),
        "CHECK" | "GC" | "STATUS" => Ok(Value::Null),
        other => Err(Fail {
            code: 4,
            msg: format!("unknown CNI_COMMAND {other:?}"),
        }),
    };
    match res {
        Ok(Value::Null) => {}
        Ok(v) => println!("{v}"),
        Err(Fail { code, msg }) => {
            println!(
                "{}",
                json!({ "cniVersion": version, "code": code, "msg": msg })
            );
            std::process::exit(1);
        }
    }
}
