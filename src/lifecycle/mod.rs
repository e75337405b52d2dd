//! Start-up, the signal loop and graceful shutdown.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

pub mod config_watch;
mod summary;
pub mod supervisor;
pub mod workers;

pub use summary::summary;

use crate::admin::api::ApiSettings;
use crate::admin::{self, AdminBindError, AdminState};
use crate::config::{Config, ValueError};
use crate::metrics::{self, MetricsError};
use crate::net::listen::BindError;
use crate::upstream::state_file::{self, Seed};
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
        let token = match &admin_config.token_file {
            Some(path) => Some(read_token(path).map_err(StartError::Config)?),
            None => None,
        };
        let settings = ApiSettings::new(&admin_config.bind, token, admin_config.state_file.clone());
        if settings.reachable_without_token() {
            warn!(address = %admin_config.bind, "the admin endpoint is reachable from other hosts and [admin] token_file is not set: runtime API writes are refused, reads (/status, /metrics, GET /api) are open to anyone who can connect");
        }
        admin.set_api_settings(settings);
        admin::serve(&admin_config.bind, Arc::clone(&admin)).await?;
    }
    let seed = load_state_file(&config).await;
    let mut supervisor = Supervisor::start(config, workers.handles().to_vec(), &seed).await?;
    admin.set_upstreams(supervisor.upstreams());
    admin.set_listeners(supervisor.listeners());
    admin.set_listening();
    // Started after the SIGHUP handler is installed: it signals this process.
    let config_watch = watch.map(config_watch::spawn);

    loop {
        tokio::select! {
            _ = terminate.recv() => {
                info!(timeout = %humantime::format_duration(supervisor.config().shutdown_timeout), "SIGTERM received: shutting down");
                break;
            }
            _ = interrupt.recv() => {
                info!(timeout = %humantime::format_duration(supervisor.config().shutdown_timeout), "SIGINT received: shutting down");
                break;
            }
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

/// What `--check` verifies of `[admin]` beyond parsing: the token file reads.
pub fn check_admin(config: &Config) -> Result<(), StartError> {
    match config
        .admin
        .as_ref()
        .and_then(|admin| admin.token_file.as_ref())
    {
        Some(path) => read_token(path).map(drop).map_err(StartError::Config),
        None => Ok(()),
    }
}

/// The largest `[admin] token_file` read.
const MAX_TOKEN_FILE: u64 = 4096;

/// The bearer token in `path`: its content without surrounding whitespace.
pub fn read_token(path: &std::path::Path) -> Result<String, ValueError> {
    use std::io::Read;
    let fail = |reason: String| {
        ValueError::Unplaced(format!("[admin] token_file {}: {reason}", path.display()))
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_TOKEN_FILE + 1).read_to_string(&mut text))
        .map_err(|err| fail(err.to_string()))?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(fail(format!("larger than {MAX_TOKEN_FILE} bytes")));
    }
    let token = text.trim();
    if token.is_empty() {
        return Err(fail("the file is empty".to_owned()));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(fail("the token must be one word".to_owned()));
    }
    Ok(token.to_owned())
}

/// The runtime changes of `[admin] state_file`; none without one.
async fn load_state_file(config: &Config) -> Seed {
    match config
        .admin
        .as_ref()
        .and_then(|admin| admin.state_file.as_ref())
    {
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
            admin.save_runtime_state();
            admin.set_listeners(supervisor.listeners());
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
