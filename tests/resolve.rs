//! DNS re-resolution through the real binary, against a small DNS server on
//! loopback that the test controls.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::A;
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use hickory_resolver::proto::serialize::binary::{BinDecodable, BinEncodable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// What the DNS server answers for every A query.
struct Zone {
    addresses: Vec<Ipv4Addr>,
    ttl: u32,
    servfail: bool,
}

/// A DNS server on 127.0.0.1 (UDP and TCP on one port) answering A queries
/// for any name from a zone the test changes.
struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DnsServer {
    async fn start(addresses: &[Ipv4Addr], ttl: u32) -> DnsServer {
        // A free UDP port may be taken for TCP: try until both are ours.
        let (udp, tcp, addr) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            if let Ok(tcp) = TcpListener::bind(addr).await {
                break (udp, tcp, addr);
            }
        };
        let zone = Arc::new(Mutex::new(Zone {
            addresses: addresses.to_vec(),
            ttl,
            servfail: false,
        }));
        let udp_zone = Arc::clone(&zone);
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0; 4096];
            loop {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                if let Some(reply) = answer(&udp_zone, &buf[..n]) {
                    let _ = udp.send_to(&reply, from).await;
                }
            }
        });
        let tcp_zone = Arc::clone(&zone);
        let tcp_task = tokio::spawn(async move {
            loop {
                let (stream, _) = tcp.accept().await.unwrap();
                tokio::spawn(serve_tcp(stream, Arc::clone(&tcp_zone)));
            }
        });
        DnsServer {
            addr,
            zone,
            tasks: vec![udp_task, tcp_task],
        }
    }

    fn set(&self, addresses: &[Ipv4Addr]) {
        self.zone.lock().unwrap().addresses = addresses.to_vec();
    }

    fn fail(&self, servfail: bool) {
        self.zone.lock().unwrap().servfail = servfail;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// DNS over TCP: each message behind a 2-byte length.
async fn serve_tcp(mut stream: TcpStream, zone: Arc<Mutex<Zone>>) {
    loop {
        let Ok(len) = stream.read_u16().await else {
            return;
        };
        let mut query = vec![0; usize::from(len)];
        if stream.read_exact(&mut query).await.is_err() {
            return;
        }
        let Some(reply) = answer(&zone, &query) else {
            return;
        };
        let framed = [&(reply.len() as u16).to_be_bytes()[..], &reply].concat();
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

fn answer(zone: &Mutex<Zone>, query: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_bytes(query).ok()?;
    let zone = zone.lock().unwrap();
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    reply.add_queries(query.queries().to_vec());
    if zone.servfail {
        reply.set_response_code(ResponseCode::ServFail);
    } else {
        for question in query.queries() {
            if question.query_type() == RecordType::A {
                for &ip in &zone.addresses {
                    reply.add_answer(Record::from_rdata(
                        question.name().clone(),
                        zone.ttl,
                        RData::A(A(ip)),
                    ));
                }
            }
        }
    }
    reply.to_bytes().ok()
}

/// Announce backends on 127.0.0.2, .3 and .4, all on one port.
async fn backends_on_one_port() -> (u16, Vec<Backend>) {
    'port: loop {
        let first = Backend::tcp_on("127.0.0.2:0", "a", Behavior::Announce).await;
        let port = first.addr.port();
        let mut backends = vec![first];
        for (ip, name) in [("127.0.0.3", "b"), ("127.0.0.4", "c")] {
            // The port was free on 127.0.0.2; another test may hold it elsewhere.
            if std::net::TcpListener::bind((ip, port)).is_err() {
                continue 'port;
            }
            backends.push(Backend::tcp_on(&format!("{ip}:{port}"), name, Behavior::Announce).await);
        }
        return (port, backends);
    }
}

const A_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const B_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const C_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);

fn resolving_config(listen: &str, dns: SocketAddr, port: u16, interval: &str) -> String {
    config(
        listen,
        "",
        &format!("resolver = [\"{dns}\"]"),
        &[server(
            format!("pool.sluice.test:{port}"),
            &format!("name = \"pool\"\nresolve = true\nresolve_interval = \"{interval}\""),
        )],
    )
}

async fn names(listen: &str, count: usize) -> String {
    let mut order = String::new();
    for _ in 0..count {
        order.push_str(&announced(listen, 1).await);
    }
    order
}

fn changes(sluice: &Sluice) -> usize {
    sluice
        .log_lines()
        .iter()
        .filter(|line| line.contains("DNS re-resolution changed the peers"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_addresses_become_peers_and_removed_ones_finish_their_connections() {
    let (port, backends) = backends_on_one_port().await;
    let dns = DnsServer::start(&[A_IP], 300).await;
    let listen = free_addr();
    let sluice = Sluice::start(&resolving_config(&listen, dns.addr, port, "200ms")).await;
    assert_eq!(names(&listen, 4).await, "aaaa");

    // A second address appears: it becomes a peer.
    dns.set(&[A_IP, B_IP]);
    assert!(wait_until(Duration::from_secs(5), || changes(&sluice) == 1).await);
    let order = names(&listen, 6).await;
    assert_eq!(
        (order.matches('a').count(), order.matches('b').count()),
        (3, 3),
        "{order}"
    );
    assert!(sluice
        .log_text()
        .contains(&format!("pool@127.0.0.3:{port}")));

    // Hold a connection on a (round-robin gives it one of the next two),
    // then take a out of DNS and add c.
    let mut held = None;
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&listen).await.unwrap();
        let mut name = [0u8; 1];
        stream.read_exact(&mut name).await.unwrap();
        if name == *b"a" {
            held = Some(stream);
            break;
        }
    }
    let mut held = held.expect("a got neither of two connections");
    dns.set(&[B_IP, C_IP]);
    assert!(wait_until(Duration::from_secs(5), || changes(&sluice) == 2).await);
    let order = names(&listen, 10).await;
    assert_eq!(
        (order.matches('b').count(), order.matches('c').count()),
        (5, 5),
        "{order}"
    );
    // The open connection to the removed peer still relays.
    held.write_all(b"still here").await.unwrap();
    let mut echo = [0u8; 10];
    held.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"still here");
    drop(held);

    // DNS fails: the last good set stays and a warning says so.
    dns.fail(true);
    assert!(
        sluice
            .wait_for_log(
                "DNS re-resolution failed; keeping the last good addresses",
                Duration::from_secs(5)
            )
            .await
    );
    let order = names(&listen, 4).await;
    assert_eq!(order.matches('a').count(), 0, "{order}");
    assert_eq!(changes(&sluice), 2);
    assert_eq!(backends[0].accepted(), 4 + 3 + 1);
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_record_ttl_re_resolves_before_resolve_interval() {
    let (port, backends) = backends_on_one_port().await;
    let dns = DnsServer::start(&[A_IP], 1).await;
    let listen = free_addr();
    // resolve_interval is an hour; the 1 s TTL brings a change in within seconds.
    let sluice = Sluice::start(&resolving_config(&listen, dns.addr, port, "1h")).await;
    assert_eq!(names(&listen, 2).await, "aa");
    dns.set(&[B_IP]);
    assert!(wait_until(Duration::from_secs(5), || changes(&sluice) == 1).await);
    assert_eq!(names(&listen, 2).await, "bb");
    // The re-resolution task does not hold up a clean exit.
    let mut sluice = sluice;
    sluice.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sluice.wait_exit(Duration::from_secs(5)).await;
    assert!(status.is_some_and(|status| status.success()), "{status:?}");
    for backend in backends {
        backend.finish().await;
    }
}

/// A PATCH through the admin endpoint; the status code.
async fn patch(admin: &str, path: &str, body: &str) -> u16 {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let request = format!(
        "PATCH {path} HTTP/1.1\r\nHost: s\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response.split(' ').nth(1).unwrap().parse().unwrap()
}

/// An aggregator's preStop drains its own address (one peer of a
/// re-resolved name); once DNS drops the address, its drain is forgotten, so
/// a new pod on the same address later starts in rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_of_a_resolved_name_is_drained_on_its_own_until_dns_drops_it() {
    let (port, backends) = backends_on_one_port().await;
    let dns = DnsServer::start(&[A_IP, B_IP], 300).await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = format!(
        "{}\n[admin]\nbind = \"{admin}\"\n",
        resolving_config(&listen, dns.addr, port, "200ms")
    );
    let sluice = Sluice::start(&config).await;
    assert_eq!(names(&listen, 4).await, "abab");
    let peer = format!("/api/upstreams/pool/servers/pool@127.0.0.2:{port}");
    assert_eq!(patch(&admin, &peer, r#"{"state": "drain"}"#).await, 200);
    assert_eq!(names(&listen, 4).await, "bbbb");

    dns.set(&[B_IP]);
    assert!(wait_until(Duration::from_secs(5), || changes(&sluice) == 1).await);
    dns.set(&[A_IP, B_IP]);
    assert!(wait_until(Duration::from_secs(5), || changes(&sluice) == 2).await);
    let order = names(&listen, 4).await;
    assert_eq!(order.matches('a').count(), 2, "{order}");
    for backend in backends {
        backend.finish().await;
    }
}
