//! `[upstream.NAME.agent_check]` (the group's default) and
//! `[upstream.NAME.server.agent_check]` (per server): where a server's agent
//! listens and how often it is asked (SPEC §13). A server's table takes the
//! keys it does not set from the group's.

use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::toml::raw::RawAgentCheck;
use super::Address;

/// The longest `interval` and `timeout`, as for the other timers (SPEC §8).
pub const MAX_AGENT_DURATION: Duration = Duration::from_secs(3600);
/// The most bytes `send` may hold: an agent request is one short line.
pub const MAX_AGENT_SEND: usize = 1024;

const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, ConfigError};

    const HEAD: &str = r#"
[[listener]]
name = "l"
bind = "127.0.0.1:7000"
upstream = "u"

[upstream.u]
"#;

    fn parse(body: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{HEAD}{body}"), Path::new("test.toml"))
    }

    fn checks(body: &str) -> Vec<Option<AgentCheckConfig>> {
        let config = parse(body).unwrap_or_else(|err| panic!("{err}"));
        config.upstreams["u"]
            .servers
            .iter()
            .map(|server| server.agent_check.clone())
            .collect()
    }

    fn error(body: &str) -> ConfigError {
        match parse(body) {
            Ok(_) => panic!("accepted:\n{body}"),
            Err(err) => err,
        }
    }

    #[test]
    fn defaults_and_the_servers_keys_over_the_groups() {
        let found = checks(
            r#"
[upstream.u.agent_check]
port = 9999
send = "hello\n"

[[upstream.u.server]]
address = "127.0.0.1:7001"

[[upstream.u.server]]
address = "127.0.0.1:7002"
[upstream.u.server.agent_check]
address = "unix:/run/agent.sock"
interval = "5s"

[[upstream.u.server]]
address = "127.0.0.1:7003"
[upstream.u.server.agent_check]
timeout = "300ms"
"#,
        );
        assert_eq!(
            found,
            [
                Some(AgentCheckConfig {
                    agent: AgentAddress::Port(9999),
                    interval: Duration::from_secs(2),
                    timeout: Duration::from_secs(1),
                    send: b"hello\n".to_vec(),
                }),
                Some(AgentCheckConfig {
                    agent: AgentAddress::Address(Address::Unix("/run/agent.sock".into())),
                    interval: Duration::from_secs(5),
                    timeout: Duration::from_secs(1),
                    send: b"hello\n".to_vec(),
                }),
                Some(AgentCheckConfig {
                    agent: AgentAddress::Port(9999),
                    interval: Duration::from_secs(2),
                    timeout: Duration::from_millis(300),
                    send: b"hello\n".to_vec(),
                }),
            ]
        );
        assert_eq!(
            checks("[[upstream.u.server]]\naddress = \"127.0.0.1:7001\"\n"),
            [None]
        );
    }

    #[test]
    fn bounds_and_missing_keys_are_errors_naming_the_line() {
        let server = "[[upstream.u.server]]\naddress = \"127.0.0.1:7001\"\n[upstream.u.server.agent_check]\n";
        for (keys, line, needle) in [
            ("port = 0\n", 11, "`port` must be 1-65535"),
            ("port = 70000\n", 11, "port"),
            ("port = 1\naddress = \"127.0.0.1:2\"\n", 12, "not both"),
            (
                "port = 1\ninterval = \"0s\"\n",
                12,
                "`interval` must be between 1ms and 1h",
            ),
            (
                "port = 1\ntimeout = \"2h\"\n",
                12,
                "`timeout` must be between 1ms and 1h",
            ),
            ("interval = \"1s\"\n", 10, "needs `port` or `address`"),
            ("port = 1\ncolour = 1\n", 12, "colour"),
        ] {
            let err = error(&format!("{server}{keys}"));
            assert_eq!(err.line, Some(line), "{keys}: {err}");
            assert!(err.message.contains(needle), "{keys}: {err}");
        }
        let long = "x".repeat(MAX_AGENT_SEND + 1);
        let err = error(&format!("{server}port = 1\nsend = \"{long}\"\n"));
        assert!(
            err.message.contains("`send` must be at most 1024 bytes"),
            "{err}"
        );
        assert!(checks(&format!("{server}port = 1\nsend = \"{}\"\n", &long[1..]))[0].is_some());
    }

    #[test]
    fn fluent_bit_nodes_take_the_groups_table() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("nodes.conf"),
            "[UPSTREAM]\n    name n\n[NODE]\n    name node-1\n    host 127.0.0.1\n    port 24224\n",
        )
        .unwrap();
        let text = format!(
            "{HEAD}from_fluent_bit = \"nodes.conf\"\n[upstream.u.agent_check]\nport = 9999\n"
        );
        let config = Config::parse(&text, &dir.path().join("sluice.toml")).unwrap();
        let node = &config.upstreams["u"].servers[0];
        assert_eq!(node.name.as_deref(), Some("node-1"));
        assert_eq!(
            node.agent_check.as_ref().map(|check| &check.agent),
            Some(&AgentAddress::Port(9999))
        );
    }

    #[test]
    fn a_port_needs_a_host_address() {
        let err = error(
            "[upstream.u.agent_check]\nport = 9999\n[[upstream.u.server]]\naddress = \"unix:/run/s.sock\"\n",
        );
        assert_eq!(err.line, Some(9));
        assert!(
            err.message.contains("needs a HOST:PORT server address"),
            "{err}"
        );
        let own = checks(
            "[upstream.u.agent_check]\nport = 9999\n[[upstream.u.server]]\naddress = \"unix:/run/s.sock\"\n[upstream.u.server.agent_check]\naddress = \"unix:/run/agent.sock\"\n",
        );
        assert!(own[0].is_some());
    }
}
