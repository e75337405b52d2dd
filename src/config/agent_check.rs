//! `[upstream.NAME.agent_check]` (the group's default) and
//! `[upstream.NAME.server.agent_check]` (per server): where a server's agent
//! listens and how often it is asked (SPEC §13). A server's table takes the
//! keys it does not set from the group's.

use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::raw::DurationValue;
use super::Address;

/// The longest `interval` and `timeout`, as for the other timers (SPEC §8).
pub const MAX_AGENT_DURATION: Duration = Duration::from_secs(3600);
/// The most bytes `send` may hold: an agent request is one short line.
pub const MAX_AGENT_SEND: usize = 1024;

const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// One `agent_check` table as written; every key optional, so a server's
/// table can take the rest from the group's.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgentCheck {
    pub port: Option<Spanned<u16>>,
    pub address: Option<Spanned<Address>>,
    pub interval: Option<Spanned<DurationValue>>,
    pub timeout: Option<Spanned<DurationValue>>,
    pub send: Option<Spanned<String>>,
}

/// A server's agent check, with the group's keys filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCheckConfig {
    pub agent: AgentAddress,
    pub interval: Duration,
    /// For one check as a whole: connect, send and the reply line.
    pub timeout: Duration,
    /// Written after connecting; empty: nothing is sent.
    pub send: Vec<u8>,
}

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// This port on the server's own (first) address.
    Port(u16),
    /// An address of its own: `HOST:PORT` or `unix:/path`.
    Address(Address),
}

/// What is wrong with an `agent_check` table, and where.
#[derive(Debug)]
pub(super) struct AgentCheckError {
    pub span: Range<usize>,
    pub message: String,
}

fn error(span: Range<usize>, message: impl Into<String>) -> AgentCheckError {
    AgentCheckError {
        span,
        message: message.into(),
    }
}

/// Checks the bounds of the keys one table sets.
pub(super) fn check_table(table: &Spanned<RawAgentCheck>) -> Result<(), AgentCheckError> {
    let raw = table.get_ref();
    if let (Some(_), Some(address)) = (&raw.port, &raw.address) {
        return Err(error(
            address.span(),
            "agent_check takes `port` or `address`, not both",
        ));
    }
    if let Some(port) = &raw.port {
        if *port.get_ref() == 0 {
            return Err(error(port.span(), "agent_check key `port` must be 1-65535"));
        }
    }
    for (key, value) in [("interval", &raw.interval), ("timeout", &raw.timeout)] {
        if let Some(value) = value {
            let duration = value.get_ref().0;
            if duration.is_zero() || duration > MAX_AGENT_DURATION {
                return Err(error(
                    value.span(),
                    format!("agent_check key `{key}` must be between 1ms and 1h"),
                ));
            }
        }
    }
    if let Some(send) = &raw.send {
        if send.get_ref().len() > MAX_AGENT_SEND {
            return Err(error(
                send.span(),
                format!("agent_check key `send` must be at most {MAX_AGENT_SEND} bytes"),
            ));
        }
    }
    Ok(())
}

/// The agent check of a server at `address` with table `own` (if any) over
/// the group's `group` (if any); both tables already passed [`check_table`].
pub(super) fn for_server(
    own: Option<&Spanned<RawAgentCheck>>,
    group: Option<&Spanned<RawAgentCheck>>,
    address: &Address,
) -> Result<Option<AgentCheckConfig>, AgentCheckError> {
    let Some(table) = own.or(group) else {
        return Ok(None);
    };
    let own = own.map(Spanned::get_ref);
    let group = group.map(Spanned::get_ref);
    // `port` and `address` are one setting: the server's wins as a whole.
    let has_agent = |raw: &&RawAgentCheck| raw.port.is_some() || raw.address.is_some();
    let agent = match own.filter(has_agent).or(group.filter(has_agent)) {
        Some(RawAgentCheck {
            port: Some(port), ..
        }) => {
            if address.host().is_none() {
                return Err(error(
                    port.span(),
                    format!("agent_check key `port` needs a HOST:PORT server address; server {address} needs the agent's `address`"),
                ));
            }
            AgentAddress::Port(*port.get_ref())
        }
        Some(RawAgentCheck {
            address: Some(agent),
            ..
        }) => AgentAddress::Address(agent.get_ref().clone()),
        _ => {
            return Err(error(
                table.span(),
                format!("agent_check of server {address} needs `port` or `address`"),
            ))
        }
    };
    let pick = |field: fn(&RawAgentCheck) -> Option<Duration>, default: Duration| {
        own.and_then(field)
            .or_else(|| group.and_then(field))
            .unwrap_or(default)
    };
    let send = own
        .and_then(|raw| raw.send.as_ref())
        .or_else(|| group.and_then(|raw| raw.send.as_ref()))
        .map(|send| send.get_ref().clone().into_bytes())
        .unwrap_or_default();
    Ok(Some(AgentCheckConfig {
        agent,
        interval: pick(
            |raw| raw.interval.as_ref().map(|value| value.get_ref().0),
            DEFAULT_INTERVAL,
        ),
        timeout: pick(
            |raw| raw.timeout.as_ref().map(|value| value.get_ref().0),
            DEFAULT_TIMEOUT,
        ),
        send,
    }))
}
