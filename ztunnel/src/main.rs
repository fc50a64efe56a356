//! `ztunnel run ...` starts the proxy; `ztunnel ca init --dir DIR` creates a lab CA.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ztunnel::config::{Config, LogFormat, RunArgs};

#[derive(Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "Per-node HBONE proxy of the ambient data plane"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Certificate authority for labs and tests.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create ca-cert.pem, ca-key.pem and root-cert.pem in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = ambient_common::constants::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
}

fn init_logging(format: LogFormat, level: &str) {
    // RUST_LOG wins when set; else --log-level (AMBIENT_LOG_LEVEL), checked by the config.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::CryptoProvider::install_default(
        ztunnel::identity::crypto_provider().as_ref().clone(),
    );
    match Cli::parse().cmd {
        Cmd::Ca {
            cmd:
                CaCmd::Init {
                    dir,
                    trust_domain,
                    force,
                },
        } => {
            let files = ztunnel::identity::ca_init(&dir, &trust_domain, force)
                .with_context(|| format!("creating a CA in {}", dir.display()))?;
            println!(
                "{}\n{}\n{}",
                files.cert.display(),
                files.key.display(),
                files.roots.display()
            );
            Ok(())
        }
        Cmd::Run(args) => {
            let cfg = match Config::from_args(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ztunnel: {e}");
                    std::process::exit(2);
                }
            };
            init_logging(cfg.log_format, &cfg.log_level);
            if !ztunnel::sys::tune_allocator() {
                tracing::debug!("allocator thresholds left at their defaults");
            }
            match ztunnel::sys::raise_nofile_limit() {
                Ok(n) => tracing::debug!(nofile = n, "open-file limit"),
                Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
            }
            ztunnel::app::run_blocking(cfg).context("ztunnel failed")
        }
    }
}
