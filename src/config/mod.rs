//! The TOML configuration: parsed with serde into raw types that keep source
//! spans, then validated into plain types the rest of sluice uses.

mod address;
mod agent_check;
mod fluent_bit;
mod raw;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use address::Address;
pub use agent_check::{AgentAddress, AgentCheckConfig};
pub use raw::{Balance, HashKey, ProxyProtocol};

use raw::{RawClientTls, RawConfig, RawHealthCheck, RawListener, RawServer, RawUpstream};

/// Server defaults (SPEC §2), shared by the TOML reader and Fluent Bit nodes.
mod server_defaults {
    use std::time::Duration;

    pub const WEIGHT: u32 = 1;
    pub const MAX_FAILS: u32 = 1;
    pub const FAIL_TIMEOUT: Duration = Duration::from_secs(10);
    pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(5);
}
use toml::Spanned;

/// The most clients one upstream's queue may hold (SPEC §8, §11).
pub const MAX_QUEUE: u32 = 100_000;
/// The longest a client may wait in a queue.
pub const MAX_QUEUE_TIMEOUT: Duration = Duration::from_secs(3600);

use crate::tls::{self, ClientTlsSettings, PemKind, ServerTlsSettings, TlsError};

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
    /// Keys of a Fluent Bit node that sluice keeps but does not use
    /// (`shared_key`, ...), in file order; listed by `--check`.
    pub plugin_keys: Vec<(String, String)>,
    /// Asks the server's agent for its weight and state (SPEC §13).
    pub agent_check: Option<AgentCheckConfig>,
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
        ServerConfig {
            address,
            address_line: KeyLine {
                file: PathBuf::from("runtime API"),
                line: 0,
                quote: None,
            },
            name,
            weight,
            max_conns,
            max_fails: server_defaults::MAX_FAILS,
            fail_timeout: server_defaults::FAIL_TIMEOUT,
            backup: false,
            down: false,
            slow_start: Duration::ZERO,
            resolve: false,
            resolve_interval: server_defaults::RESOLVE_INTERVAL,
            tls: None,
            tls_lines: FileLines::default(),
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

/// A configuration error: names the file, the line where known, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Where a key was written, so that an error found only when its value is
/// used (a host that does not resolve, a TLS file that cannot be read) names
/// the line as an error found while reading the file does.
#[derive(Debug, Clone)]
pub struct KeyLine {
    file: PathBuf,
    line: usize,
    /// The line as written, quoted in errors; `None` in Fluent Bit files,
    /// whose errors do not quote their lines.
    quote: Option<String>,
}

impl KeyLine {
    /// An error about the value written on this line.
    pub fn error(&self, message: String) -> ConfigError {
        // Quoting the offending line names the key even when the message
        // only talks about the value.
        let message = match &self.quote {
            Some(quote) => format!("{message} (in `{quote}`)"),
            None => message,
        };
        ConfigError {
            file: self.file.clone(),
            line: Some(self.line),
            message,
        }
    }
}

/// Where a value was written is not part of the configuration: a reload
/// that only moves lines changes nothing.
impl PartialEq for KeyLine {
    fn eq(&self, _: &KeyLine) -> bool {
        true
    }
}

impl Eq for KeyLine {}

/// The line naming each TLS file (or `ca_path` directory) of a listener or
/// server, in the order they are read, for the errors of reading them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileLines(Vec<(PathBuf, PemKind, KeyLine)>);

impl FileLines {
    fn add(&mut self, path: &Path, kind: PemKind, line: KeyLine) {
        self.0.push((path.to_owned(), kind, line));
    }

    /// The line of the setting whose file `err` is about.
    pub fn naming(&self, err: &TlsError) -> Option<&KeyLine> {
        let (path, kind) = err.file()?;
        self.of(path, kind)
    }

    /// The first line naming `path` for holding `kind` (any, if `None`), else
    /// the first naming a directory holding it.
    fn of(&self, path: &Path, kind: Option<PemKind>) -> Option<&KeyLine> {
        let named = |exact: bool| {
            self.0
                .iter()
                .filter(|(_, holds, _)| kind.is_none_or(|kind| kind == *holds))
                .find(|(named, _, _)| {
                    if exact {
                        named == path
                    } else {
                        path.starts_with(named)
                    }
                })
                .map(|(_, _, line)| line)
        };
        named(true).or_else(|| named(false))
    }
}

/// A configuration error found only when a value is used, after the file
/// was read: with the line of the value where sluice knows it.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    #[error(transparent)]
    At(#[from] ConfigError),
    #[error("{0}")]
    Unplaced(String),
}

impl ValueError {
    /// As an error of the configuration `file`, unless it names its own
    /// (a Fluent Bit file).
    pub fn in_file(self, file: &Path) -> ConfigError {
        match self {
            ValueError::At(err) => err,
            ValueError::Unplaced(message) => ConfigError {
                file: file.to_owned(),
                line: None,
                message,
            },
        }
    }
}

impl Config {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            file: path.to_owned(),
            line: None,
            message: format!("cannot read the configuration: {err}"),
        })?;
        Config::parse(&text, path)
    }

    /// Validates configuration `text`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let source = Source { text, path };
        let raw: RawConfig = toml::from_str(text)
            .map_err(|err| source.error(err.span(), err.message().trim_end().to_owned()))?;
        source.validate(raw)
    }
}

