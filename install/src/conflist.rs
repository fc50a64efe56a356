//! The CNI configuration documents: where the primary configuration is, and the pure
//! transformations that add this project's plugin to its chain and take it out again.
//!
//! A runtime (containerd, CRI-O) uses the lexically first `.conflist`, `.conf` or `.json` file
//! of its configuration directory; we follow the same rule. A `.conflist` is a chain
//! (`plugins: [...]`); a `.conf` is a single plugin, which we convert into a chain of two. Our
//! entry records the name of a converted file (`convertedFrom`), so that an uninstall after a
//! restart still knows to write the single-plugin file back. The plugin ignores that key.

use std::path::{Path, PathBuf};

use ambient_common::constants::PLUGIN_NAME;
use serde_json::{Map, Value};

/// Key of our entry naming the single-plugin file it was converted from.
pub const CONVERTED_FROM_KEY: &str = "convertedFrom";

/// Extensions a runtime reads, in the order libcni lists them (the sort is by whole name).
pub const CONFIG_EXTENSIONS: &[&str] = &["conflist", "conf", "json"];

#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: a CNI configuration must be a JSON object")]
    NotObject { path: PathBuf },
    #[error("{path}: `plugins` must be an array of objects")]
    BadPlugins { path: PathBuf },
    #[error("{path}: a single-plugin configuration needs a string `type`")]
    NoType { path: PathBuf },
    #[error("cannot list CNI configuration directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// True for a file name a runtime would load as a configuration.
pub fn is_config_name(name: &str) -> bool {
    if name.starts_with('.') {
        // Our temporary files (and editors' swap files) are hidden; libcni would read a hidden
        // `.conf`, but nothing we care about writes one.
        return false;
    }
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| CONFIG_EXTENSIONS.contains(&e))
}

/// The configuration files of `dir`, sorted as the runtime sorts them, minus `skip` (our own
/// file in own-file mode).
pub fn config_files(dir: &Path, skip: Option<&str>) -> Result<Vec<PathBuf>, ConflistError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ConflistError::ReadDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| !t.is_dir()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_config_name(n) && Some(n.as_str()) != skip)
        .collect();
    names.sort();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// The primary configuration: the first file the runtime would use, ignoring `skip`.
pub fn find_primary(dir: &Path, skip: Option<&str>) -> Result<Option<PathBuf>, ConflistError> {
    Ok(config_files(dir, skip)?.into_iter().next())
}

/// Parses a configuration document.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Map<String, Value>, ConflistError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|source| ConflistError::Json {
        path: path.to_owned(),
        source,
    })?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ConflistError::NotObject {
            path: path.to_owned(),
        }),
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_NAME)
}

fn plugins<'a>(path: &Path, doc: &'a Map<String, Value>) -> Result<&'a [Value], ConflistError> {
    match doc.get("plugins") {
        Some(Value::Array(a)) if a.iter().all(Value::is_object) => Ok(a),
        _ => Err(ConflistError::BadPlugins {
            path: path.to_owned(),
        }),
    }
}

/// Whether a document is a chain (`plugins`) rather than a single plugin.
pub fn is_chain(doc: &Map<String, Value>) -> bool {
    doc.contains_key("plugins")
}

/// Our entry in a chain, if it is there.
pub fn our_entry(doc: &Map<String, Value>) -> Option<&Map<String, Value>> {
    doc.get("plugins")?
        .as_array()?
        .iter()
        .find(|p| is_ours(p))?
        .as_object()
}

/// Whether `doc` is a chain whose last plugin is exactly `entry` (ignoring the
/// `convertedFrom` bookkeeping) and which holds no other entry of ours.
pub fn has_entry_last(doc: &Map<String, Value>, entry: &Map<String, Value>) -> bool {
    let Some(Value::Array(plugins)) = doc.get("plugins") else {
        return false;
    };
    let ours = plugins.iter().filter(|p| is_ours(p)).count();
    let Some(Value::Object(last)) = plugins.last() else {
        return false;
    };
    let mut last = last.clone();
    last.remove(CONVERTED_FROM_KEY);
    ours == 1 && &last == entry
}

