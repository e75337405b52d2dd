//! Long-lived Forward connections (SPEC §9) with `protocol = "forward"`:
//! sluice recycles them only at a message boundary with every `chunk`
//! acknowledged, so senders move to a new aggregator without losing or
//! repeating a record, through the shared_key handshake too; a stream that
//! is not Forward is relayed untouched and never recycled; SIGTERM drains
//! by recycling.

mod common;
#[path = "common/recycling.rs"]
mod recycling;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use recycling::{metric, reload, OpenCount};
use rmpv::Value;
use sha2::{Digest, Sha512};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SHARED_KEY: &str = "sluice-test-key";

fn text(s: &str) -> Value {
    Value::from(s)
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(pairs.into_iter().map(|(k, v)| (text(k), v)).collect())
}

fn encode(value: &Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, value).unwrap();
    bytes
}

fn field<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    value
        .as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// The shared_key digest of the Forward handshake.
fn digest(salt: &[u8], hostname: &str, nonce: &[u8]) -> String {
    let mut hasher = Sha512::new();
    hasher.update(salt);
    hasher.update(hostname.as_bytes());
    hasher.update(nonce);
    hasher.update(SHARED_KEY.as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads the next msgpack value; `None` at a clean end of stream.
async fn read_value(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Result<Option<Value>, String> {
    loop {
        let mut cursor = &buf[..];
        match rmpv::decode::read_value(&mut cursor) {
            Ok(value) => {
                let used = buf.len() - cursor.len();
                buf.drain(..used);
                return Ok(Some(value));
            }
            Err(
                rmpv::decode::Error::InvalidMarkerRead(err)
                | rmpv::decode::Error::InvalidDataRead(err),
            ) if err.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(err) => return Err(format!("not msgpack: {err}")),
        }
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err("end of stream inside a value".to_owned()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(err) => return Err(err.to_string()),
        }
    }
}

/// A Forward receiver (a stand-in fluentd): records every (sender, seq),
/// acks every `chunk`, and with `shared_key` runs the handshake first.
struct Receiver {
    addr: String,
    open: OpenCount,
    records: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl Receiver {
    async fn start(shared_key: bool) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let open = OpenCount::default();
        let records = Arc::new(Mutex::new(Vec::new()));
        let (counter, store) = (open.clone(), Arc::clone(&records));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let guard = counter.hold();
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let _guard = guard;
                    let _ = receive(stream, shared_key, store).await;
                });
            }
        });
        Receiver {
            addr,
            open,
            records,
        }
    }
}

