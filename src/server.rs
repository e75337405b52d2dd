//! Start-up, the signal loop and graceful shutdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::proxy::listener::BindError;
use crate::supervisor::{PrepareError, Supervisor};
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

/// Binds every listener and serves until SIGTERM or SIGINT, then drains. On
/// SIGHUP, `reload` gives the new configuration (SPEC §6).
pub async fn run(
    config: Config,
    reload: impl Fn() -> Result<Config, String>,
) -> Result<(), StartError> {
    let mut terminate = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;
    let mut supervisor = Supervisor::start(config).await.map_err(|err| match err {
        PrepareError::Config(message) => StartError::Config(message),
        PrepareError::Bind(err) => StartError::Bind(err),
    })?;

    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => reload_from(&mut supervisor, &reload).await,
        }
    }

    // Stop accepting at once, then give open connections shutdown_timeout.
    let open = supervisor.drain().await;
    if open > 0 {
        warn!(
            open_connections = open,
            "shutdown_timeout passed; closing the remaining connections"
        );
    }
    info!("stopped");
    Ok(())
}

/// One reload: the new configuration is read and checked first; any error
/// leaves the running one untouched.
async fn reload_from(supervisor: &mut Supervisor, reload: &impl Fn() -> Result<Config, String>) {
    info!("SIGHUP received: reloading the configuration");
    let config = match reload() {
        Ok(config) => config,
        Err(err) => {
            error!(reason = %err, "reload failed: the configuration is invalid; the running configuration stays");
            return;
        }
    };
    match supervisor.reload(config).await {
        Ok(summary) => info!(changes = %summary, "configuration reloaded"),
        Err(err) => {
            error!(reason = %err, "reload failed; the running configuration stays")
        }
    }
}
