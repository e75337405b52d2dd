//! Next upstream: tries peers until one accepts, within
//! `next_upstream_tries` and `next_upstream_timeout` (SPEC §3). The loop is
//! written against [`Candidates`], so its limits are unit-tested with
//! paused time; the data path implements it over an upstream group.

use std::fmt;
use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::time::Instant;

/// The limits one client connection's attempts run under.
#[derive(Debug, Clone, Copy)]
pub struct RetryLimits {
    /// Per attempt: the connect and any TLS handshake.
    pub connect_timeout: Duration,
    /// `0`: every eligible peer once.
    pub tries: u32,
    /// For all attempts together; `None`: no limit.
    pub total: Option<Duration>,
}

/// Why an attempt did not give a connection.
#[derive(Debug)]
pub enum AttemptError {
    /// The peer failed (refused, timed out, handshake): counts against it.
    Failed(String),
    /// sluice itself could not open a socket: nobody else is tried.
    LocalResources(io::Error),
}

/// The peers one client connection may try, in the order the balancer gives.
pub trait Candidates {
    type Attempt;
    type Connection;

    /// The next peer to try, or `None` when no eligible peer is left.
    fn next(&mut self) -> Option<Self::Attempt>;

    /// Connects to the attempt's peer within `timeout`.
    fn connect(
        &mut self,
        attempt: &Self::Attempt,
        timeout: Duration,
    ) -> impl Future<Output = Result<Self::Connection, AttemptError>>;

    /// The attempt failed for `reason`; it is settled here.
    fn failed(&mut self, attempt: Self::Attempt, reason: &str);
}

/// Why no peer took a client connection.
#[derive(Debug)]
pub enum Unavailable {
    NoEligiblePeer,
    /// Every eligible peer was tried and failed; the last failure's reason.
    AllFailed {
        attempts: u32,
        last: String,
    },
    TriesExhausted(u32),
    TimeoutExhausted(Duration),
    /// sluice itself could not open a socket.
    LocalResources(io::Error),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::NoEligiblePeer => f.write_str("no eligible peer"),
            Unavailable::AllFailed { attempts: 1, last } => {
                write!(f, "the only eligible peer failed: {last}")
            }
            Unavailable::AllFailed { attempts, last } => {
                write!(f, "all {attempts} eligible peers failed; the last: {last}")
            }
            Unavailable::TriesExhausted(tries) => {
                write!(f, "next_upstream_tries ({tries}) used up")
            }
            Unavailable::TimeoutExhausted(timeout) => {
                write!(
                    f,
                    "next_upstream_timeout ({}) passed",
                    humantime::format_duration(*timeout)
                )
            }
            Unavailable::LocalResources(err) => write!(f, "cannot open a socket: {err}"),
        }
    }
}

