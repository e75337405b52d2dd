//! `sluice ctl`: the command-line client of the runtime API (SPEC §10). It
//! speaks just enough HTTP/1.1 (one request per connection, a bounded
//! answer) over TCP or a UNIX socket; the answer is printed as a table, or
//! as the server's JSON with `--json`. A refused request exits 1 with the
//! server's error; an endpoint that cannot be reached exits 2.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::Address;

/// The largest answer read: `/status` of a group of 20,000 servers fits.
const MAX_RESPONSE: u64 = 64 * 1024 * 1024;

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The admin endpoint: HOST:PORT, [IPv6]:PORT or unix:/path.
    #[arg(long, env = "SLUICE_ADMIN", default_value = "127.0.0.1:9100")]
    admin: String,
    /// A file holding the bearer token (the server's `[admin] token_file`).
    #[arg(long, env = "SLUICE_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Print the server's JSON answer instead of a table.
    #[arg(long)]
    json: bool,
    /// Give up waiting for the answer after this long (`remove` waits until
    /// the server's connections are gone).
    #[arg(long, default_value = "10m", value_name = "DURATION")]
    timeout: String,
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Show every upstream and its servers, or only UPSTREAM.
    Status { upstream: Option<String> },
    /// Stop sending new connections to SERVER; open ones go on.
    Drain { upstream: String, server: String },
    /// Send new connections to SERVER again.
    Up { upstream: String, server: String },
    /// Take SERVER out of rotation, like `down = true`.
    Down { upstream: String, server: String },
    /// Set SERVER's weight (1-1000).
    Weight {
        upstream: String,
        server: String,
        weight: u32,
    },
    /// Set SERVER's max_conns (0: unlimited).
    MaxConns {
        upstream: String,
        server: String,
        max_conns: u32,
    },
    /// Add a server at ADDRESS.
    Add {
        upstream: String,
        address: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        weight: Option<u32>,
        #[arg(long)]
        max_conns: Option<u32>,
    },
    /// Drain SERVER, wait until its connections are gone, and remove it.
    Remove {
        upstream: String,
        server: String,
        /// Close its connections at once instead of waiting.
        #[arg(long)]
        force: bool,
    },
}

const EXIT_REFUSED: u8 = 1;
const EXIT_UNREACHABLE: u8 = 2;

pub fn main(args: CtlArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sluice ctl: cannot start the runtime: {err}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: CtlArgs) -> ExitCode {
    let address: Address = match args.admin.parse() {
        Ok(address) => address,
        Err(err) => {
            eprintln!("sluice ctl: --admin: {err}");
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    let timeout = match humantime::parse_duration(&args.timeout) {
        Ok(timeout) => timeout,
        Err(err) => {
            eprintln!("sluice ctl: --timeout: {err}");
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    let token = match &args.token_file {
        Some(path) => match read_token(path) {
            Ok(token) => Some(token),
            Err(err) => {
                eprintln!("sluice ctl: --token-file {}: {err}", path.display());
                return ExitCode::from(EXIT_REFUSED);
            }
        },
        None => None,
    };
    let (method, path, body) = request_for(&args.action);
    let exchange = send(&address, method, &path, token.as_deref(), body.as_ref());
    let (status, answer) = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(err)) => {
            eprintln!("sluice ctl: {}: {err}", args.admin);
            return ExitCode::from(EXIT_UNREACHABLE);
        }
        Err(_) => {
            eprintln!(
                "sluice ctl: {}: no answer within {}",
                args.admin,
                humantime::format_duration(timeout)
            );
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let parsed: Option<Value> = serde_json::from_slice(&answer).ok();
    if !(200..300).contains(&status) {
        let message = parsed
            .as_ref()
            .and_then(|value| value.get("error"))
            .and_then(Value::as_str)
            .map_or_else(
                || String::from_utf8_lossy(&answer).trim().to_owned(),
                str::to_owned,
            );
        eprintln!("sluice ctl: {status}: {message}");
        return ExitCode::from(EXIT_REFUSED);
    }
    match parsed {
        Some(value) if args.json => println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        ),
        Some(value) => print!("{}", table(&args.action, &value)),
        None => print!("{}", String::from_utf8_lossy(&answer)),
    }
    ExitCode::SUCCESS
}

/// The token in `path`, without surrounding whitespace; at most 4 KiB, as
/// the server reads its own.
fn read_token(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    const MAX_TOKEN_FILE: u64 = 4096;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_TOKEN_FILE + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_TOKEN_FILE} bytes"
        )));
    }
    Ok(text.trim().to_owned())
}

