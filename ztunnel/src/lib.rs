//! ztunnel: the per-node proxy of the ambient data plane.
//!
//! Captured TCP from local ambient pods arrives on the outbound listener and is carried to the
//! destination node's ztunnel in HBONE (HTTP/2 CONNECT inside mutual TLS 1.3, SPIFFE
//! identities both ways); the inbound listener terminates HBONE and connects to the local pod
//! keeping the client's source address.
//!
//! Layout:
//! - [`config`]: the typed configuration, built by a pure function from flags;
//! - [`identity`]: SPIFFE identities, the certificate provider and cache, rustls glue;
//! - [`hbone`]: the tunnel protocol: authority parsing, server, client pool, byte relay;
//! - [`store`]: workloads, services and policies, from the manifest directory and the agent;
//! - [`policy`]: L4 AuthorizationPolicy evaluation;
//! - [`proxy`]: the listeners (outbound, inbound, inbound plaintext) and socket factory;
//! - [`metrics`]: Istio-named metrics, live connection table, access log;
//! - [`app`]: builds and runs everything, drains on shutdown; its admin, metrics and
//!   readiness endpoints are routes on `ambient_common::http`.
#![deny(unsafe_code)]

pub mod app;
pub mod config;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod store;
pub mod sys;
