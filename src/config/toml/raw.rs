//! The configuration file as serde reads it: unknown keys are errors, and
//! values that later checks talk about keep their source span.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

use crate::config::limits::MAX_DURATION;
use crate::config::recycle::Protocol;
use crate::config::{quoted, Address};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default = "defaults::shutdown_timeout")]
    pub shutdown_timeout: DurationValue,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub listener: Vec<RawListener>,
    #[serde(default)]
    pub upstream: BTreeMap<Spanned<String>, RawUpstream>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub name: Spanned<String>,
    pub bind: Spanned<Address>,
    pub upstream: Spanned<String>,
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Spanned<DurationValue>,
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: DurationValue,
    #[serde(default)]
    pub next_upstream_tries: u32,
    #[serde(default = "defaults::zero")]
    pub next_upstream_timeout: DurationValue,
    pub unix_mode: Option<Spanned<String>>,
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    #[serde(default)]
    pub accept_proxy_protocol: bool,
    #[serde(default = "defaults::yes")]
    pub access_log: bool,
    #[serde(default = "defaults::yes")]
    pub delayed_ack: bool,
    pub tls: Option<RawListenerTls>,
    // SPEC §9, checked in recycle.rs.
    #[serde(default)]
    pub protocol: Protocol,
    pub quiet_period: Option<Spanned<DurationValue>>,
    pub max_connection_age: Option<Spanned<OptionalDuration>>,
    #[serde(default)]
    pub rebalance: bool,
    pub rebalance_rate: Option<Spanned<u32>>,
    pub access_log_interval: Option<Spanned<OptionalDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub bind: Spanned<Address>,
    pub token_file: Option<PathBuf>,
    pub state_file: Option<PathBuf>,
}

/// `[listener.tls]`: TLS termination.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListenerTls {
    pub cert_file: Spanned<PathBuf>,
    pub key_file: Spanned<PathBuf>,
    pub client_ca_file: Option<Spanned<PathBuf>>,
}

/// `[upstream.NAME.tls]` and `[upstream.NAME.server.tls]`: TLS origination.
/// Unset fields of a server's table take the group's value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClientTls {
    pub verify: Option<bool>,
    pub server_name: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<PathBuf>>,
    pub cert_file: Option<Spanned<PathBuf>>,
    pub key_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    #[serde(default = "defaults::balance")]
    pub balance: Spanned<Balance>,
    pub hash_key: Option<Spanned<HashKey>>,
    pub hash_ring: Option<Spanned<HashRing>>,
    pub from_fluent_bit: Option<Spanned<PathBuf>>,
    pub tls: Option<Spanned<RawClientTls>>,
    #[serde(default)]
    pub server: Vec<RawServer>,
    pub health_check: Option<RawHealthCheck>,
    pub agent_check: Option<Spanned<RawAgentCheck>>,
    pub resolver: Option<Vec<Spanned<String>>>,
    #[serde(default = "defaults::zero_u32_spanned")]
    pub queue: Spanned<u32>,
    #[serde(default = "defaults::queue_timeout")]
    pub queue_timeout: Spanned<DurationValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    #[serde(default = "defaults::check_interval")]
    pub interval: Spanned<DurationValue>,
    #[serde(default = "defaults::check_timeout")]
    pub timeout: Spanned<DurationValue>,
    #[serde(default = "defaults::check_fails")]
    pub fails: Spanned<u32>,
    #[serde(default = "defaults::check_passes")]
    pub passes: Spanned<u32>,
    pub send: Option<String>,
    pub expect: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub address: Spanned<Address>,
    pub name: Option<Spanned<String>>,
    #[serde(default = "defaults::weight")]
    pub weight: Spanned<u32>,
    #[serde(default)]
    pub max_conns: u32,
    #[serde(default = "defaults::max_fails")]
    pub max_fails: u32,
    #[serde(default = "defaults::fail_timeout")]
    pub fail_timeout: DurationValue,
    #[serde(default = "defaults::no")]
    pub backup: Spanned<bool>,
    #[serde(default)]
    pub down: bool,
    #[serde(default = "defaults::zero_spanned")]
    pub slow_start: Spanned<DurationValue>,
    #[serde(default = "defaults::no")]
    pub resolve: Spanned<bool>,
    #[serde(default = "defaults::resolve_interval")]
    pub resolve_interval: Spanned<DurationValue>,
    pub tls: Option<Spanned<RawClientTls>>,
    pub agent_check: Option<Spanned<RawAgentCheck>>,
}

