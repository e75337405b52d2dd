//! Fluent Bit compatibility: Upstream files read by the real binary, and real
//! Forward traffic from fluent-logger (Python) through sluice to Forward
//! receivers written here, one of them over TLS.

#[path = "common/certs.rs"]
mod certs;
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rmpv::Value;
use sluice::tls::{self, ServerTlsSettings};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

const TAG: &str = "sluice.test.record";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `(sender, seq)` of each record, per connection, in arrival order.
type ConnectionRecords = Arc<Mutex<Vec<Vec<(u64, u64)>>>>;

/// A Forward receiver: reads each connection to its end, decodes the
/// msgpack Forward messages `[tag, time, record]` and keeps, per connection,
/// the `(sender, seq)` of every record in arrival order.
struct ForwardReceiver {
    port: u16,
    connections: ConnectionRecords,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl ForwardReceiver {
    async fn start(tls: Option<TlsAcceptor>) -> ForwardReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = ForwardReceiver {
            port: listener.local_addr().unwrap().port(),
            connections: Arc::default(),
            tasks: Arc::default(),
        };
        let (connections, tasks) = (
            Arc::clone(&receiver.connections),
            Arc::clone(&receiver.tasks),
        );
        receiver.tasks.lock().unwrap().spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (connections, tls) = (Arc::clone(&connections), tls.clone());
                tasks.lock().unwrap().spawn(async move {
                    let records = match tls {
                        Some(acceptor) => {
                            read_records(acceptor.accept(stream).await.unwrap()).await
                        }
                        None => read_records(stream).await,
                    };
                    connections.lock().unwrap().push(records);
                });
            }
        });
        receiver
    }

    fn connections(&self) -> Vec<Vec<(u64, u64)>> {
        self.connections.lock().unwrap().clone()
    }

    fn record_count(&self) -> usize {
        self.connections().iter().map(Vec::len).sum()
    }

    async fn finish(self) {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        tasks.abort_all();
        while let Some(result) = tasks.join_next().await {
            if let Err(err) = result {
                assert!(!err.is_panic(), "receiver panicked: {err}");
            }
        }
    }
}

async fn read_records<S: AsyncRead + Unpin>(mut stream: S) -> Vec<(u64, u64)> {
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.unwrap();
    let mut input = bytes.as_slice();
    let mut records = Vec::new();
    while !input.is_empty() {
        let message = rmpv::decode::read_value(&mut input).unwrap();
        let Value::Array(parts) = message else {
            panic!("not a Forward message: {message}");
        };
        assert_eq!(parts.len(), 3, "not [tag, time, record]: {parts:?}");
        assert_eq!(parts[0].as_str(), Some(TAG));
        let field = |name: &str| {
            parts[2]
                .as_map()
                .and_then(|map| map.iter().find(|(key, _)| key.as_str() == Some(name)))
                .and_then(|(_, value)| value.as_u64())
                .unwrap_or_else(|| panic!("record without {name}: {}", parts[2]))
        };
        records.push((field("sender"), field("seq")));
    }
    records
}