/// The text being validated, for turning spans into line numbers.
struct Source<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Source<'_> {
    fn error(&self, span: Option<Range<usize>>, message: String) -> ConfigError {
        match span {
            Some(span) => self.key_line(span).error(message),
            None => ConfigError {
                file: self.path.to_owned(),
                line: None,
                message,
            },
        }
    }

    /// The line holding the start of `span`.
    fn key_line(&self, span: Range<usize>) -> KeyLine {
        let start = span.start.min(self.text.len());
        let line = self.text[..start].matches('\n').count() + 1;
        let quote = self
            .text
            .lines()
            .nth(line - 1)
            .map(str::trim)
            .filter(|text| !text.is_empty())
            .map(str::to_owned);
        KeyLine {
            file: self.path.to_owned(),
            line,
            quote,
        }
    }

    /// A TLS file key's path, relative to the file's directory; notes its line in `lines`.
    fn tls_file(&self, value: Spanned<PathBuf>, kind: PemKind, lines: &mut FileLines) -> PathBuf {
        let line = self.key_line(value.span());
        let path = self.relative(value.into_inner());
        lines.add(&path, kind, line);
        path
    }

    fn error_at<T>(&self, spanned: &Spanned<T>, message: String) -> ConfigError {
        self.error(Some(spanned.span()), message)
    }

    /// Relative paths in the file are relative to the file's directory.
    fn relative(&self, path: PathBuf) -> PathBuf {
        match self.path.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path,
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let mut upstreams = BTreeMap::new();
        for (name, upstream) in raw.upstream {
            let validated = self.validate_upstream(&name, upstream)?;
            upstreams.insert(name.into_inner(), validated);
        }
        if raw.listener.is_empty() {
            return Err(self.error(None, "no [[listener]] is configured".to_owned()));
        }
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        let mut listeners = Vec::with_capacity(raw.listener.len());
        for listener in raw.listener {
            let listener = self.validate_listener(listener, &upstreams)?;
            if !names.insert(listener.name.0.clone()) {
                return Err(self.error(
                    Some(listener.name.1),
                    format!("duplicate listener name {:?}", listener.name.0),
                ));
            }
            if !binds.insert(listener.config.bind.clone()) {
                return Err(self.error(
                    Some(listener.bind_span),
                    format!(
                        "listener {:?}: bind address {} is used by another listener",
                        listener.name.0, listener.config.bind
                    ),
                ));
            }
            listeners.push(listener.config);
        }
        let admin = match raw.admin {
            Some(admin) if binds.contains(admin.bind.get_ref()) => {
                return Err(self.error_at(
                    &admin.bind,
                    format!(
                        "[admin]: bind address {} is used by a listener",
                        admin.bind.get_ref()
                    ),
                ))
            }
            Some(admin) => Some(AdminConfig {
                bind: admin.bind.into_inner(),
                token_file: admin.token_file.map(|path| self.relative(path)),
                state_file: admin.state_file.map(|path| self.relative(path)),
            }),
            None => None,
        };
        Ok(Config {
            shutdown_timeout: raw.shutdown_timeout.0,
            admin,
            listeners,
            upstreams,
        })
    }

    fn validate_listener(
        &self,
        raw: RawListener,
        upstreams: &BTreeMap<String, UpstreamConfig>,
    ) -> Result<ValidatedListener, ConfigError> {
        let name = raw.name.get_ref().clone();
        if name.is_empty() {
            return Err(self.error_at(&raw.name, "listener name is empty".to_owned()));
        }
        if !upstreams.contains_key(raw.upstream.get_ref()) {
            return Err(self.error_at(
                &raw.upstream,
                format!(
                    "listener {name:?}: key `upstream` names unknown upstream {:?}",
                    raw.upstream.get_ref()
                ),
            ));
        }
        if raw.connect_timeout.get_ref().0.is_zero() {
            return Err(self.error_at(
                &raw.connect_timeout,
                format!("listener {name:?}: key `connect_timeout` must be greater than 0"),
            ));
        }
        let bind_span = raw.bind.span();
        let bind = raw.bind.into_inner();
        let unix_mode = match raw.unix_mode {
            Some(mode) if !matches!(bind, Address::Unix(_)) => {
                return Err(self.error_at(
                    &mode,
                    format!("listener {name:?}: key `unix_mode` applies only to unix: listeners"),
                ))
            }
            Some(mode) => match u32::from_str_radix(mode.get_ref(), 8) {
                Ok(bits) if bits <= 0o777 => bits,
                _ => {
                    return Err(self.error_at(
                        &mode,
                        format!(
                            "listener {name:?}: key `unix_mode` {:?} is not an octal mode such as \"0660\"",
                            mode.get_ref()
                        ),
                    ))
                }
            },
            None => 0o660,
        };
        let span = raw.name.span();
        let mut tls_lines = FileLines::default();
        let tls = raw.tls.map(|tls| ServerTlsSettings {
            cert_file: self.tls_file(tls.cert_file, PemKind::Certificates, &mut tls_lines),
            key_file: self.tls_file(tls.key_file, PemKind::PrivateKey, &mut tls_lines),
            client_ca_file: tls
                .client_ca_file
                .map(|path| self.tls_file(path, PemKind::Certificates, &mut tls_lines)),
        });
        Ok(ValidatedListener {
            name: (name.clone(), span),
            bind_span,
            config: ListenerConfig {
                name,
                bind,
                upstream: raw.upstream.into_inner(),
                connect_timeout: raw.connect_timeout.into_inner().0,
                idle_timeout: non_zero(raw.idle_timeout.0),
                next_upstream_tries: raw.next_upstream_tries,
                next_upstream_timeout: non_zero(raw.next_upstream_timeout.0),
                unix_mode,
                proxy_protocol: raw.proxy_protocol,
                accept_proxy_protocol: raw.accept_proxy_protocol,
                tls,
                tls_lines,
                access_log: raw.access_log,
            },
        })
    }

    fn validate_upstream(
        &self,
        name: &Spanned<String>,
        raw: RawUpstream,
    ) -> Result<UpstreamConfig, ConfigError> {
        let upstream = name.get_ref();
        let balance = match (raw.balance.get_ref(), raw.hash_key) {
            (Balance::Hash(_), Some(key)) => Balance::Hash(key.into_inner()),
            (balance, None) => balance.clone(),
            (_, Some(key)) => {
                return Err(self.error_at(
                    &key,
                    format!(
                        "upstream {upstream:?}: key `hash_key` applies only to balance = \"hash\""
                    ),
                ))
            }
        };
        if raw.server.is_empty() && raw.from_fluent_bit.is_none() {
            return Err(self.error_at(
                name,
                format!("upstream {upstream:?} has no [[upstream.{upstream}.server]] and no `from_fluent_bit`"),
            ));
        }
        let group_tls = raw.tls.as_ref();
        let group_agent = raw.agent_check.as_ref();
        if let Some(table) = group_agent {
            agent_check::check_table(table).map_err(|err| self.agent_check_error(upstream, err))?;
        }
        let mut servers = Vec::with_capacity(raw.server.len());
        if let Some(file) = raw.from_fluent_bit {
            for mut server in self.fluent_bit_servers(upstream, file, group_tls)? {
                server.agent_check = agent_check::for_server(None, group_agent, &server.address)
                    .map_err(|err| self.agent_check_error(upstream, err))?;
                servers.push(server);
            }
        }
        // Servers are told apart by label in metrics, logs and `/status`.
        // Fluent Bit nodes of one name are kept, as Fluent Bit keeps them.
        let mut labels: HashSet<String> = servers.iter().map(ServerConfig::label).collect();
        for mut server in raw.server {
            let label_span = server
                .name
                .as_ref()
                .map_or(server.address.span(), Spanned::span);
            let own_agent = server.agent_check.take();
            if let Some(table) = &own_agent {
                agent_check::check_table(table)
                    .map_err(|err| self.agent_check_error(upstream, err))?;
            }
            let mut server = self.validate_server(upstream, &balance, group_tls, server)?;
            server.agent_check =
                agent_check::for_server(own_agent.as_ref(), group_agent, &server.address)
                    .map_err(|err| self.agent_check_error(upstream, err))?;
            if !labels.insert(server.label()) {
                let message = match &server.name {
                    Some(name) => format!(
                        "upstream {upstream:?}: server name {name:?} is already used by another server of this upstream"
                    ),
                    None => format!(
                        "upstream {upstream:?}: server {} has no `name` and another server of this upstream has the same label (its address); give them distinct `name`s, or their metrics would merge",
                        server.address
                    ),
                };
                return Err(self.error(Some(label_span), message));
            }
            servers.push(server);
        }
        let mut resolver = Vec::new();
        for entry in raw.resolver.iter().flatten() {
            let text = entry.get_ref();
            let addr = text
                .parse::<SocketAddr>()
                .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| {
                    self.error_at(
                        entry,
                        format!("upstream {upstream:?}: key `resolver`: {text:?} is not IP, IP:PORT or [IPv6]:PORT"),
                    )
                })?;
            resolver.push(addr);
        }
        let health_check = raw
            .health_check
            .map(|check| self.validate_health_check(upstream, check))
            .transpose()?;
        if *raw.queue.get_ref() > MAX_QUEUE {
            return Err(self.error_at(
                &raw.queue,
                format!("upstream {upstream:?}: key `queue` must be at most {MAX_QUEUE}"),
            ));
        }
        let queue_timeout = raw.queue_timeout.get_ref().0;
        if queue_timeout.is_zero() || queue_timeout > MAX_QUEUE_TIMEOUT {
            return Err(self.error_at(
                &raw.queue_timeout,
                format!("upstream {upstream:?}: key `queue_timeout` must be between 1ms and 1h"),
            ));
        }
        Ok(UpstreamConfig {
            name: upstream.clone(),
            balance,
            servers,
            health_check,
            resolver,
            queue: raw.queue.into_inner(),
            queue_timeout,
        })
    }

    fn agent_check_error(&self, upstream: &str, err: agent_check::AgentCheckError) -> ConfigError {
        self.error(
            Some(err.span),
            format!("upstream {upstream:?}: {}", err.message),
        )
    }

    fn validate_health_check(
        &self,
        upstream: &str,
        raw: RawHealthCheck,
    ) -> Result<HealthCheckConfig, ConfigError> {
        for (key, value) in [("interval", &raw.interval), ("timeout", &raw.timeout)] {
            if value.get_ref().0.is_zero() {
                return Err(self.error_at(
                    value,
                    format!(
                        "upstream {upstream:?}: health_check key `{key}` must be greater than 0"
                    ),
                ));
            }
        }
        for (key, value) in [("fails", &raw.fails), ("passes", &raw.passes)] {
            if *value.get_ref() == 0 {
                return Err(self.error_at(
                    value,
                    format!("upstream {upstream:?}: health_check key `{key}` must be at least 1"),
                ));
            }
        }
        if let Some(expect) = &raw.expect {
            if expect.get_ref().is_empty() {
                return Err(self.error_at(
                    expect,
                    format!("upstream {upstream:?}: health_check key `expect` is empty"),
                ));
            }
        }
        Ok(HealthCheckConfig {
            interval: raw.interval.into_inner().0,
            timeout: raw.timeout.into_inner().0,
            fails: raw.fails.into_inner(),
            passes: raw.passes.into_inner(),
            send: raw.send.map(String::into_bytes),
            expect: raw.expect.map(|expect| expect.into_inner().into_bytes()),
        })
    }

    fn validate_server(
        &self,
        upstream: &str,
        balance: &Balance,
        group_tls: Option<&Spanned<RawClientTls>>,
        raw: RawServer,
    ) -> Result<ServerConfig, ConfigError> {
        if *raw.weight.get_ref() == 0 {
            return Err(self.error_at(
                &raw.weight,
                format!("upstream {upstream:?}: key `weight` must be at least 1"),
            ));
        }
        if *raw.backup.get_ref() && !balance.allows_backup() {
            return Err(self.error_at(
                &raw.backup,
                format!(
                    "upstream {upstream:?}: key `backup` is not allowed with balance = \"{}\"",
                    balance.name()
                ),
            ));
        }
        if !raw.slow_start.get_ref().0.is_zero() && !balance.allows_slow_start() {
            return Err(self.error_at(
                &raw.slow_start,
                format!(
                    "upstream {upstream:?}: key `slow_start` is not allowed with balance = \"{}\"",
                    balance.name()
                ),
            ));
        }
        if *raw.resolve.get_ref() && matches!(raw.address.get_ref(), Address::Unix(_)) {
            return Err(self.error_at(
                &raw.resolve,
                format!("upstream {upstream:?}: key `resolve` needs a HOST:PORT address"),
            ));
        }
        if raw.resolve_interval.get_ref().0.is_zero() {
            return Err(self.error_at(
                &raw.resolve_interval,
                format!("upstream {upstream:?}: key `resolve_interval` must be greater than 0"),
            ));
        }
        if let Some(name) = &raw.name {
            if name.get_ref().is_empty() {
                return Err(
                    self.error_at(name, format!("upstream {upstream:?}: server name is empty"))
                );
            }
        }
        let (tls, tls_lines) =
            self.server_tls(upstream, raw.address.get_ref(), group_tls, raw.tls)?;
        Ok(ServerConfig {
            address_line: self.key_line(raw.address.span()),
            address: raw.address.into_inner(),
            tls,
            tls_lines,
            plugin_keys: Vec::new(),
            agent_check: None,
            name: raw.name.map(Spanned::into_inner),
            weight: raw.weight.into_inner(),
            max_conns: raw.max_conns,
            max_fails: raw.max_fails,
            fail_timeout: raw.fail_timeout.0,
            backup: raw.backup.into_inner(),
            down: raw.down,
            slow_start: raw.slow_start.into_inner().0,
            resolve: raw.resolve.into_inner(),
            resolve_interval: raw.resolve_interval.into_inner().0,
        })
    }

    /// A server's TLS settings, and where their files were named: its own
    /// `tls` table over the group's; TLS is on when either table is present.
    fn server_tls(
        &self,
        upstream: &str,
        address: &Address,
        group: Option<&Spanned<RawClientTls>>,
        own: Option<Spanned<RawClientTls>>,
    ) -> Result<(Option<ClientTlsSettings>, FileLines), ConfigError> {
        let span = match (&own, group) {
            (Some(own), _) => own.span(),
            (None, Some(group)) => group.span(),
            (None, None) => return Ok((None, FileLines::default())),
        };
        let own = own.map(Spanned::into_inner).unwrap_or_default();
        let default = RawClientTls::default();
        let group = group.map_or(&default, Spanned::get_ref);
        let server_name = own.server_name.or_else(|| group.server_name.clone());
        if let Some(name) = &server_name {
            // Checked here, not when connecting, to name its line.
            tls::parse_server_name(name.get_ref()).map_err(|err| {
                self.error_at(
                    name,
                    format!("upstream {upstream:?}: server {address}: TLS: {err}"),
                )
            })?;
        }
        let mut lines = FileLines::default();
        let mut file =
            |own: Option<Spanned<PathBuf>>, group: &Option<Spanned<PathBuf>>, kind: PemKind| {
                own.or_else(|| group.clone())
                    .map(|path| self.tls_file(path, kind, &mut lines))
            };
        let settings = ClientTlsSettings {
            verify: own.verify.or(group.verify).unwrap_or(true),
            server_name: server_name.map(Spanned::into_inner),
            ca_file: file(own.ca_file, &group.ca_file, PemKind::Certificates),
            ca_path: None,
            cert_file: file(own.cert_file, &group.cert_file, PemKind::Certificates),
            key_file: file(own.key_file, &group.key_file, PemKind::PrivateKey),
        };
        let problem = match (&settings.cert_file, &settings.key_file) {
            (Some(_), None) => Some("key `cert_file` is given without `key_file`"),
            (None, Some(_)) => Some("key `key_file` is given without `cert_file`"),
            _ if address.host().is_none() && settings.server_name.is_none() => {
                Some("TLS to a unix: address needs key `server_name`")
            }
            _ => None,
        };
        match problem {
            Some(problem) => Err(self.error(
                Some(span),
                format!("upstream {upstream:?}: server {address}: {problem}"),
            )),
            None => Ok((Some(settings), lines)),
        }
    }
}

