//! Background work that belongs to one upstream group (active health checks,
//! DNS re-resolution): a handle to stop it, so shutdown and reload can end
//! and restart it.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::UpstreamConfig;
use crate::upstream::SharedUpstream;

/// A running background task of one upstream.
pub struct UpstreamTask {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl UpstreamTask {
    /// Spawns `work`, which must return soon after `stop` is cancelled.
    pub fn spawn<F, W>(work: W) -> UpstreamTask
    where
        W: FnOnce(CancellationToken) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(work(stop.clone()));
        UpstreamTask { stop, task }
    }

    /// Stops the task and waits until it has ended.
    pub async fn stop(self) {
        self.stop.cancel();
        // A task that panicked has ended too; the panic was already reported.
        let _ = self.task.await;
    }
}

/// Starts every background task `config` asks for on the group `shared`.
/// Reload stops the old group's tasks and starts these for the new one.
pub fn start(config: &UpstreamConfig, shared: &SharedUpstream) -> Vec<UpstreamTask> {
    let mut tasks = Vec::new();
    if let Some(check) = &config.health_check {
        tasks.push(crate::health_check::start(
            check.clone(),
            std::sync::Arc::clone(shared),
        ));
    }
    tasks.extend(crate::resolver::start(config, shared));
    tasks
}
