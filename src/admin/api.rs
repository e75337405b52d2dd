//! The runtime API (SPEC §10) under `/api/` on the admin endpoint: JSON in
//! and out; drain, weight, max_conns, add and remove servers without a
//! reload. Writes need the bearer token of `[admin] token_file`, or, without
//! one, an admin endpoint on loopback or a UNIX socket. Every change is one
//! log line naming who asked (the peer address), what, and old and new.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use tracing::{info, warn};

use super::{upstream_status, AdminState};
use crate::config::{Address, ServerConfig};
use crate::net::ClientAddr;
use crate::upstream::runtime::{
    self, AddedServer, RebuildError, ServerState, Source, UnknownServer, MAX_ADDED_SERVERS,
    MAX_CONNS_LIMIT, MAX_NAME_LEN, WEIGHT_RANGE,
};
use crate::upstream::state_file;
use crate::upstream::{resolve_address, Peer, SharedUpstream, Upstream};

/// The largest request body read; a change is a few fields.
pub const MAX_BODY: usize = 4096;
/// How long a request body may take to arrive, so a stalled client does
/// not hold its connection for ever.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an added server's host name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `DELETE` looks whether the drained server's connections are gone.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Who may write, and where changes are kept; fixed at start.
#[derive(Debug)]
pub struct ApiSettings {
    /// `[admin] token_file`'s token.
    pub token: Option<String>,
    /// The admin endpoint is on loopback or a UNIX socket: writes without a
    /// token are allowed.
    pub local_only: bool,
    pub state_file: Option<PathBuf>,
}

impl ApiSettings {
    pub fn new(bind: &Address, token: Option<String>, state_file: Option<PathBuf>) -> Self {
        ApiSettings {
            token,
            local_only: is_local(bind),
            state_file,
        }
    }

    /// Whether the endpoint takes writes from anyone who can reach it: the
    /// start-up warns then.
    pub fn reachable_without_token(&self) -> bool {
        self.token.is_none() && !self.local_only
    }
}

/// Loopback or a UNIX socket; a host name counts only as `localhost`.
fn is_local(bind: &Address) -> bool {
    match bind {
        Address::Unix(_) => true,
        Address::Inet { host, .. } => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

/// Compares in time independent of where the two differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serialises state-file writes so the last one holds every change.
static STATE_FILE_LOCK: Mutex<()> = Mutex::new(());

/// A refused request: status and a JSON error, naming the field if one is at fault.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }

    fn field(field: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            field: Some(field.to_owned()),
        }
    }

    fn response(self) -> Response<Full<Bytes>> {
        let mut body = json!({ "error": self.message });
        if let Some(field) = self.field {
            body["field"] = json!(field);
        }
        let mut response = json_response(self.status, &body);
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_string_pretty(body).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// What a request asks for.
enum Route {
    Upstream(String),
    Servers(String),
    Server(String, String),
}

fn route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/api/upstreams/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let decoded = |part: &str| percent_decode(part).filter(|name| !name.is_empty());
    match parts.as_slice() {
        [upstream] => Some(Route::Upstream(decoded(upstream)?)),
        [upstream, "servers"] => Some(Route::Servers(decoded(upstream)?)),
        [upstream, "servers", server] => Some(Route::Server(decoded(upstream)?, decoded(server)?)),
        _ => None,
    }
}

/// `%XX` escapes (a server labelled by a `unix:/path` address has slashes).
fn percent_decode(part: &str) -> Option<String> {
    if part.len() > 3 * MAX_NAME_LEN {
        return None;
    }
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = std::str::from_utf8(bytes.get(index + 1..index + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Answers one `/api/` request from `peer`.
pub async fn handle(
    state: &AdminState,
    request: Request<Incoming>,
    peer: ClientAddr,
) -> Response<Full<Bytes>> {
    match serve(state, request, peer).await {
        Ok(response) => response,
        Err(err) => err.response(),
    }
}

async fn serve(
    state: &AdminState,
    request: Request<Incoming>,
    peer: ClientAddr,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let Some(route) = route(request.uri().path()) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not found; the API has /api/upstreams/U, /api/upstreams/U/servers and /api/upstreams/U/servers/S",
        ));
    };
    let method = request.method().clone();
    let allowed = match route {
        Route::Upstream(_) => "GET, HEAD",
        Route::Servers(_) => "POST",
        Route::Server(..) => "PATCH, DELETE",
    };
    if !allowed.split(", ").any(|name| name == method.as_str()) {
        let mut response =
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed").response();
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allowed));
        return Ok(response);
    }
    let force = request
        .uri()
        .query()
        .is_some_and(|query| query.split('&').any(|pair| pair == "force=true"));
    if method != Method::GET && method != Method::HEAD {
        authorize(state, &request)?;
    }
    match route {
        Route::Upstream(name) => {
            let group = group(state, &name)?.load_full();
            Ok(json_response(StatusCode::OK, &status_of(&group)?))
        }
        Route::Servers(name) => {
            let shared = group(state, &name)?;
            let body = read_body(request).await?;
            add(state, &shared, body, peer).await
        }
        Route::Server(name, server) if method == Method::PATCH => {
            let shared = group(state, &name)?;
            let body = read_body(request).await?;
            patch(state, &shared, &server, body, peer)
        }
        Route::Server(name, server) => {
            let shared = group(state, &name)?;
            remove(state, shared, server, force, peer).await
        }
    }
}

