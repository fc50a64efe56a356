//! The dependency policy of `deny.toml`, checked against the locked graph: every
//! crate's licence is allowed, no crate comes in two versions unless `bans.skip` names that
//! version (and every skip entry is still needed), and every crate comes from crates.io or
//! this workspace. (Advisories need the RustSec database: `cargo deny check advisories`.)

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;
use toml_edit::{DocumentMut, Item};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn policy() -> DocumentMut {
    std::fs::read_to_string(format!("{ROOT}/deny.toml"))
        .unwrap()
        .parse()
        .unwrap()
}

fn strings(item: &Item) -> Vec<String> {
    item.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// The packages of the resolved graph for the target deny.toml names.
fn packages(target: &str) -> Vec<Value> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(ROOT)
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--filter-platform", target])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    let used: BTreeSet<&str> = m["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    m["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| used.contains(p["id"].as_str().unwrap()))
        .cloned()
        .collect()
}

/// Whether an SPDX expression (`A OR B`, `A AND (B OR C)`, `A WITH exception`, and the old
/// `A/B` for OR) is satisfied by the allowed licences.
fn satisfied(expr: &str, allowed: &[String]) -> bool {
    let spaced = expr
        .replace('(', " ( ")
        .replace(')', " ) ")
        .replace('/', " OR ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let mut pos = 0;
    let ok = or(&tokens, &mut pos, allowed);
    assert_eq!(pos, tokens.len(), "unparsed licence expression {expr:?}");
    ok
}

fn or(t: &[&str], pos: &mut usize, allowed: &[String]) -> bool {
    let mut ok = and(t, pos, allowed);
    while t.get(*pos) == Some(&"OR") {
        *pos += 1;
        ok |= and(t, pos, allowed);
    }
    ok
}

fn and(t: &[&str], pos: &mut usize, allowed: &[String]) -> bool {
    let mut ok = term(t, pos, allowed);
    while t.get(*pos) == Some(&"AND") {
        *pos += 1;
        ok &= term(t, pos, allowed);
    }
    ok
}

fn term(t: &[&str], pos: &mut usize, allowed: &[String]) -> bool {
    if t[*pos] == "(" {
        *pos += 1;
        let ok = or(t, pos, allowed);
        assert_eq!(t[*pos], ")");
        *pos += 1;
        return ok;
    }
    let mut id = t[*pos].to_owned();
    *pos += 1;
    if t.get(*pos) == Some(&"WITH") {
        id = format!("{id} WITH {}", t[*pos + 1]);
        *pos += 2;
    }
    allowed.contains(&id)
}

#[test]
fn licence_expressions_are_evaluated() {
    let allowed = ["MIT".to_string(), "Apache-2.0".to_string()];
    assert!(satisfied("MIT OR GPL-3.0", &allowed));
    assert!(satisfied("MIT/Apache-2.0", &allowed));
    assert!(!satisfied("MIT AND GPL-3.0", &allowed));
    assert!(satisfied("(GPL-3.0 OR MIT) AND Apache-2.0", &allowed));
    assert!(!satisfied("Apache-2.0 WITH LLVM-exception", &allowed));
    assert!(!satisfied("GPL-3.0", &allowed));
}

#[test]
fn every_dependency_meets_the_policy() {
    let doc = policy();
    let target = strings(&doc["graph"]["targets"]).remove(0);
    let allowed = strings(&doc["licenses"]["allow"]);
    let skip: BTreeSet<String> = doc["bans"]["skip"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let t = v.as_inline_table().unwrap();
            t.get("crate").unwrap().as_str().unwrap().to_owned()
        })
        .collect();
    let registries = strings(&doc["sources"]["allow-registry"]);

    let mut problems = Vec::new();
    let mut versions: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in packages(&target) {
        let name = p["name"].as_str().unwrap();
        let version = p["version"].as_str().unwrap();
        versions
            .entry(name.to_owned())
            .or_default()
            .insert(version.to_owned());
        match p["source"].as_str() {
            None => continue, // this workspace
            Some(s) if registries.iter().any(|r| s == format!("registry+{r}")) => {}
            Some(s) => problems.push(format!("{name} {version}: source {s} not allowed")),
        }
        match p["license"].as_str() {
            Some(l) if satisfied(l, &allowed) => {}
            l => problems.push(format!("{name} {version}: licence {l:?} not allowed")),
        }
    }
    let mut needed = BTreeSet::new();
    for (name, vs) in &versions {
        if vs.len() < 2 {
            continue;
        }
        for v in vs {
            let key = format!("{name}@{v}");
            if skip.contains(&key) {
                needed.insert(key);
            } else {
                problems.push(format!(
                    "{name} comes in versions {vs:?}; {key} is not in bans.skip"
                ));
            }
        }
    }
    for stale in skip.difference(&needed) {
        problems.push(format!(
            "bans.skip names {stale}, no longer a duplicate: remove it"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
