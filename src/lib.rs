//! sluice: a Layer-4 stream load balancer with nginx `upstream` semantics.

pub mod access_log;
pub mod admin;
pub mod balancer;
pub mod cli;
pub mod config;
pub mod config_watch;
pub mod health_check;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod resolver;
pub mod server;
pub mod stats;
pub mod supervisor;
pub mod tls;
pub mod upstream;
pub mod upstream_task;
pub mod workers;
