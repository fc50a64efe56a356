//! The installer on real files in temporary directories, with the configurations real primary
//! CNIs write (tests/fixtures/cni): install, idempotence, uninstall restoring the original,
//! the watch loop repairing a rewrite, a replacement, a removed binary, and own-file mode.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_tests::netns::wait_until;
use clap::Parser;
use install::{ChainState, ConfigArgs, Installer};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cni");

#[derive(Debug, Parser)]
struct T {
    #[command(flatten)]
    a: ConfigArgs,
}

/// A stand-in plugin: answers VERSION as a CNI plugin does.
const FAKE_PLUGIN: &[u8] =
    b"#!/bin/sh\n# plugin v1\necho '{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"1.0.0\"]}'\n";

/// A fake host: `etc/cni/net.d`, `opt/cni/bin`, and the image's plugin binary.
struct Host {
    _dir: tempfile::TempDir,
    conf: PathBuf,
    bin: PathBuf,
    source: PathBuf,
}

impl Host {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("etc/cni/net.d");
        let bin = dir.path().join("opt/cni/bin");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        let source = dir.path().join("image-ambient-cni");
        std::fs::write(&source, FAKE_PLUGIN).unwrap();
        Host {
            _dir: dir,
            conf,
            bin,
            source,
        }
    }

    fn installer(&self, extra: &[&str]) -> Installer {
        Installer::new(self.config(extra))
    }

    fn config(&self, extra: &[&str]) -> install::Config {
        let mut args = vec![
            "t".to_string(),
            "--cni-conf-dir".into(),
            self.conf.display().to_string(),
            "--cni-bin-dir".into(),
            self.bin.display().to_string(),
            "--plugin-source".into(),
            self.source.display().to_string(),
            "--poll-ms".into(),
            "20".into(),
            "--on-exit".into(),
            "keep".into(),
            // The fake plugin is a script (the static-only rule has its own tests below).
            "--allow-dynamic-plugin".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        T::try_parse_from(args).unwrap().a.build().unwrap()
    }

    fn put_fixture(&self, name: &str) -> PathBuf {
        let dst = self.conf.join(name);
        std::fs::copy(Path::new(FIXTURES).join(name), &dst).unwrap();
        dst
    }

    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.conf)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn fixture(name: &str) -> Value {
    json(&Path::new(FIXTURES).join(name))
}

fn last_plugin(doc: &Value) -> &Value {
    doc["plugins"].as_array().unwrap().last().unwrap()
}

#[test]
fn chains_after_every_real_primary_and_uninstall_restores_it() {
    let chains = [
        "10-ptp.conflist",
        "10-flannel.conflist",
        "10-calico.conflist",
        "10-kindnet.conflist",
        "05-cilium.conflist",
        "87-podman-bridge.json",
    ];
    for name in chains {
        let host = Host::new();
        let path = host.put_fixture(name);
        let original = fixture(name);
        let mut inst = host.installer(&[]);
        let pass = inst.ensure().unwrap();
        assert!(pass.binary_written, "{name}");
        assert_eq!(pass.chain, ChainState::Written(path.clone()), "{name}");
        let doc = json(&path);
        assert_eq!(last_plugin(&doc)["type"], "ambient-cni", "{name}");
        // Every other field and plugin is kept.
        let mut without = doc.clone();
        without["plugins"].as_array_mut().unwrap().pop();
        assert_eq!(without, original, "{name}");
        assert_eq!(
            std::fs::read(host.bin.join("ambient-cni")).unwrap(),
            std::fs::read(&host.source).unwrap()
        );
        // Idempotent: a second pass writes nothing.
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let pass = inst.ensure().unwrap();
        assert_eq!(pass.chain, ChainState::Unchanged(path.clone()), "{name}");
        assert!(!pass.binary_written);
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        assert_eq!(inst.check().unwrap(), path);
        assert_eq!(
            host.files(),
            vec![name.to_string()],
            "no temporary files left"
        );

        let removal = inst.uninstall().unwrap();
        assert_eq!(removal.restored, vec![path.clone()]);
        assert_eq!(
            json(&path),
            original,
            "{name}: uninstall restores the original"
        );
        assert!(!host.bin.join("ambient-cni").exists());
        assert_eq!(host.files(), vec![name.to_string()]);
        // Uninstalling again finds nothing to do.
        assert_eq!(inst.uninstall().unwrap(), install::Removal::default());
    }
}

