//! Link flags for the `ztunnel` binary; both only change where things sit in the file.
//!
//! - Relative relocations are packed (DT_RELR). The loader reads every relocation at
//!   start, so the 420 KB of RELA entries stayed resident for the process's life; packed,
//!   they take 5 KB. Needs GNU libc 2.36 (an older linker ignores the option).
//! - Release builds linked by lld (rustc's default for x86_64-unknown-linux-gnu since
//!   1.90) place the functions matching `link-order.txt` first, together, in
//!   `.text.ordered`: the code ztunnel runs to start, load its sources, take the agent's
//!   push and answer probes then fills about a megabyte, where it touched pages all over
//!   7 MB of text before (the kernel maps a 64 KB window around each first touch).
//!   `scripts/ztunnel-link-order.sh` regenerates the list; patterns that match nothing
//!   are harmless, and `scripts/check-release-layout.sh` (run by the test suite) fails when
//!   the ordered code is missing or small. The patterns are v0 symbol names: without
//!   `-C symbol-mangling-version=v0` in the build's rustflags the layout is skipped with a
//!   warning.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const ORDER_FILE: &str = "link-order.txt";
/// Set (to anything) by `scripts/ztunnel-link-order.sh` for the build it profiles: valgrind
/// does not attribute code in `.text.ordered` to its functions, so a profile of a laid-out
/// binary lists only the functions the current list left out.
const NO_LAYOUT_ENV: &str = "ZTUNNEL_NO_CODE_LAYOUT";

fn main() {
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    println!("cargo:rerun-if-env-changed={NO_LAYOUT_ENV}");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    if env::var("PROFILE").as_deref() != Ok("release") || !links_with_rust_lld() {
        return;
    }
    if env::var_os(NO_LAYOUT_ENV).is_some() {
        println!("cargo:warning=code layout not applied: {NO_LAYOUT_ENV} is set");
        return;
    }
    // The list's patterns are v0 symbol names (.cargo/config.toml). A RUSTFLAGS in the
    // environment replaces that configuration: the patterns would match nothing and the
    // layout would silently not happen. Say so; `scripts/check-release-layout.sh`, run by
    // the test suite, fails on a binary without the ordered code.
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if !flags
        .split('\x1f')
        .any(|f| f.contains("symbol-mangling-version=v0"))
    {
        println!(
            "cargo:warning=code layout not applied: the build's rustflags lack \
             -C symbol-mangling-version=v0 (a RUSTFLAGS in the environment replaces \
             .cargo/config.toml's); ztunnel's idle memory grows by about 3 MiB"
        );
        return;
    }
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let Ok(list) = std::fs::read_to_string(dir.join(ORDER_FILE)) else {
        return;
    };
    let script = Path::new(&env::var("OUT_DIR").unwrap_or_default()).join("link-order.ld");
    match std::fs::write(&script, linker_script(&list)) {
        Ok(()) => println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display()),
        Err(e) => println!("cargo:warning=link order not applied: {e}"),
    }
}

/// A linker script that adds `.text.ordered` before `.text` (everything else keeps the
/// linker's default layout) holding, in list order, the function sections whose symbol
/// matches a pattern; a function the compiler marked cold sits in `.text.unlikely.*`.
fn linker_script(list: &str) -> String {
    let mut s = String::from("SECTIONS\n{\n  .text.ordered :\n  {\n");
    for pattern in list.lines().map(str::trim) {
        if pattern.is_empty() || pattern.starts_with('#') {
            continue;
        }
        // Symbol names are [A-Za-z0-9_] and the list's '*': nothing else reaches the script.
        if !pattern
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'*')
        {
            println!("cargo:warning={ORDER_FILE}: skipped malformed line {pattern:?}");
            continue;
        }
        let _ = writeln!(s, "    *(.text.{pattern}* .text.unlikely.{pattern}*)");
    }
    s.push_str("  }\n}\nINSERT BEFORE .text;\n");
    s
}

/// Whether rustc links this build with its bundled lld: the x86_64 GNU/Linux target with
/// rustc 1.90 or later, and no linker chosen by the user.
fn links_with_rust_lld() -> bool {
    if env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu") {
        return false;
    }
    if env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_some() {
        return false;
    }
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") || flags.contains("link-self-contained") {
        return false;
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&out.stdout);
    let minor = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok());
    minor.is_some_and(|m| m >= 90)
}
