//! sluice: a Layer-4 stream load balancer with nginx `upstream` semantics.

pub mod proxy_protocol;