#[test]
fn single_plugin_conf_becomes_a_conflist_and_comes_back() {
    use std::os::unix::fs::PermissionsExt;
    let host = Host::new();
    let conf = host.put_fixture("10-bridge.conf");
    // Some primary CNIs keep their file private; the rewrite keeps its mode.
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut inst = host.installer(&["--excluded-namespaces", "kube-system,infra"]);
    let pass = inst.ensure().unwrap();
    let list = host.conf.join("10-bridge.conflist");
    assert_eq!(pass.chain, ChainState::Written(list.clone()));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&list), 0o600);
    assert_eq!(host.files(), vec!["10-bridge.conflist".to_string()]);
    let doc = json(&list);
    let original = fixture("10-bridge.conf");
    assert_eq!(doc["cniVersion"], original["cniVersion"]);
    assert_eq!(doc["name"], original["name"]);
    assert_eq!(doc["plugins"][0]["bridge"], "cni0");
    assert_eq!(doc["plugins"][0]["ipam"], original["ipam"]);
    assert_eq!(
        last_plugin(&doc)["excludedNamespaces"],
        serde_json::json!(["kube-system", "infra"])
    );
    assert!(matches!(
        inst.ensure().unwrap().chain,
        ChainState::Unchanged(_)
    ));

    // The primary CNI writes its .conf again: it sorts first, so it is converted again.
    host.put_fixture("10-bridge.conf");
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        inst.ensure().unwrap().chain,
        ChainState::Written(list.clone())
    );
    assert_eq!(host.files(), vec!["10-bridge.conflist".to_string()]);

    inst.uninstall().unwrap();
    assert_eq!(host.files(), vec!["10-bridge.conf".to_string()]);
    assert_eq!(json(&conf), original);
    assert_eq!(mode(&conf), 0o600);
}

#[test]
fn waits_for_the_primary_then_follows_the_first_file() {
    let host = Host::new();
    let mut inst = host.installer(&[]);
    assert_eq!(inst.ensure().unwrap().chain, ChainState::WaitingForPrimary);
    assert!(inst.check().is_err());
    // Files the runtime ignores are not a primary.
    std::fs::write(host.conf.join("README"), "x").unwrap();
    std::fs::write(host.conf.join(".10-x.conflist.swp"), "x").unwrap();
    assert_eq!(inst.ensure().unwrap().chain, ChainState::WaitingForPrimary);
    let flannel = host.put_fixture("10-flannel.conflist");
    assert_eq!(inst.ensure().unwrap().chain, ChainState::Written(flannel));
    // A CNI switch: a new file sorting first becomes the runtime's choice.
    let cilium = host.put_fixture("05-cilium.conflist");
    assert_eq!(inst.ensure().unwrap().chain, ChainState::Written(cilium));
    // Uninstall cleans both.
    let r = inst.uninstall().unwrap();
    assert_eq!(r.restored.len(), 2);
    assert_eq!(
        json(&host.conf.join("10-flannel.conflist")),
        fixture("10-flannel.conflist")
    );
}

#[test]
fn garbage_is_reported_and_never_overwritten() {
    let host = Host::new();
    let p = host.conf.join("10-broken.conflist");
    std::fs::write(&p, "{\"plugins\": [").unwrap();
    let mut inst = host.installer(&[]);
    let err = inst.ensure().unwrap_err().to_string();
    assert!(err.contains("10-broken.conflist"), "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), b"{\"plugins\": [");
    let mut cfg = host.config(&[]);
    cfg.plugin_source = "/nonexistent/ambient-cni".into();
    let missing = Installer::new(cfg);
    assert!(missing
        .check()
        .unwrap_err()
        .to_string()
        .contains("missing from the image"));
}

#[tokio::test]
async fn the_watch_loop_repairs_rewrites_replacements_and_a_removed_binary() {
    let host = Host::new();
    let path = host.put_fixture("10-calico.conflist");
    let inst = host.installer(&[]);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(install::run::watch(inst, async {
        let _ = stop_rx.await;
    }));
    let chained = |p: &Path| {
        std::fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|d| {
                d["plugins"]
                    .as_array()
                    .and_then(|a| a.last())
                    .map(|l| l["type"].clone())
                    == Some(Value::from("ambient-cni"))
            })
    };
    let p2 = path.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("first install", Duration::from_secs(5), || chained(&p2));
        // 1. The primary rewrites its file in place (truncate + write).
        std::fs::write(
            &p2,
            std::fs::read(Path::new(FIXTURES).join("10-calico.conflist")).unwrap(),
        )
        .unwrap();
        assert!(!chained(&p2));
        wait_until(
            "repair after an in-place rewrite",
            Duration::from_secs(2),
            || chained(&p2),
        );
        // 2. The primary replaces its file (write elsewhere, rename over).
        let tmp = p2.with_file_name("calico.tmp");
        std::fs::copy(Path::new(FIXTURES).join("10-calico.conflist"), &tmp).unwrap();
        std::fs::rename(&tmp, &p2).unwrap();
        wait_until("repair after a replacement", Duration::from_secs(2), || {
            chained(&p2)
        });
        // 3. The primary deletes and recreates it.
        std::fs::remove_file(&p2).unwrap();
        std::fs::copy(Path::new(FIXTURES).join("10-calico.conflist"), &p2).unwrap();
        wait_until(
            "repair after delete + create",
            Duration::from_secs(2),
            || chained(&p2),
        );
    })
    .await
    .unwrap();
    // 4. Something removes the binary.
    let bin = host.bin.join("ambient-cni");
    std::fs::remove_file(&bin).unwrap();
    let b2 = bin.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("binary back", Duration::from_secs(2), || b2.exists())
    })
    .await
    .unwrap();
    stop_tx.send(()).unwrap();
    let inst = task.await.unwrap();
    assert!(inst.recent_repairs() >= 3, "{}", inst.recent_repairs());
    inst.check().unwrap();
    inst.uninstall().unwrap();
    assert_eq!(json(&path), fixture("10-calico.conflist"));
}

