//! DNS for `resolve = true` servers: lookups through hickory-resolver (the
//! upstream's `resolver` name servers, else the system's), and the task that
//! re-resolves them while sluice runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, TokioResolver};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::task::UpstreamTask;
use super::{SharedUpstream, Upstream};
use crate::config::{Address, UpstreamConfig};
use crate::net::PeerTarget;

/// Record TTLs shorter than this are read as this, so a TTL of 0 does not
/// make sluice query in a loop.
const MIN_TTL: Duration = Duration::from_secs(1);

/// The addresses a name resolved to, and how long the answer is valid.
#[derive(Debug)]
pub struct Resolution {
    pub targets: Vec<PeerTarget>,
    pub ttl: Duration,
}

fn resolver(name_servers: &[SocketAddr]) -> Result<TokioResolver, ResolveError> {
    let provider = TokioConnectionProvider::default();
    if name_servers.is_empty() {
        return Ok(TokioResolver::builder_tokio()?.build());
    }
    let mut config = ResolverConfig::new();
    for &addr in name_servers {
        config.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
        config.add_name_server(NameServerConfig::new(addr, Protocol::Tcp));
    }
    Ok(TokioResolver::builder_with_config(config, provider).build())
}

/// Looks `address` up in DNS. A fresh resolver per lookup: there is no cache
/// between sluice and the name servers to hide a change.
pub async fn lookup(address: &Address, name_servers: &[SocketAddr]) -> Result<Resolution, String> {
    let Address::Inet { host, port } = address else {
        return Err("only HOST:PORT addresses can be resolved".to_owned());
    };
    let answer = resolver(name_servers)
        .map_err(|err| err.to_string())?
        .lookup_ip(host.as_str())
        .await
        .map_err(|err| err.to_string())?;
    let mut targets: Vec<PeerTarget> = Vec::new();
    for ip in answer.iter() {
        let target = PeerTarget::Tcp(SocketAddr::new(ip, *port));
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    if targets.is_empty() {
        return Err("the name has no addresses".to_owned());
    }
    let ttl = answer
        .valid_until()
        .saturating_duration_since(Instant::now())
        .max(MIN_TTL);
    Ok(Resolution { targets, ttl })
}

/// Starts re-resolving the `resolve = true` servers of `config`, storing a
/// rebuilt group into `shared` whenever their addresses change; `None` when
/// no server asks for it.
pub fn start(config: &UpstreamConfig, shared: &SharedUpstream) -> Option<UpstreamTask> {
    if !config.servers.iter().any(|server| server.resolve) {
        return None;
    }
    let (config, shared) = (config.clone(), Arc::clone(shared));
    Some(UpstreamTask::spawn(move |stop| run(config, shared, stop)))
}

/// The time to the next lookup when nothing tells better: the shortest
/// `resolve_interval` of the group's re-resolved servers.
fn shortest_interval(config: &UpstreamConfig) -> Duration {
    config
        .servers
        .iter()
        .filter(|server| server.resolve)
        .map(|server| server.resolve_interval)
        .min()
        .unwrap_or(Duration::from_secs(5))
}

async fn run(config: UpstreamConfig, shared: SharedUpstream, stop: CancellationToken) {
    // The first round runs at once: it learns the records' TTL, which the
    // start-up resolution did not keep.
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let current = shared.load_full();
        let round = tokio::select! {
            () = stop.cancelled() => return,
            round = resolve_round(&config, &current) => round,
        };
        wait = round.next;
        let unchanged = config
            .servers
            .iter()
            .zip(&round.targets)
            .all(|(server, targets)| current.targets_of(server) == *targets);
        if unchanged {
            continue;
        }
        // Under the build lock, from the newest build: a runtime API change
        // stored meanwhile is kept.
        let runtime = Arc::clone(&current.runtime);
        let _build = runtime.build_lock();
        let current = shared.load_full();
        let rebuilt = match Upstream::assemble(
            &config,
            round.targets,
            Some(&current),
            Arc::clone(&current.runtime),
        ) {
            Ok(rebuilt) => rebuilt,
            Err(reason) => {
                warn!(upstream = config.name.as_str(), reason = %reason, "cannot rebuild the group after DNS re-resolution; keeping the last good addresses");
                continue;
            }
        };
        let labels = |group: &Upstream| -> Vec<String> {
            group.peers.iter().map(|peer| peer.label.clone()).collect()
        };
        let (old, new) = (labels(&current), labels(&rebuilt));
        let added: Vec<&String> = new.iter().filter(|label| !old.contains(label)).collect();
        let removed: Vec<&String> = old.iter().filter(|label| !new.contains(label)).collect();
        info!(upstream = config.name.as_str(), added = ?added, removed = ?removed, peers = new.len(), "DNS re-resolution changed the peers");
        // Connections already open keep the build they started with.
        shared.store(Arc::new(rebuilt));
    }
}

struct Round {
    /// Per server, in configuration order.
    targets: Vec<Vec<PeerTarget>>,
    next: Duration,
}

/// Looks up every re-resolved server; the others, and any whose lookup
/// fails, keep the addresses `current` has for them.
async fn resolve_round(config: &UpstreamConfig, current: &Upstream) -> Round {
    let mut targets = Vec::with_capacity(config.servers.len());
    let mut next: Option<Duration> = None;
    for server in &config.servers {
        if !server.resolve {
            targets.push(current.targets_of(server));
            continue;
        }
        let wait = match lookup(&server.address, &config.resolver).await {
            Ok(resolution) => {
                targets.push(resolution.targets);
                server.resolve_interval.min(resolution.ttl)
            }
            Err(reason) => {
                warn!(upstream = config.name.as_str(), server = %server.address, reason = %reason, "DNS re-resolution failed; keeping the last good addresses");
                targets.push(current.targets_of(server));
                server.resolve_interval
            }
        };
        next = Some(next.map_or(wait, |next| next.min(wait)));
    }
    Round {
        targets,
        next: next.unwrap_or_else(|| shortest_interval(config)),
    }
}
