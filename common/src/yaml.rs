//! YAML, read and written in one place with one set of rules, by serde-saphyr (the parser
//! kube's client already uses for kubeconfigs): the manifests both daemons read, the agent's
//! configuration file, the issuer's credentials file, and the tests' rendered manifests.
//!
//! The rules are YAML 1.2's: only `true`/`false` are booleans (`yes`, `on` stay strings),
//! no legacy octal numbers, duplicate keys are an error. Empty documents of a stream are
//! skipped. The inputs are files the operator controls, so no size budget applies (a lab
//! manifest with 10,000 pods exceeds the parser's defaults); alias expansion keeps its
//! limits.

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use serde_saphyr::{Error, SerializeError};

fn options() -> serde_saphyr::Options {
    let mut o = serde_saphyr::Options::default();
    o.budget = None;
    o.strict_booleans = true;
    o.legacy_octal_numbers = false;
    // Errors on one line, for logs and CLI messages (no source snippet).
    o.with_snippet = false;
    o
}

/// One document.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    serde_saphyr::from_str_with_options(text, options())
}

/// Every non-empty document of a stream (`---`-separated), in order.
pub fn documents<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, Error> {
    serde_saphyr::from_multiple_with_options(text, options())
}

/// `value` as YAML.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, SerializeError> {
    serde_saphyr::to_string(value)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    #[test]
    fn yaml_1_2_rules() {
        let v: Value = super::from_str("a: yes\nb: true\nc: 10\nd: '1'\ne: 1.5\n").unwrap();
        assert_eq!(
            v,
            json!({"a": "yes", "b": true, "c": 10, "d": "1", "e": 1.5})
        );
        assert!(
            super::from_str::<Value>("a: 1\na: 2\n").is_err(),
            "duplicate key"
        );
        assert!(super::from_str::<Value>("a: [1\n").is_err());
    }

    /// The budget is off (operator files can be large), but alias expansion keeps its
    /// limit: nine levels of ten aliases (a billion leaves) are refused, not expanded.
    #[test]
    fn alias_expansion_is_bounded() {
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..=9 {
            let p = i - 1;
            doc.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let started = std::time::Instant::now();
        assert!(
            super::from_str::<Value>(&doc).is_err(),
            "billion laughs expanded"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }

    #[test]
    fn streams_skip_empty_documents_and_hold_many() {
        let docs: Vec<Value> = super::documents("---\na: 1\n---\n---\nb: 2\n").unwrap();
        assert_eq!(docs, vec![json!({"a": 1}), json!({"b": 2})]);
        let big: String = (0..5000)
            .map(|i| format!("---\nkind: Pod\nmetadata: {{name: p{i}, labels: {{a: b}}}}\n"))
            .collect();
        assert_eq!(super::documents::<Value>(&big).unwrap().len(), 5000);
    }

    #[test]
    fn writes_what_it_reads() {
        let v = json!({"tokens": [{"node": "n1", "token": "abc"}], "on": "on"});
        let text = super::to_string(&v).unwrap();
        assert_eq!(super::from_str::<Value>(&text).unwrap(), v);
    }
}
