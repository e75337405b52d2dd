//! Start-up, the signal loop and graceful shutdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{self, AdminBindError, AdminState};
use crate::config::{Config, UpstreamConfig};
use crate::config_watch::{self, ConfigWatch};
use crate::metrics::{self, MetricsError};
use crate::proxy::listener::{accept_loop, bind, BindError};
use crate::proxy::ListenerContext;
use crate::tls::ClientTlsSettings;
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
    /// The admin endpoint's address could not be bound: exit 2.
    #[error(transparent)]
    Admin(#[from] AdminBindError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
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
        warn_unverified_tls(upstream);
        upstreams.insert(name.clone(), Arc::new(ArcSwap::from_pointee(resolved)));
    }
    Ok(upstreams)
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

/// One context per listener, in configuration order; reads the listeners'
/// TLS files, so an unusable one is a configuration error.
pub fn listener_contexts(
    config: &Config,
    upstreams: &BTreeMap<String, SharedUpstream>,
) -> Result<Vec<ListenerContext>, StartError> {
    config
        .listeners
        .iter()
        .map(|listener| {
            ListenerContext::new(listener.clone(), Arc::clone(&upstreams[&listener.upstream]))
                .map_err(StartError::Config)
        })
        .collect()
}

/// What `--check` prints: the configuration as sluice will run it.
pub fn summary(config: &Config, upstreams: &BTreeMap<String, SharedUpstream>) -> String {
    let mut out = String::new();
    if let Some(admin) = &config.admin {
        let _ = writeln!(out, "admin endpoint on {}", admin.bind);
    }
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
        if let Some(tls) = &listener.tls {
            let _ = writeln!(
                out,
                "  tls termination cert_file {} key_file {} client_ca_file {}",
                tls.cert_file.display(),
                tls.key_file.display(),
                tls.client_ca_file
                    .as_ref()
                    .map_or("none (no client certificates)".into(), |p| p
                        .display()
                        .to_string()),
            );
        }
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
            if let Some(tls) = &server.tls {
                let _ = writeln!(out, "    tls {}", describe_client_tls(tls));
            }
            if !server.plugin_keys.is_empty() {
                let keys: Vec<String> = server
                    .plugin_keys
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect();
                let _ = writeln!(out, "    kept, not used: {}", keys.join(" "));
            }
        }
    }
    out
}

fn describe_client_tls(tls: &ClientTlsSettings) -> String {
    let mut text = format!("verify {}", if tls.verify { "on" } else { "off" });
    if let Some(name) = &tls.server_name {
        let _ = write!(text, " server_name {name}");
    }
    let files = [
        ("ca_file", &tls.ca_file),
        ("ca_path", &tls.ca_path),
        ("cert_file", &tls.cert_file),
        ("key_file", &tls.key_file),
    ];
    for (key, path) in files {
        if let Some(path) = path {
            let _ = write!(text, " {key} {}", path.display());
        }
    }
    if tls.verify && tls.ca_file.is_none() && tls.ca_path.is_none() {
        text.push_str(" (system trust roots)");
    }
    text
}

/// Binds every listener, serves until SIGTERM or SIGINT, then drains. With
/// `watch`, a change of the configuration file's content raises SIGHUP.
pub async fn run(config: Config, watch: Option<ConfigWatch>) -> Result<(), StartError> {
    // Before the peers are built: they take their metric handles from it.
    let metrics = metrics::install()?;
    let upstreams = resolve_upstreams(&config).await?;
    let contexts = listener_contexts(&config, &upstreams)?;
    let admin = AdminState::new(metrics, upstreams.clone());
    if let Some(admin_config) = &config.admin {
        admin::serve(&admin_config.bind, Arc::clone(&admin)).await?;
    }
    let mut terminate = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;

    let mut bound = Vec::with_capacity(config.listeners.len());
    for context in contexts {
        let listener = &context.config;
        let socket = bind(&listener.name, &listener.bind, listener.unix_mode).await?;
        bound.push((socket, Arc::new(ArcSwap::from_pointee(context))));
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
    admin.set_listening();
    // Started after the SIGHUP handler is installed: it signals this process.
    let config_watch = watch.map(config_watch::spawn);

    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => warn!("SIGHUP received: live reload is not available in this build; the configuration is unchanged"),
        }
    }
    drop(config_watch);

    // Stop accepting at once, then give open connections shutdown_timeout.
    admin.set_draining();
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