fn request_for(action: &Action) -> (&'static str, String, Option<Value>) {
    let server_path = |upstream: &str, server: &str| {
        format!(
            "/api/upstreams/{}/servers/{}",
            encode(upstream),
            encode(server)
        )
    };
    match action {
        Action::Status { upstream: None } => ("GET", "/status".to_owned(), None),
        Action::Status {
            upstream: Some(upstream),
        } => ("GET", format!("/api/upstreams/{}", encode(upstream)), None),
        Action::Drain { upstream, server } => (
            "PATCH",
            server_path(upstream, server),
            Some(json!({"state": "drain"})),
        ),
        Action::Up { upstream, server } => (
            "PATCH",
            server_path(upstream, server),
            Some(json!({"state": "up"})),
        ),
        Action::Down { upstream, server } => (
            "PATCH",
            server_path(upstream, server),
            Some(json!({"state": "down"})),
        ),
        Action::Weight {
            upstream,
            server,
            weight,
        } => (
            "PATCH",
            server_path(upstream, server),
            Some(json!({ "weight": weight })),
        ),
        Action::MaxConns {
            upstream,
            server,
            max_conns,
        } => (
            "PATCH",
            server_path(upstream, server),
            Some(json!({ "max_conns": max_conns })),
        ),
        Action::Add {
            upstream,
            address,
            name,
            weight,
            max_conns,
        } => {
            let mut body = json!({ "address": address });
            if let Some(name) = name {
                body["name"] = json!(name);
            }
            if let Some(weight) = weight {
                body["weight"] = json!(weight);
            }
            if let Some(max_conns) = max_conns {
                body["max_conns"] = json!(max_conns);
            }
            (
                "POST",
                format!("/api/upstreams/{}/servers", encode(upstream)),
                Some(body),
            )
        }
        Action::Remove {
            upstream,
            server,
            force,
        } => {
            let mut path = server_path(upstream, server);
            if *force {
                path.push_str("?force=true");
            }
            ("DELETE", path, None)
        }
    }
}

/// Percent-encodes one path segment.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~:@[]".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// One request, one answer: (status, body).
async fn send(
    address: &Address,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> std::io::Result<(u16, Vec<u8>)> {
    match address {
        Address::Unix(path_name) => {
            let stream = tokio::net::UnixStream::connect(path_name).await?;
            exchange(stream, method, path, token, body).await
        }
        Address::Inet { host, port } => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            exchange(stream, method, path, token, body).await
        }
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\nAccept: application/json\r\n");
    if let Some(token) = token {
        let _ = write!(request, "Authorization: Bearer {token}\r\n");
    }
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    let _ = write!(request, "Content-Length: {}\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE + 1)
        .read_to_end(&mut answer)
        .await?;
    if answer.len() as u64 > MAX_RESPONSE {
        return Err(std::io::Error::other(format!(
            "the answer is larger than {MAX_RESPONSE} bytes"
        )));
    }
    parse_response(&answer)
}

fn parse_response(answer: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let invalid = || std::io::Error::other("the answer is not HTTP/1.1");
    let split = answer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(invalid)?;
    let head = std::str::from_utf8(&answer[..split]).map_err(|_| invalid())?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(invalid)?;
    let mut body = answer[split + 4..].to_vec();
    let length = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    if let Some(length) = length {
        body.truncate(length);
    }
    Ok((status, body))
}

/// The answer as a table: one line per server.
fn table(action: &Action, answer: &Value) -> String {
    let mut rows = vec![[
        "UPSTREAM",
        "SERVER",
        "ADDRESS",
        "STATE",
        "WEIGHT",
        "MAX_CONNS",
        "ACTIVE",
        "TOTAL",
        "FAILURES",
    ]
    .map(str::to_owned)];
    let mut add_group = |name: &str, group: &Value| {
        for peer in group["peers"].as_array().into_iter().flatten() {
            let field = |key: &str| match &peer[key] {
                Value::String(text) => text.clone(),
                Value::Null => "-".to_owned(),
                other => other.to_string(),
            };
            rows.push([
                name.to_owned(),
                field("name"),
                field("address"),
                field("state"),
                field("weight"),
                field("max_conns"),
                field("active"),
                field("total"),
                field("failures"),
            ]);
        }
    };
    let named = match action {
        Action::Status { upstream: None } => None,
        Action::Status {
            upstream: Some(upstream),
        }
        | Action::Drain { upstream, .. }
        | Action::Up { upstream, .. }
        | Action::Down { upstream, .. }
        | Action::Weight { upstream, .. }
        | Action::MaxConns { upstream, .. }
        | Action::Add { upstream, .. }
        | Action::Remove { upstream, .. } => Some(upstream),
    };
    match named {
        Some(upstream) => add_group(upstream, answer),
        None => {
            for (name, group) in answer["upstreams"].as_object().into_iter().flatten() {
                add_group(name, group);
            }
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode("node-1"), "node-1");
        assert_eq!(encode("unix:/run/a.sock"), "unix:%2Frun%2Fa.sock");
        assert_eq!(encode("a b?"), "a%20b%3F");
    }

    #[test]
    fn answers_are_parsed_and_cut_at_their_length() {
        let (status, body) =
            parse_response(b"HTTP/1.1 409 Conflict\r\ncontent-length: 2\r\n\r\n{}xx").unwrap();
        assert_eq!((status, body.as_slice()), (409, b"{}".as_slice()));
        assert!(parse_response(b"garbage").is_err());
    }
}
