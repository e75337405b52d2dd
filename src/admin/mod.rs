//! The admin HTTP endpoint (SPEC §5): `/metrics`, `/healthz`, `/readyz`,
//! `/status` and the status page (SPEC §12) on one small hyper server, on
//! TCP or a UNIX socket; the runtime API (SPEC §10) under `/api/`.

pub mod api;
mod status_page;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::balancer::PeerState;
use crate::config::Address;
use crate::net::listen::{bind, Acceptor, BoundSocket, ListenerReport};
use crate::upstream::runtime::{Overrides, Source};
use crate::upstream::{SharedUpstream, Upstream};

/// The admin address could not be bound: a start-up failure (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("admin endpoint: cannot listen on {address}: {source}")]
pub struct AdminBindError {
    pub address: String,
    #[source]
    pub source: io::Error,
}

/// What the endpoint reports on, shared with the server's start-up and
/// shutdown code.
pub struct AdminState {
    /// Every listener is bound.
    listening: AtomicBool,
    draining: AtomicBool,
    metrics: PrometheusHandle,
    upstreams: ArcSwap<BTreeMap<String, SharedUpstream>>,
    listeners: ArcSwap<Vec<ListenerReport>>,
    /// Set once at start when there is an admin endpoint.
    api: OnceLock<api::ApiSettings>,
}

impl AdminState {
    pub fn new(
        metrics: PrometheusHandle,
        upstreams: BTreeMap<String, SharedUpstream>,
    ) -> Arc<AdminState> {
        Arc::new(AdminState {
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            metrics,
            upstreams: ArcSwap::from_pointee(upstreams),
            listeners: ArcSwap::from_pointee(Vec::new()),
            api: OnceLock::new(),
        })
    }

    /// Who may write through the runtime API; set once, at start.
    pub fn set_api_settings(&self, settings: api::ApiSettings) {
        let _ = self.api.set(settings);
    }

    /// Writes the runtime changes to `[admin] state_file`, if set: after a
    /// reload, which drops those of servers no longer configured.
    pub fn save_runtime_state(&self) {
        api::save(self);
    }

    fn api_settings(&self) -> Option<&api::ApiSettings> {
        self.api.get()
    }

    /// Every listener is bound: `/readyz` answers 200 (unless draining).
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::SeqCst);
    }

    /// Shutdown began: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Replaces the upstream groups reported on (after a reload).
    pub fn set_upstreams(&self, upstreams: BTreeMap<String, SharedUpstream>) {
        self.upstreams.store(Arc::new(upstreams));
    }

    /// Replaces the listeners reported on (after start-up and each reload).
    pub fn set_listeners(&self, listeners: Vec<ListenerReport>) {
        self.listeners.store(Arc::new(listeners));
    }

    fn ready(&self) -> bool {
        self.listening.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }

    fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match request.uri().path() {
            "/metrics" => {
                let mut response = text(StatusCode::OK, self.render_metrics());
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            "/" | "/ui" => status_page::response(),
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if self.ready() => text(StatusCode::OK, "ready\n"),
            "/readyz" if self.draining.load(Ordering::SeqCst) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            }
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            "/status" => match serde_json::to_string_pretty(&self.status()) {
                Ok(mut body) => {
                    body.push('\n');
                    let mut response = text(StatusCode::OK, body);
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    response
                }
                Err(err) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode the status: {err}\n"),
                ),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try / (the status page), /metrics, /healthz, /readyz or /status\n",
            ),
        }
    }

    /// `server_up` depends on time (a failure window expires), so it is
    /// brought up to date before every render.
    fn render_metrics(&self) -> String {
        for shared in self.upstreams.load().values() {
            let group = shared.load();
            for (index, peer) in group.peers.iter().enumerate() {
                peer.stats.refresh_up(group.peer_state(index));
                peer.stats.refresh_draining(peer.draining);
                peer.stats.refresh_weight(peer.weight, peer.down);
            }
        }
        self.metrics.render()
    }

    fn status(&self) -> Status {
        let now = SystemTime::now();
        let upstreams = self
            .upstreams
            .load()
            .iter()
            .map(|(name, shared)| (name.clone(), upstream_status(&shared.load(), now)))
            .collect();
        let listeners = self
            .listeners
            .load()
            .iter()
            .map(|listener| {
                let (accepted, active) = listener.counts.snapshot();
                ListenerStatus {
                    name: listener.name.clone(),
                    address: listener.address.clone(),
                    upstream: listener.upstream.clone(),
                    accepted,
                    active,
                }
            })
            .collect();
        Status {
            ready: self.ready(),
            draining: self.draining.load(Ordering::SeqCst),
            listeners,
            upstreams,
        }
    }

    /// Notes every peer's state, so a change is dated within one
    /// STATE_SAMPLE_INTERVAL even when nobody reads `/status` (a failure
    /// window, for one, ends with time, not with an event).
    fn sample_states(&self) {
        let now = SystemTime::now();
        for shared in self.upstreams.load().values() {
            let group = shared.load();
            for (index, peer) in group.peers.iter().enumerate() {
                peer.stats.note_state(state_name(&group, index), now);
            }
        }
    }
}

