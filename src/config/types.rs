//! The validated configuration: plain types the rest of sluice uses, read
//! from either a TOML file or a Fluent Bit Upstream file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{
    Address, AgentCheckConfig, Balance, ClientTlsSettings, FileLines, HashRing, KeyLine,
    ProxyProtocol, RecycleConfig, ServerTlsSettings,
};

/// Server defaults (SPEC §2), shared by the TOML reader and Fluent Bit nodes.
pub(super) mod server_defaults {
    use std::time::Duration;

    pub const WEIGHT: u32 = 1;
    pub const MAX_FAILS: u32 = 1;
    pub const FAIL_TIMEOUT: Duration = Duration::from_secs(10);
    pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(5);
}

/// Process, listener and upstream defaults (SPEC §2), shared by the TOML
/// reader and `--fluent-bit` mode, which takes every default.
pub(super) mod defaults {
    use std::time::Duration;

    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
    pub const UNIX_MODE: u32 = 0o660;
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub shutdown_timeout: Duration,
    /// `None`: no admin endpoint.
    pub admin: Option<AdminConfig>,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: Address,
    pub upstream: String,
    pub connect_timeout: Duration,
    /// `None`: connections are never closed for idleness.
    pub idle_timeout: Option<Duration>,
    /// `0`: every eligible server once.
    pub next_upstream_tries: u32,
    /// `None`: no limit on the time all attempts may take together.
    pub next_upstream_timeout: Option<Duration>,
    pub unix_mode: u32,
    /// Send a PROXY header to the upstream before any client byte.
    pub proxy_protocol: ProxyProtocol,
    /// Read and strip a PROXY header from each client first.
    pub accept_proxy_protocol: bool,
    /// `[listener.tls]`: terminate TLS from clients.
    pub tls: Option<ServerTlsSettings>,
    /// Where the files of `tls` were named.
    pub tls_lines: FileLines,
    /// One access-log line per client connection at its close.
    pub access_log: bool,
    /// The ACK of a client's first bytes waits for the reply to carry it
    /// (TCP listeners, Linux).
    pub delayed_ack: bool,
    /// Recycling and rebalancing long-lived connections (SPEC §9).
    pub recycle: RecycleConfig,
}

/// The admin HTTP endpoint (SPEC §5).
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub bind: Address,
    /// Holds the bearer token runtime API writes must carry (SPEC §10).
    pub token_file: Option<PathBuf>,
    /// Where runtime API changes are kept across reloads and restarts.
    pub state_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    pub balance: Balance,
    /// The ring of `balance = "hash"`.
    pub hash_ring: HashRing,
    pub servers: Vec<ServerConfig>,
    /// `None`: no active health checks.
    pub health_check: Option<HealthCheckConfig>,
    /// Name servers for `resolve = true` servers; empty: the system's (`/etc/resolv.conf`).
    pub resolver: Vec<SocketAddr>,
    /// Clients that may wait for a free slot when every peer is at
    /// `max_conns` (SPEC §11); `0`: none wait.
    pub queue: u32,
    pub queue_timeout: Duration,
}

/// `[upstream.NAME.health_check]`: active checks of every peer of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub interval: Duration,
    /// For the whole check: connect, send, and the expected reply.
    pub timeout: Duration,
    /// Consecutive failed checks that make a peer unhealthy.
    pub fails: u32,
    /// Consecutive passed checks that make an unhealthy peer healthy again.
    pub passes: u32,
    /// Bytes written after connecting; `None`: a check is a connect.
    pub send: Option<Vec<u8>>,
    /// The reply must start with these bytes.
    pub expect: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub address: Address,
    /// Where `address` (a Fluent Bit node's `host`) was written.
    pub address_line: KeyLine,
    pub name: Option<String>,
    pub weight: u32,
    /// `0`: unlimited.
    pub max_conns: u32,
    /// `0`: never mark failed.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub backup: bool,
    pub down: bool,
    /// Zero: no slow start.
    pub slow_start: Duration,
    /// Re-resolve the host name while running.
    pub resolve: bool,
    /// How often at most; a shorter record TTL re-resolves sooner.
    pub resolve_interval: Duration,
    /// TLS origination towards this server; `None`: plain.
    pub tls: Option<ClientTlsSettings>,
    /// Where the files of `tls` were named (the server's table, the group's
    /// or the node's).
    pub tls_lines: FileLines,
    /// The format the server was written in.
    pub syntax: Syntax,
    /// Keys of a Fluent Bit node that sluice keeps but does not use
    /// (`shared_key`, ...), in file order; listed by `--check`.
    pub plugin_keys: Vec<(String, String)>,
    /// Asks the server's agent for its weight and state (SPEC §13).
    pub agent_check: Option<AgentCheckConfig>,
}

/// The format a server was written in, so that messages about it use the
/// words of its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    Toml,
    FluentBit,
}

impl Syntax {
    /// The setting that turns TLS verification off, as written in this format.
    pub fn verify_off(self) -> &'static str {
        match self {
            Syntax::Toml => "verify = false",
            Syntax::FluentBit => "tls.verify off",
        }
    }
}

impl ServerConfig {
    /// A server added through the runtime API (SPEC §10): plain (no TLS),
    /// the defaults of §2 for what the request does not set.
    pub fn added_at_runtime(
        address: Address,
        name: Option<String>,
        weight: u32,
        max_conns: u32,
    ) -> ServerConfig {
        let line = KeyLine {
            file: PathBuf::from("runtime API"),
            line: 0,
            quote: None,
        };
        ServerConfig {
            name,
            weight,
            max_conns,
            ..ServerConfig::with_defaults(address, line, Syntax::Toml)
        }
    }

    /// A plain server at `address` with every other setting at its default
    /// (SPEC §2): what servers that are not TOML tables start from.
    pub(super) fn with_defaults(address: Address, address_line: KeyLine, syntax: Syntax) -> Self {
        ServerConfig {
            address,
            address_line,
            name: None,
            weight: server_defaults::WEIGHT,
            max_conns: 0,
            max_fails: server_defaults::MAX_FAILS,
            fail_timeout: server_defaults::FAIL_TIMEOUT,
            backup: false,
            down: false,
            slow_start: Duration::ZERO,
            resolve: false,
            resolve_interval: server_defaults::RESOLVE_INTERVAL,
            tls: None,
            tls_lines: FileLines::default(),
            syntax,
            plugin_keys: Vec::new(),
            agent_check: None,
        }
    }

    /// The name used in metrics, logs and `/status`: `name`, else the address as written.
    pub fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.address.to_string())
    }
}
