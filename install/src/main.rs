use std::process::ExitCode;
use std::time::Duration;

use ambient_common::error::chain;
use clap::{Parser, Subcommand};
use install::lifecycle::{self, ExitDecision};
use install::{ConfigArgs, Installer, OnExit};

#[derive(Debug, Parser)]
#[command(
    name = "install-cni",
    version,
    about = "Installs ambient-cni into the node's CNI chain"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install, keep the plugin in place until SIGTERM, then uninstall or keep (--on-exit).
    Run(ConfigArgs),
    /// One install pass, then exit.
    Install(ConfigArgs),
    /// Remove the plugin from every configuration, restore converted files, remove the binary.
    Uninstall(ConfigArgs),
    /// Exit 0 when the chain is valid and the node agent is ready (the readiness probe).
    Ready(ConfigArgs),
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn build(args: &ConfigArgs) -> Result<install::Config, ExitCode> {
    args.build().map_err(|errors| {
        for e in errors {
            eprintln!("install-cni: invalid configuration: {e}");
        }
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, kind) = match &cli.command {
        Command::Run(a) => (a, "run"),
        Command::Install(a) => (a, "install"),
        Command::Uninstall(a) => (a, "uninstall"),
        Command::Ready(a) => (a, "ready"),
    };
    let cfg = match build(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logs(cfg.json_logs);
    match kind {
        "install" => match Installer::new(cfg).ensure() {
            Ok(pass) => {
                tracing::info!(?pass, "installed");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %chain(&e), "install failed");
                ExitCode::FAILURE
            }
        },
        "uninstall" => uninstall(&Installer::new(cfg)),
        "ready" => {
            let socket = cfg.plugin.agent_socket.clone();
            if let Err(e) = Installer::new(cfg).check() {
                eprintln!("not ready: {}", chain(&e));
                return ExitCode::FAILURE;
            }
            match install::ready::agent_ready(&socket, Duration::from_secs(3)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("not ready: {}", chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
        _ => run(cfg),
    }
}

fn uninstall(installer: &Installer) -> ExitCode {
    match installer.uninstall() {
        Ok(r) => {
            tracing::info!(restored = ?r.restored, removed = ?r.removed, "uninstalled");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %chain(&e), "uninstall failed");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: install::Config) -> ExitCode {
    tracing::info!(config = ?cfg, "starting installer");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let installer = install::run::watch(Installer::new(cfg), wait_for_signal()).await;
        let cfg = installer.config().clone();
        let decision = match cfg.on_exit {
            OnExit::Keep => ExitDecision::Keep("--on-exit keep".into()),
            OnExit::Uninstall => ExitDecision::Uninstall("--on-exit uninstall".into()),
            OnExit::Auto => match lifecycle::client(cfg.kubeconfig.as_deref()).await {
                Ok(client) => {
                    lifecycle::daemonset_decision(
                        client,
                        &cfg.namespace,
                        &cfg.daemonset,
                        Duration::from_secs(5),
                    )
                    .await
                }
                Err(e) => ExitDecision::Keep(format!(
                    "no API client ({}); leaving the plugin in place",
                    chain(&e)
                )),
            },
        };
        match decision {
            ExitDecision::Keep(why) => {
                tracing::info!(reason = %why, "stopping; the plugin stays in the chain");
                ExitCode::SUCCESS
            }
            ExitDecision::Uninstall(why) => {
                tracing::info!(reason = %why, "stopping and uninstalling");
                uninstall(&installer)
            }
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
