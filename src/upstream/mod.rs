//! An upstream group at run time: its resolved peers, the shared selector,
//! the leases connections hold on peers, and the group's background work
//! (health checks, DNS re-resolution).

pub mod agent_check;
pub mod force_close;
pub mod health_check;
pub mod queue;
pub mod resolve;
pub mod runtime;
pub mod state_file;
pub mod stats;
pub mod task;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use std::time::Instant;

use crate::balancer::{
    Method, PeerHealth, PeerIdentity, PeerParams, PeerState, Ring, Selector, Tried,
};
use crate::config::{Address, Balance, ConfigError, HashRing, ServerConfig, UpstreamConfig};
use crate::net::PeerTarget;
use crate::tls::{self, TlsOrigin};
use force_close::ForceClose;
use runtime::Runtime;
use stats::{unavailable_counter, PeerStats};
use task::UpstreamTask;
use tracing::{info, warn};

/// One peer: a server of the configuration at one resolved address.
#[derive(Debug)]
pub struct Peer {
    /// Metric label and log name: the server's `name`, else its address as
    /// written; `@ADDRESS` is appended when a host name gave several peers.
    pub label: String,
    pub target: PeerTarget,
    pub server: ServerConfig,
    /// TLS towards this peer, loaded from its files once per build of the group.
    pub tls: Option<TlsOrigin>,
    /// Shared with the same peer in earlier and later builds of the group.
    pub health: Arc<PeerHealth>,
    /// Shared like `health`.
    pub stats: Arc<PeerStats>,
    /// The server's values after runtime overrides (SPEC §10): what the
    /// selector is given.
    pub weight: u32,
    pub max_conns: u32,
    pub down: bool,
    /// Drained: not selected (`down` is set too), shown as `draining` while
    /// connections are left.
    pub draining: bool,
    /// Closed to end every connection to the peer at once (`DELETE
    /// ?force=true`); shared like `health`.
    pub close: ForceClose,
}

impl Peer {
    /// Whether runtime changes to `label` apply to this peer: its server's
    /// label, or its own.
    pub fn answers_to(&self, label: &str) -> bool {
        self.label == label || self.server.label() == label
    }
}

/// The live build of one upstream group. Reload and re-resolution store a
/// rebuilt group here; a connection keeps the build it started with.
pub type SharedUpstream = Arc<ArcSwap<Upstream>>;

pub struct Upstream {
    pub name: String,
    pub balance: Balance,
    /// What the group was built from; runtime changes rebuild it from this.
    pub config: Arc<UpstreamConfig>,
    /// Runtime changes and the queue, shared by every build of the group.
    pub runtime: Arc<Runtime>,
    pub peers: Vec<Peer>,
    selector: Mutex<Selector>,
    unavailable: metrics::Counter,
}

impl Upstream {
    /// Resolves every server's address (a host name with several addresses
    /// gives one peer each) and builds the group. Peers also in `previous`
    /// keep their health (active connections, failures). Each load of the
    /// group warns once per server whose TLS certificate is not verified.
    /// An error names the line of the server's address or TLS file.
    pub async fn resolve(
        config: &UpstreamConfig,
        previous: Option<&Upstream>,
        runtime: Arc<Runtime>,
    ) -> Result<Upstream, ConfigError> {
        let mut targets = Vec::with_capacity(config.servers.len());
        for server in &config.servers {
            let resolved = if server.resolve {
                resolve::lookup(&server.address, &config.resolver)
                    .await
                    .map(|resolution| resolution.targets)
            } else {
                resolve_address(&server.address)
                    .await
                    .map_err(|err| err.to_string())
            };
            targets.push(resolved.map_err(|err| {
                server.address_line.error(format!(
                    "upstream {:?}: cannot resolve server address {}: {err}",
                    config.name, server.address
                ))
            })?);
        }
        let group = Upstream::assemble(config, targets, previous, runtime)?;
        warn_unverified_tls(config);
        Ok(group)
    }