fn authorize(state: &AdminState, request: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(settings) = state.api_settings() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the runtime API is off",
        ));
    };
    match &settings.token {
        Some(token) => {
            let given = request
                .headers()
                .get(AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "))
                .unwrap_or("");
            if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
                Ok(())
            } else {
                Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "writes need the header Authorization: Bearer TOKEN with the token of [admin] token_file",
                ))
            }
        }
        None if settings.local_only => Ok(()),
        None => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "writes are refused: the admin endpoint is not on loopback or a UNIX socket and [admin] token_file is not set",
        )),
    }
}

fn group(state: &AdminState, name: &str) -> Result<SharedUpstream, ApiError> {
    state
        .upstreams
        .load()
        .get(name)
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("unknown upstream {name:?}")))
}

/// The upstream's object as in `/status`, with only the peers of `server`:
/// what a change answers, so its size does not grow with the group.
fn status_of_server(group: &Upstream, server: &str) -> Result<Value, ApiError> {
    let mut status = status_of(group)?;
    if let Some(Value::Array(peers)) = status.get_mut("peers") {
        let names: Vec<&str> = group
            .peers
            .iter()
            .filter(|peer| peer.answers_to(server))
            .map(|peer| peer.label.as_str())
            .collect();
        peers.retain(|peer| {
            peer["name"]
                .as_str()
                .is_some_and(|name| names.contains(&name))
        });
    }
    Ok(status)
}

fn status_of(group: &Upstream) -> Result<Value, ApiError> {
    serde_json::to_value(upstream_status(group, std::time::SystemTime::now())).map_err(|err| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the status: {err}"),
        )
    })
}

async fn read_body(request: Request<Incoming>) -> Result<Map<String, Value>, ApiError> {
    let collect = Limited::new(request.into_body(), MAX_BODY).collect();
    let body = tokio::time::timeout(BODY_TIMEOUT, collect)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {BODY_TIMEOUT:?}"),
            )
        })?
        .map_err(|err| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the body (at most {MAX_BODY} bytes): {err}"),
            )
        })?
        .to_bytes();
    match serde_json::from_slice(&body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(ApiError::field("body", "the body must be a JSON object")),
        Err(err) => Err(ApiError::field(
            "body",
            format!("the body is not JSON: {err}"),
        )),
    }
}

/// Only these keys may be in the body.
fn known_fields(body: &Map<String, Value>, known: &[&'static str]) -> Result<(), ApiError> {
    for key in body.keys() {
        if !known.contains(&key.as_str()) {
            let shown: String = key.chars().take(MAX_NAME_LEN).collect();
            return Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!("unknown field {shown:?}; known: {}", known.join(", ")),
                field: Some(shown),
            });
        }
    }
    Ok(())
}

fn integer(
    body: &Map<String, Value>,
    field: &'static str,
    range: std::ops::RangeInclusive<u32>,
) -> Result<Option<u32>, ApiError> {
    let Some(value) = body.get(field) else {
        return Ok(None);
    };
    value
        .as_u64()
        .and_then(|number| u32::try_from(number).ok())
        .filter(|number| range.contains(number))
        .map(Some)
        .ok_or_else(|| {
            ApiError::field(
                field,
                format!(
                    "{field} must be an integer from {} to {}",
                    range.start(),
                    range.end()
                ),
            )
        })
}

fn text<'b>(
    body: &'b Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'b str>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::String(text)) if text.is_empty() || text.len() > MAX_NAME_LEN => {
            Err(ApiError::field(
                field,
                format!("{field} must be 1 to {MAX_NAME_LEN} bytes long"),
            ))
        }
        Some(Value::String(text)) if text.chars().any(char::is_control) => Err(ApiError::field(
            field,
            format!("{field} must not hold control characters"),
        )),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(ApiError::field(field, format!("{field} must be a string"))),
    }
}

