//! `ambient-issuer run ...` serves certificates; `ambient-issuer ca init` creates a lab CA;
//! `ambient-issuer credential add` mints a token for the credentials file.

use std::path::PathBuf;

use ambient_issuer::config::{Config, LogFormat, RunArgs};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ambient-issuer",
    version,
    about = "Certificate issuer of the ambient mesh (Istio's certificate API)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve certificates.
    Run(Box<RunArgs>),
    /// The CA directory.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// The credentials file of `--source manifests`.
    Credential {
        #[command(subcommand)]
        cmd: CredentialCmd,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a self-signed root (ca-cert.pem, ca-key.pem, root-cert.pem) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = ambient_common::constants::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// The root's common name.
        #[arg(long, default_value = "ambient mesh root CA")]
        name: String,
    },
}

#[derive(Subcommand)]
enum CredentialCmd {
    /// Mint a token and add its credential.
    Add(ambient_issuer::credentials::AddArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let _ =
        rustls::crypto::CryptoProvider::install_default(rustls::crypto::ring::default_provider());
    match Cli::parse().cmd {
        Cmd::Run(args) => {
            init_logging(args.log_format);
            let cfg = Config::from_args(&args)?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(ambient_issuer::run(cfg))
        }
        Cmd::Ca {
            cmd:
                CaCmd::Init {
                    dir,
                    trust_domain,
                    name,
                },
        } => {
            ambient_issuer::ca::init_dir(&dir, &trust_domain, &name)?;
            Ok(())
        }
        Cmd::Credential {
            cmd: CredentialCmd::Add(a),
        } => {
            ambient_issuer::credentials::add(&a)?;
            Ok(())
        }
    }
}
