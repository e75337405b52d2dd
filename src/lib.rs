//! sluice: a Layer-4 stream load balancer with nginx `upstream` semantics.
//!
//! Layers, each importing only those below it (ARCHITECTURE.md draws them):
//! `config`, `balancer`, `metrics`, `buffer_pool` at the bottom; then `tls`, `net`,
//! `upstream`, `proxy`, `admin`, `lifecycle`, and `cli` (with `ctl`, its
//! runtime API client) on top.

pub mod admin;
pub mod balancer;
pub mod buffer_pool;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod lifecycle;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod tls;
pub mod upstream;