/// How an upstream picks a peer (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    Random,
    RandomTwo,
    Hash(HashKey),
}

impl Balance {
    /// The name as written in the configuration.
    pub fn name(&self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConn => "least_conn",
            Balance::Random => "random",
            Balance::RandomTwo => "random_two",
            Balance::Hash(_) => "hash",
        }
    }

    /// Random and hash methods spread over every peer; a backup tier makes no sense there.
    pub fn allows_backup(&self) -> bool {
        matches!(self, Balance::RoundRobin | Balance::LeastConn)
    }

    /// Only the weighted rotating methods can ramp a weight (as in nginx Plus).
    pub fn allows_slow_start(&self) -> bool {
        matches!(self, Balance::RoundRobin | Balance::LeastConn)
    }
}

impl<'de> Deserialize<'de> for Balance {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const METHODS: &[&str] = &["round_robin", "least_conn", "random", "random_two", "hash"];
        let text = String::deserialize(deserializer)?;
        Ok(match text.as_str() {
            "round_robin" => Balance::RoundRobin,
            "least_conn" => Balance::LeastConn,
            "random" => Balance::Random,
            "random_two" => Balance::RandomTwo,
            "hash" => Balance::Hash(HashKey::ClientIp),
            _ => return Err(de::Error::unknown_variant(&text, METHODS)),
        })
    }
}

/// Whether a listener sends a PROXY protocol header to the upstream, and which version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    Off,
    V1,
    V2,
}

/// What `balance = "hash"` hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    ClientIp,
    ClientAddr,
}

/// Which consistent-hash ring `balance = "hash"` uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashRing {
    /// nginx's `hash ... consistent` ring (CRC32).
    #[default]
    Nginx,
    /// libmemcached's ketama ring (MD5).
    Ketama,
}

/// One `agent_check` table as written; every key optional, so a server's
/// table can take the rest from the group's.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::config) struct RawAgentCheck {
    pub port: Option<Spanned<u16>>,
    pub address: Option<Spanned<Address>>,
    pub interval: Option<Spanned<DurationValue>>,
    pub timeout: Option<Spanned<DurationValue>>,
    pub send: Option<Spanned<String>>,
}

/// A duration: a string with a unit, such as `"500ms"` or `"10m"`; or, as
/// nginx reads a time without a unit, a number of seconds (`10`, `"10"`).
/// At most [`MAX_DURATION`], so that no deadline can overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::config) struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }
}

struct DurationVisitor;

impl de::Visitor<'_> for DurationVisitor {
    type Value = DurationValue;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a duration like \"10s\" or \"500ms\", or a number of seconds")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<DurationValue, E> {
        let parsed = if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
            text.parse::<u64>()
                .map(Duration::from_secs)
                .map_err(|err| err.to_string())
        } else {
            humantime::parse_duration(text).map_err(|err| err.to_string())
        };
        let duration = parsed.map_err(|err| {
            E::custom(format!(
                "invalid duration {}: {err}; write a duration like \"10s\" or \"500ms\"",
                quoted(text)
            ))
        })?;
        bounded(duration, || quoted(text))
    }

    fn visit_i64<E: de::Error>(self, seconds: i64) -> Result<DurationValue, E> {
        let seconds = u64::try_from(seconds)
            .map_err(|_| E::custom(format!("invalid duration {seconds}: it is negative")))?;
        self.visit_u64(seconds)
    }

    fn visit_u64<E: de::Error>(self, seconds: u64) -> Result<DurationValue, E> {
        bounded(Duration::from_secs(seconds), || seconds.to_string())
    }
}

