//! Closing every connection to a peer at once (`DELETE ?force=true`).
//!
//! Each relaying connection waits on its peer's signal for its whole life,
//! and its task is polled on every wake-up of the relay. A cancellation
//! token would take two locks on each of those polls; here the waker is
//! registered once and each later poll reads one atomic flag.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// Shared by a peer's builds, like its health.
#[derive(Clone, Default)]
pub struct ForceClose(Arc<Signal>);

impl std::fmt::Debug for ForceClose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForceClose")
            .field("closed", &self.0.closed.load(Ordering::Relaxed))
            .finish()
    }
}

#[derive(Default)]
struct Signal {
    closed: AtomicBool,
    notify: Notify,
}

impl ForceClose {
    /// Ends every connection waiting on this signal, now and later.
    pub fn close(&self) {
        // Set before the wake-up, so every task it wakes sees it.
        self.0.closed.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    /// Runs `work` to its end, or until the signal closes: then `None`.
    /// To be awaited by one task for its whole life, as a connection's
    /// relay is: the waker registered at the first poll must stay the
    /// task's.
    pub fn guard<F: Future>(&self, work: F) -> UntilClosed<'_, F> {
        UntilClosed {
            work,
            // Made before the flag is first read: a close between the two
            // is seen by one or the other.
            notified: self.0.notify.notified(),
            registered: false,
            closed: &self.0.closed,
        }
    }
}

pin_project! {
    /// See [`ForceClose::guard`].
    pub struct UntilClosed<'a, F> {
        #[pin]
        work: F,
        #[pin]
        notified: Notified<'a>,
        registered: bool,
        closed: &'a AtomicBool,
    }
}

impl<F: Future> Future for UntilClosed<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.work.poll(cx) {
            return Poll::Ready(Some(output));
        }
        // The first poll leaves the task's waker with the signal (a Pending
        // `Notified` has always stored it: it takes no part in tokio's
        // cooperative budget); a task's waker stays the same, so later
        // polls need not hand it over again.
        if !*this.registered {
            if this.notified.poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            *this.registered = true;
        }
        if this.closed.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::pending;
    use std::time::Duration;
    use tokio::sync::{mpsc, oneshot};
    use tokio::task::JoinHandle;

    /// Guarded work that tells when it was first polled, then waits for
    /// `wake` and after it forever. On the tests' single thread, the task
    /// has registered with the signal by the time the test hears of it.
    async fn guarded_work(signal: &ForceClose, wake: mpsc::Receiver<()>) -> JoinHandle<Option<()>> {
        let (polled_tx, polled_rx) = oneshot::channel();
        let signal = signal.clone();
        let task = tokio::spawn(async move {
            let mut wake = wake;
            signal
                .guard(async move {
                    let _ = polled_tx.send(());
                    let _ = wake.recv().await;
                    pending::<()>().await
                })
                .await
        });
        polled_rx.await.expect("the work was polled");
        task
    }

    /// A broken signal fails the test instead of hanging it.
    const DEADLINE: Duration = Duration::from_secs(10);

    async fn assert_ends_closed(task: JoinHandle<Option<()>>) {
        let ended = tokio::time::timeout(DEADLINE, task).await;
        assert!(matches!(ended, Ok(Ok(None))), "{ended:?}");
    }

    #[tokio::test]
    async fn work_that_ends_gives_its_output() {
        let signal = ForceClose::default();
        let ended = tokio::time::timeout(DEADLINE, signal.guard(async { 7 })).await;
        assert_eq!(ended, Ok(Some(7)));
    }

    #[tokio::test]
    async fn a_close_ends_work_that_already_waits() {
        let signal = ForceClose::default();
        let (_wake, wake_rx) = mpsc::channel(1);
        let task = guarded_work(&signal, wake_rx).await;
        signal.close();
        assert_ends_closed(task).await;
    }

    #[tokio::test]
    async fn work_started_after_a_close_ends_at_once() {
        let signal = ForceClose::default();
        signal.close();
        let ended = tokio::time::timeout(DEADLINE, signal.guard(pending::<()>())).await;
        assert_eq!(ended, Ok(None));
    }

    #[tokio::test]
    async fn work_woken_for_itself_after_registering_still_sees_a_close() {
        let signal = ForceClose::default();
        let (wake, wake_rx) = mpsc::channel(1);
        let task = guarded_work(&signal, wake_rx).await;
        // Woken by its own work, the task polls without the signal's
        // future; the close must still reach it.
        wake.send(()).await.expect("the task is alive");
        tokio::task::yield_now().await;
        signal.close();
        assert_ends_closed(task).await;
    }
}
