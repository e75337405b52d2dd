//! Active health checks: every `interval`, each peer of the group's current
//! build is connected to (and sent `send`, and expected to answer with
//! `expect`) within `timeout`; results feed [`PeerHealth::check_result`].
//!
//! [`PeerHealth::check_result`]: crate::balancer::PeerHealth::check_result

use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::task::UpstreamTask;
use super::{Peer, SharedUpstream, Upstream};
use crate::balancer::CheckTransition;
use crate::config::HealthCheckConfig;
use crate::net::connect::connect_peer;
use crate::net::Stream;

/// Starts checking the peers of `shared`, following it across rebuilds.
pub fn start(config: HealthCheckConfig, shared: SharedUpstream) -> UpstreamTask {
    UpstreamTask::spawn(move |stop| run(config, shared, stop))
}

async fn run(config: HealthCheckConfig, shared: SharedUpstream, stop: CancellationToken) {
    let config = Arc::new(config);
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = check_round(&config, shared.load_full()) => {}
        }
    }
}

/// Checks every peer of one build at once and records the results.
async fn check_round(config: &Arc<HealthCheckConfig>, group: Arc<Upstream>) {
    let mut checks = JoinSet::new();
    for index in 0..group.peers.len() {
        // A peer marked down is never used, so it is not checked either; a
        // draining one may come back, so its health is kept known.
        let peer = &group.peers[index];
        if peer.down && !peer.draining {
            continue;
        }
        let (config, group) = (Arc::clone(config), Arc::clone(&group));
        checks.spawn(async move {
            let peer = &group.peers[index];
            let outcome = check(peer, &config).await;
            record(&group, peer, &config, outcome);
        });
    }
    while checks.join_next().await.is_some() {}
}

fn record(group: &Upstream, peer: &Peer, config: &HealthCheckConfig, outcome: Result<(), String>) {
    let upstream = group.name.as_str();
    let label = peer.label.as_str();
    let transition =
        peer.health
            .check_result(outcome.is_ok(), config.fails, config.passes, Instant::now());
    match (transition, outcome) {
        (Some(CheckTransition::BecameUnhealthy), Err(reason)) => {
            warn!(upstream, peer = label, address = %peer.target, reason = %reason, fails = config.fails, "health check: peer is unhealthy")
        }
        (Some(CheckTransition::BecameHealthy), _) => {
            info!(upstream, peer = label, address = %peer.target, passes = config.passes, "health check: peer is healthy again")
        }
        (_, Err(reason)) => {
            debug!(upstream, peer = label, reason = %reason, "health check failed")
        }
        (_, Ok(())) => {}
    }
}

/// One check of one peer, bounded by `timeout` as a whole.
async fn check(peer: &Peer, config: &HealthCheckConfig) -> Result<(), String> {
    match tokio::time::timeout(config.timeout, exchange(peer, config)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(config.timeout)
        )),
    }
}

async fn exchange(peer: &Peer, config: &HealthCheckConfig) -> Result<(), String> {
    let mut stream = open(peer).await.map_err(|err| format!("connect: {err}"))?;
    if let Some(send) = &config.send {
        stream
            .write_all(send)
            .await
            .map_err(|err| format!("send: {err}"))?;
    }
    if let Some(expect) = &config.expect {
        let mut reply = vec![0; expect.len()];
        let mut received = 0;
        while received < reply.len() {
            let read = stream
                .read(&mut reply[received..])
                .await
                .map_err(|err| format!("receive: {err}"))?;
            if read == 0 {
                return Err(format!("closed after {received} bytes of the reply"));
            }
            received += read;
            if !expect.starts_with(&reply[..received]) {
                break;
            }
        }
        if &reply[..received] != expect.as_slice() {
            return Err(format!(
                "reply {:?} does not start with {:?}",
                String::from_utf8_lossy(&reply[..received]),
                String::from_utf8_lossy(expect)
            ));
        }
    }
    Ok(())
}

/// Connects to the peer exactly as client connections do (TLS included, for
/// servers with TLS), so a check covers what they depend on. No PROXY header:
/// a check has no client to describe.
async fn open(peer: &Peer) -> std::io::Result<Stream> {
    connect_peer(&peer.target, peer.tls.as_ref(), &[], false).await
}