/// `PATCH /api/upstreams/U/servers/S`.
fn patch(
    state: &AdminState,
    shared: &SharedUpstream,
    server: &str,
    body: Map<String, Value>,
    peer: ClientAddr,
) -> Result<Response<Full<Bytes>>, ApiError> {
    known_fields(&body, &["state", "weight", "max_conns"])?;
    let weight = integer(&body, "weight", WEIGHT_RANGE)?;
    let max_conns = integer(&body, "max_conns", 0..=MAX_CONNS_LIMIT)?;
    let server_state = match text(&body, "state")? {
        None => None,
        Some("up") => Some(ServerState::Up),
        Some("drain") => Some(ServerState::Drain),
        Some("down") => Some(ServerState::Down),
        Some(_) => {
            return Err(ApiError::field(
                "state",
                "state must be \"up\", \"drain\" or \"down\"",
            ))
        }
    };
    if weight.is_none() && max_conns.is_none() && server_state.is_none() {
        return Err(ApiError::field(
            "body",
            "nothing to change: give state, weight or max_conns",
        ));
    }
    let before = describe(&shared.load(), server);
    runtime::change_server(shared, Source::Api, server, |overrides| {
        if server_state.is_some() {
            overrides.state = server_state;
        }
        if weight.is_some() {
            overrides.weight = weight;
        }
        if max_conns.is_some() {
            overrides.max_conns = max_conns;
        }
    })
    .map_err(|err| rebuild_error(err, shared, server))?;
    let group = shared.load_full();
    log_change(
        &group,
        server,
        "set",
        peer,
        before,
        describe(&group, server),
    );
    save(state);
    Ok(json_response(
        StatusCode::OK,
        &status_of_server(&group, server)?,
    ))
}

/// `POST /api/upstreams/U/servers`.
async fn add(
    state: &AdminState,
    shared: &SharedUpstream,
    body: Map<String, Value>,
    peer: ClientAddr,
) -> Result<Response<Full<Bytes>>, ApiError> {
    known_fields(&body, &["address", "name", "weight", "max_conns"])?;
    let address_text =
        text(&body, "address")?.ok_or_else(|| ApiError::field("address", "address is required"))?;
    let address: Address = address_text
        .parse()
        .map_err(|err| ApiError::field("address", format!("address {address_text:?}: {err}")))?;
    let name = text(&body, "name")?.map(str::to_owned);
    let weight = integer(&body, "weight", WEIGHT_RANGE)?.unwrap_or(1);
    let max_conns = integer(&body, "max_conns", 0..=MAX_CONNS_LIMIT)?.unwrap_or(0);
    let config = ServerConfig::added_at_runtime(address, name, weight, max_conns);
    let label = config.label();
    let targets =
        match tokio::time::timeout(RESOLVE_TIMEOUT, resolve_address(&config.address)).await {
            Ok(Ok(targets)) => targets,
            Ok(Err(err)) => {
                return Err(ApiError::field(
                    "address",
                    format!("cannot resolve {address_text}: {err}"),
                ))
            }
            Err(_) => {
                return Err(ApiError::field(
                    "address",
                    format!("{address_text} did not resolve within {RESOLVE_TIMEOUT:?}"),
                ))
            }
        };
    runtime::rebuild(shared, |group| {
        if group.has_server(&label) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("upstream {:?} already has a server named {label:?}", group.name),
            ));
        }
        if group.runtime.added_count() >= MAX_ADDED_SERVERS {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("upstream {:?} has {MAX_ADDED_SERVERS} servers added at run time, the most allowed", group.name),
            ));
        }
        group.runtime.add_server(AddedServer {
            config: config.clone(),
            targets,
        });
        Ok(())
    })
    .map_err(|err| match err {
        RebuildError::Refused(err) => err,
        RebuildError::Build(err) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.message),
    })?;
    let group = shared.load_full();
    log_change(
        &group,
        &label,
        "add",
        peer,
        "absent".to_owned(),
        describe(&group, &label),
    );
    save(state);
    Ok(json_response(
        StatusCode::CREATED,
        &status_of_server(&group, &label)?,
    ))
}