    /// Builds the group from each server's targets (`targets[i]` for
    /// `config.servers[i]`) with the runtime changes in `runtime` applied,
    /// reusing the health of peers also in `previous`.
    pub fn assemble(
        config: &UpstreamConfig,
        targets: Vec<Vec<PeerTarget>>,
        previous: Option<&Upstream>,
        runtime: Arc<Runtime>,
    ) -> Result<Upstream, ConfigError> {
        let mut peers = Vec::new();
        // Peers of two builds are the same peer when they have the same
        // label and address.
        let earlier: HashMap<(&str, &PeerTarget), &Peer> = previous
            .into_iter()
            .flat_map(|old| &old.peers)
            .map(|old| ((old.label.as_str(), &old.target), old))
            .collect();
        let servers = runtime.servers(config, targets);
        let server_labels: Vec<String> = servers.iter().map(|(server, _)| server.label()).collect();
        let mut peer_labels = Vec::new();
        for (server, targets) in servers {
            let server = &server;
            let tls = server_tls(&config.name, server)?;
            // A re-resolved name always labels its peers by address, so a
            // peer keeps its label (and metrics) as the set grows and shrinks.
            let by_address = targets.len() > 1 || server.resolve;
            for (nth, target) in targets.into_iter().enumerate() {
                let label = if by_address {
                    format!("{}@{target}", server.label())
                } else {
                    server.label()
                };
                peer_labels.push(label.clone());
                if by_address && runtime.is_removed(&label) {
                    continue;
                }
                let effective = runtime.effective(server, &label);
                // A peer also in `previous` keeps its shared state; looking
                // it up first spares registering its metrics again.
                let (stats, health, close) = match earlier.get(&(label.as_str(), &target)) {
                    Some(old) => (
                        Arc::clone(&old.stats),
                        Arc::clone(&old.health),
                        old.close.clone(),
                    ),
                    None => (
                        Arc::new(PeerStats::new(&config.name, &label)),
                        Arc::default(),
                        ForceClose::default(),
                    ),
                };
                peers.push(Peer {
                    stats,
                    label,
                    target,
                    server: server.clone(),
                    // Each address is its own server: its own TLS sessions.
                    tls: match &tls {
                        Some(tls) if nth > 0 => Some(tls.with_own_sessions()),
                        tls => tls.clone(),
                    },
                    health,
                    weight: effective.weight,
                    max_conns: effective.max_conns,
                    down: effective.down,
                    draining: effective.draining,
                    close,
                });
            }
        }
        runtime.forget_gone_peers(&server_labels, &peer_labels);
        Ok(Upstream::new(Arc::new(config.clone()), runtime, peers))
    }

    /// Whether a server of this label (its `name`, else its address as
    /// written), or a peer of this label (`LABEL@ADDRESS`), is in this build.
    pub fn has_server(&self, label: &str) -> bool {
        self.peers.iter().any(|peer| peer.answers_to(label))
    }

    /// The targets this build has for `server`, in order.
    pub fn targets_of(&self, server: &ServerConfig) -> Vec<PeerTarget> {
        let mut targets: Vec<PeerTarget> = Vec::new();
        for peer in self.peers.iter().filter(|peer| peer.server == *server) {
            if !targets.contains(&peer.target) {
                targets.push(peer.target.clone());
            }
        }
        targets
    }

    pub fn new(config: Arc<UpstreamConfig>, runtime: Arc<Runtime>, peers: Vec<Peer>) -> Upstream {
        let params: Vec<PeerParams> = peers.iter().map(peer_params).collect();
        let health = peers.iter().map(|peer| Arc::clone(&peer.health)).collect();
        let identities: Vec<PeerIdentity> = peers
            .iter()
            .map(|peer| PeerIdentity {
                server: peer.server.address.to_string(),
                address: peer.target.to_string(),
            })
            .collect();
        let method = method(&config.balance, config.hash_ring);
        let selector = Selector::for_method(method, &identities, params, health);
        Upstream {
            unavailable: unavailable_counter(&config.name),
            name: config.name.clone(),
            balance: config.balance.clone(),
            config,
            runtime,
            peers,
            selector: Mutex::new(selector),
        }
    }

    /// The selector; the lock is held only for a pick, never across I/O.
    fn selector(&self) -> MutexGuard<'_, Selector> {
        // A pick leaves the algorithm's state consistent at every step, so a
        // panic elsewhere while the lock was held leaves nothing to repair.
        self.selector.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Picks a peer for the next attempt of one client connection.
    pub fn select(self: &Arc<Self>, tried: &mut Tried, key: &[u8]) -> Option<Attempt> {
        let (index, params) = {
            let mut selector = self.selector();
            let index = selector.select(Instant::now(), tried, key)?;
            (index, selector.params(index))
        };
        Some(Attempt {
            upstream: Arc::clone(self),
            index,
            params,
            started: Instant::now(),
            settled: false,
        })
    }

    /// Peer `index`'s state as of now.
    pub fn peer_state(&self, index: usize) -> PeerState {
        self.selector().state(index, Instant::now())
    }

    /// Whether some peer that is up is at its `max_conns`: a client that
    /// found no eligible peer may then wait in the queue (SPEC §11).
    pub fn has_full_peer(&self) -> bool {
        self.peers.iter().enumerate().any(|(index, peer)| {
            peer.max_conns > 0
                && peer.health.active() >= peer.max_conns
                && self.peer_state(index) == PeerState::Up
        })
    }

    /// A client connection was closed because no peer could take it.
    pub fn count_unavailable(&self) {
        self.unavailable.increment(1);
    }
}

/// Reads a server's TLS files; an error names the file and the line naming
/// it, else the server's address line (a configuration error).
fn server_tls(upstream: &str, server: &ServerConfig) -> Result<Option<TlsOrigin>, ConfigError> {
    let Some(settings) = &server.tls else {
        return Ok(None);
    };
    // A unix: server always has `server_name` (the configuration requires it).
    let host = server.address.host().unwrap_or_default();
    tls::origin(settings, host).map(Some).map_err(|err| {
        let line = server
            .tls_lines
            .naming(&err)
            .unwrap_or(&server.address_line);
        line.error(format!(
            "upstream {upstream:?}: server {}: TLS: {err}",
            server.label()
        ))
    })
}

