//! An upstream group at run time: its resolved peers, the shared selector,
//! the leases connections hold on peers, and the group's background work
//! (health checks, DNS re-resolution).

pub mod agent_check;
pub mod health_check;
pub mod queue;
pub mod resolve;
pub mod runtime;
pub mod state_file;
pub mod stats;
pub mod task;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use std::time::Instant;

use crate::balancer::{PeerHealth, PeerParams, PeerState, Selector, Tried};
use crate::config::{Address, Balance, ConfigError, ServerConfig, UpstreamConfig};
use crate::net::PeerTarget;
use crate::tls::{self, TlsOrigin};
use runtime::Runtime;
use stats::{unavailable_counter, PeerStats};
use task::UpstreamTask;
use tokio_util::sync::CancellationToken;
use tracing::warn;

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
    /// Cancelled to close every connection to the peer at once (`DELETE
    /// ?force=true`); shared like `health`.
    pub close: CancellationToken,
}

impl Peer {
    /// Peers of two builds of a group are the same peer when they have the same
    /// label and address; such a peer keeps its health across the rebuild.
    fn same_as(&self, other: &Peer) -> bool {
        self.label == other.label && self.target == other.target
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
        for (server, targets) in runtime.servers(config, targets) {
            let server = &server;
            let tls = server_tls(&config.name, server)?;
            let effective = runtime.effective(server);
            // A re-resolved name always labels its peers by address, so a
            // peer keeps its label (and metrics) as the set grows and shrinks.
            let by_address = targets.len() > 1 || server.resolve;
            for target in targets {
                let label = if by_address {
                    format!("{}@{target}", server.label())
                } else {
                    server.label()
                };
                let mut peer = Peer {
                    stats: Arc::new(PeerStats::new(&config.name, &label)),
                    label,
                    target,
                    server: server.clone(),
                    tls: tls.clone(),
                    health: Arc::default(),
                    weight: effective.weight,
                    max_conns: effective.max_conns,
                    down: effective.down,
                    draining: effective.draining,
                    close: CancellationToken::new(),
                };
                if let Some(old) =
                    previous.and_then(|old| old.peers.iter().find(|old| old.same_as(&peer)))
                {
                    peer.health = Arc::clone(&old.health);
                    peer.stats = Arc::clone(&old.stats);
                    peer.close = old.close.clone();
                }
                peers.push(peer);
            }
        }
        Ok(Upstream::new(Arc::new(config.clone()), runtime, peers))
    }

    /// Whether a server of this label (its `name`, else its address as
    /// written) is in this build.
    pub fn has_server(&self, label: &str) -> bool {
        self.peers.iter().any(|peer| peer.server.label() == label)
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
        let identities: Vec<String> = peers.iter().map(|peer| peer.target.to_string()).collect();
        let selector = Selector::for_method(&config.balance, &identities, params, health);
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
        let index = self.selector().select(Instant::now(), tried, key)?;
        tried.insert(index);
        Some(Attempt {
            upstream: Arc::clone(self),
            index,
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
                "TLS verification is off for this server (verify = false): any certificate is accepted"
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
    started: Instant,
    settled: bool,
}

impl Attempt {
    pub fn peer(&self) -> &Peer {
        &self.upstream.peers[self.index]
    }

    /// The attempt failed for `reason`: counts towards max_fails.
    pub fn failed(mut self, reason: &str) {
        self.settled = true;
        self.peer().health.failed(Instant::now());
        self.peer().stats.failed(reason);
        self.upstream.runtime.queue.slot_freed();
    }

    /// The attempt connected: the peer stays active until the lease drops.
    pub fn succeeded(mut self) -> Lease {
        self.settled = true;
        self.peer().health.succeeded();
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
            self.peer().health.released();
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

    /// The peer's position in the group build the lease came from.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.peer().health.released();
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