/// Runs the fluent-logger script: `senders` connections, `records` records each.
async fn send_records(listen: &str, senders: u64, records: u64) {
    let (host, port) = listen.rsplit_once(':').unwrap();
    let script = manifest_dir().join("tests/forward/send_records.py");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("python3")
            .arg(script)
            .args([host, port, &senders.to_string(), &records.to_string()])
            .output(),
    )
    .await
    .expect("fluent-logger did not finish in time")
    .expect("python3 could not run");
    assert!(
        output.status.success(),
        "fluent-logger failed ({}); is `fluent-logger` installed (.ci/run installs it)?\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Waits for every record, then checks: each connection carried one sender's
/// records, all of them, in order; every sender arrived exactly once; and
/// each receiver got `per_receiver` connections.
async fn assert_delivered_once(
    receivers: &[&ForwardReceiver],
    senders: u64,
    records: u64,
    per_receiver: usize,
) {
    let expected_total = (senders * records) as usize;
    let arrived = wait_until(Duration::from_secs(20), || {
        receivers.iter().map(|r| r.record_count()).sum::<usize>() >= expected_total
    })
    .await;
    assert!(arrived, "records missing");
    let mut seen_senders = BTreeMap::new();
    for (index, receiver) in receivers.iter().enumerate() {
        let connections = receiver.connections();
        assert_eq!(
            connections.len(),
            per_receiver,
            "receiver {index}: connections {connections:?}"
        );
        for records_of_connection in connections {
            let sender = records_of_connection[0].0;
            let expected: Vec<(u64, u64)> = (0..records).map(|seq| (sender, seq)).collect();
            assert_eq!(records_of_connection, expected, "sender {sender}");
            *seen_senders.entry(sender).or_insert(0) += 1;
        }
    }
    let all_once: BTreeMap<u64, i32> = (0..senders).map(|sender| (sender, 1)).collect();
    assert_eq!(seen_senders, all_once);
}

fn tls_receiver_acceptor(pki: &certs::TestPki) -> TlsAcceptor {
    tls::acceptor(&ServerTlsSettings {
        cert_file: pki.impostor.cert.clone(),
        key_file: pki.impostor.key.clone(),
        client_ca_file: None,
    })
    .unwrap()
}

/// The operator's own file, ports rewritten to the receivers' ones.
fn seed_file(dir: &Path, ports: [u16; 3]) -> PathBuf {
    let fixture = manifest_dir().join("tests/fixtures/fluent-bit/forward-balancing.conf");
    let mut text = std::fs::read_to_string(fixture).unwrap();
    for (seed_port, port) in ["43000", "44000", "45000"].into_iter().zip(ports) {
        assert_eq!(text.matches(seed_port).count(), 1);
        text = text.replace(seed_port, &port.to_string());
    }
    let path = dir.join("forward-balancing.conf");
    std::fs::write(&path, text).unwrap();
    path
}

/// The seed example: three nodes, node-3 with `tls on`, `tls.verify off` and
/// `shared_key secret`, run with `sluice --fluent-bit FILE --bind ADDR`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_example_balances_forward_traffic_over_three_nodes_one_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::generate_pki(dir.path());
    let node1 = ForwardReceiver::start(None).await;
    let node2 = ForwardReceiver::start(None).await;
    // node-3's certificate is self-signed: only `tls.verify off` gets through.
    let node3 = ForwardReceiver::start(Some(tls_receiver_acceptor(&pki))).await;
    let file = seed_file(dir.path(), [node1.port, node2.port, node3.port]);
    let listen = free_addr();
    let sluice = Sluice::start_args(
        &["--fluent-bit", file.to_str().unwrap(), "--bind", &listen],
        1,
    )
    .await;
    assert!(
        sluice
            .log_text()
            .contains("tls.verify off): any certificate is accepted upstream=\"forward-balancing\" server=\"node-3\""),
        "{}",
        sluice.log_text()
    );

    send_records(&listen, 6, 200).await;
    assert_delivered_once(&[&node1, &node2, &node3], 6, 200, 2).await;
    node1.finish().await;
    node2.finish().await;
    node3.finish().await;
}

