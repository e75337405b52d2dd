//! The threads that relay: one single-threaded runtime per worker, each with
//! its own event loop and timers. A connection lives on the worker that
//! accepted it, from accept to close, so its wake-ups never cross threads
//! (a shared work-stealing pool does, at a cost measured in
//! docs/BENCHMARKS.md). The control plane (signals,
//! reloads, admin, health checks, DNS) runs on the main thread's runtime.

use std::io;
use std::num::NonZeroUsize;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` worker threads, each running its own runtime until
    /// [`Workers::shutdown`].
    pub fn start(count: NonZeroUsize) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: Vec::with_capacity(count.get()),
            threads: Vec::with_capacity(count.get()),
            stop: stop.clone(),
        };
        for index in 0..count.get() {
            let (handle_tx, handle_rx) = mpsc::sync_channel(1);
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sluice-worker-{index}"))
                .spawn(move || {
                    let runtime = match Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(err) => {
                            let _ = handle_tx.send(Err(err));
                            return;
                        }
                    };
                    if handle_tx.send(Ok(runtime.handle().clone())).is_err() {
                        return;
                    }
                    runtime.block_on(stop.cancelled());
                    // Connections still open are closed as their tasks drop.
                    runtime.shutdown_background();
                })?;
            workers.threads.push(thread);
            let handle = handle_rx.recv().map_err(|_| {
                io::Error::other(format!("worker thread {index} ended before starting"))
            })??;
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// The workers' runtimes, each to be given its share of every listener.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Stops every worker, closing the connections still open on them.
    pub fn shutdown(mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Workers {
    /// A start-up that fails after the workers started still stops them.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One worker per core the process may use (affinity and cgroup CPU quota
/// count), unless told otherwise.
pub fn default_count() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_tasks_on_its_own_thread() {
        let workers =
            Workers::start(NonZeroUsize::new(2).expect("2 is not zero")).expect("workers start");
        let names: Vec<String> = workers
            .handles()
            .iter()
            .map(|handle| {
                let (tx, rx) = mpsc::channel();
                handle.spawn(async move {
                    let name = std::thread::current().name().map(str::to_owned);
                    let _ = tx.send(name);
                });
                rx.recv()
                    .expect("the task ran")
                    .expect("worker threads are named")
            })
            .collect();
        assert_eq!(names, ["sluice-worker-0", "sluice-worker-1"]);
        workers.shutdown();
    }
}
