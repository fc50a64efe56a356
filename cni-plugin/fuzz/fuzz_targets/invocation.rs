//! Everything the runtime hands the plugin: the `CNI_*` environment and stdin, through parsing
//! and the commands themselves (with an in-memory agent and host, so no I/O happens).
//!
//! Input layout: `KEY=VALUE` lines for the environment, a NUL byte, then stdin. Without a NUL
//! the whole input is stdin under a fixed ADD environment.
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use ambient_cni::agent::{AgentCallError, AgentClient};
use ambient_cni::discovery::HostLinks;
use ambient_cni::sys::SysError;
use ambient_cni::{execute, parse_invocation, to_cni_error, CniVersion};
use ambient_common::agent_api::{AddOutcome, AgentOp, AgentReply, AgentRequest};
use libfuzzer_sys::fuzz_target;

struct Agent;

impl AgentClient for Agent {
    fn call(&self, request: &AgentRequest) -> Result<AgentReply, AgentCallError> {
        // The request must always encode: the agent has to be able to read it.
        serde_json::to_vec(request).expect("agent request encodes");
        Ok(match request.op {
            AgentOp::Add(_) => AgentReply::Added(AddOutcome::Captured),
            AgentOp::Del(_) => AgentReply::Released,
            AgentOp::Check(_) => AgentReply::Checked,
            AgentOp::Status => AgentReply::Ready,
            AgentOp::Gc { .. } => AgentReply::Collected { released: 0 },
        })
    }
}

struct Host;

impl HostLinks for Host {
    fn is_bridge(&self, name: &str) -> bool {
        name.starts_with("cni")
    }
    fn veth_peer(&self, _: &Path, ifname: &str) -> Result<String, SysError> {
        Err(SysError::NoPeer(ifname.to_owned()))
    }
}

fuzz_target!(|data: &[u8]| {
    let (env, stdin) = match data.iter().position(|b| *b == 0) {
        Some(i) => {
            let env: HashMap<String, String> = String::from_utf8_lossy(&data[..i])
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            (env, &data[i + 1..])
        }
        None => {
            let env = [
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/var/run/netns/x"),
                ("CNI_ARGS", "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            (env, data)
        }
    };
    match parse_invocation(|k| env.get(k).cloned(), stdin) {
        Ok(inv) => match execute(&inv, &Agent, &Host) {
            Ok(_) => {}
            Err(e) => {
                let _ = to_cni_error(&e).to_json(inv.response_version());
            }
        },
        Err(e) => {
            let _ = to_cni_error(&e).to_json(CniVersion::LATEST);
        }
    }
});