async fn receive(
    mut stream: TcpStream,
    shared_key: bool,
    records: Arc<Mutex<Vec<(u64, u64)>>>,
) -> Result<(), String> {
    let mut buf = Vec::new();
    if shared_key {
        let nonce: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
        let helo = Value::Array(vec![
            text("HELO"),
            map(vec![
                ("nonce", Value::Binary(nonce.clone())),
                ("auth", Value::Binary(Vec::new())),
                ("keepalive", Value::from(true)),
            ]),
        ]);
        stream
            .write_all(&encode(&helo))
            .await
            .map_err(|e| e.to_string())?;
        let ping = read_value(&mut stream, &mut buf).await?.ok_or("no PING")?;
        let ping = ping.as_array().ok_or("PING is not an array")?;
        let hostname = ping[1].as_str().ok_or("no hostname")?.to_owned();
        let salt = ping[2].as_slice().ok_or("no salt")?.to_owned();
        let valid = ping[3].as_str() == Some(digest(&salt, &hostname, &nonce).as_str());
        let pong = Value::Array(vec![
            text("PONG"),
            Value::from(valid),
            text(if valid { "" } else { "shared_key mismatch" }),
            text("receiver"),
            text(&digest(&salt, "receiver", &nonce)),
        ]);
        stream
            .write_all(&encode(&pong))
            .await
            .map_err(|e| e.to_string())?;
        if !valid {
            return Err("shared_key mismatch".to_owned());
        }
    }
    while let Some(message) = read_value(&mut stream, &mut buf).await? {
        let items = message.as_array().ok_or("a message is an array")?;
        let options = if let Some(entries) = items[1].as_slice() {
            // PackedForward: [tag "bulk.SENDER.SEQ", entries, option].
            let tag = items[0].as_str().ok_or("no tag")?;
            let mut numbers = tag.split('.').skip(1).map(str::parse::<u64>);
            let (Some(Ok(sender)), Some(Ok(seq))) = (numbers.next(), numbers.next()) else {
                return Err(format!("tag {tag}"));
            };
            if entries != bulk_entries(sender, seq, entries.len()) {
                return Err(format!("the entries of {tag} changed on the way"));
            }
            records.lock().unwrap().push((sender, seq));
            items.get(2)
        } else {
            // Message mode: [tag, time, record, option?].
            let record = &items[2];
            if let (Some(sender), Some(seq)) = (field(record, "sender"), field(record, "seq")) {
                let pair = (
                    sender.as_u64().unwrap_or(u64::MAX),
                    seq.as_u64().unwrap_or(u64::MAX),
                );
                records.lock().unwrap().push(pair);
            }
            items.get(3)
        };
        if let Some(chunk) = options.and_then(|options| field(options, "chunk")) {
            let ack = map(vec![("ack", chunk.clone())]);
            stream
                .write_all(&encode(&ack))
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The entries blob of a PackedForward record: `len` bytes that differ by
/// sender, record and position, so a lost, repeated or moved byte shows.
fn bulk_entries(sender: u64, seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 7 + seq * 13 + sender * 101) % 251) as u8)
        .collect()
}

/// A PackedForward message `[tag "bulk.SENDER.SEQ", entries, {chunk}]`
/// whose entries the receiver checks byte for byte.
fn packed_forward(sender: u64, seq: u64, entries: usize, chunk: &str) -> Value {
    Value::Array(vec![
        text(&format!("bulk.{sender}.{seq}")),
        Value::Binary(bulk_entries(sender, seq, entries)),
        map(vec![("chunk", text(chunk))]),
    ])
}

/// What one chunk sender saw.
#[derive(Debug, Default)]
struct SenderReport {
    /// Records acknowledged (0..acked were all sent and acked).
    acked: u64,
    /// Closed by sluice between messages: reconnected.
    reconnects: usize,
    /// EOF while waiting for an ack: the record is resent, a duplicate.
    eof_with_ack_outstanding: usize,
    errors: Vec<String>,
}

