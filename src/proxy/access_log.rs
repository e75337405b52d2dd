//! The access log: one line per client connection at its close, under the
//! tracing target `sluice::access` so it can be filtered on its own
//! (`RUST_LOG=info,sluice::access=off`). The line's timestamp is its time.

use std::fmt::{self, Write as _};
use std::time::Duration;

use tokio::time::Instant;

use crate::net::ClientAddr;

/// The tracing target of access-log lines.
pub const TARGET: &str = "sluice::access";

/// How one attempt on a peer ended.
pub enum TryOutcome {
    Connected,
    Failed(String),
}

/// Why a client connection closed.
pub enum Close<'a> {
    /// Both sides finished sending.
    Done,
    /// `idle_timeout` passed with no byte either way.
    Idle,
    ClientError(&'a (dyn fmt::Display + Sync)),
    UpstreamError(&'a (dyn fmt::Display + Sync)),
    /// No peer could take the connection.
    NoPeer(&'a (dyn fmt::Display + Sync)),
    /// Recycled at a quiet moment (SPEC §9), for this reason.
    Recycled(&'static str),
}

impl Close<'_> {
    fn keyword(&self) -> &'static str {
        match self {
            Close::Done => "done",
            Close::Idle => "idle_timeout",
            Close::ClientError(_) => "client_error",
            Close::UpstreamError(_) => "upstream_error",
            Close::NoPeer(_) => "no_peer",
            Close::Recycled(_) => "recycled",
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Close::Done | Close::Idle => None,
            Close::ClientError(why) | Close::UpstreamError(why) | Close::NoPeer(why) => {
                Some(why.to_string())
            }
            Close::Recycled(reason) => Some((*reason).to_owned()),
        }
    }
}

/// What the access log records of one client connection while it runs.
/// It lives as long as the connection, so an enabled record is kept on the
/// heap and a disabled one (`access_log = false`) is a null pointer: it
/// records, writes and holds nothing.
pub struct AccessRecord<'a>(Option<Box<Record<'a>>>);

struct Record<'a> {
    listener: &'a str,
    client: ClientAddr,
    upstream: &'a str,
    accepted: Instant,
    tries: String,
    connect_time: Option<Duration>,
}

impl<'a> AccessRecord<'a> {
    /// Starts the record when the client is accepted.
    pub fn new(
        enabled: bool,
        listener: &'a str,
        client: ClientAddr,
        upstream: &'a str,
        accepted: Instant,
    ) -> AccessRecord<'a> {
        AccessRecord(enabled.then(|| {
            Box::new(Record {
                listener,
                client,
                upstream,
                accepted,
                tries: String::new(),
                connect_time: None,
            })
        }))
    }

    /// Notes an attempt on peer `label`; a success also fixes the connect time.
    pub fn tried(&mut self, label: &str, outcome: TryOutcome) {
        let Some(record) = self.0.as_mut() else {
            return;
        };
        if !record.tries.is_empty() {
            record.tries.push_str(", ");
        }
        match outcome {
            TryOutcome::Connected => {
                let _ = write!(record.tries, "{label} connected");
                record.connect_time = Some(record.accepted.elapsed());
            }
            TryOutcome::Failed(reason) => {
                let _ = write!(record.tries, "{label} failed ({reason})");
            }
        }
    }

    /// Writes an interim line for a connection still open (the listener's
    /// `access_log_interval`): its bytes so far, `close = "open"`.
    pub fn interim(&self, peer: &str, sent: u64, received: u64) {
        self.write(peer, sent, received, "open", None);
    }

    /// Writes the line. `peer` is the peer relayed to, if any.
    pub fn finish(&self, peer: Option<&str>, sent: u64, received: u64, close: Close<'_>) {
        self.write(
            peer.unwrap_or("-"),
            sent,
            received,
            close.keyword(),
            close.detail(),
        );
    }

    fn write(&self, peer: &str, sent: u64, received: u64, close: &str, reason: Option<String>) {
        let Some(record) = self.0.as_ref() else {
            return;
        };
        tracing::info!(
            target: TARGET,
            listener = record.listener,
            client = %record.client,
            upstream = record.upstream,
            peer,
            tries = record.tries.as_str(),
            connect_ms = record.connect_time.map(millis),
            sent,
            received,
            duration_ms = millis(record.accepted.elapsed()),
            close,
            reason,
            "access"
        );
    }
}

/// Milliseconds with microsecond precision.
fn millis(duration: Duration) -> f64 {
    (duration.as_micros() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_list_every_attempt_in_order() {
        let mut access = AccessRecord::new(true, "l", ClientAddr::Unix, "u", Instant::now());
        access.tried("a", TryOutcome::Failed("connection refused".into()));
        access.tried("b", TryOutcome::Connected);
        let record = access.0.as_ref().expect("enabled");
        assert_eq!(record.tries, "a failed (connection refused), b connected");
        assert!(record.connect_time.is_some());

        let mut disabled = AccessRecord::new(false, "l", ClientAddr::Unix, "u", Instant::now());
        disabled.tried("a", TryOutcome::Connected);
        assert!(disabled.0.is_none());
    }

    #[test]
    fn close_keywords() {
        let why = "connection reset";
        assert_eq!(Close::Done.keyword(), "done");
        assert_eq!(Close::Done.detail(), None);
        assert_eq!(Close::Idle.keyword(), "idle_timeout");
        assert_eq!(Close::ClientError(&why).keyword(), "client_error");
        assert_eq!(
            Close::UpstreamError(&why).detail().as_deref(),
            Some("connection reset")
        );
        assert_eq!(Close::NoPeer(&why).keyword(), "no_peer");
        assert_eq!(Close::Recycled("age").keyword(), "recycled");
        assert_eq!(Close::Recycled("age").detail().as_deref(), Some("age"));
    }
}
