//! The `ambient-cni` chained CNI plugin.
#![forbid(unsafe_code)]