/// Adds `entry` as the last plugin of the chain in `doc` (read from `path`), replacing any
/// previous entry of ours. A single-plugin document becomes a chain of two; `entry` then
/// records the file name it came from. Every other field and plugin is kept as is.
pub fn with_entry(
    path: &Path,
    doc: &Map<String, Value>,
    entry: &Map<String, Value>,
) -> Result<Map<String, Value>, ConflistError> {
    let mut entry = entry.clone();
    if is_chain(doc) {
        let mut list: Vec<Value> = plugins(path, doc)?.to_vec();
        // Keep the bookkeeping of an earlier conversion.
        if let Some(from) = our_entry(doc).and_then(|e| e.get(CONVERTED_FROM_KEY)) {
            entry.insert(CONVERTED_FROM_KEY.into(), from.clone());
        }
        list.retain(|p| !is_ours(p));
        list.push(Value::Object(entry));
        let mut out = doc.clone();
        out.insert("plugins".into(), Value::Array(list));
        return Ok(out);
    }
    if !doc.get("type").is_some_and(Value::is_string) {
        return Err(ConflistError::NoType {
            path: path.to_owned(),
        });
    }
    let mut out = Map::new();
    let mut plugin = doc.clone();
    for key in ["cniVersion", "name"] {
        if let Some(v) = plugin.remove(key) {
            out.insert(key.into(), v);
        }
    }
    if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
        entry.insert(CONVERTED_FROM_KEY.into(), Value::String(name.to_owned()));
    }
    out.insert(
        "plugins".into(),
        Value::Array(vec![Value::Object(plugin), Value::Object(entry)]),
    );
    Ok(out)
}

/// What removing our entry gives back.
#[derive(Debug, Clone, PartialEq)]
pub struct Removed {
    pub doc: Map<String, Value>,
    /// Set when the chain was converted from a single-plugin file of this name: `doc` is then
    /// that single plugin again, to be written under this name.
    pub restore_as: Option<String>,
}

/// Takes every entry of ours out of `doc`; `None` when there was none.
pub fn without_entry(
    path: &Path,
    doc: &Map<String, Value>,
) -> Result<Option<Removed>, ConflistError> {
    if !is_chain(doc) {
        return Ok(None);
    }
    let list = plugins(path, doc)?;
    if !list.iter().any(is_ours) {
        return Ok(None);
    }
    let converted = our_entry(doc)
        .and_then(|e| e.get(CONVERTED_FROM_KEY))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let rest: Vec<Value> = list.iter().filter(|p| !is_ours(p)).cloned().collect();
    if let (Some(name), [Value::Object(single)]) = (&converted, rest.as_slice()) {
        let mut out = Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(v) = doc.get(key) {
                out.insert(key.into(), v.clone());
            }
        }
        for (k, v) in single {
            out.insert(k.clone(), v.clone());
        }
        return Ok(Some(Removed {
            doc: out,
            restore_as: Some(name.clone()),
        }));
    }
    let mut out = doc.clone();
    out.insert("plugins".into(), Value::Array(rest));
    Ok(Some(Removed {
        doc: out,
        restore_as: None,
    }))
}

/// The file a chained document is written to: a chain stays where it is; a single plugin
/// (`.conf`, `.json`) becomes `<stem>.conflist`, which sorts right after it.
pub fn chain_name(primary: &Path, doc: &Map<String, Value>) -> PathBuf {
    if is_chain(doc) || primary.extension().and_then(|e| e.to_str()) == Some("conflist") {
        primary.to_owned()
    } else {
        primary.with_extension("conflist")
    }
}

