use std::process::ExitCode;

use clap::Parser;
use node_agent::cli::{Cli, CommandKind};
use node_agent::config::{Config, ConfigFile};

fn init_logs(json: bool, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        CommandKind::Run(args) => {
            let file = match &args.config {
                Some(p) => match ConfigFile::load(p) {
                    Ok(f) => f,
                    Err(e) => {
                        eprintln!("node-agent: {e}");
                        return ExitCode::from(2);
                    }
                },
                None => ConfigFile::default(),
            };
            let cfg = match Config::build(file.merge(args.to_layer())) {
                Ok(c) => c,
                Err(errors) => {
                    for e in errors {
                        eprintln!("node-agent: invalid configuration: {e}");
                    }
                    return ExitCode::from(2);
                }
            };
            init_logs(cfg.json_logs, &cfg.log_level);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            match rt.block_on(node_agent::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %anyhow::Error::from(e), "node agent failed");
                    ExitCode::FAILURE
                }
            }
        }
        CommandKind::Pods(a) => view("pods", &a),
        CommandKind::Rules(a) => view("rules", &a),
        CommandKind::Status(a) => view("status", &a),
        CommandKind::Uninstall(a) => {
            init_logs(false, "info");
            // Only the table name matters to removing the rules of every backend.
            let params = node_agent::nft::RulesetParams {
                table: a.table.clone(),
                ..Default::default()
            };
            if let Err(e) = node_agent::backend::remove_all(&params) {
                eprintln!("node-agent: removing the tables failed: {e}");
                return ExitCode::FAILURE;
            }
            let routing = node_agent::routing::PolicyRouting::default();
            if let Err(e) = node_agent::routing::uninstall(&routing) {
                eprintln!("node-agent: removing policy routing failed: {e}");
                return ExitCode::FAILURE;
            }
            let _ = node_agent::state::StateDir::new(
                a.run_dir.join(ambient_common::constants::STATE_DIR),
            )
            .clear();
            eprintln!("node-agent: tables, policy routing and state removed");
            ExitCode::SUCCESS
        }
    }
}

fn view(kind: &str, args: &node_agent::cli::ViewArgs) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match node_agent::cli::view(kind, args, &mut out) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("node-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
