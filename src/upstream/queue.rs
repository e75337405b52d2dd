//! The queue of clients waiting for a free slot when every peer of a group
//! is at `max_conns` (SPEC §11). First in, first out: a freed slot wakes the
//! client at the head, and while anyone waits (or a woken client is still
//! taking its slot) new clients queue behind them instead of overtaking.
//! A waiting client's bytes stay unread in its socket, so nothing it sent is
//! lost when it is finally relayed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use metrics::Gauge;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::metrics::names;

/// One upstream's waiting clients; shared by every build of the group.
#[derive(Debug)]
pub struct Queue {
    waiters: Mutex<VecDeque<Waiter>>,
    /// The deque's length, read without its lock on every released slot.
    waiting: AtomicUsize,
    /// Woken clients that have not yet taken (or given up) their slot.
    turns: AtomicUsize,
    next_id: AtomicU64,
    /// `sluice_upstream_queued{upstream}`.
    queued: Gauge,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    wake: oneshot::Sender<()>,
}

/// Why a client left the queue without a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// `queue` clients were waiting already.
    Full,
    /// `queue_timeout` passed.
    TimedOut,
}

impl std::fmt::Display for QueueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QueueError::Full => "every peer is at max_conns and the queue is full",
            QueueError::TimedOut => "every peer is at max_conns and queue_timeout passed",
        })
    }
}

/// Where a client joins the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A new client.
    Back,
    /// A woken client that found no free slot after all keeps its place.
    Front,
}

impl Queue {
    pub fn new(upstream: &str) -> Queue {
        Queue {
            waiters: Mutex::default(),
            waiting: AtomicUsize::new(0),
            turns: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            queued: metrics::gauge!(names::UPSTREAM_QUEUED, "upstream" => upstream.to_owned()),
        }
    }

    fn waiters(&self) -> MutexGuard<'_, VecDeque<Waiter>> {
        // Every update leaves the deque whole.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Clients waiting now.
    pub fn len(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Called with the deque locked after each change of its length.
    fn set_len(&self, len: usize) {
        self.waiting.store(len, Ordering::SeqCst);
        self.queued.set(len as f64);
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a new client must queue behind others to keep the order.
    pub fn is_busy(&self) -> bool {
        self.turns.load(Ordering::SeqCst) > 0 || !self.is_empty()
    }

    /// A slot may have freed (a connection ended, the group changed): the
    /// client at the head is woken to try for it.
    pub fn slot_freed(&self) {
        if self.is_empty() {
            return;
        }
        let mut waiters = self.waiters();
        while let Some(waiter) = waiters.pop_front() {
            self.set_len(waiters.len());
            // The turn is counted before the wake, so the woken client's
            // drop of it always finds it counted.
            self.turns.fetch_add(1, Ordering::SeqCst);
            if waiter.wake.send(()).is_ok() {
                return;
            }
            // That client gave up in the meantime; its guard saw it gone.
            self.turns.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Waits at `place` until a slot frees, at most until `deadline`, with
    /// at most `limit` clients waiting. The [`Turn`] returned must be kept
    /// while the client tries for the slot.
    pub async fn wait(
        self: &Arc<Self>,
        limit: u32,
        deadline: Instant,
        place: Place,
    ) -> Result<Turn, QueueError> {
        let (wake, woken) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut waiters = self.waiters();
            if place == Place::Back && waiters.len() >= limit as usize {
                return Err(QueueError::Full);
            }
            let waiter = Waiter { id, wake };
            match place {
                Place::Back => waiters.push_back(waiter),
                Place::Front => waiters.push_front(waiter),
            }
            self.set_len(waiters.len());
        }
        let mut waiting = Waiting {
            queue: self,
            id,
            woken: false,
        };
        match tokio::time::timeout_at(deadline, woken).await {
            Ok(Ok(())) => {
                waiting.woken = true;
                Ok(Turn {
                    queue: Arc::clone(self),
                    wake_next: true,
                })
            }
            // The sender is dropped only by `slot_freed`, after a send.
            Ok(Err(_)) | Err(_) => Err(QueueError::TimedOut),
        }
    }
}

/// A client in the queue; dropped without being woken (timeout, the task
/// ended), it leaves the queue, and passes on a wake it raced with.
struct Waiting<'q> {
    queue: &'q Queue,
    id: u64,
    woken: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.woken {
            return;
        }
        let mut waiters = self.queue.waiters();
        if let Some(position) = waiters.iter().position(|waiter| waiter.id == self.id) {
            waiters.remove(position);
            self.queue.set_len(waiters.len());
        } else {
            // Woken as it gave up: its turn passes to the next client.
            drop(waiters);
            self.queue.turns.fetch_sub(1, Ordering::SeqCst);
            self.queue.slot_freed();
        }
    }
}

/// A woken client trying for its slot. Dropped, the next client is woken
/// if any waits: more than one slot may have freed.
#[derive(Debug)]
pub struct Turn {
    queue: Arc<Queue>,
    wake_next: bool,
}

impl Turn {
    /// The client found no free slot after all and waits again at the
    /// front: nobody else is woken for a slot that is not there.
    pub fn give_back(mut self) {
        self.wake_next = false;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.queue.turns.fetch_sub(1, Ordering::SeqCst);
        if self.wake_next && !self.queue.is_empty() {
            self.queue.slot_freed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn first_in_is_first_woken_and_the_limit_holds() {
        let queue = Arc::new(Queue::new("pool"));
        let first = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { queue.wait(2, far(), Place::Back).await }
        });
        while queue.is_empty() {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { queue.wait(2, far(), Place::Back).await }
        });
        while queue.len() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            queue.wait(2, far(), Place::Back).await.unwrap_err(),
            QueueError::Full
        );
        queue.slot_freed();
        let turn = first.await.unwrap().unwrap();
        assert!(!second.is_finished());
        assert!(queue.is_busy());
        // Dropping the turn wakes the next client.
        drop(turn);
        let turn = second.await.unwrap().unwrap();
        drop(turn);
        assert!(!queue.is_busy());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_leaves_at_its_deadline() {
        let queue = Arc::new(Queue::new("pool"));
        let deadline = Instant::now() + Duration::from_secs(2);
        let err = queue.wait(5, deadline, Place::Back).await.unwrap_err();
        assert_eq!(err, QueueError::TimedOut);
        assert!(!queue.is_busy());
    }
}
