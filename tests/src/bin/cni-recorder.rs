//! `cni-recorder`: a chained CNI plugin that records its calls; see `ambient_tests::recorder`.

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let out = ambient_tests::recorder::handle(std::env::vars().collect(), &stdin);
    let _ = std::io::stdout().write_all(out.stdout.as_bytes());
    std::process::exit(if out.success { 0 } else { 1 });
}