/// The balancer's method for a configured `balance` and `hash_ring`.
fn method(balance: &Balance, hash_ring: HashRing) -> Method {
    match balance {
        Balance::RoundRobin => Method::RoundRobin,
        Balance::LeastConn => Method::LeastConn,
        Balance::Random => Method::Random,
        Balance::RandomTwo => Method::RandomTwo,
        Balance::Hash(_) => Method::Hash(match hash_ring {
            HashRing::Nginx => Ring::Nginx,
            HashRing::Ketama => Ring::Ketama,
        }),
    }
}

fn peer_params(peer: &Peer) -> PeerParams {
    let server = &peer.server;
    PeerParams {
        weight: peer.weight,
        max_conns: peer.max_conns,
        max_fails: server.max_fails,
        fail_timeout: server.fail_timeout,
        backup: server.backup,
        down: peer.down,
        slow_start: server.slow_start,
    }
}

fn warn_unverified_tls(upstream: &UpstreamConfig) {
    for server in &upstream.servers {
        if server.tls.as_ref().is_some_and(|tls| !tls.verify) {
            warn!(
                upstream = upstream.name.as_str(),
                server = server.label().as_str(),
                "TLS verification is off for this server ({}): any certificate is accepted",
                server.syntax.verify_off()
            );
        }
    }
}

pub async fn resolve_address(address: &Address) -> std::io::Result<Vec<PeerTarget>> {
    match address {
        Address::Unix(path) => Ok(vec![PeerTarget::Unix(path.clone())]),
        Address::Inet { host, port } => {
            let mut targets: Vec<PeerTarget> = Vec::new();
            for addr in tokio::net::lookup_host((host.as_str(), *port)).await? {
                let target = PeerTarget::Tcp(addr);
                if !targets.contains(&target) {
                    targets.push(target);
                }
            }
            if targets.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the name has no addresses",
                ));
            }
            Ok(targets)
        }
    }
}

/// A peer picked for one connection attempt, counted active until it is
/// settled. Dropped unsettled (the client went away mid-connect), it is
/// released without counting a failure.
pub struct Attempt {
    upstream: Arc<Upstream>,
    index: usize,
    /// The peer's parameters as the group applies them, for the failure count.
    params: PeerParams,
    started: Instant,
    settled: bool,
}

impl Attempt {
    pub fn peer(&self) -> &Peer {
        &self.upstream.peers[self.index]
    }

    /// The peer's position in the group build the attempt came from.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The attempt failed for `reason`: counts towards max_fails.
    pub fn failed(mut self, reason: &str) {
        self.settled = true;
        let now = Instant::now();
        let was_failed = self.upstream.peer_state(self.index) == PeerState::Failed;
        self.peer().health.failed(&self.params, now);
        self.peer().stats.failed(reason);
        self.upstream.runtime.queue.slot_freed();
        // As nginx's "upstream server temporarily disabled": once per marking.
        if !was_failed && self.upstream.peer_state(self.index) == PeerState::Failed {
            let server = &self.peer().server;
            warn!(
                upstream = self.upstream.name.as_str(),
                peer = self.peer().label.as_str(),
                max_fails = server.max_fails,
                fail_timeout = %humantime::format_duration(server.fail_timeout),
                reason,
                "peer marked failed: not selected for fail_timeout"
            );
        }
    }

    /// The attempt connected: the peer stays active until the lease drops.
    pub fn succeeded(mut self) -> Lease {
        self.settled = true;
        let health = &self.peer().health;
        let recovered_before = health.recovered_at();
        health.connected(Instant::now());
        if health.recovered_at() != recovered_before {
            info!(
                upstream = self.upstream.name.as_str(),
                peer = self.peer().label.as_str(),
                "peer recovered: a connection to it succeeded after it was marked failed"
            );
        }
        self.peer().stats.connected(self.started.elapsed());
        Lease {
            upstream: Arc::clone(&self.upstream),
            index: self.index,
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.settled {
            self.peer().health.abandoned();
            self.upstream.runtime.queue.slot_freed();
        }
    }
}

/// A relayed connection's hold on its peer; dropping it releases the peer.
pub struct Lease {
    upstream: Arc<Upstream>,
    index: usize,
}

impl Lease {
    pub fn peer(&self) -> &Peer {
        &self.upstream.peers[self.index]
    }

    /// The group build the lease came from.
    pub fn group(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// The peer's position in the group build the lease came from.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.peer().health.closed();
        self.peer().stats.closed();
        self.upstream.runtime.queue.slot_freed();
    }
}

/// Starts every background task `config` asks for on the group `shared`.
/// Reload stops the old group's tasks and starts these for the new one.
pub fn start_tasks(config: &UpstreamConfig, shared: &SharedUpstream) -> Vec<UpstreamTask> {
    let mut tasks = Vec::new();
    if let Some(check) = &config.health_check {
        tasks.push(health_check::start(
            check.clone(),
            std::sync::Arc::clone(shared),
        ));
    }
    tasks.extend(resolve::start(config, shared));
    tasks.extend(agent_check::start(config, shared));
    tasks
}
