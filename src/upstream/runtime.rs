//! Runtime changes to one upstream group (SPEC §10): per-server overrides of
//! state, weight and max_conns, servers added and removed, kept in one
//! object shared by every build of the group. [`Upstream::assemble`] applies
//! them on top of the configuration at every build (API write, reload, DNS
//! re-resolution), so no rebuild loses them.
//!
//! Two sources set overrides: the runtime API and agent checks. A server's
//! state is the most restrictive one set (down over drain over up), else the
//! configuration's `down`; its weight and max_conns are the agent's if set,
//! else the API's, else the configuration's. Only the API's layer, and the
//! servers added and removed, are kept in `[admin] state_file`.
//!
//! [`Upstream::assemble`]: super::Upstream::assemble

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use super::queue::Queue;
use super::{SharedUpstream, Upstream};
use crate::config::{ConfigError, ServerConfig, UpstreamConfig};
use crate::net::PeerTarget;

/// The weights a runtime change may set, as the configuration's (SPEC §8).
pub const WEIGHT_RANGE: std::ops::RangeInclusive<u32> = 1..=1000;
/// Servers the runtime API may add to one upstream, so a client cannot grow
/// the group (and the hash ring) without limit.
pub const MAX_ADDED_SERVERS: usize = 1000;

/// A server's administrative state, as the runtime API and agents set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    /// Takes new connections.
    Up,
    /// Takes no new connections; open ones go on.
    Drain,
    /// Takes no new connections, like `down = true`.
    Down,
}

impl fmt::Display for ServerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerState::Up => "up",
            ServerState::Drain => "drain",
            ServerState::Down => "down",
        })
    }
}

/// Who set an override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Api,
    Agent,
}

/// What one source overrides of one server; `None` keeps the value below.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ServerState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_conns: Option<u32>,
}

impl Overrides {
    fn is_empty(&self) -> bool {
        *self == Overrides::default()
    }
}

/// A server the runtime API added, with the addresses it resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct AddedServer {
    pub config: ServerConfig,
    pub targets: Vec<PeerTarget>,
}

/// What the API changed of one group: kept in the state file, and replaced
/// as a whole on reload (by the file's, or by nothing without a file).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApiLayer {
    /// By server label.
    pub overrides: BTreeMap<String, Overrides>,
    pub added: Vec<AddedServer>,
    /// Labels of configured servers the API removed.
    pub removed: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct Inner {
    api: ApiLayer,
    /// By server label.
    agent: BTreeMap<String, Overrides>,
}

/// A server's values after every override, as a build applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    pub weight: u32,
    pub max_conns: u32,
    /// Not selected for new connections.
    pub down: bool,
    /// Not selected, but shown as `draining` while connections are left.
    pub draining: bool,
}

/// The runtime state of one upstream group, shared by its builds.
#[derive(Debug)]
pub struct Runtime {
    inner: Mutex<Inner>,
    /// Held while a build is assembled and stored, so two rebuilds (an API
    /// write, DNS re-resolution) never store over each other's changes.
    build: Mutex<()>,
    pub queue: Arc<Queue>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update leaves the state whole, so a panic elsewhere while the
    // lock was held leaves nothing to repair.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Runtime {
    /// Fresh state for `config`'s group: no overrides, an empty queue.
    pub fn new(config: &UpstreamConfig) -> Arc<Runtime> {
        Arc::new(Runtime {
            inner: Mutex::default(),
            build: Mutex::new(()),
            queue: Arc::new(Queue::new(&config.name)),
        })
    }

    /// The state a reload's build of the group starts with: `api` (from the
    /// state file, or empty), the agents' overrides and the queue of `self`.
    /// The running group keeps `self` until the reload is committed.
    pub fn successor(&self, api: ApiLayer) -> Arc<Runtime> {
        let agent = lock(&self.inner).agent.clone();
        Arc::new(Runtime {
            inner: Mutex::new(Inner { api, agent }),
            build: Mutex::new(()),
            queue: Arc::clone(&self.queue),
        })
    }

    /// Starts a new group's state with the state file's changes.
    pub fn replace_api_layer(&self, api: ApiLayer) {
        lock(&self.inner).api = api;
    }