/// `from_fluent_bit` inside an upstream, with Fluent Bit's YAML form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_fluent_bit_yaml_file_in_a_toml_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let node1 = ForwardReceiver::start(None).await;
    let node2 = ForwardReceiver::start(None).await;
    let yaml = format!(
        "upstream_servers:\n  - name: aggregators\n    nodes:\n\
         \x20     - name: agg-1\n        host: 127.0.0.1\n        port: {}\n        shared_key: s1\n\
         \x20     - name: agg-2\n        host: 127.0.0.1\n        port: {}\n",
        node1.port, node2.port
    );
    std::fs::write(dir.path().join("aggregators.yaml"), yaml).unwrap();
    let listen = free_addr();
    let text = format!(
        "[[listener]]\nname = \"forward\"\nbind = \"{listen}\"\nupstream = \"fluentd\"\n\n\
         [upstream.fluentd]\nfrom_fluent_bit = \"aggregators.yaml\"\n"
    );
    let config_path = dir.path().join("sluice.toml");
    std::fs::write(&config_path, text).unwrap();
    let _sluice = Sluice::start_args(&["--config", config_path.to_str().unwrap()], 1).await;

    send_records(&listen, 4, 150).await;
    assert_delivered_once(&[&node1, &node2], 4, 150, 2).await;
    node1.finish().await;
    node2.finish().await;
}

#[test]
fn check_prints_the_nodes_as_sluice_uses_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = seed_file(dir.path(), [43001, 44001, 45001]);
    let (code, stdout, stderr) = run_sluice(
        &[
            "--check",
            "--fluent-bit",
            file.to_str().unwrap(),
            "--bind",
            "127.0.0.1:24224",
        ],
        &[],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    let expected = format!(
        "shutdown_timeout 30s\n\
         listener \"forward-balancing\" on 127.0.0.1:24224 -> upstream \"forward-balancing\" \
         (connect_timeout 5s, idle_timeout 10m, next_upstream_tries unlimited, next_upstream_timeout off, \
         proxy_protocol off, accept_proxy_protocol off, access_log on)\n\
         upstream \"forward-balancing\" balance round_robin\n\
         \x20 peer \"node-1\" 127.0.0.1:43001 weight 1 max_conns unlimited max_fails 1 fail_timeout 10s slow_start off\n\
         \x20 peer \"node-2\" 127.0.0.1:44001 weight 1 max_conns unlimited max_fails 1 fail_timeout 10s slow_start off\n\
         \x20 peer \"node-3\" 127.0.0.1:45001 weight 1 max_conns unlimited max_fails 1 fail_timeout 10s slow_start off\n\
         \x20   tls verify off\n\
         \x20   kept, not used: shared_key=(secret, not shown)\n\
         configuration {} is valid\n",
        file.display()
    );
    assert_eq!(stdout, expected);
    assert!(!stdout.contains("secret\n"), "{stdout}");
}

#[test]
fn check_maps_node_tls_keys_and_expands_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nodes.conf");
    std::fs::write(
        &file,
        "[UPSTREAM]\n  name  secure\n[NODE]\n  name  n1\n  host  127.0.0.1\n  port  ${NODE_PORT}\n\
         \x20 TLS  On\n  tls.vhost  sni.test\n  tls.ca_file  /etc/ca.pem\n  tls.ca_path  /etc/cas\n\
         \x20 tls.crt_file  /etc/c.pem\n  tls.key_file  /etc/c.key\n  username  fb\n  password  pw\n\
         \x20 self_hostname  edge-1\n",
    )
    .unwrap();
    let args = [
        "--check",
        "--fluent-bit",
        file.to_str().unwrap(),
        "--bind",
        "unix:/tmp/sluice-fb.sock",
    ];
    let (code, stdout, stderr) = run_sluice(&args, &[("NODE_PORT", "24299")], dir.path());
    // The files do not exist: --check reads them, so this is exit 1 naming
    // the first read and the line of its key.
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("/etc/ca.pem"), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:9: ", file.display())),
        "{stderr}"
    );

    let pki = certs::generate_pki(dir.path());
    let cas = dir.path().join("cas");
    std::fs::create_dir(&cas).unwrap();
    std::fs::copy(&pki.ca, cas.join("ca.pem")).unwrap();
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("/etc/ca.pem", pki.ca.to_str().unwrap())
        .replace("/etc/cas", cas.to_str().unwrap())
        .replace("/etc/c.pem", pki.client.cert.to_str().unwrap())
        .replace("/etc/c.key", pki.client.key.to_str().unwrap());
    std::fs::write(&file, text).unwrap();
    let (code, stdout, stderr) = run_sluice(&args, &[("NODE_PORT", "24299")], dir.path());
    assert_eq!(code, 0, "{stderr}");
    let tls_line = format!(
        "    tls verify on server_name sni.test ca_file {} ca_path {} cert_file {} key_file {}\n",
        pki.ca.display(),
        cas.display(),
        pki.client.cert.display(),
        pki.client.key.display()
    );
    assert!(stdout.contains("peer \"n1\" 127.0.0.1:24299 "), "{stdout}");
    assert!(stdout.contains(&tls_line), "{stdout}");
    assert!(
        stdout.contains(
            "    kept, not used: username=fb password=(secret, not shown) self_hostname=edge-1\n"
        ),
        "{stdout}"
    );

    let (code, _, stderr) = run_sluice(&args, &[], dir.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("{}:6", file.display())),
        "{stderr}"
    );
    assert!(stderr.contains("NODE_PORT"), "{stderr}");
}