/// Tries candidates until one connects; the winning attempt is returned
/// unsettled, with its connection.
pub async fn connect_first<C: Candidates>(
    candidates: &mut C,
    limits: RetryLimits,
) -> Result<(C::Attempt, C::Connection), Unavailable> {
    let started = Instant::now();
    let mut attempts = 0;
    let mut last_failure = None;
    loop {
        if limits.tries > 0 && attempts >= limits.tries {
            return Err(Unavailable::TriesExhausted(limits.tries));
        }
        let mut timeout = limits.connect_timeout;
        if let Some(total) = limits.total {
            let left = total.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(Unavailable::TimeoutExhausted(total));
            }
            timeout = timeout.min(left);
        }
        let Some(attempt) = candidates.next() else {
            return Err(match last_failure {
                Some(last) => Unavailable::AllFailed { attempts, last },
                None => Unavailable::NoEligiblePeer,
            });
        };
        attempts += 1;
        match candidates.connect(&attempt, timeout).await {
            Ok(connection) => return Ok((attempt, connection)),
            // Out of descriptors or memory for the whole attempt is sluice's
            // trouble, not the peer's: the attempt is dropped, not failed.
            Err(AttemptError::LocalResources(err)) => return Err(Unavailable::LocalResources(err)),
            Err(AttemptError::Failed(reason)) => {
                candidates.failed(attempt, &reason);
                last_failure = Some(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted peer: how long its connect takes and whether it accepts.
    #[derive(Clone, Copy)]
    enum Script {
        Accepts(Duration),
        Refuses(Duration),
        Hangs,
        OutOfDescriptors,
    }

    /// Peers offered in order, each once; what happened is recorded.
    struct Scripted {
        peers: Vec<Script>,
        next: usize,
        failed: Vec<(usize, String)>,
    }

    impl Scripted {
        fn new(peers: &[Script]) -> Self {
            Scripted {
                peers: peers.to_vec(),
                next: 0,
                failed: Vec::new(),
            }
        }
    }

    impl Candidates for Scripted {
        type Attempt = usize;
        type Connection = usize;

        fn next(&mut self) -> Option<usize> {
            let index = self.next;
            self.next += 1;
            (index < self.peers.len()).then_some(index)
        }

        async fn connect(
            &mut self,
            attempt: &usize,
            timeout: Duration,
        ) -> Result<usize, AttemptError> {
            let script = self.peers[*attempt];
            let work = async move {
                match script {
                    Script::Accepts(took) => {
                        tokio::time::sleep(took).await;
                        Ok(*attempt)
                    }
                    Script::Refuses(took) => {
                        tokio::time::sleep(took).await;
                        Err(AttemptError::Failed("connection refused".into()))
                    }
                    Script::Hangs => std::future::pending().await,
                    Script::OutOfDescriptors => Err(AttemptError::LocalResources(
                        io::Error::from_raw_os_error(libc::EMFILE),
                    )),
                }
            };
            match tokio::time::timeout(timeout, work).await {
                Ok(outcome) => outcome,
                Err(_) => Err(AttemptError::Failed("timed out".into())),
            }
        }

        fn failed(&mut self, attempt: usize, reason: &str) {
            self.failed.push((attempt, reason.to_owned()));
        }
    }

    const MS: Duration = Duration::from_millis(1);

    fn limits(tries: u32, total: Option<Duration>) -> RetryLimits {
        RetryLimits {
            connect_timeout: 100 * MS,
            tries,
            total,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_peers_are_passed_over_until_one_accepts() {
        let mut peers =
            Scripted::new(&[Script::Refuses(MS), Script::Hangs, Script::Accepts(5 * MS)]);
        let started = Instant::now();
        let (attempt, _) = connect_first(&mut peers, limits(0, None)).await.unwrap();
        assert_eq!(attempt, 2);
        assert_eq!(
            peers.failed,
            vec![(0, "connection refused".into()), (1, "timed out".into())]
        );
        // 1 ms refused, 100 ms connect_timeout, 5 ms connect.
        assert_eq!(started.elapsed(), 106 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn next_upstream_tries_caps_the_attempts() {
        let mut peers = Scripted::new(&[
            Script::Refuses(MS),
            Script::Refuses(MS),
            Script::Accepts(MS),
        ]);
        let err = connect_first(&mut peers, limits(2, None))
            .await
            .unwrap_err();
        assert!(matches!(err, Unavailable::TriesExhausted(2)), "{err}");
        assert_eq!(peers.failed.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn next_upstream_timeout_shortens_the_last_attempt_and_ends_the_loop() {
        let mut peers = Scripted::new(&[Script::Hangs, Script::Hangs, Script::Accepts(MS)]);
        let started = Instant::now();
        let err = connect_first(&mut peers, limits(0, Some(150 * MS)))
            .await
            .unwrap_err();
        assert!(matches!(err, Unavailable::TimeoutExhausted(_)), "{err}");
        // The second attempt gets only the 50 ms left of the total.
        assert_eq!(started.elapsed(), 150 * MS);
        assert_eq!(peers.failed.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn every_peer_failing_names_the_last_reason() {
        let mut peers = Scripted::new(&[Script::Hangs, Script::Refuses(MS)]);
        let err = connect_first(&mut peers, limits(0, None))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "all 2 eligible peers failed; the last: connection refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_eligible_peer_is_told_apart_from_failures() {
        let mut peers = Scripted::new(&[]);
        let err = connect_first(&mut peers, limits(0, None))
            .await
            .unwrap_err();
        assert!(matches!(err, Unavailable::NoEligiblePeer), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn running_out_of_descriptors_stops_without_failing_the_peer() {
        let mut peers = Scripted::new(&[Script::OutOfDescriptors, Script::Accepts(MS)]);
        let err = connect_first(&mut peers, limits(0, None))
            .await
            .unwrap_err();
        assert!(matches!(err, Unavailable::LocalResources(_)), "{err}");
        assert!(peers.failed.is_empty());
    }
}