    /// A copy of the API's changes, for the state file.
    pub fn api_layer(&self) -> ApiLayer {
        lock(&self.inner).api.clone()
    }

    /// Serialises builds of the group; see [`Runtime::rebuild`].
    pub fn build_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.build)
    }

    /// The servers a build has: the configured ones not removed, then the
    /// added ones, each with its targets (`targets[i]` for `config.servers[i]`).
    pub fn servers(
        &self,
        config: &UpstreamConfig,
        targets: Vec<Vec<PeerTarget>>,
    ) -> Vec<(ServerConfig, Vec<PeerTarget>)> {
        let inner = lock(&self.inner);
        let mut servers: Vec<(ServerConfig, Vec<PeerTarget>)> = config
            .servers
            .iter()
            .zip(targets)
            .filter(|(server, _)| !inner.api.removed.contains(&server.label()))
            .map(|(server, targets)| (server.clone(), targets))
            .collect();
        servers.extend(
            inner
                .api
                .added
                .iter()
                .map(|added| (added.config.clone(), added.targets.clone())),
        );
        servers
    }

    /// `server`'s values after the overrides of both sources.
    pub fn effective(&self, server: &ServerConfig) -> Effective {
        let inner = lock(&self.inner);
        let label = server.label();
        let api = inner.api.overrides.get(&label);
        let agent = inner.agent.get(&label);
        let state = api
            .and_then(|api| api.state)
            .into_iter()
            .chain(agent.and_then(|agent| agent.state))
            .max();
        let pick = |field: fn(&Overrides) -> Option<u32>, configured: u32| {
            agent
                .and_then(field)
                .or_else(|| api.and_then(field))
                .unwrap_or(configured)
        };
        Effective {
            weight: pick(|o| o.weight, server.weight),
            max_conns: pick(|o| o.max_conns, server.max_conns),
            down: match state {
                Some(ServerState::Up) => false,
                Some(ServerState::Drain | ServerState::Down) => true,
                None => server.down,
            },
            draining: state == Some(ServerState::Drain),
        }
    }

    /// The overrides `source` has set on server `label`.
    pub fn overrides(&self, source: Source, label: &str) -> Overrides {
        let inner = lock(&self.inner);
        let layer = match source {
            Source::Api => &inner.api.overrides,
            Source::Agent => &inner.agent,
        };
        layer.get(label).cloned().unwrap_or_default()
    }

    /// Sets `source`'s overrides of server `label` (an empty one clears
    /// them). Takes effect at the next build; see [`Runtime::rebuild`].
    pub fn set_overrides(&self, source: Source, label: &str, overrides: Overrides) {
        let mut inner = lock(&self.inner);
        let layer = match source {
            Source::Api => &mut inner.api.overrides,
            Source::Agent => &mut inner.agent,
        };
        if overrides.is_empty() {
            layer.remove(label);
        } else {
            layer.insert(label.to_owned(), overrides);
        }
    }

    /// Adds a server through the API. Its label must be new to the group.
    pub fn add_server(&self, server: AddedServer) {
        lock(&self.inner).api.added.push(server);
    }

    /// How many servers the API has added to the group.
    pub fn added_count(&self) -> usize {
        lock(&self.inner).api.added.len()
    }

    /// Removes server `label`: an added one is forgotten, a configured one
    /// remembered as removed. Both sources' overrides of it are dropped.
    pub fn remove_server(&self, label: &str) {
        let mut inner = lock(&self.inner);
        let before = inner.api.added.len();
        inner
            .api
            .added
            .retain(|added| added.config.label() != label);
        if inner.api.added.len() == before {
            inner.api.removed.insert(label.to_owned());
        }
        inner.api.overrides.remove(label);
        inner.agent.remove(label);
    }
}