#[test]
fn upstream_file_errors_exit_1_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.conf");
    let cases = [
        (
            "[UPSTREAM]\n name a\n[UPSTREAM]\n name b\n[NODE]\n name n\n host h\n port 1\n",
            3,
        ),
        (
            "[UPSTREAM]\n name a\n[NODE]\n name n\n host 127.0.0.1\n port 65536\n",
            6,
        ),
        ("[UPSTREAM]\n name a\n[NODE]\n name n\n port 24224\n", 3),
        ("[UPSTREAM]\n name a\n[SERVER]\n name n\n", 3),
        // Found when the host is resolved, named at its `host` line.
        (
            "[UPSTREAM]\n name a\n[NODE]\n name n\n port 1\n host nohost.invalid\n",
            6,
        ),
        (
            "[UPSTREAM]\n name a\n[NODE]\n name n\n host h\n port 1\n tls maybe\n",
            7,
        ),
    ];
    for (text, line) in cases {
        std::fs::write(&file, text).unwrap();
        let (code, _, stderr) = run_sluice(
            &[
                "--check",
                "--fluent-bit",
                file.to_str().unwrap(),
                "--bind",
                "127.0.0.1:1",
            ],
            &[],
            dir.path(),
        );
        assert_eq!(code, 1, "{text}: {stderr}");
        assert!(
            stderr.contains(&format!("{}:{line}:", file.display())),
            "{text}: {stderr}"
        );
    }
    // The same errors through `from_fluent_bit` name the Fluent Bit file too.
    let toml = dir.path().join("sluice.toml");
    std::fs::write(
        &toml,
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1\"\nupstream = \"u\"\n[upstream.u]\nfrom_fluent_bit = \"bad.conf\"\n",
    )
    .unwrap();
    let (code, _, stderr) = run_sluice(
        &["--check", "--config", toml.to_str().unwrap()],
        &[],
        dir.path(),
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("{}:7:", file.display())),
        "{stderr}"
    );
}

#[test]
fn fluent_bit_mode_needs_bind_and_excludes_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = seed_file(dir.path(), [1, 2, 3]);
    let (code, _, stderr) = run_sluice(&["--fluent-bit", file.to_str().unwrap()], &[], dir.path());
    assert_ne!(code, 0);
    assert!(stderr.contains("--bind"), "{stderr}");
    let (code, _, stderr) = run_sluice(
        &[
            "--fluent-bit",
            file.to_str().unwrap(),
            "--bind",
            "127.0.0.1:1",
            "--config",
            "x.toml",
        ],
        &[],
        dir.path(),
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("--config"), "{stderr}");
    // $SLUICE_CONFIG in the environment is not a conflict.
    let (code, _, stderr) = run_sluice(
        &[
            "--check",
            "--fluent-bit",
            file.to_str().unwrap(),
            "--bind",
            "127.0.0.1:1",
        ],
        &[("SLUICE_CONFIG", "/nonexistent.toml")],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
}