/// A Forward client that sends each record with the `chunk` option and
/// waits for its ack, `pause` between records, as Fluent Bit does with
/// `require_ack_response`. Each record is a Message-mode record, or with
/// `entries` > 0 a PackedForward message carrying that many bytes of
/// entries. Before each record it checks whether sluice
/// closed the connection, and reconnects if so. It stops after `records`,
/// or when sluice refuses a reconnect (it is shutting down). With
/// `shutting_down`, a reconnect that sluice resets before the first ack
/// also ends it: it was queued on the listening socket as sluice closed it.
async fn chunk_sender(
    listen: String,
    sender: u64,
    records: u64,
    pause: Duration,
    shared_key: bool,
    shutting_down: bool,
    entries: usize,
) -> SenderReport {
    let mut report = SenderReport::default();
    let mut connection: Option<(TcpStream, Vec<u8>)> = None;
    let mut attempt = 0u64;
    let mut acked_here = 0u64;
    while report.acked < records {
        let refused_late = |report: &SenderReport, acked_here: u64| {
            shutting_down && report.reconnects > 0 && acked_here == 0
        };
        let (stream, buf) = match &mut connection {
            Some(open) => open,
            None => {
                let Ok(stream) = TcpStream::connect(&listen).await else {
                    return report;
                };
                acked_here = 0;
                let mut open = (stream, Vec::new());
                if shared_key {
                    if let Err(err) = handshake(&mut open.0, &mut open.1).await {
                        report.errors.push(format!("handshake: {err}"));
                        return report;
                    }
                }
                connection.insert(open)
            }
        };
        match recycling::peek_end(stream) {
            Ok(0) => {
                report.reconnects += 1;
                connection = None;
                continue;
            }
            Ok(_) => {
                report.errors.push("bytes nobody asked for".to_owned());
                return report;
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => {
                report.errors.push(format!("between messages: {err}"));
                return report;
            }
        }
        let seq = report.acked;
        let chunk = format!("{sender}-{seq}-{attempt}");
        attempt += 1;
        let message = if entries > 0 {
            packed_forward(sender, seq, entries, &chunk)
        } else {
            Value::Array(vec![
                text("sluice.test.record"),
                Value::from(1_700_000_000u64 + seq),
                map(vec![
                    ("sender", Value::from(sender)),
                    ("seq", Value::from(seq)),
                ]),
                map(vec![("chunk", text(&chunk))]),
            ])
        };
        if let Err(err) = stream.write_all(&encode(&message)).await {
            if !refused_late(&report, acked_here) {
                report.errors.push(format!("record {seq}: {err}"));
            }
            return report;
        }
        match read_value(stream, buf).await {
            Ok(Some(ack)) if field(&ack, "ack").and_then(Value::as_str) == Some(&chunk) => {
                report.acked += 1;
                acked_here += 1;
            }
            Ok(Some(other)) => {
                report
                    .errors
                    .push(format!("record {seq}: not its ack: {other}"));
                return report;
            }
            Ok(None) => {
                report.eof_with_ack_outstanding += 1;
                connection = None;
                continue;
            }
            Err(err) => {
                if !refused_late(&report, acked_here) {
                    report.errors.push(format!("record {seq}: {err}"));
                }
                return report;
            }
        }
        tokio::time::sleep(pause).await;
    }
    report
}

/// The client side of the shared_key handshake.
async fn handshake(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let helo = read_value(stream, buf).await?.ok_or("no HELO")?;
    let nonce = helo
        .as_array()
        .and_then(|items| field(&items[1], "nonce"))
        .and_then(Value::as_slice)
        .ok_or("no nonce")?
        .to_owned();
    let salt: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
    let ping = Value::Array(vec![
        text("PING"),
        text("sender"),
        Value::Binary(salt.clone()),
        text(&digest(&salt, "sender", &nonce)),
        text(""),
        text(""),
    ]);
    stream
        .write_all(&encode(&ping))
        .await
        .map_err(|e| e.to_string())?;
    let pong = read_value(stream, buf).await?.ok_or("no PONG")?;
    let pong = pong.as_array().ok_or("PONG is not an array")?;
    if pong[1].as_bool() != Some(true) {
        return Err(format!("refused: {}", pong[2]));
    }
    if pong[4].as_str() != Some(digest(&salt, "receiver", &nonce).as_str()) {
        return Err("the server's digest does not match".to_owned());
    }
    Ok(())
}

fn forward_config(listen: &str, admin: &str, extra: &str, servers: &[String]) -> String {
    let text = config(
        listen,
        &format!("protocol = \"forward\"\nrebalance = true\n{extra}"),
        "",
        servers,
    );
    format!("{text}\n[admin]\nbind = \"{admin}\"\n")
}

/// Every (sender, seq) below `upto[sender]` received at least once; returns
/// how many records arrived more than once.
fn assert_every_record(received: &[(u64, u64)], upto: &[u64]) -> usize {
    let mut seen: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    for &pair in received {
        *seen.entry(pair).or_default() += 1;
    }
    for (sender, &count) in upto.iter().enumerate() {
        for seq in 0..count {
            assert!(
                seen.contains_key(&(sender as u64, seq)),
                "record {seq} of sender {sender} was lost"
            );
        }
    }
    seen.values().map(|n| n - 1).sum()
}

fn all_records(receivers: &[&Receiver]) -> Vec<(u64, u64)> {
    receivers
        .iter()
        .flat_map(|r| r.records.lock().unwrap().clone())
        .collect()
}

/// Six chunk senders on two aggregators; a third joins by reload and gets
/// its share; every chunk is acked, no record lost or repeated. With
/// `entries` > 0 they send PackedForward messages of that size.
async fn senders_move_to_a_new_aggregator(shared_key: bool, entries: usize) {
    let a = Receiver::start(shared_key).await;
    let b = Receiver::start(shared_key).await;
    let c = Receiver::start(shared_key).await;
    let (listen, admin) = (free_addr(), free_addr());
    let two = [server(&a.addr, ""), server(&b.addr, "")];
    let sluice = Sluice::start(&forward_config(&listen, &admin, "", &two)).await;
    let (senders, records) = (6u64, if entries > 0 { 30 } else { 50 });
    let mut tasks = Vec::new();
    for sender in 0..senders {
        let pause = Duration::from_millis(150);
        tasks.push(tokio::spawn(chunk_sender(
            listen.clone(),
            sender,
            records,
            pause,
            shared_key,
            false,
            entries,
        )));
        let open = wait_until(Duration::from_secs(10), || {
            a.open.get() + b.open.get() > sender as usize
        });
        assert!(open.await);
    }
    assert_eq!((a.open.get(), b.open.get()), (3, 3));
    let three = [two[0].clone(), two[1].clone(), server(&c.addr, "")];
    reload(&sluice, &forward_config(&listen, &admin, "", &three)).await;
    let moved = wait_until(Duration::from_secs(10), || {
        let counts = [a.open.get(), b.open.get(), c.open.get()];
        counts.iter().sum::<usize>() == 6
            && counts.iter().all(|n| n.abs_diff(2) <= 1)
            && counts[2] > 0
    })
    .await;
    assert!(
        moved,
        "shares {:?}",
        [a.open.get(), b.open.get(), c.open.get()]
    );
    let mut reports = Vec::new();
    for task in tasks {
        reports.push(task.await.unwrap());
    }
    for report in &reports {
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.acked, records, "every chunk acknowledged");
        assert_eq!(
            report.eof_with_ack_outstanding, 0,
            "a sender got EOF while its ack was outstanding"
        );
    }
    let reconnects: usize = reports.iter().map(|r| r.reconnects).sum();
    assert!(reconnects > 0, "no sender moved");
    let duplicates = assert_every_record(&all_records(&[&a, &b, &c]), &[records; 6]);
    assert_eq!(duplicates, 0, "records repeated");
    let counted = metric(
        &admin,
        "sluice_connections_recycled_total{listener=\"front\",reason=\"rebalance\"}",
    )
    .await;
    assert!(
        counted as usize >= reconnects,
        "{counted} counted, {reconnects} seen"
    );
    assert!(
        !c.records.lock().unwrap().is_empty(),
        "the new aggregator got nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_senders_move_to_a_new_aggregator_with_every_chunk_acked() {
    senders_move_to_a_new_aggregator(false, 0).await;
}

/// The entries of each PackedForward message (256 KiB) are spliced past
/// the framing follower, which must still find every boundary and ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_packed_forward_senders_move_with_every_byte_intact() {
    senders_move_to_a_new_aggregator(false, 256 * 1024).await;
}

