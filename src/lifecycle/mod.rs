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

use crate::admin::{self, AdminBindError, AdminState};
use crate::config::{Config, ValueError};
use crate::metrics::{self, MetricsError};
use crate::net::listen::BindError;
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
        admin::serve(&admin_config.bind, Arc::clone(&admin)).await?;
    }
    let mut supervisor = Supervisor::start(config, workers.handles().to_vec()).await?;
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
    match supervisor.reload(config).await {
        Ok(summary) => {
            admin.set_upstreams(supervisor.upstreams());
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