/// How often every peer's state is sampled for `state_since_seconds`.
const STATE_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// `/status`.
#[derive(Debug, Serialize)]
struct Status {
    ready: bool,
    draining: bool,
    listeners: Vec<ListenerStatus>,
    upstreams: BTreeMap<String, UpstreamStatus>,
}

#[derive(Debug, Serialize)]
struct ListenerStatus {
    name: String,
    /// The address bound: the port chosen when the configuration gave 0.
    address: String,
    upstream: String,
    /// Client connections accepted since the listener started.
    accepted: u64,
    active: u64,
}

#[derive(Debug, Serialize)]
struct UpstreamStatus {
    balance: &'static str,
    /// Clients waiting for a free slot (SPEC §11).
    queued: usize,
    peers: Vec<PeerStatus>,
}

#[derive(Debug, Serialize)]
struct PeerStatus {
    /// The server's `name`, else its address as written: the metric label.
    name: String,
    /// The address connected to.
    address: String,
    /// `up`, `failed`, `down`, `draining` (runtime drain; `active` is the
    /// count left), or `backup` for a backup peer that is up.
    state: &'static str,
    /// Whole seconds since the peer entered `state` (sampled every second),
    /// or since it was built if it has not changed state since.
    state_since_seconds: u64,
    backup: bool,
    weight: u32,
    max_conns: u32,
    active: u64,
    total: u64,
    failures: u64,
    bytes_sent: u64,
    bytes_received: u64,
    last_failure_reason: Option<String>,
    /// RFC 3339, UTC.
    last_failure_time: Option<String>,
    /// What the server's agent set (SPEC §13); absent without an agent check.
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<Overrides>,
}

/// Peer `index`'s state as `/status` names it.
fn state_name(group: &Upstream, index: usize) -> &'static str {
    match group.peer_state(index) {
        PeerState::Down if group.peers[index].draining => "draining",
        PeerState::Down => "down",
        PeerState::Failed => "failed",
        PeerState::Up if group.peers[index].server.backup => "backup",
        PeerState::Up => "up",
    }
}

fn upstream_status(group: &Upstream, now: SystemTime) -> UpstreamStatus {
    let peers = group
        .peers
        .iter()
        .enumerate()
        .map(|(index, peer)| {
            let stats = peer.stats.snapshot();
            let state = state_name(group, index);
            let since = peer.stats.note_state(state, now);
            let (last_failure_reason, last_failure_time) = match stats.last_failure {
                Some(last) => (
                    Some(last.reason),
                    Some(humantime::format_rfc3339_millis(last.at).to_string()),
                ),
                None => (None, None),
            };
            PeerStatus {
                name: peer.label.clone(),
                address: peer.target.to_string(),
                state,
                state_since_seconds: now.duration_since(since).unwrap_or_default().as_secs(),
                backup: peer.server.backup,
                weight: peer.weight,
                max_conns: peer.max_conns,
                active: stats.active,
                total: stats.total,
                failures: stats.failures,
                bytes_sent: stats.sent,
                bytes_received: stats.received,
                last_failure_reason,
                last_failure_time,
                agent: peer
                    .server
                    .agent_check
                    .as_ref()
                    .map(|_| group.runtime.overrides(Source::Agent, &peer.server.label())),
            }
        })
        .collect();
    UpstreamStatus {
        balance: group.balance.name(),
        queued: group.runtime.queue.len(),
        peers,
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A request's headers must arrive within this time, so idle or stuck admin
/// connections do not pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `address` and serves the endpoint in the background for the life of
/// the process.
pub async fn serve(address: &Address, state: Arc<AdminState>) -> Result<(), AdminBindError> {
    let socket = bind("admin", address, 0o660, 1)
        .await
        .map_err(|err| AdminBindError {
            address: err.address,
            source: err.source,
        })?;
    info!(address = %socket.local_addr(), "admin endpoint ready");
    let acceptor = socket.acceptor(0).map_err(|source| AdminBindError {
        address: address.to_string(),
        source,
    })?;
    let sampled = Arc::clone(&state);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(STATE_SAMPLE_INTERVAL);
        loop {
            interval.tick().await;
            sampled.sample_states();
        }
    });
    tokio::spawn(accept_loop(socket, acceptor, state));
    Ok(())
}

/// `socket` is held for its UNIX socket file, removed when it drops.
async fn accept_loop(socket: BoundSocket, acceptor: Acceptor, state: Arc<AdminState>) {
    let _socket = socket;
    loop {
        let (stream, peer) = match acceptor.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors, most likely: give connections time to close.
                warn!(reason = %err, "admin endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let state = Arc::clone(&state);
                async move {
                    let response = if request.uri().path().starts_with("/api/") {
                        api::handle(&state, request, peer).await
                    } else {
                        state.answer(&request)
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            if let Err(err) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(reason = %err, "admin connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    #[test]
    fn ready_only_between_listening_and_draining() {
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let state = AdminState::new(handle, BTreeMap::new());
        assert!(!state.ready());
        state.set_listening();
        assert!(state.ready());
        state.set_draining();
        assert!(!state.ready());
        let status = state.status();
        assert!(status.draining && !status.ready && status.upstreams.is_empty());
    }
}
