//! The node agent.
#![forbid(unsafe_code)]