#[test]
fn own_file_mode_leaves_the_primary_alone() {
    let host = Host::new();
    let primary = host.put_fixture("10-flannel.conflist");
    let before = std::fs::read(&primary).unwrap();
    let mut inst = host.installer(&["--mode", "own-file"]);
    let own = host.conf.join("00-ambient.conflist");
    assert_eq!(
        inst.ensure().unwrap().chain,
        ChainState::Written(own.clone())
    );
    assert_eq!(std::fs::read(&primary).unwrap(), before);
    let doc = json(&own);
    assert_eq!(last_plugin(&doc)["type"], "ambient-cni");
    assert!(last_plugin(&doc).get("convertedFrom").is_none());
    assert_eq!(
        doc["plugins"][0],
        fixture("10-flannel.conflist")["plugins"][0]
    );
    assert!(matches!(
        inst.ensure().unwrap().chain,
        ChainState::Unchanged(_)
    ));
    assert_eq!(inst.check().unwrap(), own);

    // The primary changes (an MTU update): our copy follows.
    let mut changed = fixture("10-flannel.conflist");
    changed["plugins"][0]["delegate"]["mtu"] = 1400.into();
    std::fs::write(&primary, serde_json::to_vec(&changed).unwrap()).unwrap();
    assert_eq!(
        inst.ensure().unwrap().chain,
        ChainState::Written(own.clone())
    );
    assert_eq!(json(&own)["plugins"][0]["delegate"]["mtu"], 1400);

    // A single-plugin primary works too, and is not converted on disk.
    let host2 = Host::new();
    host2.put_fixture("10-bridge.conf");
    let mut inst2 = host2.installer(&["--mode", "own-file"]);
    inst2.ensure().unwrap();
    assert_eq!(
        host2.files(),
        vec![
            "00-ambient.conflist".to_string(),
            "10-bridge.conf".to_string()
        ]
    );

    // Switching back to chain mode removes the own file.
    let mut chain = host.installer(&[]);
    chain.ensure().unwrap();
    assert_eq!(host.files(), vec!["10-flannel.conflist".to_string()]);
    chain.uninstall().unwrap();
    assert_eq!(json(&primary), changed);

    // Own file that would not sort first is refused with a precise error.
    let mut late = host.installer(&[
        "--mode",
        "own-file",
        "--own-file-name",
        "99-ambient.conflist",
    ]);
    let err = late.ensure().unwrap_err().to_string();
    assert!(err.contains("does not sort before"), "{err}");
    inst.uninstall().unwrap();
    assert_eq!(host.files(), vec!["10-flannel.conflist".to_string()]);
}

#[test]
fn readiness_asks_the_agent_for_status() {
    use ambient_common::agent_api::{AgentError, AgentOp, AgentReply, AgentRequest, ErrorKind};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("cni.sock");
    let timeout = Duration::from_secs(2);
    // No agent: unreachable, with the socket named.
    let err = install::ready::agent_ready(&sock, timeout)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cni.sock"), "{err}");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let answers = [
        AgentReply::Ready,
        AgentReply::Error(AgentError::new(ErrorKind::NotReady, "not synced")),
    ];
    let server = std::thread::spawn(move || {
        for answer in answers {
            let (mut c, _) = listener.accept().unwrap();
            let req: AgentRequest = ambient_common::frame::read_frame(&mut c).unwrap();
            assert_eq!(req.op, AgentOp::Status);
            ambient_common::frame::write_frame(&mut c, &answer).unwrap();
        }
    });
    install::ready::agent_ready(&sock, timeout).unwrap();
    let err = install::ready::agent_ready(&sock, timeout)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not ready"), "{err}");
    server.join().unwrap();
}

