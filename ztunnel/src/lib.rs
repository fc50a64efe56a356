//! ztunnel.
#![forbid(unsafe_code)]
