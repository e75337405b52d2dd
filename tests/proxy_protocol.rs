//! PROXY protocol through the real binary: headers as an echo backend
//! receives them, byte for byte, and headers read from clients.

#[path = "common/certs.rs"]
mod certs;
mod common;
#[path = "common/tls_backend.rs"]
mod tls_backend;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use sluice::tls;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixStream};

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The example header of the PROXY protocol specification (section 2.1).
const SPEC_V1: &[u8] = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";

/// The same addresses in v2: PROXY command, TCP over IPv4, 12 address bytes.
fn spec_v2() -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
    header.extend_from_slice(&[192, 168, 0, 1, 192, 168, 0, 11]);
    header.extend_from_slice(&[0xdc, 0x04, 0x01, 0xbb]);
    header
}

/// Sends `data`, half-closes, and returns everything that came back.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, data: &[u8]) -> Vec<u8> {
    stream.write_all(data).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut back))
        .await
        .expect("no answer")
        .unwrap();
    back
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_header_carries_the_client_and_listener_addresses() {
    let echo = Backend::tcp("e", Behavior::Echo).await;
    let listen = free_addr();
    let _sluice = Sluice::start(&config(
        &listen,
        "proxy_protocol = \"v1\"",
        "",
        &[server(echo.addr, "")],
    ))
    .await;
    let client = TcpStream::connect(&listen).await.unwrap();
    let local = client.local_addr().unwrap();
    let listen_port = listen.rsplit(':').next().unwrap();
    let back = exchange(client, b"hello").await;
    let expected = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {} {listen_port}\r\nhello",
        local.port()
    );
    assert_eq!(String::from_utf8_lossy(&back), expected);
    echo.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_header_is_binary_with_the_same_addresses() {
    let echo = Backend::tcp("e", Behavior::Echo).await;
    let listen = free_addr();
    let _sluice = Sluice::start(&config(
        &listen,
        "proxy_protocol = \"v2\"",
        "",
        &[server(echo.addr, "")],
    ))
    .await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.9:0".parse().unwrap()).unwrap();
    let listen_addr: SocketAddr = listen.parse().unwrap();
    let client = socket.connect(listen_addr).await.unwrap();
    let local = client.local_addr().unwrap();
    let back = exchange(client, b"payload").await;
    let mut expected = V2_SIGNATURE.to_vec();
    expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c, 127, 0, 0, 9, 127, 0, 0, 1]);
    expected.extend_from_slice(&local.port().to_be_bytes());
    expected.extend_from_slice(&listen_addr.port().to_be_bytes());
    expected.extend_from_slice(b"payload");
    assert_eq!(back, expected);
    echo.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_header_on_ipv6_is_tcp6() {
    let echo = Backend::tcp("e", Behavior::Echo).await;
    let port = {
        let probe = std::net::TcpListener::bind("[::1]:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let listen = format!("[::1]:{port}");
    let _sluice = Sluice::start(&config(
        &listen,
        "proxy_protocol = \"v1\"",
        "",
        &[server(echo.addr, "")],
    ))
    .await;
    let client = TcpStream::connect(&listen).await.unwrap();
    let local = client.local_addr().unwrap();
    let back = exchange(client, b"x").await;
    let expected = format!("PROXY TCP6 ::1 ::1 {} {port}\r\nx", local.port());
    assert_eq!(String::from_utf8_lossy(&back), expected);
    echo.finish().await;
}

async fn unix_client_header(version: &str, dir: &Path) -> Vec<u8> {
    let echo = Backend::tcp("e", Behavior::Echo).await;
    let socket = dir.join(format!("{version}.sock"));
    let listen = format!("unix:{}", socket.display());
    let _sluice = Sluice::start(&config(
        &listen,
        &format!("proxy_protocol = \"{version}\""),
        "",
        &[server(echo.addr, "")],
    ))
    .await;
    let back = exchange(UnixStream::connect(&socket).await.unwrap(), b"data").await;
    echo.finish().await;
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_clients_are_sent_as_unknown() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        unix_client_header("v1", dir.path()).await,
        b"PROXY UNKNOWN\r\ndata"
    );
    // v2: PROXY command, AF_UNSPEC, no address block.
    assert_eq!(
        unix_client_header("v2", dir.path()).await,
        concat(&[V2_SIGNATURE, &[0x21, 0x00, 0x00, 0x00], b"data"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_headers_are_stripped_or_passed_on_with_their_addresses() {
    let echo = Backend::tcp("e", Behavior::Echo).await;
    let plain = free_addr();
    let to_v2 = free_addr();
    let to_v1 = free_addr();
    let mut text = config(
        &plain,
        "accept_proxy_protocol = true",
        "",
        &[server(echo.addr, "")],
    );
    for (listen, name, version) in [(&to_v2, "to_v2", "v2"), (&to_v1, "to_v1", "v1")] {
        text.push_str(&format!(
            "\n[[listener]]\nname = \"{name}\"\nbind = \"{listen}\"\nupstream = \"pool\"\naccept_proxy_protocol = true\nproxy_protocol = \"{version}\"\n"
        ));
    }
    let _sluice = Sluice::start(&text).await;

    // Stripped: the backend sees only the payload, whether v1 or v2 came in.
    for header in [SPEC_V1.to_vec(), spec_v2()] {
        let client = TcpStream::connect(&plain).await.unwrap();
        let back = exchange(client, &concat(&[&header, b"after the header"])).await;
        assert_eq!(back, b"after the header");
    }
    // Passed on: the carried addresses, re-encoded in the listener's version.
    let client = TcpStream::connect(&to_v2).await.unwrap();
    let back = exchange(client, &concat(&[SPEC_V1, b"z"])).await;
    assert_eq!(back, concat(&[&spec_v2(), b"z"]));
    let client = TcpStream::connect(&to_v1).await.unwrap();
    let back = exchange(client, &concat(&[&spec_v2(), b"z"])).await;
    assert_eq!(back, concat(&[SPEC_V1, b"z"]));
    // UNKNOWN carries no address: the connection's own are sent.
    let client = TcpStream::connect(&to_v1).await.unwrap();
    let local = client.local_addr().unwrap();
    let back = exchange(client, b"PROXY UNKNOWN\r\nz").await;
    let expected = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\nz",
        local.port(),
        to_v1.rsplit(':').next().unwrap()
    );
    assert_eq!(String::from_utf8_lossy(&back), expected);
    echo.finish().await;
}

/// Connects, sends `data` (if any) and expects to be closed with nothing written.
async fn expect_closed(listen: &str, data: &[u8], within: Duration) {
    let mut client = TcpStream::connect(listen).await.unwrap();
    if !data.is_empty() {
        client.write_all(data).await.unwrap();
    }
    let mut rest = Vec::new();
    let read = tokio::time::timeout(within, client.read_to_end(&mut rest))
        .await
        .expect("client was not closed");
    // A reset (unread bytes at close) or a clean EOF: either way nothing written.
    assert!(rest.is_empty(), "something was written: {rest:?}");
    if let Ok(n) = read {
        assert_eq!(n, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_malformed_or_late_header_closes_the_client() {
    let echo = Backend::tcp("e", Behavior::Echo).await;
    let listen = free_addr();
    let sluice = Sluice::start(&config(
        &listen,
        "accept_proxy_protocol = true",
        "",
        &[server(echo.addr, "")],
    ))
    .await;
    expect_closed(&listen, b"GET / HTTP/1.0\r\n\r\n", Duration::from_secs(5)).await;
    expect_closed(&listen, b"PROXY TCP4 1.2.3.4\r\n", Duration::from_secs(5)).await;
    expect_closed(
        &listen,
        b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
        Duration::from_secs(5),
    )
    .await;
    // Half a header and then silence: closed once connect_timeout (1s) passes.
    let started = std::time::Instant::now();
    expect_closed(&listen, b"PROXY TCP4 ", Duration::from_secs(5)).await;
    assert!(started.elapsed() >= Duration::from_millis(950));
    let rejected = |sluice: &Sluice| {
        sluice
            .log_lines()
            .iter()
            .filter(|line| line.contains("no valid PROXY header") && line.contains("WARN"))
            .count()
    };
    assert!(wait_until(Duration::from_secs(5), || rejected(&sluice) == 4).await);
    assert_eq!(rejected(&sluice), 4, "log:\n{}", sluice.log_text());
    assert!(sluice.log_text().contains("within connect_timeout"));
    assert_eq!(echo.accepted(), 0);
    echo.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_carried_address_is_the_hash_key_and_is_logged() {
    let mut backends = Vec::new();
    for name in ["a", "b", "c", "d"] {
        backends.push(Backend::tcp(name, Behavior::Announce).await);
    }
    let listen = free_addr();
    let servers: Vec<String> = backends.iter().map(|b| server(b.addr, "")).collect();
    let sluice = Sluice::spawn(
        &config(
            &listen,
            "accept_proxy_protocol = true",
            "balance = \"hash\"",
            &servers,
        ),
        &["--log-level", "debug"],
    );
    assert!(
        sluice
            .wait_for_log("listening", Duration::from_secs(10))
            .await
    );

    async fn peer_for(listen: &str, source: &str, port: u16) -> String {
        let mut client = TcpStream::connect(listen).await.unwrap();
        let header = format!("PROXY TCP4 {source} 192.0.2.1 {port} 24224\r\n");
        client.write_all(header.as_bytes()).await.unwrap();
        let mut name = [0u8; 1];
        client.read_exact(&mut name).await.unwrap();
        String::from_utf8(name.to_vec()).unwrap()
    }
    // One real client IP, many carried ones: each carried IP sticks to its
    // peer, and they spread (all 16 on one of 4 peers: about 4^-15).
    let mut seen = std::collections::HashMap::new();
    for n in 1..=16 {
        let source = format!("10.9.0.{n}");
        let first = peer_for(&listen, &source, 40000).await;
        for port in [40001, 40002] {
            assert_eq!(peer_for(&listen, &source, port).await, first, "{source}");
        }
        seen.insert(source, first);
    }
    let used: std::collections::HashSet<&String> = seen.values().collect();
    assert!(used.len() >= 2, "{seen:?}");
    let logged = wait_until(Duration::from_secs(5), || {
        sluice
            .log_lines()
            .iter()
            .any(|line| line.contains("connection closed") && line.contains("10.9.0.7:40002"))
    })
    .await;
    assert!(logged, "log:\n{}", sluice.log_text());
    for backend in backends {
        backend.finish().await;
    }
}

fn toml_path(key: &str, path: &Path) -> String {
    format!("{key} = {:?}\n", path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_goes_in_the_clear_before_the_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::generate_pki(dir.path());
    // A TLS backend behind a PROXY-protocol receiver: it reads the header
    // from the raw connection, then accepts TLS and answers with the header.
    let acceptor = tls::acceptor(&tls_backend::server_settings(
        &pki.server.cert,
        &pki.server.key,
    ))
    .unwrap();
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let listen = free_addr();
    let served = tokio::spawn(async move {
        let (mut raw, _) = backend.accept().await.unwrap();
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n") {
            line.push(raw.read_u8().await.unwrap());
        }
        let mut tls = acceptor.accept(raw).await.unwrap();
        tls.write_all(&line).await.unwrap();
        tls.shutdown().await.unwrap();
    });
    let _sluice = Sluice::start(&config(
        &listen,
        "proxy_protocol = \"v1\"",
        "",
        &[server(
            backend_addr,
            &format!(
                "[upstream.pool.server.tls]\n{}",
                toml_path("ca_file", &pki.ca)
            ),
        )],
    ))
    .await;
    let mut client = TcpStream::connect(&listen).await.unwrap();
    let local = client.local_addr().unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    let expected = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
        local.port(),
        listen.rsplit(':').next().unwrap()
    );
    assert_eq!(String::from_utf8_lossy(&back), expected);
    served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_reads_the_header_before_the_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::generate_pki(dir.path());
    let echo = Backend::tcp("e", Behavior::Echo).await;
    let listen = free_addr();
    let _sluice = Sluice::start(&config(
        &listen,
        &format!(
            "accept_proxy_protocol = true\nproxy_protocol = \"v2\"\n[listener.tls]\n{}{}",
            toml_path("cert_file", &pki.server.cert),
            toml_path("key_file", &pki.server.key)
        ),
        "",
        &[server(echo.addr, "")],
    ))
    .await;
    let mut tcp = TcpStream::connect(&listen).await.unwrap();
    tcp.write_all(SPEC_V1).await.unwrap();
    let settings = tls::ClientTlsSettings {
        ca_file: Some(pki.ca.clone()),
        ..tls::ClientTlsSettings::default()
    };
    let origin = tls::origin(&settings, "backend.test").unwrap();
    let client = origin
        .connector
        .connect(origin.server_name, tcp)
        .await
        .unwrap();
    // The carried addresses go on to the backend as v2; the payload follows.
    let back = exchange(client, b"inside tls").await;
    assert_eq!(back, concat(&[&spec_v2(), b"inside tls"]));
    echo.finish().await;
}