/// A duration key that may also be `"off"`: `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::config) struct OptionalDuration(pub Option<Duration>);

impl<'de> Deserialize<'de> for OptionalDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OptionalDurationVisitor)
    }
}

struct OptionalDurationVisitor;

impl de::Visitor<'_> for OptionalDurationVisitor {
    type Value = OptionalDuration;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("\"off\", a duration like \"10s\", or a number of seconds")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<OptionalDuration, E> {
        if text == "off" {
            return Ok(OptionalDuration(None));
        }
        DurationVisitor
            .visit_str(text)
            .map(|value| OptionalDuration(Some(value.0)))
    }

    fn visit_i64<E: de::Error>(self, seconds: i64) -> Result<OptionalDuration, E> {
        DurationVisitor
            .visit_i64(seconds)
            .map(|value| OptionalDuration(Some(value.0)))
    }

    fn visit_u64<E: de::Error>(self, seconds: u64) -> Result<OptionalDuration, E> {
        DurationVisitor
            .visit_u64(seconds)
            .map(|value| OptionalDuration(Some(value.0)))
    }
}

fn bounded<E: de::Error>(
    duration: Duration,
    written: impl FnOnce() -> String,
) -> Result<DurationValue, E> {
    if duration > MAX_DURATION {
        return Err(E::custom(format!(
            "duration {} is longer than the longest allowed, {}d",
            written(),
            MAX_DURATION.as_secs() / (24 * 60 * 60)
        )));
    }
    Ok(DurationValue(duration))
}

mod defaults {
    use super::*;
    use crate::config::{defaults, server_defaults};

    fn spanned<T>(value: T) -> Spanned<T> {
        Spanned::new(0..0, value)
    }

    pub fn shutdown_timeout() -> DurationValue {
        DurationValue(defaults::SHUTDOWN_TIMEOUT)
    }
    pub fn connect_timeout() -> Spanned<DurationValue> {
        spanned(DurationValue(defaults::CONNECT_TIMEOUT))
    }
    pub fn idle_timeout() -> DurationValue {
        DurationValue(defaults::IDLE_TIMEOUT)
    }
    pub fn zero_u32_spanned() -> Spanned<u32> {
        spanned(0)
    }
    pub fn queue_timeout() -> Spanned<DurationValue> {
        spanned(DurationValue(defaults::QUEUE_TIMEOUT))
    }
    pub fn zero() -> DurationValue {
        DurationValue(Duration::ZERO)
    }
    pub fn zero_spanned() -> Spanned<DurationValue> {
        spanned(zero())
    }
    pub fn balance() -> Spanned<Balance> {
        spanned(Balance::RoundRobin)
    }
    pub fn weight() -> Spanned<u32> {
        spanned(server_defaults::WEIGHT)
    }
    pub fn max_fails() -> u32 {
        server_defaults::MAX_FAILS
    }
    pub fn fail_timeout() -> DurationValue {
        DurationValue(server_defaults::FAIL_TIMEOUT)
    }
    pub fn check_interval() -> Spanned<DurationValue> {
        spanned(DurationValue(Duration::from_secs(5)))
    }
    pub fn check_timeout() -> Spanned<DurationValue> {
        spanned(DurationValue(Duration::from_secs(1)))
    }
    pub fn check_fails() -> Spanned<u32> {
        spanned(3)
    }
    pub fn check_passes() -> Spanned<u32> {
        spanned(2)
    }
    pub fn resolve_interval() -> Spanned<DurationValue> {
        spanned(DurationValue(server_defaults::RESOLVE_INTERVAL))
    }
    pub fn no() -> Spanned<bool> {
        spanned(false)
    }
    pub fn yes() -> bool {
        true
    }
}
