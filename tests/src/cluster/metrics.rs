//! Reading the Prometheus text format that ztunnel and the issuer serve on `/metrics`:
//! [`metric_samples`] (a metric's samples with their labels) and [`sum_samples`].

use std::collections::BTreeMap;

/// The sum of `metric`'s samples in a Prometheus text whose labels include all of `labels`.
pub fn sum_samples(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    metric_samples(text, metric)
        .into_iter()
        .filter(|(l, _)| {
            labels
                .iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Parses the Prometheus text: samples of `metric` as (labels, value).
pub fn metric_samples(text: &str, metric: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => match r.rsplit_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        out.push((parse_labels(labels), v));
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((k, r)) = rest.split_once("=\"") {
        let mut val = String::new();
        let mut chars = r.char_indices();
        let mut end = r.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(n);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.insert(k.trim_start_matches(',').trim().to_owned(), val);
        rest = &r[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_samples_parse_labels_and_values() {
        let text = "# HELP x\nistio_tcp_connections_opened_total{reporter=\"source\",source_principal=\"spiffe://cluster.local/ns/a/sa/b\",x=\"q\\\"uote\"} 3\nistio_tcp_connections_opened_total 1\nother 2\n";
        let s = metric_samples(text, "istio_tcp_connections_opened_total");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0["reporter"], "source");
        assert_eq!(
            s[0].0["source_principal"],
            "spiffe://cluster.local/ns/a/sa/b"
        );
        assert_eq!(s[0].0["x"], "q\"uote");
        assert_eq!(s[0].1, 3.0);
        assert!(s[1].0.is_empty());
    }
}
