//! Failed TLS handshakes of a listener's clients: each is counted by kind
//! in `sluice_listener_tls_handshake_errors_total{listener,reason}`, and
//! logged at most once a minute per listener and kind, with how many were
//! not logged since the previous line. A client that repeats a protocol
//! mistake on every connection would otherwise write a line per connection.

use std::fmt;
use std::io;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::metrics::names;

/// At most one line per listener and kind in this time.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What went wrong, coarsely: the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No finished handshake within the listener's `connect_timeout`.
    Timeout,
    /// The client closed or reset the connection during the handshake.
    Closed,
    /// The client ended the handshake with an alert (typically: it does not
    /// trust sluice's certificate).
    Alert,
    /// `client_ca_file` is set and the client sent no certificate.
    ClientCertificateMissing,
    /// `client_ca_file` is set and the client's certificate is not trusted
    /// (or not valid for client authentication).
    ClientCertificateRefused,
    /// Anything else the client sent that is not valid TLS, or not a
    /// protocol version, cipher suite or extension sluice accepts.
    Protocol,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Timeout,
        Kind::Closed,
        Kind::Alert,
        Kind::ClientCertificateMissing,
        Kind::ClientCertificateRefused,
        Kind::Protocol,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Timeout => "timeout",
            Kind::Closed => "closed",
            Kind::Alert => "alert",
            Kind::ClientCertificateMissing => "client_certificate_missing",
            Kind::ClientCertificateRefused => "client_certificate_refused",
            Kind::Protocol => "protocol",
        }
    }
}

/// One client's failed handshake.
#[derive(Debug)]
pub struct HandshakeError {
    pub kind: Kind,
    /// For the log and the access log.
    pub message: String,
}

impl HandshakeError {
    pub fn timed_out(timeout: Duration) -> HandshakeError {
        HandshakeError {
            kind: Kind::Timeout,
            message: format!(
                "no TLS handshake within {}",
                humantime::format_duration(timeout)
            ),
        }
    }

    /// Sorts an error of the acceptor: rustls's errors travel inside the
    /// I/O error; any other I/O error means the connection itself failed.
    pub fn from_io(err: &io::Error) -> HandshakeError {
        let tls = err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let kind = match tls {
            None => Kind::Closed,
            Some(rustls::Error::AlertReceived(_)) => Kind::Alert,
            Some(rustls::Error::NoCertificatesPresented) => Kind::ClientCertificateMissing,
            Some(rustls::Error::InvalidCertificate(_)) => Kind::ClientCertificateRefused,
            Some(_) => Kind::Protocol,
        };
        HandshakeError {
            kind,
            message: err.to_string(),
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The counters and log limits of one listener's handshakes.
pub struct HandshakeErrors {
    kinds: [KindState; Kind::ALL.len()],
}

struct KindState {
    counter: metrics::Counter,
    window: Mutex<LogWindow>,
}

#[derive(Default)]
struct LogWindow {
    last_logged: Option<Instant>,
    not_logged: u64,
}

impl HandshakeErrors {
    /// Registers the listener's counters, at 0 for every kind.
    pub fn new(listener: &str) -> HandshakeErrors {
        HandshakeErrors {
            kinds: Kind::ALL.map(|kind| KindState {
                counter: metrics::counter!(
                    names::LISTENER_TLS_HANDSHAKE_ERRORS_TOTAL,
                    "listener" => listener.to_owned(),
                    "reason" => kind.label()
                ),
                window: Mutex::default(),
            }),
        }
    }

    /// Counts the failure and logs it if this listener has logged none of
    /// its kind in the last [`LOG_INTERVAL`].
    pub fn record(
        &self,
        error: &HandshakeError,
        listener: &str,
        upstream: &str,
        client: &dyn fmt::Display,
    ) {
        if let Some(not_logged) = self.admit(error.kind) {
            warn!(listener, upstream, client = %client, kind = error.kind.label(), reason = %error, not_logged, "client turned away: TLS handshake failed");
        }
    }

    /// Counts one failure of `kind`; `Some(failures not logged since the
    /// last line)` when this one is to be logged.
    fn admit(&self, kind: Kind) -> Option<u64> {
        let state = &self.kinds[kind as usize];
        state.counter.increment(1);
        // A panic elsewhere cannot leave the two fields inconsistent.
        let mut window = state.window.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match window.last_logged {
            Some(last) if now.duration_since(last) < LOG_INTERVAL => {
                window.not_logged += 1;
                None
            }
            _ => {
                window.last_logged = Some(now);
                Some(std::mem::take(&mut window.not_logged))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_a_minute_per_kind_with_the_count_not_logged() {
        let errors = HandshakeErrors::new("front");
        assert_eq!(errors.admit(Kind::Protocol), Some(0));
        for _ in 0..49 {
            assert_eq!(errors.admit(Kind::Protocol), None);
        }
        // Another kind has its own minute.
        assert_eq!(errors.admit(Kind::Timeout), Some(0));
        tokio::time::advance(LOG_INTERVAL - Duration::from_millis(1)).await;
        assert_eq!(errors.admit(Kind::Protocol), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(errors.admit(Kind::Protocol), Some(50));
        assert_eq!(errors.admit(Kind::Protocol), None);
    }

    #[test]
    fn kinds_index_their_own_state() {
        for (index, kind) in Kind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, index);
        }
    }

    #[test]
    fn io_errors_are_sorted_by_the_tls_error_inside() {
        let tls = |err: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, err);
        let cases = [
            (io::Error::from(io::ErrorKind::UnexpectedEof), Kind::Closed),
            (
                io::Error::from(io::ErrorKind::ConnectionReset),
                Kind::Closed,
            ),
            (
                tls(rustls::Error::AlertReceived(
                    rustls::AlertDescription::UnknownCA,
                )),
                Kind::Alert,
            ),
            (
                tls(rustls::Error::NoCertificatesPresented),
                Kind::ClientCertificateMissing,
            ),
            (
                tls(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                )),
                Kind::ClientCertificateRefused,
            ),
            (
                tls(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                Kind::Protocol,
            ),
        ];
        for (err, kind) in cases {
            assert_eq!(HandshakeError::from_io(&err).kind, kind, "{err}");
        }
    }
}
