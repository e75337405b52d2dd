//! Checks of each TOML table beside the conversion into its validated type.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::raw::{
    OptionalDuration, RawClientTls, RawConfig, RawHealthCheck, RawListener, RawServer, RawUpstream,
};
use super::Source;
use crate::config::limits::{
    MAX_HASH_TOTAL_WEIGHT, MAX_LISTENERS, MAX_QUEUE, MAX_QUEUE_TIMEOUT, MAX_SERVERS, MAX_WEIGHT,
};
use crate::config::{agent_check, defaults};
use crate::config::{
    clip, parse_server_name, quoted, Address, AdminConfig, Balance, ClientTlsSettings, Config,
    ConfigError, FileLines, HashRing, HealthCheckConfig, ListenerConfig, PemKind, RecycleConfig,
    ServerConfig, ServerTlsSettings, Syntax, UpstreamConfig,
};

impl Source<'_> {
    pub(super) fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let mut upstreams = BTreeMap::new();
        let mut servers = 0;
        for (name, upstream) in raw.upstream {
            let validated = self.validate_upstream(&name, upstream)?;
            servers += validated.servers.len();
            if servers > MAX_SERVERS {
                return Err(self.error_at(
                    &name,
                    format!("more than {MAX_SERVERS} servers in the configuration"),
                ));
            }
            upstreams.insert(name.into_inner(), validated);
        }
        if raw.listener.is_empty() {
            return Err(self.error(None, "no [[listener]] is configured".to_owned()));
        }
        if let Some(listener) = raw.listener.get(MAX_LISTENERS) {
            return Err(self.error_at(
                &listener.name,
                format!("more than {MAX_LISTENERS} listeners in the configuration"),
            ));
        }
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        let mut listeners = Vec::with_capacity(raw.listener.len());
        for listener in raw.listener {
            let listener = self.validate_listener(listener, &upstreams)?;
            if !names.insert(listener.name.0.clone()) {
                return Err(self.error(
                    Some(listener.name.1),
                    format!("duplicate listener name {}", quoted(&listener.name.0)),
                ));
            }
            if !binds.insert(listener.config.bind.clone()) {
                return Err(self.error(
                    Some(listener.bind_span),
                    format!(
                        "listener {}: bind address {} is used by another listener",
                        quoted(&listener.name.0),
                        listener.config.bind
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
        let shown = quoted(&name);
        if !upstreams.contains_key(raw.upstream.get_ref()) {
            return Err(self.error_at(
                &raw.upstream,
                format!(
                    "listener {shown}: key `upstream` names unknown upstream {}",
                    quoted(raw.upstream.get_ref())
                ),
            ));
        }
        if raw.connect_timeout.get_ref().0.is_zero() {
            return Err(self.error_at(
                &raw.connect_timeout,
                format!("listener {shown}: key `connect_timeout` must be greater than 0"),
            ));
        }
        let recycle = self.validate_recycle(&shown, &raw)?;
        let bind_span = raw.bind.span();
        let bind = raw.bind.into_inner();
        let unix_mode = match raw.unix_mode {
            Some(mode) if !matches!(bind, Address::Unix(_)) => {
                return Err(self.error_at(
                    &mode,
                    format!("listener {shown}: key `unix_mode` applies only to unix: listeners"),
                ))
            }
            Some(mode) => match u32::from_str_radix(mode.get_ref(), 8) {
                Ok(bits) if bits <= 0o777 => bits,
                _ => {
                    return Err(self.error_at(
                        &mode,
                        format!(
                            "listener {shown}: key `unix_mode` {} is not an octal mode such as \"0660\"",
                            quoted(mode.get_ref())
                        ),
                    ))
                }
            },
            None => defaults::UNIX_MODE,
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
                delayed_ack: raw.delayed_ack,
                recycle,
            },
        })
    }

    fn agent_check_error(&self, upstream: &str, err: agent_check::AgentCheckError) -> ConfigError {
        self.error(
            Some(err.span),
            format!("upstream {upstream}: {}", err.message),
        )
    }

    /// The keys of SPEC §9; an error names the key's line.
    fn validate_recycle(
        &self,
        shown: &str,
        raw: &RawListener,
    ) -> Result<RecycleConfig, ConfigError> {
        let defaults = RecycleConfig::default();
        let off = |value: &Option<Spanned<OptionalDuration>>| {
            value.as_ref().and_then(|value| value.get_ref().0)
        };
        RecycleConfig::new(
            raw.protocol,
            raw.quiet_period
                .as_ref()
                .map_or(defaults.quiet_period, |value| value.get_ref().0),
            off(&raw.max_connection_age),
            raw.rebalance,
            raw.rebalance_rate
                .as_ref()
                .map_or(defaults.rebalance_rate, |value| *value.get_ref()),
            off(&raw.access_log_interval),
        )
        .map_err(|(key, problem)| {
            let span = match key {
                "quiet_period" => raw.quiet_period.as_ref().map(Spanned::span),
                "max_connection_age" => raw.max_connection_age.as_ref().map(Spanned::span),
                "rebalance_rate" => raw.rebalance_rate.as_ref().map(Spanned::span),
                _ => raw.access_log_interval.as_ref().map(Spanned::span),
            };
            self.error(span, format!("listener {shown}: key `{key}` {problem}"))
        })
    }

    fn validate_upstream(
        &self,
        name: &Spanned<String>,
        raw: RawUpstream,
    ) -> Result<UpstreamConfig, ConfigError> {
        // The name as errors quote it.
        let upstream = &quoted(name.get_ref());
        let balance = match (raw.balance.get_ref(), raw.hash_key) {
            (Balance::Hash(_), Some(key)) => Balance::Hash(key.into_inner()),
            (balance, None) => balance.clone(),
            (_, Some(key)) => {
                return Err(self.error_at(
                    &key,
                    format!(
                        "upstream {upstream}: key `hash_key` applies only to balance = \"hash\""
                    ),
                ))
            }
        };
        let hash_ring = match (&balance, raw.hash_ring) {
            (_, None) => HashRing::default(),
            (Balance::Hash(_), Some(ring)) => ring.into_inner(),
            (_, Some(ring)) => {
                return Err(self.error_at(
                    &ring,
                    format!(
                        "upstream {upstream}: key `hash_ring` applies only to balance = \"hash\""
                    ),
                ))
            }
        };
        if raw.server.is_empty() && raw.from_fluent_bit.is_none() {
            return Err(self.error_at(
                name,
                format!(
                    "upstream {upstream} has no [[upstream.{}.server]] and no `from_fluent_bit`",
                    clip(name.get_ref())
                ),
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
                        "upstream {upstream}: server name {} is already used by another server of this upstream", quoted(name)
                    ),
                    None => format!(
                        "upstream {upstream}: server {} has no `name` and another server of this upstream has the same label (its address); give them distinct `name`s, or their metrics would merge",
                        clip(&server.address.to_string())
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
                        format!("upstream {upstream}: key `resolver`: {} is not IP, IP:PORT or [IPv6]:PORT", quoted(text)),
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
                format!("upstream {upstream}: key `queue` must be at most {MAX_QUEUE}"),
            ));
        }
        let queue_timeout = raw.queue_timeout.get_ref().0;
        if queue_timeout.is_zero() || queue_timeout > MAX_QUEUE_TIMEOUT {
            return Err(self.error_at(
                &raw.queue_timeout,
                format!("upstream {upstream}: key `queue_timeout` must be between 1ms and 1h"),
            ));
        }
        if matches!(balance, Balance::Hash(_)) {
            let total_weight: u64 = servers.iter().map(|server| u64::from(server.weight)).sum();
            if total_weight > MAX_HASH_TOTAL_WEIGHT {
                return Err(self.error_at(
                    name,
                    format!(
                        "upstream {upstream}: the weights of its servers add up to {total_weight}; balance = \"hash\" allows at most {MAX_HASH_TOTAL_WEIGHT}"
                    ),
                ));
            }
        }
        Ok(UpstreamConfig {
            name: name.get_ref().clone(),
            balance,
            hash_ring,
            servers,
            health_check,
            resolver,
            queue: raw.queue.into_inner(),
            queue_timeout,
        })
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
                    format!("upstream {upstream}: health_check key `{key}` must be greater than 0"),
                ));
            }
        }
        for (key, value) in [("fails", &raw.fails), ("passes", &raw.passes)] {
            if *value.get_ref() == 0 {
                return Err(self.error_at(
                    value,
                    format!("upstream {upstream}: health_check key `{key}` must be at least 1"),
                ));
            }
        }
        if let Some(expect) = &raw.expect {
            if expect.get_ref().is_empty() {
                return Err(self.error_at(
                    expect,
                    format!("upstream {upstream}: health_check key `expect` is empty"),
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
                format!("upstream {upstream}: key `weight` must be at least 1"),
            ));
        }
        if *raw.weight.get_ref() > MAX_WEIGHT {
            return Err(self.error_at(
                &raw.weight,
                format!("upstream {upstream}: key `weight` must be at most {MAX_WEIGHT}"),
            ));
        }
        if *raw.backup.get_ref() && !balance.allows_backup() {
            return Err(self.error_at(
                &raw.backup,
                format!(
                    "upstream {upstream}: key `backup` is not allowed with balance = \"{}\"",
                    balance.name()
                ),
            ));
        }
        if !raw.slow_start.get_ref().0.is_zero() && !balance.allows_slow_start() {
            return Err(self.error_at(
                &raw.slow_start,
                format!(
                    "upstream {upstream}: key `slow_start` is not allowed with balance = \"{}\"",
                    balance.name()
                ),
            ));
        }
        if *raw.resolve.get_ref() && matches!(raw.address.get_ref(), Address::Unix(_)) {
            return Err(self.error_at(
                &raw.resolve,
                format!("upstream {upstream}: key `resolve` needs a HOST:PORT address"),
            ));
        }
        if raw.resolve_interval.get_ref().0.is_zero() {
            return Err(self.error_at(
                &raw.resolve_interval,
                format!("upstream {upstream}: key `resolve_interval` must be greater than 0"),
            ));
        }
        if let Some(name) = &raw.name {
            if name.get_ref().is_empty() {
                return Err(
                    self.error_at(name, format!("upstream {upstream}: server name is empty"))
                );
            }
        }
        let (tls, tls_lines) =
            self.server_tls(upstream, raw.address.get_ref(), group_tls, raw.tls)?;
        Ok(ServerConfig {
            syntax: Syntax::Toml,
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
            parse_server_name(name.get_ref()).map_err(|err| {
                self.error_at(
                    name,
                    format!(
                        "upstream {upstream}: server {}: TLS: {err}",
                        clip(&address.to_string())
                    ),
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
                format!(
                    "upstream {upstream}: server {}: {problem}",
                    clip(&address.to_string())
                ),
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
