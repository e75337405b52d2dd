//! Agent checks (SPEC §13), as HAProxy's `agent-check`: every `interval`,
//! each server's agent is connected to, sent `send`, and read for one line
//! of at most [`MAX_REPLY`] bytes within `timeout`. The line sets what the
//! agent overrides of the server (`runtime::Source::Agent`): its weight as a
//! share of the configured one, its state and its max_conns. An agent that
//! does not answer changes nothing: agents steer, health checks fail.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::runtime::{self, Overrides, RebuildError, ServerState, Source, WEIGHT_RANGE};
use super::task::UpstreamTask;
use super::{resolve_address, SharedUpstream, Upstream};
use crate::config::{Address, AgentAddress, AgentCheckConfig, UpstreamConfig};
use crate::net::connect::connect_peer;
use crate::net::PeerTarget;

/// The most bytes read from an agent per check: one line, end included.
pub const MAX_REPLY: usize = 512;
/// Percentages above this are read as this, as HAProxy does.
const MAX_PERCENT: u64 = 25_600;
/// Characters of an agent's words quoted in a warning (SPEC §8).
const MAX_QUOTE: usize = 100;
/// How long the task sleeps when no server of the build has an agent (the
/// servers with one may all have been removed at run time).
const IDLE_WAKE: Duration = Duration::from_secs(1);

/// What one reply line says; `None` where it says nothing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// The most restrictive state word of the line.
    pub state: Option<ServerState>,
    /// `N%`, capped at 25600.
    pub percent: Option<u32>,
    /// `maxconn:N`; 0 is unlimited.
    pub max_conns: Option<u32>,
    /// Words not understood, in order.
    pub unknown: Vec<String>,
}

/// Parses one reply line in HAProxy's agent protocol: words separated by
/// spaces, tabs or commas, case-insensitive; `#` starts a description that is
/// not parsed.
pub fn parse(line: &str) -> Report {
    let words = line.split('#').next().unwrap_or_default();
    let mut report = Report::default();
    for word in words
        .split([' ', '\t', ',', '\r', '\n'])
        .filter(|word| !word.is_empty())
    {
        let lower = word.to_ascii_lowercase();
        let state = match lower.as_str() {
            "up" | "ready" => Some(ServerState::Up),
            "drain" => Some(ServerState::Drain),
            "maint" | "down" | "stopped" | "fail" => Some(ServerState::Down),
            _ => None,
        };
        if let Some(state) = state {
            report.state = report.state.max(Some(state));
        } else if let Some(percent) = lower.strip_suffix('%').and_then(number) {
            report.percent = Some(percent.min(MAX_PERCENT) as u32);
        } else if let Some(max_conns) = lower
            .strip_prefix("maxconn:")
            .and_then(number)
            .and_then(|n| u32::try_from(n).ok())
        {
            report.max_conns = Some(max_conns);
        } else {
            report.unknown.push(word.to_owned());
        }
    }
    report
}

/// Decimal digits only; too many digits saturate.
fn number(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(digits.parse().unwrap_or(u64::MAX))
}

/// `percent` of `configured`, rounded down as HAProxy does, at most the
/// largest weight sluice takes.
pub fn scaled_weight(configured: u32, percent: u32) -> u32 {
    let weight = u64::from(configured) * u64::from(percent) / 100;
    weight.min(u64::from(*WEIGHT_RANGE.end())) as u32
}

/// What the agent has said of one server so far: each reply changes only
/// what it names, as in HAProxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Said {
    /// `Drain` or `Down`; `None` after `up`/`ready`.
    state: Option<ServerState>,
    weight: Option<u32>,
    /// The last percentage came to weight 0: drained until another one.
    zero_weight: bool,
    max_conns: Option<u32>,
}

impl Said {
    /// Starts from what the agent set before (a reload restarts the task).
    fn from_overrides(overrides: &Overrides) -> Said {
        Said {
            state: overrides.state.filter(|state| *state != ServerState::Up),
            weight: overrides.weight,
            zero_weight: false,
            max_conns: overrides.max_conns,
        }
    }

    fn hear(&mut self, report: &Report, configured_weight: u32) {
        if let Some(state) = report.state {
            self.state = Some(state).filter(|state| *state != ServerState::Up);
        }
        if let Some(percent) = report.percent {
            match scaled_weight(configured_weight, percent) {
                0 => self.zero_weight = true,
                weight => {
                    self.weight = Some(weight);
                    self.zero_weight = false;
                }
            }
        }
        if let Some(max_conns) = report.max_conns {
            self.max_conns = Some(max_conns);
        }
    }

