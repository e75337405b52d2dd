//! The configuration: the plain types the rest of sluice uses, read from a
//! TOML file ([`toml`]) or a Fluent Bit Upstream file ([`fluent_bit`]), with
//! errors that name the file and line of what is wrong.

mod address;
mod agent_check;
mod error;
pub mod fluent_bit;
pub mod limits;
mod recycle;
mod tls_settings;
mod toml;
mod types;

pub use address::Address;
pub use agent_check::{AgentAddress, AgentCheckConfig};
use error::clip_message;
pub use error::{clip, quoted, ConfigError, FileLines, KeyLine, ValueError};
pub use recycle::{Protocol, RecycleConfig, MAX_REBALANCE_RATE};
pub use tls_settings::{
    parse_server_name, ClientTlsSettings, InvalidServerName, NamesFile, PemKind, ServerTlsSettings,
};
pub use toml::raw::{Balance, HashKey, HashRing, ProxyProtocol};
use types::{defaults, server_defaults};
pub use types::{
    AdminConfig, Config, HealthCheckConfig, ListenerConfig, ServerConfig, Syntax, UpstreamConfig,
};
