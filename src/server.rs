//! Start-up, the signal loop and graceful shutdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::proxy::listener::{accept_loop, bind, BindError};
use crate::proxy::ListenerContext;
use crate::upstream::{SharedUpstream, Upstream};

/// Why sluice could not start; each maps to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A value of the configuration that only fails when used, such as a host name that does not resolve: exit 1.
    #[error("{0}")]
    Config(String),
    /// The OS refused a resource, such as an address in use: exit 2.
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot install a signal handler: {0}")]
    Signal(std::io::Error),
}

/// Resolves every upstream of the configuration.
pub async fn resolve_upstreams(
    config: &Config,
) -> Result<BTreeMap<String, SharedUpstream>, StartError> {
    let mut upstreams = BTreeMap::new();
    for (name, upstream) in &config.upstreams {
        let resolved = Upstream::resolve(upstream, None)
            .await
            .map_err(StartError::Config)?;
        upstreams.insert(name.clone(), Arc::new(ArcSwap::from_pointee(resolved)));
    }
    Ok(upstreams)
}

/// What `--check` prints: the configuration as sluice will run it.
pub fn summary(config: &Config, upstreams: &BTreeMap<String, SharedUpstream>) -> String {
    let mut out = String::new();
    for listener in &config.listeners {
        let _ = writeln!(
            out,
            "listener {:?} on {} -> upstream {:?} (connect_timeout {}, idle_timeout {}, next_upstream_tries {}, next_upstream_timeout {})",
            listener.name,
            listener.bind,
            listener.upstream,
            humantime::format_duration(listener.connect_timeout),
            listener.idle_timeout.map_or("off".into(), |d| humantime::format_duration(d).to_string()),
            listener.next_upstream_tries,
            listener.next_upstream_timeout.map_or("off".into(), |d| humantime::format_duration(d).to_string()),
        );
    }
    for upstream in upstreams.values().map(|shared| shared.load()) {
        let _ = writeln!(
            out,
            "upstream {:?} balance {}",
            upstream.name,
            upstream.balance.name()
        );
        for peer in &upstream.peers {
            let server = &peer.server;
            let _ = writeln!(
                out,
                "  peer {:?} {} weight {} max_conns {} max_fails {} fail_timeout {}{}{}",
                peer.label,
                peer.target,
                server.weight,
                server.max_conns,
                server.max_fails,
                humantime::format_duration(server.fail_timeout),
                if server.backup { " backup" } else { "" },
                if server.down { " down" } else { "" },
            );
        }
    }
    out
}

/// Binds every listener, serves until SIGTERM or SIGINT, then drains.
pub async fn run(config: Config) -> Result<(), StartError> {
    let upstreams = resolve_upstreams(&config).await?;
    let mut terminate = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;

    let mut bound = Vec::with_capacity(config.listeners.len());
    for listener in &config.listeners {
        let socket = bind(&listener.name, &listener.bind, listener.unix_mode).await?;
        let context = Arc::new(ArcSwap::from_pointee(ListenerContext {
            config: listener.clone(),
            upstream: Arc::clone(&upstreams[&listener.upstream]),
        }));
        bound.push((socket, context));
    }

    let mut upstream_tasks = Vec::new();
    for upstream in config.upstreams.values() {
        upstream_tasks.extend(crate::upstream_task::start(
            upstream,
            &upstreams[&upstream.name],
        ));
    }

    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let accept_loops = TaskTracker::new();
    for (socket, context) in bound {
        accept_loops.spawn(accept_loop(
            socket,
            context,
            stop.clone(),
            connections.clone(),
        ));
    }
    accept_loops.close();

    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => warn!("SIGHUP received: live reload is not available in this build; the configuration is unchanged"),
        }
    }

    // Stop accepting at once, then give open connections shutdown_timeout.
    stop.cancel();
    for task in upstream_tasks {
        task.stop().await;
    }
    accept_loops.wait().await;
    connections.close();
    info!(open_connections = connections.len(), timeout = %humantime::format_duration(config.shutdown_timeout), "draining");
    if tokio::time::timeout(config.shutdown_timeout, connections.wait())
        .await
        .is_err()
    {
        warn!(
            open_connections = connections.len(),
            "shutdown_timeout passed; closing the remaining connections"
        );
    }
    info!("stopped");
    Ok(())
}
