//! Error formatting shared by every binary.

use std::fmt::Write;

/// The error and every source under it on one line, joined with `": "` (`a: b: c`), for
/// logs, CLI messages and error replies.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("reading the config")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn joins_every_source() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(super::chain(&io), "no such file");
        assert_eq!(super::chain(&Outer(io)), "reading the config: no such file");
    }
}