struct ValidatedListener {
    name: (String, Range<usize>),
    bind_span: Range<usize>,
    config: ListenerConfig,
}

fn non_zero(duration: Duration) -> Option<Duration> {
    (!duration.is_zero()).then_some(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    const MINIMAL: &str = r#"
[[listener]]
name = "l"
bind = "127.0.0.1:7000"
upstream = "u"

[upstream.u]
[[upstream.u.server]]
address = "127.0.0.1:7001"
"#;

    #[test]
    fn defaults_match_the_contract() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
        let listener = &config.listeners[0];
        assert_eq!(listener.connect_timeout, Duration::from_secs(5));
        assert_eq!(listener.idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(listener.next_upstream_tries, 0);
        assert_eq!(listener.next_upstream_timeout, None);
        assert_eq!(listener.proxy_protocol, ProxyProtocol::Off);
        assert!(!listener.accept_proxy_protocol);
        let server = &config.upstreams["u"].servers[0];
        assert_eq!(
            (server.weight, server.max_conns, server.max_fails),
            (1, 0, 1)
        );
        assert_eq!(server.fail_timeout, Duration::from_secs(10));
        assert!(!server.backup && !server.down);
        assert_eq!(server.slow_start, Duration::ZERO);
        assert!(!server.resolve);
        assert_eq!(server.resolve_interval, Duration::from_secs(5));
        assert!(config.upstreams["u"].resolver.is_empty());
        assert_eq!(config.upstreams["u"].balance, Balance::RoundRobin);
        assert_eq!(config.admin, None);
        assert!(listener.access_log);
    }

    #[test]
    fn admin_bind_and_access_log() {
        let text = format!(
            "{}\n[admin]\nbind = \"unix:/run/sluice/admin.sock\"\n",
            MINIMAL.replace("upstream = \"u\"", "upstream = \"u\"\naccess_log = false")
        );
        let config = parse(&text).unwrap();
        assert_eq!(
            config.admin,
            Some(AdminConfig {
                bind: Address::Unix("/run/sluice/admin.sock".into()),
                token_file: None,
                state_file: None,
            })
        );
        assert!(!config.listeners[0].access_log);
    }

    #[test]
    fn admin_bind_is_checked() {
        let err = error_of(&format!("{MINIMAL}\n[admin]\nbind = \"127.0.0.1\"\n"));
        assert_eq!(err.line, Some(12));
        assert!(err.message.contains("127.0.0.1"), "{err}");
        let err = error_of(&format!("{MINIMAL}\n[admin]\nbind = \"127.0.0.1:7000\"\n"));
        assert_eq!(err.line, Some(12));
        assert!(err.message.contains("[admin]"), "{err}");
        let err = error_of(&format!("{MINIMAL}\n[admin]\nport = 9100\n"));
        assert!(err.message.contains("port"), "{err}");
        let err = error_of(&format!("{MINIMAL}\n[admin]\n"));
        assert!(err.message.contains("bind"), "{err}");
    }

    fn error_of(text: &str) -> ConfigError {
        match parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(err) => err,
        }
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = error_of(&MINIMAL.replace("upstream = \"u\"", "upstream = \"u\"\ncolour = 1"));
        assert_eq!(err.line, Some(6));
        assert!(err.message.contains("colour"), "{err}");
    }

    #[test]
    fn bad_duration_names_key_and_line() {
        let err = error_of(&MINIMAL.replace(
            "upstream = \"u\"",
            "upstream = \"u\"\nidle_timeout = \"5 parsecs\"",
        ));
        assert_eq!(err.line, Some(6));
        assert!(err.message.contains("idle_timeout"), "{err}");
        assert!(err.message.contains("5 parsecs"), "{err}");
    }

    #[test]
    fn unknown_upstream_is_named() {
        let err = error_of(&MINIMAL.replace("upstream = \"u\"", "upstream = \"nope\""));
        assert_eq!(err.line, Some(5));
        assert!(err.message.contains("\"nope\""), "{err}");
    }

    #[test]
    fn port_out_of_range() {
        let err = error_of(&MINIMAL.replace("127.0.0.1:7001", "127.0.0.1:70000"));
        assert_eq!(err.line, Some(9));
        assert!(err.message.contains("70000"), "{err}");
    }

    #[test]
    fn duplicate_listener_names() {
        let second = "\n[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:7002\"\nupstream = \"u\"\n";
        let err = error_of(&format!("{MINIMAL}{second}"));
        assert_eq!(err.line, Some(12));
        assert!(err.message.contains("duplicate listener name"), "{err}");
    }

    #[test]
    fn backup_is_refused_with_hash() {
        let text =
            MINIMAL.replace("[upstream.u]", "[upstream.u]\nbalance = \"hash\"") + "backup = true\n";
        let err = error_of(&text);
        assert_eq!(err.line, Some(11));
        assert!(err.message.contains("backup"), "{err}");
        assert!(err.message.contains("hash"), "{err}");
    }

    #[test]
    fn slow_start_only_with_round_robin_and_least_conn() {
        let with = |balance: &str| {
            parse(
                &(MINIMAL.replace(
                    "[upstream.u]",
                    &format!("[upstream.u]\nbalance = \"{balance}\""),
                ) + "slow_start = \"30s\"\n"),
            )
        };
        for balance in ["round_robin", "least_conn"] {
            let config = with(balance).unwrap();
            assert_eq!(
                config.upstreams["u"].servers[0].slow_start,
                Duration::from_secs(30)
            );
        }
        for balance in ["random", "random_two", "hash"] {
            let err = with(balance).unwrap_err();
            assert_eq!(err.line, Some(11), "{err}");
            assert!(err.message.contains("slow_start"), "{err}");
            assert!(err.message.contains(balance), "{err}");
        }
    }

    #[test]
    fn proxy_protocol_versions() {
        let with = |extra: &str| {
            parse(&MINIMAL.replace("upstream = \"u\"", &format!("upstream = \"u\"\n{extra}")))
        };
        for (text, version) in [
            ("off", ProxyProtocol::Off),
            ("v1", ProxyProtocol::V1),
            ("v2", ProxyProtocol::V2),
        ] {
            let config = with(&format!("proxy_protocol = \"{text}\"")).unwrap();
            assert_eq!(config.listeners[0].proxy_protocol, version);
        }
        let err = with("proxy_protocol = \"v3\"").unwrap_err();
        assert_eq!(err.line, Some(6));
        assert!(err.message.contains("v3"), "{err}");
        let config = with("accept_proxy_protocol = true").unwrap();
        assert!(config.listeners[0].accept_proxy_protocol);
    }

    #[test]
    fn health_check_defaults_and_limits() {
        assert_eq!(parse(MINIMAL).unwrap().upstreams["u"].health_check, None);
        let with = |body: &str| parse(&format!("{MINIMAL}\n[upstream.u.health_check]\n{body}"));
        let check = with("").unwrap().upstreams["u"]
            .health_check
            .clone()
            .unwrap();
        assert_eq!(
            check,
            HealthCheckConfig {
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(1),
                fails: 3,
                passes: 2,
                send: None,
                expect: None,
            }
        );
        let check = with("send = \"version\\r\\n\"\nexpect = \"VERSION\"")
            .unwrap()
            .upstreams["u"]
            .health_check
            .clone()
            .unwrap();
        assert_eq!(check.send.as_deref(), Some(&b"version\r\n"[..]));
        assert_eq!(check.expect.as_deref(), Some(&b"VERSION"[..]));
        for (body, key) in [
            ("interval = \"0s\"", "interval"),
            ("timeout = \"0s\"", "timeout"),
            ("fails = 0", "fails"),
            ("passes = 0", "passes"),
            ("expect = \"\"", "expect"),
            ("port = 1", "port"),
        ] {
            let err = with(body).unwrap_err();
            assert_eq!(err.line, Some(12), "{err}");
            assert!(err.message.contains(key), "{err}");
        }
    }

    #[test]
    fn resolve_keys() {
        let text = MINIMAL.replace(
            "[upstream.u]",
            "[upstream.u]\nresolver = [\"127.0.0.1:5353\", \"10.0.0.10\", \"[::1]:53\"]",
        ) + "resolve = true\nresolve_interval = \"1m\"\n";
        let config = parse(&text).unwrap();
        let upstream = &config.upstreams["u"];
        assert_eq!(
            upstream.resolver,
            vec![
                "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "10.0.0.10:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert!(upstream.servers[0].resolve);
        assert_eq!(
            upstream.servers[0].resolve_interval,
            Duration::from_secs(60)
        );

        let err =
            error_of(&MINIMAL.replace("[upstream.u]", "[upstream.u]\nresolver = [\"dns.local\"]"));
        assert_eq!(err.line, Some(8), "{err}");
        assert!(err.message.contains("resolver"), "{err}");
        let err =
            error_of(&(MINIMAL.replace("127.0.0.1:7001", "unix:/tmp/u.sock") + "resolve = true\n"));
        assert!(err.message.contains("resolve"), "{err}");
        let err = error_of(&(MINIMAL.to_owned() + "resolve_interval = \"0s\"\n"));
        assert!(err.message.contains("resolve_interval"), "{err}");
    }

    #[test]
    fn hash_key_only_with_hash() {
        let err =
            error_of(&MINIMAL.replace("[upstream.u]", "[upstream.u]\nhash_key = \"client_ip\""));
        assert!(err.message.contains("hash_key"), "{err}");
        let ok = parse(&MINIMAL.replace(
            "[upstream.u]",
            "[upstream.u]\nbalance = \"hash\"\nhash_key = \"client_addr\"",
        ))
        .unwrap();
        assert_eq!(
            ok.upstreams["u"].balance,
            Balance::Hash(HashKey::ClientAddr)
        );
    }

    #[test]
    fn syntax_error_has_a_line() {
        let err = error_of(&MINIMAL.replace("name = \"l\"", "name = "));
        assert_eq!(err.line, Some(3));
    }

    #[test]
    fn unix_mode_only_for_unix() {
        let err = error_of(
            &MINIMAL.replace("upstream = \"u\"", "upstream = \"u\"\nunix_mode = \"0600\""),
        );
        assert!(err.message.contains("unix_mode"), "{err}");
        let ok = parse(
            &MINIMAL
                .replace("127.0.0.1:7000", "unix:/tmp/x.sock")
                .replace("upstream = \"u\"", "upstream = \"u\"\nunix_mode = \"0600\""),
        )
        .unwrap();
        assert_eq!(ok.listeners[0].unix_mode, 0o600);
    }

    #[test]
    fn server_tls_overrides_the_groups_and_group_tls_turns_tls_on() {
        let text = MINIMAL.replace(
            "[upstream.u]",
            "[upstream.u]\n[upstream.u.tls]\nca_file = \"ca.pem\"\nserver_name = \"group.test\"",
        ) + "[upstream.u.server.tls]\nverify = false\nserver_name = \"own.test\"\n\
             cert_file = \"/abs/client.pem\"\nkey_file = \"client.key\"\n\
             [[upstream.u.server]]\naddress = \"127.0.0.1:7002\"\n";
        let config = Config::parse(&text, Path::new("/etc/sluice/sluice.toml")).unwrap();
        let servers = &config.upstreams["u"].servers;
        let own = servers[0].tls.as_ref().unwrap();
        assert!(!own.verify);
        assert_eq!(own.server_name.as_deref(), Some("own.test"));
        assert_eq!(
            own.ca_file.as_deref(),
            Some(Path::new("/etc/sluice/ca.pem"))
        );
        assert_eq!(own.cert_file.as_deref(), Some(Path::new("/abs/client.pem")));
        assert_eq!(
            own.key_file.as_deref(),
            Some(Path::new("/etc/sluice/client.key"))
        );
        let inherited = servers[1].tls.as_ref().unwrap();
        assert!(inherited.verify);
        assert_eq!(inherited.server_name.as_deref(), Some("group.test"));
        assert_eq!(inherited.cert_file, None);
        assert_eq!(parse(MINIMAL).unwrap().upstreams["u"].servers[0].tls, None);
    }

    #[test]
    fn listener_tls_paths_are_relative_to_the_file() {
        let text = MINIMAL.replace(
            "upstream = \"u\"",
            "upstream = \"u\"\n[listener.tls]\ncert_file = \"tls.pem\"\nkey_file = \"/k.pem\"",
        );
        let config = Config::parse(&text, Path::new("/etc/sluice/sluice.toml")).unwrap();
        let tls = config.listeners[0].tls.as_ref().unwrap();
        assert_eq!(tls.cert_file, Path::new("/etc/sluice/tls.pem"));
        assert_eq!(tls.key_file, Path::new("/k.pem"));
        assert_eq!(tls.client_ca_file, None);
    }

    #[test]
    fn tls_table_errors_name_the_line() {
        let err = error_of(&format!(
            "{MINIMAL}[upstream.u.server.tls]\nkey_file = \"k.pem\"\n"
        ));
        assert_eq!(err.line, Some(10));
        assert!(
            err.message
                .contains("`key_file` is given without `cert_file`"),
            "{err}"
        );
        let err = error_of(&format!(
            "{MINIMAL}[upstream.u.server.tls]\nverfy = false\n"
        ));
        assert_eq!(err.line, Some(11));
        assert!(err.message.contains("verfy"), "{err}");
        let err = error_of(
            &format!("{MINIMAL}[upstream.u.server.tls]\n")
                .replace("127.0.0.1:7001", "unix:/run/u.sock"),
        );
        assert!(err.message.contains("server_name"), "{err}");
        let err = error_of(&MINIMAL.replace(
            "upstream = \"u\"",
            "upstream = \"u\"\n[listener.tls]\ncert_file = \"tls.pem\"",
        ));
        assert!(err.message.contains("key_file"), "{err}");
    }

    /// An error found when the value written at `line` is used: (file, line, message).
    fn placed(line: &KeyLine) -> (PathBuf, Option<usize>, String) {
        let err = line.error("cannot use it".to_owned());
        (err.file, err.line, err.message)
    }

    #[test]
    fn values_checked_when_used_keep_the_line_naming_them() {
        let text = r#"
[[listener]]
name = "l"
bind = "127.0.0.1:7000"
upstream = "u"
[listener.tls]
cert_file = "tls.pem"
key_file = "/k.pem"
client_ca_file = "clients.pem"

[upstream.u.tls]
cert_file = "group.pem"
key_file = "group.key"
[[upstream.u.server]]
address = "127.0.0.1:7001"
[upstream.u.server.tls]
ca_file = "own-ca.pem"
"#;
        let file = Path::new("/etc/sluice/sluice.toml");
        let config = Config::parse(text, file).unwrap();
        let line_of = |lines: &FileLines, path: &str| {
            let (named_in, line, message) = placed(lines.of(Path::new(path), None).unwrap());
            assert_eq!(named_in, file);
            (line.unwrap(), message)
        };
        let listener = &config.listeners[0].tls_lines;
        assert_eq!(
            line_of(listener, "/etc/sluice/tls.pem"),
            (7, "cannot use it (in `cert_file = \"tls.pem\"`)".to_owned())
        );
        assert_eq!(line_of(listener, "/k.pem").0, 8);
        assert_eq!(line_of(listener, "/etc/sluice/clients.pem").0, 9);
        assert!(listener
            .of(Path::new("/etc/sluice/other.pem"), None)
            .is_none());

        let server = &config.upstreams["u"].servers[0];
        assert_eq!(
            placed(&server.address_line),
            (
                file.to_owned(),
                Some(15),
                "cannot use it (in `address = \"127.0.0.1:7001\"`)".to_owned()
            )
        );
        assert_eq!(line_of(&server.tls_lines, "/etc/sluice/own-ca.pem").0, 17);
        // Files the server takes from the group's table: the group's lines.
        assert_eq!(line_of(&server.tls_lines, "/etc/sluice/group.pem").0, 12);
        assert_eq!(line_of(&server.tls_lines, "/etc/sluice/group.key").0, 13);

        // Lines are not part of the configuration: moving them changes nothing.
        let moved = Config::parse(&format!("# moved down\n{text}"), file).unwrap();
        assert_eq!(moved, config);
    }

    #[test]
    fn one_file_named_by_two_keys_is_told_apart_by_what_failed() {
        let text = MINIMAL.replace(
            "upstream = \"u\"",
            "upstream = \"u\"\n[listener.tls]\ncert_file = \"/c.pem\"\nkey_file = \"/same.pem\"\nclient_ca_file = \"/same.pem\"",
        );
        let config = parse(&text).unwrap();
        let lines = &config.listeners[0].tls_lines;
        let path = PathBuf::from("/same.pem");
        let line_for = |err: TlsError| lines.naming(&err).and_then(|line| placed(line).1);
        assert_eq!(
            line_for(TlsError::NoPrivateKey { path: path.clone() }),
            Some(8)
        );
        assert_eq!(
            line_for(TlsError::NoCertificate { path: path.clone() }),
            Some(9)
        );
        let unreadable = TlsError::Read {
            path,
            source: std::io::ErrorKind::NotFound.into(),
        };
        assert_eq!(line_for(unreadable), Some(8), "the first read");
        assert_eq!(
            line_for(TlsError::InvalidServerName { name: "x".into() }),
            None
        );
    }

    #[test]
    fn an_invalid_server_name_is_named_with_its_line() {
        let err = error_of(&format!(
            "{MINIMAL}[upstream.u.server.tls]\nserver_name = \"not a name!\"\n"
        ));
        assert_eq!(err.line, Some(11), "{err}");
        assert!(err.message.contains("invalid TLS server name"), "{err}");
        assert!(err.message.contains("server_name"), "{err}");
    }

    #[test]
    fn servers_of_one_upstream_need_distinct_labels() {
        let second = |extra: &str| {
            format!("{MINIMAL}name = \"x\"\n[[upstream.u.server]]\naddress = \"127.0.0.1:7002\"\n{extra}")
        };
        let err = error_of(&second("name = \"x\"\n"));
        assert_eq!(err.line, Some(13), "{err}");
        assert!(
            err.message
                .contains("server name \"x\" is already used by another server of this upstream"),
            "{err}"
        );
        assert!(parse(&second("name = \"y\"\n")).is_ok());

        // Without `name`, the address is the label: listing it twice would
        // merge the two servers' metrics.
        let twice = format!("{MINIMAL}[[upstream.u.server]]\naddress = \"127.0.0.1:7001\"\n");
        let err = error_of(&twice);
        assert_eq!(err.line, Some(11), "{err}");
        assert!(err.message.contains("distinct `name`s"), "{err}");
        assert!(parse(&format!("{twice}name = \"again\"\n")).is_ok());

        // Labels are per upstream.
        let other = MINIMAL.replace("upstream = \"u\"", "upstream = \"v\"")
            + "[[upstream.v.server]]\naddress = \"127.0.0.1:7001\"\n";
        assert!(parse(&other).is_ok());
    }

    const UPSTREAM_FILE: &str = "[UPSTREAM]\n    name  fb\n\n[NODE]\n    name  one\n    host  127.0.0.1\n    port  7101\n\n\
        [NODE]\n    name  two\n    host  backend.test\n    port  7102\n    tls   on\n    tls.vhost  sni.test\n\
        \x20   tls.ca_path  /cas\n    shared_key  secret\n";

    fn with_upstream_file(toml: &str, upstream_file: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nodes.conf"), upstream_file).unwrap();
        Config::parse(toml, &dir.path().join("sluice.toml"))
    }

    #[test]
    fn from_fluent_bit_takes_the_nodes_before_the_servers() {
        let text = MINIMAL.replace(
            "[upstream.u]",
            "[upstream.u]\nfrom_fluent_bit = \"nodes.conf\"\n[upstream.u.tls]\nca_file = \"/ca.pem\"",
        );
        let config = with_upstream_file(&text, UPSTREAM_FILE).unwrap();
        let servers = &config.upstreams["u"].servers;
        let labels: Vec<String> = servers.iter().map(ServerConfig::label).collect();
        assert_eq!(labels, ["one", "two", "127.0.0.1:7001"]);
        assert_eq!(servers[0].tls, None, "a node without `tls on` stays plain");
        let tls = servers[1].tls.as_ref().unwrap();
        assert!(tls.verify);
        assert_eq!(tls.server_name.as_deref(), Some("sni.test"));
        assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(tls.ca_path.as_deref(), Some(Path::new("/cas")));
        assert_eq!(
            servers[1].plugin_keys,
            [("shared_key".to_owned(), "secret".to_owned())]
        );
        assert_eq!(servers[1].address.to_string(), "backend.test:7102");
        // The group's table turns TLS on for [[server]] entries as usual.
        assert!(servers[2].tls.is_some());

        // Values used later keep the line naming them: in the node file
        // (its errors do not quote lines), or in the TOML for the group's.
        let (file, line, message) = placed(&servers[1].address_line);
        assert!(file.ends_with("nodes.conf"), "{file:?}");
        assert_eq!((line, message.as_str()), (Some(11), "cannot use it"));
        let (file, line, _) = placed(
            servers[1]
                .tls_lines
                .of(Path::new("/cas/a.pem"), None)
                .unwrap(),
        );
        assert!(file.ends_with("nodes.conf"), "{file:?}");
        assert_eq!(line, Some(15));
        let (file, line, message) =
            placed(servers[1].tls_lines.of(Path::new("/ca.pem"), None).unwrap());
        assert!(file.ends_with("sluice.toml"), "{file:?}");
        assert_eq!(line, Some(10));
        assert!(
            message.ends_with("(in `ca_file = \"/ca.pem\"`)"),
            "{message}"
        );
    }

    #[test]
    fn fluent_bit_nodes_of_one_name_are_kept_but_a_server_may_not_join_them() {
        let text = MINIMAL.replace(
            "[upstream.u]",
            "[upstream.u]\nfrom_fluent_bit = \"nodes.conf\"",
        );
        let same_names = UPSTREAM_FILE.replace("name  two", "name  one");
        let config = with_upstream_file(&text, &same_names).unwrap();
        let labels: Vec<String> = config.upstreams["u"]
            .servers
            .iter()
            .map(ServerConfig::label)
            .collect();
        assert_eq!(labels, ["one", "one", "127.0.0.1:7001"]);

        let err =
            with_upstream_file(&format!("{text}name = \"two\"\n"), UPSTREAM_FILE).unwrap_err();
        assert!(err.file.ends_with("sluice.toml"), "{err}");
        assert_eq!(err.line, Some(11), "{err}");
        assert!(err.message.contains("\"two\" is already used"), "{err}");
    }

    #[test]
    fn from_fluent_bit_alone_is_enough_and_its_errors_name_that_file() {
        let text = "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:7000\"\nupstream = \"u\"\n\
                    [upstream.u]\nfrom_fluent_bit = \"nodes.conf\"\n";
        let config = with_upstream_file(text, UPSTREAM_FILE).unwrap();
        assert_eq!(config.upstreams["u"].servers.len(), 2);

        let err = with_upstream_file(text, &UPSTREAM_FILE.replace("7102", "70000")).unwrap_err();
        assert!(err.file.ends_with("nodes.conf"), "{err}");
        assert_eq!(err.line, Some(12));

        let err = with_upstream_file(&text.replace("nodes.conf", "absent.conf"), UPSTREAM_FILE)
            .unwrap_err();
        assert!(err.file.ends_with("sluice.toml"), "{err}");
        assert_eq!(err.line, Some(6));
        assert!(err.message.contains("absent.conf"), "{err}");
    }

    #[test]
    fn fluent_bit_mode_builds_one_round_robin_listener() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nodes.conf");
        std::fs::write(&file, UPSTREAM_FILE).unwrap();
        let config = Config::from_fluent_bit(&file, "[::1]:24224").unwrap();
        assert_eq!(config.listeners.len(), 1);
        let listener = &config.listeners[0];
        assert_eq!(
            (listener.name.as_str(), listener.upstream.as_str()),
            ("fb", "fb")
        );
        assert_eq!(listener.bind.to_string(), "[::1]:24224");
        assert_eq!(listener.connect_timeout, Duration::from_secs(5));
        let upstream = &config.upstreams["fb"];
        assert_eq!(upstream.balance, Balance::RoundRobin);
        assert_eq!(upstream.servers.len(), 2);
        let err = Config::from_fluent_bit(&file, "nowhere").unwrap_err();
        assert!(err.to_string().starts_with("--bind: "), "{err}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Lines built from the configuration's own vocabulary, valid or not.
        fn config_line() -> impl Strategy<Value = String> {
            let key = prop::sample::select(vec![
                "name",
                "bind",
                "upstream",
                "connect_timeout",
                "idle_timeout",
                "next_upstream_tries",
                "next_upstream_timeout",
                "unix_mode",
                "balance",
                "hash_key",
                "address",
                "weight",
                "max_conns",
                "max_fails",
                "fail_timeout",
                "backup",
                "down",
                "shutdown_timeout",
                "colour",
            ]);
            let value = prop::sample::select(vec![
                "\"u\"",
                "\"l\"",
                "\"127.0.0.1:7000\"",
                "\"[::1]:7001\"",
                "\"unix:/tmp/s.sock\"",
                "\"unix:relative\"",
                "\"host:0\"",
                "\"host:99999\"",
                "\"5s\"",
                "\"0s\"",
                "\"5 parsecs\"",
                "\"hash\"",
                "\"random\"",
                "\"client_ip\"",
                "\"0660\"",
                "\"9999\"",
                "0",
                "1",
                "-1",
                "4294967296",
                "true",
                "\"\"",
                "[]",
                "{}",
                "\"",
            ]);
            prop_oneof![
                (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
                prop::sample::select(vec![
                    "[[listener]]",
                    "[upstream.u]",
                    "[upstream.v]",
                    "[[upstream.u.server]]",
                    "[[upstream.v.server]]",
                    "[upstream.u.tls]",
                    "[admin]",
                    "[[upstream]]",
                    "[",
                ])
                .prop_map(str::to_owned),
            ]
        }

        fn check_invariants(text: &str, result: Result<Config, ConfigError>) {
            match result {
                Ok(config) => {
                    assert!(!config.listeners.is_empty());
                    for listener in &config.listeners {
                        assert!(config.upstreams.contains_key(&listener.upstream));
                    }
                    for upstream in config.upstreams.values() {
                        assert!(!upstream.servers.is_empty());
                        assert!(upstream.servers.iter().all(|server| server.weight >= 1));
                    }
                }
                Err(err) => {
                    assert_eq!(err.file, Path::new("test.toml"));
                    if let Some(line) = err.line {
                        assert!(line >= 1 && line <= text.lines().count() + 1, "{err}");
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn arbitrary_text_never_panics(text in any::<String>()) {
                check_invariants(&text, parse(&text));
            }

            #[test]
            fn vocabulary_soup_never_panics(lines in prop::collection::vec(config_line(), 0..32)) {
                let text = lines.join("\n");
                check_invariants(&text, parse(&text));
            }

            #[test]
            fn mutated_minimal_config_never_panics(
                cuts in prop::collection::vec((any::<prop::sample::Index>(), 0..8usize, config_line()), 1..6),
            ) {
                let mut text = MINIMAL.to_owned();
                for (at, len, insert) in cuts {
                    let start = at.index(text.len() + 1);
                    let end = (start + len).min(text.len());
                    if text.is_char_boundary(start) && text.is_char_boundary(end) {
                        text.replace_range(start..end, &insert);
                    }
                }
                check_invariants(&text, parse(&text));
            }

            #[test]
            fn generated_values_come_back_exactly(
                weight in 1..1000u32,
                max_conns in any::<u32>(),
                max_fails in any::<u32>(),
                fail_ms in 1..100_000u64,
                tries in any::<u32>(),
                port in 1..=65535u16,
                backup: bool,
            ) {
                let text = format!(
                    "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"u\"\n\
                     next_upstream_tries = {tries}\n\n[upstream.u]\n[[upstream.u.server]]\n\
                     address = \"[::1]:{port}\"\nweight = {weight}\nmax_conns = {max_conns}\n\
                     max_fails = {max_fails}\nfail_timeout = \"{fail_ms}ms\"\nbackup = {backup}\n"
                );
                let config = parse(&text).unwrap();
                let listener = &config.listeners[0];
                prop_assert_eq!(listener.next_upstream_tries, tries);
                prop_assert_eq!(&listener.bind, &Address::Inet { host: "127.0.0.1".into(), port });
                let server = &config.upstreams["u"].servers[0];
                prop_assert_eq!(&server.address, &Address::Inet { host: "::1".into(), port });
                prop_assert_eq!(
                    (server.weight, server.max_conns, server.max_fails, server.backup),
                    (weight, max_conns, max_fails, backup)
                );
                prop_assert_eq!(server.fail_timeout, Duration::from_millis(fail_ms));
            }
        }
    }
}