/// `DELETE /api/upstreams/U/servers/S[?force=true]`: drains the server,
/// waits until its connections are gone (or closes them with `force`), then
/// removes it. The removal goes on if the client stops waiting.
async fn remove(
    state: &AdminState,
    shared: SharedUpstream,
    server: String,
    force: bool,
    peer: ClientAddr,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let before = describe(&shared.load(), &server);
    runtime::rebuild(&shared, |group| {
        if !group.has_server(&server) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("upstream {:?} has no server {server:?}", group.name),
            ));
        }
        let others = group.peers.iter().any(|peer| peer.server.label() != server);
        if !others {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{server:?} is the last server of upstream {:?}; it cannot be removed",
                    group.name
                ),
            ));
        }
        let mut overrides = group.runtime.overrides(Source::Api, &server);
        overrides.state = Some(ServerState::Drain);
        group.runtime.set_overrides(Source::Api, &server, overrides);
        Ok(())
    })
    .map_err(|err| match err {
        RebuildError::Refused(err) => err,
        RebuildError::Build(err) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.message),
    })?;
    log_change(
        &shared.load(),
        &server,
        "remove",
        peer,
        before,
        if force {
            "closing connections"
        } else {
            "draining"
        }
        .to_owned(),
    );
    let settings_path = state.api_settings().and_then(|s| s.state_file.clone());
    let upstreams = state.upstreams.load_full();
    let removal = tokio::spawn(async move {
        let peers: Vec<(
            Arc<crate::balancer::PeerHealth>,
            crate::upstream::force_close::ForceClose,
        )> = shared
            .load()
            .peers
            .iter()
            .filter(|peer| peer.answers_to(&server))
            .map(|peer: &Peer| (Arc::clone(&peer.health), peer.close.clone()))
            .collect();
        if force {
            for (_, close) in &peers {
                close.close();
            }
        }
        while peers.iter().any(|(health, _)| health.active() > 0) {
            tokio::time::sleep(DRAIN_POLL).await;
            // Set up again meanwhile: the removal is called off. A peer that
            // DNS dropped meanwhile is gone already; its connections are
            // still waited for.
            let group = shared.load();
            if group.has_server(&server)
                && group.runtime.overrides(Source::Api, &server).state != Some(ServerState::Drain)
            {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("the removal of {server:?} was called off: its state changed while it drained"),
                ));
            }
        }
        runtime::rebuild(&shared, |group| {
            if group.has_server(&server) {
                group.runtime.remove_server(&server);
            }
            Ok::<_, UnknownServer>(())
        })
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot rebuild the group",
            )
        })?;
        let group = shared.load_full();
        info!(upstream = group.name.as_str(), server = server.as_str(), who = %peer, "runtime change: server removed");
        save_to(settings_path.as_deref(), &upstreams);
        status_of(&group)
    });
    let status = removal.await.map_err(|err| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the removal failed: {err}"),
        )
    })??;
    Ok(json_response(StatusCode::OK, &status))
}

fn rebuild_error(
    err: RebuildError<UnknownServer>,
    shared: &SharedUpstream,
    server: &str,
) -> ApiError {
    match err {
        RebuildError::Refused(UnknownServer) => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("upstream {:?} has no server {server:?}", shared.load().name),
        ),
        RebuildError::Build(err) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.message),
    }
}

/// A server's state, weight and max_conns in one build, for log lines.
fn describe(group: &Upstream, server: &str) -> String {
    match group.peers.iter().find(|peer| peer.answers_to(server)) {
        Some(peer) => {
            let state = if peer.draining {
                "drain"
            } else if peer.down {
                "down"
            } else {
                "up"
            };
            format!(
                "state={state} weight={} max_conns={}",
                peer.weight, peer.max_conns
            )
        }
        None => "absent".to_owned(),
    }
}

fn log_change(
    group: &Upstream,
    server: &str,
    what: &str,
    who: ClientAddr,
    old: String,
    new: String,
) {
    info!(
        upstream = group.name.as_str(),
        server,
        what,
        who = %who,
        old = old.as_str(),
        new = new.as_str(),
        "runtime change"
    );
}

/// Writes the state file, if there is one, after a change.
pub(super) fn save(state: &AdminState) {
    let path = state.api_settings().and_then(|s| s.state_file.clone());
    save_to(path.as_deref(), &state.upstreams.load());
}

fn save_to(
    path: Option<&std::path::Path>,
    upstreams: &std::collections::BTreeMap<String, SharedUpstream>,
) {
    let Some(path) = path else {
        return;
    };
    let _writing = STATE_FILE_LOCK
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let layers = upstreams
        .iter()
        .map(|(name, shared)| (name, shared.load().runtime.api_layer()));
    if let Err(err) = state_file::write(path, layers) {
        warn!(file = %path.display(), reason = %err, "cannot write the state_file; the change holds until the next reload or restart");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_decode_names() {
        assert!(
            matches!(route("/api/upstreams/pool"), Some(Route::Upstream(name)) if name == "pool")
        );
        assert!(matches!(
            route("/api/upstreams/pool/servers/unix:%2Frun%2Fa.sock"),
            Some(Route::Server(_, server)) if server == "unix:/run/a.sock"
        ));
        assert!(route("/api/upstreams/pool/servers/a/b").is_none());
        assert!(route("/api/upstreams//servers").is_none());
        assert!(route(&format!("/api/upstreams/{}", "a".repeat(1000))).is_none());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn local_addresses() {
        let local = |text: &str| is_local(&text.parse().unwrap());
        assert!(local("127.0.0.1:9100"));
        assert!(local("[::1]:9100"));
        assert!(local("localhost:9100"));
        assert!(local("unix:/run/sluice/admin.sock"));
        assert!(!local("0.0.0.0:9100"));
        assert!(!local("10.0.0.1:9100"));
    }
}
