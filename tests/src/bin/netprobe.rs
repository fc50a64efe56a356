//! `netprobe`: TCP tools run inside test namespaces (`ip netns exec <ns> netprobe ...`).
//! See `ambient_tests::probe`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambient_tests::probe;
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "TCP probes for the ambient test harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo every connection.
    ListenEcho {
        #[arg(long, default_value = "0.0.0.0")]
        addr: std::net::IpAddr,
        #[arg(long)]
        port: u16,
        /// Written with the bound address once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Record (peer, local, SO_ORIGINAL_DST) of each connection as JSON lines, then echo.
    ListenOrigdst {
        #[arg(long, default_value = "0.0.0.0")]
        addr: std::net::IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Connect, send, check the answer; prints a JSON report, exits non-zero on failure.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "ping")]
        send: String,
        /// Expected answer (defaults to the echo of --send).
        #[arg(long)]
        expect: Option<String>,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::ListenEcho {
            addr,
            port,
            ready_file,
        } => {
            let l = probe::bind(SocketAddr::new(addr, port), ready_file.as_deref())?;
            probe::serve_echo(l);
        }
        Cmd::ListenOrigdst {
            addr,
            port,
            out,
            ready_file,
        } => {
            let l = probe::bind(SocketAddr::new(addr, port), ready_file.as_deref())?;
            probe::serve_origdst(l, &out)?;
        }
        Cmd::Connect {
            to,
            send,
            expect,
            timeout_ms,
        } => {
            let expect = expect.unwrap_or_else(|| send.clone());
            let r = probe::connect(
                to,
                send.as_bytes(),
                Some(expect.as_bytes()),
                Duration::from_millis(timeout_ms),
            )
            .with_context(|| format!("probe to {to}"))?;
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}
