//! The `ambient-cni` binary: reads the environment and stdin, runs the command, and writes the
//! result or the error JSON to stdout (the only place that does). Exit status 0 on success,
//! 1 on any error.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::OnceLock;

use ambient_cni::{
    execute, logging, parse_invocation, read_stdin, response_version, to_cni_error, CniError,
    CniVersion, KernelLinks, Output, PluginConfig, PluginError, UnixAgent,
};

/// The version errors are written at, for the panic hook.
static RESPONSE_VERSION: OnceLock<CniVersion> = OnceLock::new();

fn print(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn fail(err: &PluginError, version: CniVersion) -> ExitCode {
    let cni = to_cni_error(err);
    tracing::error!(code = cni.code, error = %cni.msg, "command failed");
    print(&cni.to_json(version));
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let version = RESPONSE_VERSION
            .get()
            .copied()
            .unwrap_or(CniVersion::LATEST);
        eprintln!("ambient-cni: {info}");
        print(&CniError::panic(info.to_string()).to_json(version));
        std::process::exit(1);
    }));

    let env: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let stdin = read_stdin(std::io::stdin().lock());
    let version = stdin
        .as_deref()
        .map_or(CniVersion::LATEST, response_version);
    let _ = RESPONSE_VERSION.set(version);
    // Debug builds only: lets the spec tests prove that a panic still yields a CNI error.
    #[cfg(debug_assertions)]
    if std::env::var_os("AMBIENT_CNI_PANIC_FOR_TEST").is_some() {
        panic!("panic requested by AMBIENT_CNI_PANIC_FOR_TEST");
    }

    let invocation = stdin.and_then(|s| parse_invocation(|k| env.get(k).cloned(), &s));
    let invocation = match invocation {
        Ok(inv) => inv,
        Err(e) => {
            logging::init(&PluginConfig::default());
            return fail(&e, version);
        }
    };
    let cfg = invocation.plugin_config();
    logging::init(&cfg);
    let agent = UnixAgent::new(&cfg.agent_socket, cfg.timeout);
    let links = KernelLinks {
        sysfs_root: cfg.sysfs_root.clone(),
    };
    match execute(&invocation, &agent, &links) {
        Ok(Output::Print(v)) => {
            print(&v);
            ExitCode::SUCCESS
        }
        Ok(Output::Nothing) => ExitCode::SUCCESS,
        Err(e) => fail(&e, invocation.response_version()),
    }
}
