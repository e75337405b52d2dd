//! Background work that belongs to one upstream group (active health checks,
//! DNS re-resolution): a handle to stop it, so shutdown and reload can end
//! and restart it.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