/// Serialises a document the way it is written to disk.
pub fn render(doc: &Map<String, Value>) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(doc).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn entry() -> Map<String, Value> {
        obj(json!({"type": "ambient-cni", "agentSocket": "/var/run/ambient/cni.sock"}))
    }

    #[test]
    fn config_names_follow_libcni_extensions() {
        for ok in ["10-flannel.conflist", "10-bridge.conf", "87-podman.json"] {
            assert!(is_config_name(ok), "{ok}");
        }
        for no in [
            ".10-x.conflist.tmp",
            "x.conflist.bak",
            "README",
            ".hidden.conf",
        ] {
            assert!(!is_config_name(no), "{no}");
        }
    }

    #[test]
    fn appends_last_and_is_idempotent() {
        let p = Path::new("10-calico.conflist");
        let doc = obj(
            json!({"cniVersion": "0.3.1", "name": "k8s-pod-network", "plugins": [
                {"type": "calico", "ipam": {"type": "calico-ipam"}},
                {"type": "bandwidth", "capabilities": {"bandwidth": true}},
                {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
            ]}),
        );
        assert!(!has_entry_last(&doc, &entry()));
        let once = with_entry(p, &doc, &entry()).unwrap();
        assert!(has_entry_last(&once, &entry()));
        let twice = with_entry(p, &once, &entry()).unwrap();
        assert_eq!(once, twice);
        assert_eq!(once["plugins"].as_array().unwrap().len(), 4);
        let back = without_entry(p, &once).unwrap().unwrap();
        assert_eq!(back.doc, doc);
        assert_eq!(back.restore_as, None);
        assert_eq!(without_entry(p, &doc).unwrap(), None);
    }

    #[test]
    fn moves_a_misplaced_or_stale_entry_to_the_end() {
        let p = Path::new("10-x.conflist");
        let doc = obj(json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
            {"type": "ambient-cni", "old": true}, {"type": "ptp"}, {"type": "ambient-cni"}
        ]}));
        let out = with_entry(p, &doc, &entry()).unwrap();
        let list = out["plugins"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0]["type"], "ptp");
        assert_eq!(Value::Object(entry()), list[1]);
    }

    #[test]
    fn converts_a_single_plugin_and_back() {
        let p = Path::new("/etc/cni/net.d/10-bridge.conf");
        let doc = obj(
            json!({"cniVersion": "0.4.0", "name": "mynet", "type": "bridge",
            "bridge": "cni0", "isGateway": true, "ipMasq": true,
            "ipam": {"type": "host-local", "subnet": "10.22.0.0/16", "routes": [{"dst": "0.0.0.0/0"}]}}),
        );
        let chain = with_entry(p, &doc, &entry()).unwrap();
        assert_eq!(chain["cniVersion"], "0.4.0");
        assert_eq!(chain["name"], "mynet");
        let list = chain["plugins"].as_array().unwrap();
        assert_eq!(list[0]["type"], "bridge");
        assert!(list[0].get("cniVersion").is_none());
        assert_eq!(list[1][CONVERTED_FROM_KEY], "10-bridge.conf");
        assert!(has_entry_last(&chain, &entry()));
        // Re-applying (e.g. with a changed setting) keeps the bookkeeping.
        let mut e2 = entry();
        e2.insert("logLevel".into(), json!("debug"));
        let chained = chain_name(p, &doc);
        assert_eq!(chained, Path::new("/etc/cni/net.d/10-bridge.conflist"));
        assert_eq!(chain_name(&chained, &chain), chained);
        let again = with_entry(&chained, &chain, &e2).unwrap();
        assert_eq!(again["plugins"][1][CONVERTED_FROM_KEY], "10-bridge.conf");
        let back = without_entry(&chained, &again).unwrap().unwrap();
        assert_eq!(back.doc, doc);
        assert_eq!(back.restore_as.as_deref(), Some("10-bridge.conf"));
    }

    #[test]
    fn bad_documents_are_precise_errors() {
        let p = Path::new("x.conflist");
        assert!(matches!(
            parse(p, b"[1]"),
            Err(ConflistError::NotObject { .. })
        ));
        assert!(matches!(parse(p, b"{"), Err(ConflistError::Json { .. })));
        let doc = obj(json!({"plugins": {"type": "x"}}));
        assert!(matches!(
            with_entry(p, &doc, &entry()),
            Err(ConflistError::BadPlugins { .. })
        ));
        let doc = obj(json!({"name": "x"}));
        assert!(matches!(
            with_entry(p, &doc, &entry()),
            Err(ConflistError::NoType { .. })
        ));
    }

    proptest::proptest! {
        /// Adding then removing our entry gives back any chain exactly.
        #[test]
        fn add_remove_roundtrip(
            types in proptest::collection::vec("[a-z]{1,8}", 1..5),
            keys in proptest::collection::vec(("[a-zA-Z]{1,6}", "[ -~]{0,10}"), 0..5),
        ) {
            let mut doc = Map::new();
            doc.insert("cniVersion".into(), json!("1.0.0"));
            doc.insert("name".into(), json!("n"));
            for (k, v) in &keys {
                if k != "plugins" { doc.insert(k.clone(), json!(v)); }
            }
            let plugins: Vec<Value> = types.iter()
                .filter(|t| *t != "ambient")
                .map(|t| json!({"type": t, "x": t.len()})).collect();
            doc.insert("plugins".into(), Value::Array(plugins));
            let p = Path::new("a.conflist");
            let with = with_entry(p, &doc, &entry()).unwrap();
            proptest::prop_assert!(has_entry_last(&with, &entry()));
            let back = without_entry(p, &with).unwrap().unwrap();
            proptest::prop_assert_eq!(back.doc, doc);
        }
    }
}
