//! The Prometheus recorder behind the `metrics` facade: metric names (SPEC
//! §5), their help text and histogram buckets. Rendering is done by the
//! admin endpoint; the recorder has no listener of its own.

use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Every metric sluice exports.
pub mod names {
    pub const LISTENER_CONNECTIONS_TOTAL: &str = "sluice_listener_connections_total";
    pub const LISTENER_CONNECTIONS_ACTIVE: &str = "sluice_listener_connections_active";
    pub const LISTENER_TLS_HANDSHAKE_ERRORS_TOTAL: &str =
        "sluice_listener_tls_handshake_errors_total";
    pub const UPSTREAM_CONNECTIONS_TOTAL: &str = "sluice_upstream_connections_total";
    pub const UPSTREAM_CONNECTIONS_ACTIVE: &str = "sluice_upstream_connections_active";
    pub const UPSTREAM_CONNECT_FAILURES_TOTAL: &str = "sluice_upstream_connect_failures_total";
    pub const UPSTREAM_BYTES_SENT_TOTAL: &str = "sluice_upstream_bytes_sent_total";
    pub const UPSTREAM_BYTES_RECEIVED_TOTAL: &str = "sluice_upstream_bytes_received_total";
    pub const UPSTREAM_SERVER_UP: &str = "sluice_upstream_server_up";
    pub const UPSTREAM_UNAVAILABLE_TOTAL: &str = "sluice_upstream_unavailable_total";
    pub const UPSTREAM_CONNECT_DURATION: &str = "sluice_upstream_connect_duration_seconds";
    pub const UPSTREAM_QUEUED: &str = "sluice_upstream_queued";
    pub const UPSTREAM_DRAINING_CONNECTIONS: &str = "sluice_upstream_draining_connections";
    pub const CONNECTIONS_RECYCLED_TOTAL: &str = "sluice_connections_recycled_total";
    pub const CONNECTION_DURATION: &str = "sluice_connection_duration_seconds";
    pub const UPSTREAM_SERVER_WEIGHT: &str = "sluice_upstream_server_weight";
}

/// Upper bounds of the connect-duration buckets, in seconds: loopback and
/// LAN connects land in the first few, timeouts in the last.
const CONNECT_DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds of the connection-duration buckets, in seconds: from
/// one-request connections to the hours Forward senders hold theirs.
const CONNECTION_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0,
];

/// How often histogram samples are folded into their buckets when nobody
/// scrapes, so they never pile up in memory.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot build the metrics recorder: {0}")]
    Build(#[from] BuildError),
    #[error("a metrics recorder is already installed")]
    AlreadyInstalled,
}

/// Installs the process-wide recorder and starts its upkeep task; returns
/// the handle that renders `/metrics`. Must run before peers and listeners
/// take their metric handles.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(names::UPSTREAM_CONNECT_DURATION.to_owned()),
            CONNECT_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(names::CONNECTION_DURATION.to_owned()),
            CONNECTION_DURATION_BUCKETS,
        )?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::AlreadyInstalled)?;
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            interval.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        names::LISTENER_CONNECTIONS_TOTAL,
        "Client connections accepted by the listener."
    );
    describe_gauge!(
        names::LISTENER_CONNECTIONS_ACTIVE,
        "Client connections of the listener open now."
    );
    describe_counter!(
        names::LISTENER_TLS_HANDSHAKE_ERRORS_TOTAL,
        "Client TLS handshakes of the listener that failed, by reason."
    );
    describe_counter!(
        names::UPSTREAM_CONNECTIONS_TOTAL,
        "Connections relayed to the server (successful connects)."
    );
    describe_gauge!(
        names::UPSTREAM_CONNECTIONS_ACTIVE,
        "Connections relayed to the server open now."
    );
    describe_counter!(
        names::UPSTREAM_CONNECT_FAILURES_TOTAL,
        "Failed connect attempts to the server (error, timeout, TLS handshake)."
    );
    describe_counter!(
        names::UPSTREAM_BYTES_SENT_TOTAL,
        Unit::Bytes,
        "Bytes relayed from clients to the server."
    );
    describe_counter!(
        names::UPSTREAM_BYTES_RECEIVED_TOTAL,
        Unit::Bytes,
        "Bytes relayed from the server to clients."
    );
    describe_gauge!(
        names::UPSTREAM_SERVER_UP,
        "1 if the server can be selected (not down, not failed), else 0."
    );
    describe_counter!(
        names::UPSTREAM_UNAVAILABLE_TOTAL,
        "Client connections closed because no server of the group could take them."
    );
    describe_gauge!(
        names::UPSTREAM_QUEUED,
        "Clients waiting for a free slot because every server is at max_conns."
    );
    describe_gauge!(
        names::UPSTREAM_DRAINING_CONNECTIONS,
        "Connections left on a draining server (runtime API or agent drain)."
    );
    describe_gauge!(
        names::UPSTREAM_SERVER_WEIGHT,
        "The server's effective weight (after agent checks and the runtime API); 0 while it is down or draining."
    );
    describe_histogram!(
        names::UPSTREAM_CONNECT_DURATION,
        Unit::Seconds,
        "Time to connect to the server, successful attempts only."
    );
    describe_counter!(
        names::CONNECTIONS_RECYCLED_TOTAL,
        "Connections closed at a quiet moment to be balanced anew (reason: age, rebalance, drain)."
    );
    describe_histogram!(
        names::CONNECTION_DURATION,
        Unit::Seconds,
        "How long relayed client connections of the listener lasted, accept to close."
    );
}