    fn overrides(&self) -> Overrides {
        let zero = self.zero_weight.then_some(ServerState::Drain);
        Overrides {
            state: self.state.max(zero),
            weight: self.weight,
            max_conns: self.max_conns,
        }
    }
}

/// Overrides as a log field: `state=drain weight=3 max_conns=-`.
struct Shown<'a>(&'a Overrides);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
        write!(
            f,
            "state={} weight={} max_conns={}",
            field(self.0.state.map(|state| state.to_string())),
            field(self.0.weight.map(|weight| weight.to_string())),
            field(self.0.max_conns.map(|max| max.to_string())),
        )
    }
}

/// How one check ended without a line to parse.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// Refused, timed out, closed with nothing: the agent is not there.
    NoAnswer(String),
    /// More than [`MAX_REPLY`] bytes without a line end.
    TooLong,
}

/// Starts the agent checks of the group in `shared`, when a server of
/// `config` has one. A reload keeps what agents set (see
/// `Runtime::successor`); a server whose agent check the reload removed
/// loses it here.
pub fn start(config: &UpstreamConfig, shared: &SharedUpstream) -> Option<UpstreamTask> {
    forget_unchecked(config, shared);
    if !config
        .servers
        .iter()
        .any(|server| server.agent_check.is_some())
    {
        return None;
    }
    let shared = Arc::clone(shared);
    Some(UpstreamTask::spawn(move |stop| run(shared, stop)))
}

/// Clears what agents set on servers of `config` that have no agent check.
fn forget_unchecked(config: &UpstreamConfig, shared: &SharedUpstream) {
    let runtime = Arc::clone(&shared.load().runtime);
    for server in config
        .servers
        .iter()
        .filter(|server| server.agent_check.is_none())
    {
        let label = server.label();
        if runtime.overrides(Source::Agent, &label) == Overrides::default() {
            continue;
        }
        match runtime::change_server(shared, Source::Agent, &label, |overrides| {
            *overrides = Overrides::default()
        }) {
            Ok((old, _)) => {
                info!(upstream = config.name.as_str(), server = label.as_str(), old = ?Shown(&old).to_string(), "agent check removed: the server is back to its other settings");
            }
            Err(RebuildError::Refused(_)) => {}
            Err(RebuildError::Build(err)) => {
                warn!(upstream = config.name.as_str(), server = label.as_str(), error = %err, "agent check removed; the group cannot be rebuilt now, so the change applies at its next build");
            }
        }
    }
}

/// One server's agent as the task follows it.
struct Agent {
    said: Said,
    next: Instant,
    asking: bool,
    /// The last problem warned of, so each is warned of once until it changes.
    warned: Option<String>,
}