/// PackedForward messages of mixed sizes, written back to back without
/// waiting for acks: after each spliced payload the relay reads the short
/// rest and the framing that follows, which may hold a whole small message
/// or the head of the next large one. Every byte arrives, every chunk is
/// acked in order, and the follower still knows the boundaries: the
/// connection is recycled at its age once everything is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_packed_forward_of_mixed_sizes_keeps_every_byte_and_boundary() {
    let a = Receiver::start(false).await;
    let (listen, admin) = (free_addr(), free_addr());
    let extra = "max_connection_age = \"1s\"";
    let _sluice = Sluice::start(&forward_config(
        &listen,
        &admin,
        extra,
        &[server(&a.addr, "")],
    ))
    .await;
    // Around the 16 KiB splice threshold and the 1 KiB framing read, and
    // payloads larger than a pipe.
    let sizes = [
        300_000, 1, 17_000, 0, 70_000, 16_383, 16_385, 900, 40_000, 5, 16_384, 1_100,
    ];
    let records = 60u64;
    let mut stream = TcpStream::connect(&listen).await.unwrap();
    let mut burst = Vec::new();
    for seq in 0..records {
        let entries = sizes[seq as usize % sizes.len()];
        burst.extend(encode(&packed_forward(0, seq, entries, &format!("c{seq}"))));
    }
    let (mut reader, mut writer) = stream.split();
    let (written, acks) = tokio::join!(writer.write_all(&burst), async {
        let mut buf = Vec::new();
        let mut acks = Vec::new();
        while acks.len() < records as usize {
            match tokio::time::timeout(Duration::from_secs(10), read_value(&mut reader, &mut buf))
                .await
            {
                Ok(Ok(Some(ack))) => acks.push(
                    field(&ack, "ack")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                ),
                other => panic!("after {} acks: {other:?}", acks.len()),
            }
        }
        acks
    });
    written.unwrap();
    let expected: Vec<_> = (0..records).map(|seq| Some(format!("c{seq}"))).collect();
    assert_eq!(acks, expected, "every chunk acked, in order");
    let mut probe = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut probe)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "recycled at its age: {closed:?}"
    );
    let duplicates = assert_every_record(&all_records(&[&a]), &[records]);
    assert_eq!(duplicates, 0, "records repeated");
    let recycled = metric(
        &admin,
        "sluice_connections_recycled_total{listener=\"front\",reason=\"age\"}",
    )
    .await;
    assert_eq!(recycled, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_key_handshake_passes_through_and_senders_still_move() {
    senders_move_to_a_new_aggregator(true, 0).await;
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fluent_logger_senders_move_without_losing_a_record() {
    let a = Receiver::start(false).await;
    let b = Receiver::start(false).await;
    let c = Receiver::start(false).await;
    let (listen, admin) = (free_addr(), free_addr());
    let two = [server(&a.addr, ""), server(&b.addr, "")];
    let sluice = Sluice::start(&forward_config(&listen, &admin, "", &two)).await;
    let (host, port) = listen.rsplit_once(':').unwrap();
    let (senders, records) = (6u64, 60u64);
    let script = manifest_dir().join("tests/forward/send_paced.py");
    let child = tokio::process::Command::new("python3")
        .arg(script)
        .args([
            host,
            port,
            &senders.to_string(),
            &records.to_string(),
            "100",
        ])
        .output();
    let python = tokio::spawn(child);
    let connected = wait_until(Duration::from_secs(10), || a.open.get() + b.open.get() == 6);
    assert!(connected.await, "fluent-logger did not connect");
    let three = [two[0].clone(), two[1].clone(), server(&c.addr, "")];
    reload(&sluice, &forward_config(&listen, &admin, "", &three)).await;
    let output = python.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "send_paced.py: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reconnects: usize = stdout
        .trim()
        .strip_prefix("reconnects=")
        .and_then(|n| n.parse().ok())
        .unwrap();
    let received = all_records(&[&a, &b, &c]);
    let duplicates = assert_every_record(&received, &[records; 6]);
    // fluent-logger resends a record it already sent when it finds the
    // connection closed just after sending it: at most one per reconnect.
    println!("fluent-logger: {reconnects} reconnects, {duplicates} records repeated");
    assert!(duplicates <= reconnects);
    assert!(reconnects > 0, "no sender moved");
    assert!(
        !c.records.lock().unwrap().is_empty(),
        "the new aggregator got nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_is_not_forward_is_relayed_untouched_and_never_recycled() {
    let a = Backend::tcp("a", Behavior::Echo).await;
    let b = Backend::tcp("b", Behavior::Echo).await;
    let c = Backend::tcp("c", Behavior::Echo).await;
    let (listen, admin) = (free_addr(), free_addr());
    let two = [server(a.addr, ""), server(b.addr, "")];
    let sluice = Sluice::start(&forward_config(&listen, &admin, "", &two)).await;
    let mut streams = Vec::new();
    for _ in 0..6 {
        streams.push(TcpStream::connect(&listen).await.unwrap());
    }
    let relayed = wait_until(Duration::from_secs(10), || a.accepted() + b.accepted() == 6);
    assert!(relayed.await);
    let three = [two[0].clone(), two[1].clone(), server(c.addr, "")];
    reload(&sluice, &forward_config(&listen, &admin, "", &three)).await;
    // Text lines, then bytes of every value: each comes back unchanged,
    // over the same connection, for 3 s of rebalancing.
    let started = Instant::now();
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        for (index, stream) in streams.iter_mut().enumerate() {
            let message = if round == 0 {
                format!("hello {index}\n").into_bytes()
            } else {
                payload(64, round * 10 + index as u64)
            };
            stream.write_all(&message).await.unwrap();
            let mut echo = vec![0; message.len()];
            stream.read_exact(&mut echo).await.unwrap();
            assert_eq!(echo, message);
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!((a.accepted(), b.accepted(), c.accepted()), (3, 3, 0));
    let recycled = metric(
        &admin,
        "sluice_connections_recycled_total{listener=\"front\",reason=\"rebalance\"}",
    )
    .await;
    assert_eq!(recycled, 0.0);
    drop(streams);
    for backend in [a, b, c] {
        backend.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_moves_forward_senders_at_message_boundaries() {
    let a = Receiver::start(false).await;
    let (listen, admin) = (free_addr(), free_addr());
    let text = forward_config(&listen, &admin, "", &[server(&a.addr, "")])
        .replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"60s\"");
    let mut sluice = Sluice::start(&text).await;
    let senders = 4u64;
    let pause = Duration::from_millis(300);
    let mut tasks = Vec::new();
    for sender in 0..senders {
        tasks.push(tokio::spawn(chunk_sender(
            listen.clone(),
            sender,
            u64::MAX,
            pause,
            false,
            true,
            0,
        )));
    }
    assert!(wait_until(Duration::from_secs(10), || a.open.get() == 4).await);
    // The senders started together and keep step: signal halfway between
    // two rounds of records, so no sender is sending as its FIN comes (a
    // sender that does races the close, SPEC §9).
    let rounds = wait_until(Duration::from_secs(10), || {
        a.records.lock().unwrap().len() >= 3 * senders as usize
    });
    assert!(rounds.await);
    tokio::time::sleep(pause / 2).await;
    let signalled = Instant::now();
    sluice.signal(Signal::SIGTERM);
    let status = sluice.wait_exit(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "log:\n{}",
        sluice.log_text()
    );
    // Far sooner than shutdown_timeout: each sender was closed between records.
    assert!(signalled.elapsed() < Duration::from_secs(15));
    let mut acked = Vec::new();
    for task in tasks {
        let report = task.await.unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.eof_with_ack_outstanding, 0, "{report:?}");
        assert_eq!(report.reconnects, 1, "closed once, then refused");
        assert!(report.acked > 0);
        acked.push(report.acked);
    }
    assert_eq!(assert_every_record(&a.records.lock().unwrap(), &acked), 0);
    assert!(!sluice
        .log_text()
        .contains("closing the remaining connections"));
}