/// The static build of the plugin beside this test's binaries (`scripts/static-plugin.sh`).
fn static_plugin() -> PathBuf {
    let installer = Path::new(env!("CARGO_BIN_EXE_install-cni"));
    let profile_dir = installer.parent().unwrap();
    let path = profile_dir
        .parent()
        .unwrap()
        .join("x86_64-unknown-linux-gnu")
        .join(profile_dir.file_name().unwrap())
        .join("ambient-cni");
    assert!(
        path.exists(),
        "{} is missing: build it with scripts/static-plugin.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A complete static x86-64 executable that exits with status 1: an ELF header, one
/// loadable segment (the whole file at 0x400000), and `mov edi,1; mov eax,60; syscall`.
fn static_elf_exiting_1() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    let code: &[u8] = &[
        0xbf, 0x01, 0x00, 0x00, 0x00, // mov edi, 1
        0xb8, 0x3c, 0x00, 0x00, 0x00, // mov eax, 60 (exit)
        0x0f, 0x05, // syscall
    ];
    let size = (64 + 56 + code.len()) as u64;
    let mut b = Vec::new();
    b.extend(b"\x7fELF\x02\x01\x01\x00");
    b.extend([0u8; 8]);
    b.extend(2u16.to_le_bytes()); // ET_EXEC
    b.extend(0x3eu16.to_le_bytes()); // x86-64
    b.extend(1u32.to_le_bytes());
    b.extend((BASE + 120).to_le_bytes()); // entry: the code
    b.extend(64u64.to_le_bytes()); // program headers
    b.extend(0u64.to_le_bytes()); // no section headers
    b.extend(0u32.to_le_bytes());
    b.extend(64u16.to_le_bytes());
    b.extend(56u16.to_le_bytes());
    b.extend(1u16.to_le_bytes());
    b.extend([0u8; 6]);
    b.extend(1u32.to_le_bytes()); // PT_LOAD
    b.extend(5u32.to_le_bytes()); // R+X
    b.extend(0u64.to_le_bytes());
    b.extend(BASE.to_le_bytes());
    b.extend(BASE.to_le_bytes());
    b.extend(size.to_le_bytes());
    b.extend(size.to_le_bytes());
    b.extend(0x1000u64.to_le_bytes());
    b.extend(code);
    b
}

/// By default only a plugin that runs on any host goes in: a dynamically linked build (it
/// needs the image's libc on the host) and a static executable that fails VERSION are
/// refused, with the reason, before the host's binary directory or configuration changes;
/// the static build of ambient-cni is installed.
#[test]
fn only_a_plugin_that_runs_on_the_host_is_installed() {
    let host = Host::new();
    let conflist = host.put_fixture("10-ptp.conflist");
    let original = std::fs::read(&conflist).unwrap();
    let strict = |source: &Path| {
        let mut cfg = host.config(&[]);
        cfg.allow_dynamic_plugin = false;
        cfg.plugin_source = source.to_owned();
        Installer::new(cfg)
    };
    let untouched = |what: &str| {
        assert_eq!(std::fs::read(&conflist).unwrap(), original, "{what}");
        let left: Vec<_> = std::fs::read_dir(&host.bin).unwrap().collect();
        assert!(left.is_empty(), "{what}: {left:?} in the host's bin dir");
    };

    // A dynamically linked executable (this crate's own binary).
    let err = strict(Path::new(env!("CARGO_BIN_EXE_install-cni")))
        .ensure()
        .unwrap_err();
    let text = ambient_common::error::chain(&err);
    assert!(
        text.contains("dynamically linked") && text.contains("ld-linux"),
        "{text}"
    );
    untouched("dynamic");

    // A script, without the operator's say-so.
    let err = strict(&host.source).ensure().unwrap_err();
    assert!(
        ambient_common::error::chain(&err).contains("/bin/sh"),
        "{err:?}"
    );
    untouched("script");

    // Static, but it does not answer VERSION.
    let broken = host.bin.parent().unwrap().join("broken-plugin");
    std::fs::write(&broken, static_elf_exiting_1()).unwrap();
    let err = strict(&broken).ensure().unwrap_err();
    let text = ambient_common::error::chain(&err);
    assert!(
        text.contains("VERSION failed") && text.contains("exit status: 1"),
        "{text}"
    );
    untouched("failing VERSION");

    // The static build goes in, and the chain with it.
    let plugin = static_plugin();
    let mut inst = strict(&plugin);
    let pass = inst.ensure().unwrap();
    assert!(pass.binary_written);
    assert_eq!(pass.chain, ChainState::Written(conflist.clone()));
    assert_eq!(
        std::fs::read(host.bin.join("ambient-cni")).unwrap(),
        std::fs::read(&plugin).unwrap()
    );
    assert_eq!(last_plugin(&json(&conflist))["type"], "ambient-cni");
}