async fn run(shared: SharedUpstream, stop: CancellationToken) {
    let mut agents: HashMap<String, Agent> = HashMap::new();
    let mut checks: JoinSet<(String, Result<String, Failure>)> = JoinSet::new();
    loop {
        let group = shared.load_full();
        let now = Instant::now();
        let mut wake = now + IDLE_WAKE;
        let servers = agent_servers(&group);
        agents.retain(|label, agent| agent.asking || servers.iter().any(|(l, ..)| l == label));
        for (label, config, target) in servers {
            let agent = agents.entry(label.clone()).or_insert_with(|| Agent {
                said: Said::from_overrides(&group.runtime.overrides(Source::Agent, &label)),
                next: now,
                asking: false,
                warned: None,
            });
            if agent.asking {
                continue;
            }
            if agent.next <= now {
                agent.asking = true;
                agent.next = now + config.interval;
                checks.spawn(async move {
                    let outcome = ask(target, &config).await;
                    (label, outcome)
                });
            } else {
                wake = wake.min(agent.next);
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            Some(done) = checks.join_next(), if !checks.is_empty() => {
                // A check task only ends by returning: it never panics or is aborted.
                if let Ok((label, outcome)) = done {
                    if let Some(agent) = agents.get_mut(&label) {
                        agent.asking = false;
                        heard(&shared, &label, agent, outcome);
                    }
                }
            }
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// Each server of the build with an agent check, once, with where its agent
/// is; a server whose agent listens on a port of its own address is asked
/// at its first TCP peer's address.
fn agent_servers(group: &Upstream) -> Vec<(String, AgentCheckConfig, AgentTarget)> {
    let mut servers: Vec<(String, AgentCheckConfig, AgentTarget)> = Vec::new();
    for peer in &group.peers {
        let Some(config) = &peer.server.agent_check else {
            continue;
        };
        let label = peer.server.label();
        if servers.iter().any(|(known, ..)| *known == label) {
            continue;
        }
        let target = match (&config.agent, &peer.target) {
            (AgentAddress::Address(address), _) => AgentTarget::Address(address.clone()),
            (AgentAddress::Port(port), PeerTarget::Tcp(addr)) => {
                let mut addr = *addr;
                addr.set_port(*port);
                AgentTarget::Resolved(PeerTarget::Tcp(addr))
            }
            // The configuration allows `port` only for HOST:PORT servers.
            (AgentAddress::Port(_), PeerTarget::Unix(_)) => continue,
        };
        servers.push((label, config.clone(), target));
    }
    servers
}

enum AgentTarget {
    Resolved(PeerTarget),
    /// Resolved at each check, like a health check's connect.
    Address(Address),
}

/// One check: the reply line, within `timeout` as a whole.
async fn ask(target: AgentTarget, config: &AgentCheckConfig) -> Result<String, Failure> {
    match tokio::time::timeout(config.timeout, exchange(target, &config.send)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Failure::NoAnswer(format!(
            "no answer within {}",
            humantime::format_duration(config.timeout)
        ))),
    }
}

async fn exchange(target: AgentTarget, send: &[u8]) -> Result<String, Failure> {
    let no_answer = |what: &str, err: std::io::Error| Failure::NoAnswer(format!("{what}: {err}"));
    let target = match target {
        AgentTarget::Resolved(target) => target,
        AgentTarget::Address(address) => resolve_address(&address)
            .await
            .map_err(|err| no_answer("resolve", err))?
            .into_iter()
            .next()
            .ok_or_else(|| Failure::NoAnswer("resolve: no address".to_owned()))?,
    };
    let mut stream = connect_peer(&target, None, &[], !send.is_empty())
        .await
        .map_err(|err| no_answer("connect", err))?;
    if !send.is_empty() {
        stream
            .write_all(send)
            .await
            .map_err(|err| no_answer("send", err))?;
    }
    let mut reply = [0; MAX_REPLY];
    let mut filled = 0;
    loop {
        if filled == reply.len() {
            return Err(Failure::TooLong);
        }
        let read = stream
            .read(&mut reply[filled..])
            .await
            .map_err(|err| no_answer("receive", err))?;
        if read == 0 {
            if filled == 0 {
                return Err(Failure::NoAnswer("closed without a reply".to_owned()));
            }
            break;
        }
        let end = reply[filled..filled + read]
            .iter()
            .position(|&b| b == b'\n')
            .map(|at| filled + at);
        filled += read;
        if let Some(end) = end {
            filled = end;
            break;
        }
    }
    Ok(String::from_utf8_lossy(&reply[..filled]).into_owned())
}

/// Applies one check's outcome to server `label` of the group in `shared`.
fn heard(
    shared: &SharedUpstream,
    label: &str,
    agent: &mut Agent,
    outcome: Result<String, Failure>,
) {
    let group = shared.load_full();
    let upstream = group.name.clone();
    let upstream = upstream.as_str();
    let line = match outcome {
        Ok(line) => line,
        Err(Failure::NoAnswer(reason)) => {
            // Warned of once, not at every check: an agent being away
            // changes nothing.
            debug!(upstream, server = label, reason = %reason, "agent check: no answer; the server keeps its state");
            warn_once(
                agent,
                upstream,
                label,
                "agent does not answer; the server keeps its state".to_owned(),
                &reason,
            );
            return;
        }
        Err(Failure::TooLong) => {
            warn_once(
                agent,
                upstream,
                label,
                format!("agent answered more than {MAX_REPLY} bytes without a line end; ignored"),
                "",
            );
            return;
        }
    };
    let report = parse(&line);
    if report.unknown.is_empty() {
        agent.warned = None;
    } else {
        let mut words = report.unknown.join(" ");
        if let Some((cut, _)) = words.char_indices().nth(MAX_QUOTE) {
            words.truncate(cut);
        }
        warn_once(
            agent,
            upstream,
            label,
            format!("agent answered words it does not know, ignored: {words:?}"),
            "",
        );
    }
    let Some(configured_weight) = group
        .peers
        .iter()
        .find(|peer| peer.server.label() == label)
        .map(|peer| peer.server.weight)
    else {
        return;
    };
    agent.said.hear(&report, configured_weight);
    let wanted = agent.said.overrides();
    if group.runtime.overrides(Source::Agent, label) == wanted {
        return;
    }
    drop(group);
    match runtime::change_server(shared, Source::Agent, label, |overrides| {
        *overrides = wanted
    }) {
        Ok((old, new)) if old != new => {
            info!(upstream, server = label, old = ?Shown(&old).to_string(), new = ?Shown(&new).to_string(), reply = ?quote(&line), "agent check: server changed");
        }
        Ok(_) => {}
        Err(RebuildError::Refused(_)) => {
            debug!(
                upstream,
                server = label,
                "agent check: the server was removed meanwhile"
            );
        }
        Err(RebuildError::Build(err)) => {
            warn!(upstream, server = label, error = %err, "agent check: cannot rebuild the group; the change waits for the next one");
        }
    }
}

/// Warns of `problem` unless it is the one warned of last; `reason` is
/// this occurrence's detail, not part of what counts as a change.
fn warn_once(agent: &mut Agent, upstream: &str, label: &str, problem: String, reason: &str) {
    if agent.warned.as_ref() != Some(&problem) {
        if reason.is_empty() {
            warn!(upstream, server = label, "agent check: {problem}");
        } else {
            warn!(upstream, server = label, reason, "agent check: {problem}");
        }
        agent.warned = Some(problem);
    }
}

/// At most [`MAX_QUOTE`] characters of `line`, for a log line.
fn quote(line: &str) -> String {
    line.chars().take(MAX_QUOTE).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_states_and_max_conns() {
        let report = parse("75%\n");
        assert_eq!(report.percent, Some(75));
        assert_eq!(report.state, None);
        let report = parse("up 50%,maxconn:12\tREADY\r\n");
        assert_eq!(
            report,
            Report {
                state: Some(ServerState::Up),
                percent: Some(50),
                max_conns: Some(12),
                unknown: Vec::new(),
            }
        );
        for (word, state) in [
            ("drain", ServerState::Drain),
            ("MAINT", ServerState::Down),
            ("down", ServerState::Down),
            ("stopped", ServerState::Down),
            ("fail", ServerState::Down),
            ("ready", ServerState::Up),
        ] {
            assert_eq!(parse(word).state, Some(state), "{word}");
        }
    }

    #[test]
    fn the_most_restrictive_state_wins_and_a_description_is_not_parsed() {
        assert_eq!(parse("up,drain").state, Some(ServerState::Drain));
        assert_eq!(parse("drain down up").state, Some(ServerState::Down));
        let report = parse("down#disk full, 10%");
        assert_eq!(report.state, Some(ServerState::Down));
        assert_eq!(report.percent, None);
    }

    #[test]
    fn unknown_and_malformed_words_are_kept_apart() {
        let report = parse("50% hello -5% 1.5% maxconn:x maxconn:99999999999 %");
        assert_eq!(report.percent, Some(50));
        assert_eq!(report.max_conns, None);
        assert_eq!(
            report.unknown,
            [
                "hello",
                "-5%",
                "1.5%",
                "maxconn:x",
                "maxconn:99999999999",
                "%"
            ]
        );
        assert_eq!(parse("").unknown, Vec::<String>::new());
        assert_eq!(parse("\u{fffd}\u{0}").unknown.len(), 1);
    }

    #[test]
    fn percentages_round_down_and_are_capped() {
        assert_eq!(scaled_weight(2, 50), 1);
        assert_eq!(scaled_weight(3, 50), 1);
        assert_eq!(scaled_weight(1, 50), 0);
        assert_eq!(scaled_weight(10, 0), 0);
        assert_eq!(scaled_weight(10, 150), 15);
        assert_eq!(scaled_weight(1000, 25_600), 1000);
        assert_eq!(parse("99999999999999999999999%").percent, Some(25_600));
    }

    #[test]
    fn each_reply_changes_only_what_it_names() {
        let mut said = Said::default();
        said.hear(&parse("drain 50%"), 4);
        assert_eq!(
            said.overrides(),
            Overrides {
                state: Some(ServerState::Drain),
                weight: Some(2),
                max_conns: None
            }
        );
        said.hear(&parse("maxconn:3"), 4);
        assert_eq!(said.overrides().state, Some(ServerState::Drain));
        said.hear(&parse("ready"), 4);
        assert_eq!(
            said.overrides(),
            Overrides {
                state: None,
                weight: Some(2),
                max_conns: Some(3)
            }
        );
        said.hear(&parse("0%"), 4);
        assert_eq!(said.overrides().state, Some(ServerState::Drain));
        assert_eq!(said.overrides().weight, Some(2));
        said.hear(&parse("100%"), 4);
        assert_eq!(said.overrides().state, None);
        assert_eq!(said.overrides().weight, Some(4));
    }

    #[test]
    fn overrides_are_shown_with_every_field() {
        let shown = Shown(&Overrides {
            state: Some(ServerState::Drain),
            weight: Some(3),
            max_conns: None,
        })
        .to_string();
        assert_eq!(shown, "state=drain weight=3 max_conns=-");
    }
}
