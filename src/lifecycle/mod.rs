//! Start-up, the signal loop and graceful shutdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

pub mod config_watch;
pub mod supervisor;
pub mod workers;

use crate::admin::{self, AdminBindError, AdminState};
use crate::config::{Config, ValueError};
use crate::metrics::{self, MetricsError};
use crate::net::listen::BindError;
use crate::proxy::ListenerContext;
use crate::tls::ClientTlsSettings;
use crate::upstream::runtime::Runtime;
use crate::upstream::state_file::{self, Seed};
use crate::upstream::{SharedUpstream, Upstream};
use config_watch::ConfigWatch;
use supervisor::{PrepareError, Supervisor};
use workers::Workers;

/// Why sluice could not start; each maps to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A value of the configuration that only fails when used, such as a host name that does not resolve: exit 1.
    #[error(transparent)]
    Config(ValueError),
    /// The OS refused a resource, such as an address in use: exit 2.
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot install a signal handler: {0}")]
    Signal(std::io::Error),
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
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
        let resolved = Upstream::resolve(upstream, None, Runtime::new(upstream))
            .await
            .map_err(|err| StartError::Config(err.into()))?;
        upstreams.insert(name.clone(), Arc::new(ArcSwap::from_pointee(resolved)));
    }
    Ok(upstreams)
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

impl From<PrepareError> for StartError {
    fn from(err: PrepareError) -> Self {
        match err {
            PrepareError::Config(err) => StartError::Config(err),
            PrepareError::Bind(err) => StartError::Bind(err),
        }
    }
}

/// Binds every listener and serves until SIGTERM or SIGINT, then drains. On
/// SIGHUP, `reload` gives the new configuration (SPEC §6); with `watch`, a
/// change of the configuration file's content raises SIGHUP.
/// Each relayed connection holds two descriptors (more while splicing), so
/// the common soft limit of 1,024 would cap sluice near 500 connections.
/// Like HAProxy, take what the hard limit allows.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct passed, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur >= limit.rlim_max
    {
        return;
    }
    let soft = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads the struct passed, which outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        info!(
            from = soft,
            to = limit.rlim_max,
            "raised the open-file limit"
        );
    } else {
        warn!(soft, hard = limit.rlim_max, reason = %std::io::Error::last_os_error(), "cannot raise the open-file limit");
    }
}

pub async fn run(
    config: Config,
    reload: impl Fn() -> Result<Config, String>,
    watch: Option<ConfigWatch>,
    worker_count: NonZeroUsize,
) -> Result<(), StartError> {
    raise_open_file_limit();
    let workers = Workers::start(worker_count).map_err(StartError::Workers)?;
    // Before the peers are built: they take their metric handles from it.
    let metrics = metrics::install()?;
    let mut terminate = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;
    // The admin endpoint comes first, so probes see 503 `starting` (not a
    // refused connection) while upstreams resolve and listeners bind.
    let admin = AdminState::new(metrics, BTreeMap::new());
    if let Some(admin_config) = &config.admin {
        admin::serve(&admin_config.bind, Arc::clone(&admin)).await?;
    }
    let seed = load_state_file(&config).await;
    let mut supervisor = Supervisor::start(config, workers.handles().to_vec(), &seed).await?;
    admin.set_upstreams(supervisor.upstreams());
    admin.set_listening();
    // Started after the SIGHUP handler is installed: it signals this process.
    let config_watch = watch.map(config_watch::spawn);

    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => reload_from(&mut supervisor, &admin, &reload).await,
        }
    }
    drop(config_watch);

    // Stop accepting at once, then give open connections shutdown_timeout.
    admin.set_draining();
    let open = supervisor.drain().await;
    if open > 0 {
        warn!(
            open_connections = open,
            "shutdown_timeout passed; closing the remaining connections"
        );
    }
    workers.shutdown();
    info!("stopped");
    Ok(())
}

/// The runtime changes of `[admin] state_file`; none without one.
async fn load_state_file(config: &Config) -> Seed {
    match config.admin.as_ref().and_then(|admin| admin.state_file.as_ref()) {
        Some(path) => state_file::load(path).await,
        None => Seed::new(),
    }
}

/// One reload: the new configuration is read and checked first; any error
/// leaves the running one untouched.
async fn reload_from(
    supervisor: &mut Supervisor,
    admin: &AdminState,
    reload: &impl Fn() -> Result<Config, String>,
) {
    info!("SIGHUP received: reloading the configuration");
    let config = match reload() {
        Ok(config) => config,
        Err(err) => {
            error!(reason = %err, "reload failed: the configuration is invalid; the running configuration stays");
            return;
        }
    };
    let admin_moved = config.admin != supervisor.config().admin;
    // The running [admin] settings hold: they change only at a restart.
    let seed = load_state_file(supervisor.config()).await;
    match supervisor.reload(config, &seed).await {
        Ok(summary) => {
            admin.set_upstreams(supervisor.upstreams());
            info!(changes = %summary, "configuration reloaded");
            if admin_moved {
                warn!("the [admin] settings changed: they apply at the next start, not on reload");
            }
        }
        Err(err) => {
            error!(reason = %err, "reload failed; the running configuration stays")
        }
    }
}