/// Applies one change to the runtime state of the group in `shared` and
/// stores a build with it, under the group's build lock: concurrent writers
/// each see the others' changes. `change` returns `Err` to change nothing.
pub fn rebuild<T, E>(
    shared: &SharedUpstream,
    change: impl FnOnce(&Upstream) -> Result<T, E>,
) -> Result<T, RebuildError<E>> {
    let current = shared.load_full();
    let runtime = Arc::clone(&current.runtime);
    let _build = runtime.build_lock();
    // Another rebuild may have stored a newer build while this one waited.
    let current = shared.load_full();
    let outcome = change(&current).map_err(RebuildError::Refused)?;
    let targets = current
        .config
        .servers
        .iter()
        .map(|server| current.targets_of(server))
        .collect();
    let rebuilt = Upstream::assemble(
        &current.config,
        targets,
        Some(&current),
        Arc::clone(&current.runtime),
    )
        .map_err(RebuildError::Build)?;
    shared.store(Arc::new(rebuilt));
    runtime_changed(&current);
    Ok(outcome)
}

/// Changes `source`'s overrides of server `label` (its `name`, else its
/// address as written) of the group in `shared`, and stores a build with
/// them. Returns the overrides before and after, for the change's log line.
pub fn change_server(
    shared: &SharedUpstream,
    source: Source,
    label: &str,
    change: impl FnOnce(&mut Overrides),
) -> Result<(Overrides, Overrides), RebuildError<UnknownServer>> {
    rebuild(shared, |group| {
        if !group.has_server(label) {
            return Err(UnknownServer);
        }
        let old = group.runtime.overrides(source, label);
        let mut new = old.clone();
        change(&mut new);
        group.runtime.set_overrides(source, label, new.clone());
        Ok((old, new))
    })
}

/// The group has no server of that label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownServer;

/// Wakes the queue's first client: a change may have freed a slot.
fn runtime_changed(group: &Upstream) {
    group.runtime.queue.slot_freed();
}

/// Why [`rebuild`] stored nothing.
#[derive(Debug)]
pub enum RebuildError<E> {
    /// The change itself refused (bad input, unknown server).
    Refused(E),
    /// The group could not be built (a server's TLS files).
    Build(ConfigError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Address, Balance};

    fn group() -> UpstreamConfig {
        let server = |port: u16| {
            ServerConfig::added_at_runtime(
                Address::Inet {
                    host: "127.0.0.1".into(),
                    port,
                },
                Some(format!("s{port}")),
                4,
                10,
            )
        };
        UpstreamConfig {
            name: "pool".into(),
            balance: Balance::RoundRobin,
            servers: vec![server(1), server(2)],
            health_check: None,
            resolver: Vec::new(),
            queue: 0,
            queue_timeout: std::time::Duration::from_secs(30),
        }
    }

    #[test]
    fn the_most_restrictive_state_and_the_agents_numbers_win() {
        let config = group();
        let runtime = Runtime::new(&config);
        let server = &config.servers[0];
        let plain = runtime.effective(server);
        assert_eq!((plain.weight, plain.max_conns, plain.down), (4, 10, false));
        runtime.set_overrides(
            Source::Api,
            "s1",
            Overrides {
                state: Some(ServerState::Up),
                weight: Some(2),
                max_conns: Some(3),
            },
        );
        runtime.set_overrides(
            Source::Agent,
            "s1",
            Overrides {
                state: Some(ServerState::Drain),
                weight: Some(1),
                max_conns: None,
            },
        );
        let both = runtime.effective(server);
        assert_eq!(
            (both.weight, both.max_conns, both.down, both.draining),
            (1, 3, true, true)
        );
        runtime.set_overrides(Source::Agent, "s1", Overrides::default());
        let api = runtime.effective(server);
        assert_eq!((api.weight, api.down, api.draining), (2, false, false));
    }

    #[test]
    fn removed_servers_leave_the_build_and_added_ones_join_it() {
        let config = group();
        let runtime = Runtime::new(&config);
        let targets = vec![Vec::new(), Vec::new()];
        runtime.remove_server("s1");
        runtime.add_server(AddedServer {
            config: ServerConfig::added_at_runtime(
                Address::Unix("/run/x.sock".into()),
                Some("x".into()),
                1,
                0,
            ),
            targets: Vec::new(),
        });
        let labels: Vec<String> = runtime
            .servers(&config, targets)
            .iter()
            .map(|(server, _)| server.label())
            .collect();
        assert_eq!(labels, ["s2", "x"]);
        assert_eq!(runtime.api_layer().removed.len(), 1);
        runtime.remove_server("x");
        assert_eq!(runtime.added_count(), 0);
        assert_eq!(runtime.api_layer().removed.len(), 1);
    }
}
