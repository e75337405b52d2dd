//! The judge of SPEC §3: real nginx (1.22, stream module) and sluice in
//! front of the same loopback servers, driven through the same connection
//! sequences, must serve every connection from the same server after trying
//! the same servers in the same order.
//!
//! Servers answer with their address (`live`), refuse (`dead`: an address
//! on 127.77.0.0/16 where nothing listens), or never answer the handshake
//! (`hang`: a listener whose accept queue is full, so SYNs are dropped).
//! nginx logs `$upstream_addr` per session; sluice's access log has `tries`.
//! Both are matched to connections by the client's address.
//!
//! What is compared:
//! * round_robin, least_conn, hash (nginx's `hash $remote_addr consistent`,
//!   clients from many 127.0.0.0/8 addresses), backup, down, max_conns,
//!   max_fails, single-server groups, hanging servers: every connection's
//!   served server and tried servers, exactly.
//! * `fail_timeout` expiry: nginx's clock ticks in whole seconds, so a peer
//!   failed at `t` is out until some moment between `t + fail_timeout` and
//!   `t + fail_timeout + 1s`. The timed scenarios look only well inside
//!   (< 0.9 s after) or well after (> 2.1 s after, with 1 s timeouts).
//! * random and random_two draw at random in both: what is deterministic is
//!   compared (whether each connection is served, that a `down` server is
//!   never tried and a refusing one never serves, and how many times each
//!   refusing server is tried before it is marked).
//! * A few hundred seeded random groups (weights 1-10, some refusing, some
//!   down, some backup, max_fails 0-3, held connections): exactly, like the
//!   first list. `PARITY_SEED=N` runs another seed, `PARITY_GROUPS=N`
//!   another count.
//!
//! nginx runs in the foreground as a single process (`master_process off`,
//! so it never switches user and can write its tempdir as root) with its
//! prefix, pid file, error log and access log in a tempdir.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::SLUICE;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;

/// nginx's connect timeout and sluice's, for the hanging servers.
const CONNECT_TIMEOUT_MS: u64 = 1000;
/// How long a connection or a log line may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

// ---------------------------------------------------------------------------
// Servers

/// Accepts and writes `ADDRESS\n`, then waits for the client to close.
async fn live_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let name = listener.local_addr().unwrap().to_string();
    let answer = format!("{name}\n");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                if stream.write_all(answer.as_bytes()).await.is_ok() {
                    let mut sink = [0u8; 64];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                }
            });
        }
    });
    name
}

/// A server that can be stopped (it then refuses) and started again on the
/// same address.
struct Switchable {
    name: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Switchable {
    /// On a port below the ephemeral range, so no outgoing connection takes
    /// it while the server is stopped.
    async fn new() -> Switchable {
        let port = distinct_ports(1)[0];
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let name = listener.local_addr().unwrap().to_string();
        let mut switchable = Switchable { name, task: None };
        switchable.serve(listener);
        switchable
    }

    fn serve(&mut self, listener: TcpListener) {
        let answer = format!("{}\n", self.name);
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let answer = answer.clone();
                tokio::spawn(async move {
                    if stream.write_all(answer.as_bytes()).await.is_ok() {
                        let mut sink = [0u8; 64];
                        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                    }
                });
            }
        }));
    }

    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn start(&mut self) {
        let listener = TcpListener::bind(&self.name).await.unwrap();
        self.serve(listener);
    }
}

/// A listener that never completes a handshake: its accept queue (backlog 0)
/// is filled by a connection that is never accepted, so further SYNs are
/// dropped and connects time out.
struct Hanging {
    name: String,
    _listener: socket2::Socket,
    _fillers: Vec<std::net::TcpStream>,
}

fn hanging_server() -> Hanging {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300))
        {
            fillers.push(stream);
        }
    }
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
        "the hanging server's queue is not full"
    );
    Hanging {
        name: addr.to_string(),
        _listener: listener,
        _fillers: fillers,
    }
}

/// An address where nothing listens: connects are refused at once.
fn dead_server(n: u16) -> String {
    format!("127.77.{}.{}:1", n / 200, 1 + n % 200)
}

// ---------------------------------------------------------------------------
// Scenarios

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    RoundRobin,
    LeastConn,
    Hash,
    Random,
    RandomTwo,
}

#[derive(Debug, Clone)]
struct Server {
    address: String,
    weight: u32,
    max_fails: u32,
    fail_timeout_s: u32,
    max_conns: u32,
    backup: bool,
    down: bool,
}

impl Server {
    fn new(address: &str) -> Server {
        Server {
            address: address.to_owned(),
            weight: 1,
            max_fails: 1,
            fail_timeout_s: 30,
            max_conns: 0,
            backup: false,
            down: false,
        }
    }
    fn weight(mut self, weight: u32) -> Server {
        self.weight = weight;
        self
    }
    fn max_fails(mut self, max_fails: u32) -> Server {
        self.max_fails = max_fails;
        self
    }
    fn fail_timeout(mut self, seconds: u32) -> Server {
        self.fail_timeout_s = seconds;
        self
    }
    fn max_conns(mut self, max_conns: u32) -> Server {
        self.max_conns = max_conns;
        self
    }
    fn backup(mut self) -> Server {
        self.backup = true;
        self
    }
    fn down(mut self) -> Server {
        self.down = true;
        self
    }
}

/// One step of a connection sequence.
#[derive(Debug, Clone)]
enum Step {
    /// A connection from 127.0.0.1 that reads its answer and closes.
    Connect,
    /// A connection from this client address.
    ConnectFrom(Ipv4Addr),
    /// Connections that read their answer and stay open.
    Hold(usize),
    /// Closes every held connection.
    Release,
}

#[derive(Debug, Clone)]
struct Scenario {
    name: String,
    method: Method,
    servers: Vec<Server>,
    /// Each phase runs on both balancers at once; a timed test changes the
    /// servers or waits between phases.
    phases: Vec<Vec<Step>>,
}

fn connects(count: usize) -> Vec<Step> {
    vec![Step::Connect; count]
}

// ---------------------------------------------------------------------------
// Logs

/// Access-log entries by client address, filled by a reader as they come.
/// Entries are keyed `CLIENT@LISTENER`: a client port closed on one
/// listener may be reused towards another before the first line is read.
struct LogBook {
    /// `nginx` or `sluice`, for messages.
    who: &'static str,
    tried: Mutex<HashMap<String, Vec<String>>>,
    notify: Notify,
}

impl LogBook {
    fn new(who: &'static str) -> LogBook {
        LogBook {
            who,
            tried: Mutex::default(),
            notify: Notify::new(),
        }
    }

    fn insert(&self, client: String, tried: Vec<String>) {
        self.tried.lock().unwrap().insert(client, tried);
        self.notify.notify_waiters();
    }

    /// The servers tried for the connection from `client` to the
    /// `listener` (nginx: its port; sluice: its name), once logged.
    async fn wait(&self, client: &str, listener: &str) -> Vec<String> {
        let key = format!("{client}@{listener}");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let notified = self.notify.notified();
            if let Some(tried) = self.tried.lock().unwrap().remove(&key) {
                return tried;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {} access-log line for client {key}",
                self.who
            );
            let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), notified).await;
        }
    }
}

/// The addresses in a list such as nginx's `$upstream_addr` (`A, B, u`) or
/// sluice's `tries` (`A failed (reason), B connected`); upstream names and
/// reasons are not addresses.
fn addresses(list: &str) -> Vec<String> {
    list.split(", ")
        .filter_map(|part| part.split_whitespace().next())
        .filter(|word| word.parse::<SocketAddr>().is_ok())
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------
// The two balancers

struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
    log: Arc<LogBook>,
    reader: tokio::task::JoinHandle<()>,
}

fn nginx_binary() -> PathBuf {
    for candidate in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!("nginx is not installed: .ci/run installs nginx-light and libnginx-mod-stream");
}

fn upstream_method(method: Method, nginx: bool) -> &'static str {
    match (method, nginx) {
        (Method::RoundRobin, true) => "",
        (Method::LeastConn, true) => "least_conn;",
        (Method::Hash, true) => "hash $remote_addr consistent;",
        (Method::Random, true) => "random;",
        (Method::RandomTwo, true) => "random two;",
        (Method::RoundRobin, false) => "balance = \"round_robin\"\n",
        (Method::LeastConn, false) => "balance = \"least_conn\"\n",
        (Method::Hash, false) => "balance = \"hash\"\nhash_key = \"client_ip\"\n",
        (Method::Random, false) => "balance = \"random\"\n",
        (Method::RandomTwo, false) => "balance = \"random_two\"\n",
    }
}

impl Nginx {
    /// nginx serving `scenarios`, plus a `return` server on `ready` that
    /// tells when it listens.
    async fn start(scenarios: &[(Scenario, u16)], ready: u16) -> Nginx {
        assert!(
            Path::new(STREAM_MODULE).exists(),
            "{STREAM_MODULE} is missing: .ci/run installs libnginx-mod-stream"
        );
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let root = root.as_path();
        let mut conf = format!(
            "load_module {STREAM_MODULE};\n\
             daemon off;\nmaster_process off;\nworker_processes 1;\n\
             pid {root}/nginx.pid;\nerror_log {root}/error.log notice;\n\
             events {{ worker_connections 8192; }}\n\
             stream {{\n\
             log_format parity '$remote_addr:$remote_port@$server_port|$upstream_addr';\n\
             access_log {root}/access.log parity;\n\
             proxy_connect_timeout {CONNECT_TIMEOUT_MS}ms;\n\
             server {{ listen 127.0.0.1:{ready}; return ready; }}\n",
            root = root.display()
        );
        for (scenario, port) in scenarios {
            conf.push_str(&format!(
                "upstream {} {{ {}\n",
                scenario.name,
                upstream_method(scenario.method, true)
            ));
            for server in &scenario.servers {
                conf.push_str(&format!(
                    "  server {} weight={} max_fails={} fail_timeout={}s{}{}{};\n",
                    server.address,
                    server.weight,
                    server.max_fails,
                    server.fail_timeout_s,
                    if server.max_conns > 0 {
                        format!(" max_conns={}", server.max_conns)
                    } else {
                        String::new()
                    },
                    if server.backup { " backup" } else { "" },
                    if server.down { " down" } else { "" },
                ));
            }
            conf.push_str(&format!(
                "}}\nserver {{ listen 127.0.0.1:{port}; proxy_pass {}; }}\n",
                scenario.name
            ));
        }
        conf.push_str("}\n");
        let conf_path = root.join("nginx.conf");
        std::fs::write(&conf_path, &conf).unwrap();
        std::fs::write(root.join("access.log"), "").unwrap();
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(root)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(root.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let log = Arc::new(LogBook::new("nginx"));
        let reader = tokio::spawn(tail_nginx_log(root.join("access.log"), Arc::clone(&log)));
        let mut nginx = Nginx {
            child,
            _dir: dir,
            log,
            reader,
        };
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(("127.0.0.1", ready)).await.is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!(
                    "nginx exited ({status}):\n{}\nconfiguration:\n{conf}",
                    std::fs::read_to_string(root.join("error.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nginx did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.reader.abort();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Follows nginx's access log: `CLIENT@PORT|UPSTREAM_ADDR` per session.
async fn tail_nginx_log(path: PathBuf, log: Arc<LogBook>) {
    let mut offset = 0usize;
    let mut partial = String::new();
    loop {
        if let Ok(bytes) = tokio::fs::read(&path).await {
            if bytes.len() > offset {
                partial.push_str(&String::from_utf8_lossy(&bytes[offset..]));
                offset = bytes.len();
                while let Some(end) = partial.find('\n') {
                    let line: String = partial.drain(..=end).collect();
                    if let Some((client, upstream)) = line.trim_end().split_once('|') {
                        log.insert(client.to_owned(), addresses(upstream));
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

struct Sluice {
    child: Child,
    _dir: tempfile::TempDir,
    log: Arc<LogBook>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Sluice {
    async fn start(scenarios: &[(Scenario, u16)]) -> Sluice {
        let mut config = String::from("shutdown_timeout = \"1s\"\n");
        for (scenario, port) in scenarios {
            config.push_str(&format!(
                "\n[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"{name}\"\n\
                 connect_timeout = \"{CONNECT_TIMEOUT_MS}ms\"\n\n[upstream.{name}]\n{method}",
                name = scenario.name,
                method = upstream_method(scenario.method, false)
            ));
            for server in &scenario.servers {
                config.push_str(&format!(
                    "[[upstream.{}.server]]\naddress = \"{}\"\nweight = {}\nmax_fails = {}\n\
                     fail_timeout = \"{}s\"\nmax_conns = {}\nbackup = {}\ndown = {}\n",
                    scenario.name,
                    server.address,
                    server.weight,
                    server.max_fails,
                    server.fail_timeout_s,
                    server.max_conns,
                    server.backup,
                    server.down
                ));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, &config).unwrap();
        let mut child = Command::new(SLUICE)
            .arg("--config")
            .arg(&path)
            .arg("--log-format")
            .arg("json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(LogBook::new("sluice"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let (book, kept) = (Arc::clone(&log), Arc::clone(&lines));
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
                    kept.lock().unwrap().push(line);
                    continue;
                };
                if json["message"] == "access" {
                    let key = format!(
                        "{}@{}",
                        json["client"].as_str().unwrap_or_default(),
                        json["listener"].as_str().unwrap_or_default()
                    );
                    book.insert(key, addresses(json["tries"].as_str().unwrap_or_default()));
                } else {
                    kept.lock().unwrap().push(line);
                }
            }
        });
        let sluice = Sluice {
            child,
            _dir: dir,
            log,
            lines,
        };
        let listening = || {
            sluice
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|line| line.contains("\"listening\""))
                .count()
        };
        let deadline = Instant::now() + PATIENCE;
        while listening() < scenarios.len() {
            assert!(
                Instant::now() < deadline,
                "sluice did not start:\n{}\nconfiguration:\n{config}",
                sluice.lines.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sluice
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Driving connections

/// What one connection saw: the server that answered (none: closed with
/// nothing written) and every server tried, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    served: Option<String>,
    tried: Vec<String>,
}

/// Connects from `from` to the balancer on `port` and reads the answering
/// server's name; returns the stream (still open) and the name.
async fn open(port: u16, from: Ipv4Addr) -> (TcpStream, String, Option<String>) {
    let socket = TcpSocket::new_v4().unwrap();
    if from != Ipv4Addr::LOCALHOST {
        // The port is chosen at connect, by the whole address pair: a
        // bind to port 0 alone runs out of ports among thousands of
        // TIME_WAIT connections.
        let yes: libc::c_int = 1;
        // SAFETY: a valid socket and an int option of the right size.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                std::ptr::addr_of!(yes).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "IP_BIND_ADDRESS_NO_PORT");
        socket.bind(SocketAddr::from((from, 0))).unwrap();
    }
    let stream = tokio::time::timeout(
        PATIENCE,
        socket.connect(SocketAddr::from(([127, 0, 0, 1], port))),
    )
    .await
    .expect("connect to the balancer timed out")
    .unwrap();
    let client = stream.local_addr().unwrap().to_string();
    let mut reader = BufReader::new(stream);
    let mut name = String::new();
    let read = tokio::time::timeout(PATIENCE, reader.read_line(&mut name))
        .await
        .expect("no answer and no close from the balancer");
    let served = match read {
        Ok(n) if n > 0 => Some(name.trim_end().to_owned()),
        _ => None,
    };
    (reader.into_inner(), client, served)
}

/// Runs `steps` against the balancer on `port`, one connection at a time
/// (each logged before the next starts, so the balancer has settled it).
async fn drive(listener: &str, port: u16, log: &LogBook, steps: &[Step]) -> Vec<Record> {
    let mut records = Vec::new();
    let mut held: Vec<(TcpStream, String, usize)> = Vec::new();
    for step in steps {
        match step {
            Step::Connect | Step::ConnectFrom(_) => {
                let from = match step {
                    Step::ConnectFrom(from) => *from,
                    _ => Ipv4Addr::LOCALHOST,
                };
                let (stream, client, served) = open(port, from).await;
                drop(stream);
                let tried = log.wait(&client, listener).await;
                records.push(Record { served, tried });
            }
            Step::Hold(count) => {
                for _ in 0..*count {
                    let (stream, client, served) = open(port, Ipv4Addr::LOCALHOST).await;
                    records.push(Record {
                        served,
                        tried: Vec::new(),
                    });
                    held.push((stream, client, records.len() - 1));
                }
            }
            Step::Release => {
                for (stream, client, index) in held.drain(..) {
                    drop(stream);
                    records[index].tried = log.wait(&client, listener).await;
                }
            }
        }
    }
    for (stream, client, index) in held.drain(..) {
        drop(stream);
        records[index].tried = log.wait(&client, listener).await;
    }
    records
}

/// Runs one phase of a scenario on both balancers at once.
async fn phase_on_both(
    scenario: &str,
    nginx: &Nginx,
    sluice: &Sluice,
    port_nginx: u16,
    port_sluice: u16,
    steps: &[Step],
) -> (Vec<Record>, Vec<Record>) {
    let nginx_listener = port_nginx.to_string();
    tokio::join!(
        drive(&nginx_listener, port_nginx, &nginx.log, steps),
        drive(scenario, port_sluice, &sluice.log, steps)
    )
}

fn describe(scenario: &Scenario) -> String {
    let servers: Vec<String> = scenario
        .servers
        .iter()
        .map(|s| {
            format!(
                "{} weight={} max_fails={} fail_timeout={}s max_conns={}{}{}",
                s.address,
                s.weight,
                s.max_fails,
                s.fail_timeout_s,
                s.max_conns,
                if s.backup { " backup" } else { "" },
                if s.down { " down" } else { "" }
            )
        })
        .collect();
    format!(
        "{} ({:?}):\n  {}\n  steps {:?}",
        scenario.name,
        scenario.method,
        servers.join("\n  "),
        scenario.phases
    )
}

fn assert_same(scenario: &Scenario, nginx: &[Record], sluice: &[Record]) {
    let first_difference = nginx.iter().zip(sluice).position(|(a, b)| a != b);
    if let Some(at) = first_difference {
        panic!(
            "{}\nconnection {at} differs:\n  nginx  {:?}\n  sluice {:?}\nall nginx:  {nginx:?}\nall sluice: {sluice:?}",
            describe(scenario),
            nginx[at],
            sluice[at]
        );
    }
    assert_eq!(nginx.len(), sluice.len(), "{}", describe(scenario));
}

/// `count` ports that were free a moment ago, all different (each is held
/// until all are chosen). They are taken below the kernel's ephemeral range
/// (32768 and up), so the many connections of this and other tests, whose
/// local ports come from that range, cannot take one before the balancers
/// bind it.
fn distinct_ports(count: usize) -> Vec<u16> {
    const LOW: u32 = 12_000;
    const SPAN: u32 = 20_000;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    let start = (std::process::id().wrapping_mul(7919) ^ nanos) % SPAN;
    let mut held = Vec::with_capacity(count);
    for step in 0..SPAN {
        if held.len() == count {
            break;
        }
        let port = u16::try_from(LOW + (start + step) % SPAN).unwrap();
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
        }
    }
    assert_eq!(held.len(), count, "not enough free ports");
    held.iter()
        .map(|listener| listener.local_addr().unwrap().port())
        .collect()
}

/// Scenarios with the port each listens on.
type Listening = Vec<(Scenario, u16)>;

/// Ports for each scenario on each balancer, and nginx's readiness port.
fn with_ports(scenarios: &[Scenario]) -> (Listening, Listening, u16) {
    let ports = distinct_ports(2 * scenarios.len() + 1);
    let (for_nginx, rest) = ports.split_at(scenarios.len());
    let (for_sluice, ready) = rest.split_at(scenarios.len());
    let pair = |ports: &[u16]| {
        scenarios
            .iter()
            .cloned()
            .zip(ports.iter().copied())
            .collect()
    };
    (pair(for_nginx), pair(for_sluice), ready[0])
}

/// Runs single-phase scenarios, `parallel` at a time, and returns each
/// scenario's records from nginx and from sluice.
async fn run_all(
    scenarios: &[Scenario],
    parallel: usize,
) -> Vec<(Scenario, Vec<Record>, Vec<Record>)> {
    let (nginx_ports, sluice_ports, ready) = with_ports(scenarios);
    let nginx = Arc::new(Nginx::start(&nginx_ports, ready).await);
    let sluice = Arc::new(Sluice::start(&sluice_ports).await);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::new();
    for ((scenario, port_nginx), (_, port_sluice)) in nginx_ports.into_iter().zip(sluice_ports) {
        let (nginx, sluice, semaphore) = (
            Arc::clone(&nginx),
            Arc::clone(&sluice),
            Arc::clone(&semaphore),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.unwrap();
            let steps: Vec<Step> = scenario.phases.concat();
            let (a, b) = phase_on_both(
                &scenario.name,
                &nginx,
                &sluice,
                port_nginx,
                port_sluice,
                &steps,
            )
            .await;
            (scenario, a, b)
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

// ---------------------------------------------------------------------------
// Deterministic scenarios

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_scenarios_pick_and_try_as_nginx() {
    let live: Vec<String> = live_servers(8).await;
    let hang = hanging_server();
    let dead = |n| dead_server(n);
    let s = |address: &str| Server::new(address);
    let scenario = |name: &str, method, servers: Vec<Server>, steps: Vec<Step>| Scenario {
        name: name.to_owned(),
        method,
        servers,
        phases: vec![steps],
    };
    let clients: Vec<Step> = (1..=120u8)
        .map(|n| Step::ConnectFrom(Ipv4Addr::new(127, 0, n / 50, 1 + n % 50 * 5)))
        .collect();
    let mut hold_pattern = vec![Step::Hold(4)];
    hold_pattern.extend(connects(3));
    hold_pattern.push(Step::Hold(3));
    hold_pattern.extend(connects(2));
    hold_pattern.push(Step::Release);
    hold_pattern.extend(connects(6));
    let scenarios = vec![
        scenario(
            "weights_5_1_1",
            Method::RoundRobin,
            vec![s(&live[0]).weight(5), s(&live[1]), s(&live[2])],
            connects(14),
        ),
        scenario(
            "dead_weight_3_max_fails_3",
            Method::RoundRobin,
            vec![s(&dead(1)).weight(3).max_fails(3), s(&live[0]), s(&live[1])],
            connects(20),
        ),
        scenario(
            "dead_weight_5_max_fails_2",
            Method::RoundRobin,
            vec![
                s(&live[0]).weight(2),
                s(&dead(2)).weight(5).max_fails(2),
                s(&live[1]).weight(3),
            ],
            connects(24),
        ),
        scenario(
            "max_fails_0_keeps_trying",
            Method::RoundRobin,
            vec![s(&dead(3)).weight(2).max_fails(0), s(&live[2])],
            connects(10),
        ),
        scenario(
            "backup_after_primaries_fail",
            Method::RoundRobin,
            vec![
                s(&dead(4)),
                s(&live[3]).backup().weight(2),
                s(&dead(5)).weight(3),
                s(&live[4]).backup(),
            ],
            connects(10),
        ),
        scenario(
            "dead_backup_too",
            Method::RoundRobin,
            vec![s(&dead(6)), s(&dead(7)).backup(), s(&dead(8)).backup()],
            connects(4),
        ),
        scenario(
            "down_primary_and_backup",
            Method::RoundRobin,
            vec![
                s(&live[0]).down(),
                s(&live[1]).weight(2),
                s(&live[2]),
                s(&live[3]).backup().down(),
                s(&live[4]).backup(),
            ],
            connects(8),
        ),
        scenario(
            "max_conns_spill_and_backup",
            Method::RoundRobin,
            vec![
                s(&live[0]).max_conns(2),
                s(&live[1]).max_conns(1).weight(2),
                s(&live[2]).backup().max_conns(1),
            ],
            {
                let mut steps = vec![Step::Hold(5)];
                steps.extend(connects(2));
                steps.push(Step::Release);
                steps.extend(connects(4));
                steps
            },
        ),
        scenario(
            "least_conn_weights_and_holds",
            Method::LeastConn,
            vec![s(&live[0]).weight(3), s(&live[1]), s(&live[2])],
            hold_pattern.clone(),
        ),
        scenario(
            "least_conn_dead_and_backup",
            Method::LeastConn,
            vec![
                s(&live[0]).weight(2),
                s(&dead(9)).weight(4).max_fails(2),
                s(&live[1]),
                s(&live[5]).backup(),
            ],
            {
                let mut steps = hold_pattern.clone();
                steps.extend(connects(6));
                steps
            },
        ),
        scenario(
            "least_conn_max_conns",
            Method::LeastConn,
            vec![s(&live[0]).max_conns(1), s(&live[1]).max_conns(2)],
            {
                let mut steps = vec![Step::Hold(4)];
                steps.push(Step::Release);
                steps.extend(connects(3));
                steps
            },
        ),
        scenario(
            "hash_weights",
            Method::Hash,
            vec![
                s(&live[0]),
                s(&live[1]).weight(2),
                s(&live[2]),
                s(&live[3]).weight(3),
                s(&live[4]),
                s(&live[5]),
            ],
            clients.clone(),
        ),
        scenario(
            "hash_dead_and_down",
            Method::Hash,
            vec![
                s(&live[0]),
                s(&dead(10)).weight(2),
                s(&live[2]),
                s(&live[3]).down(),
                s(&live[4]),
            ],
            clients.clone(),
        ),
        scenario(
            "hash_mostly_dead_falls_back",
            Method::Hash,
            vec![
                s(&dead(11)).weight(3),
                s(&dead(12)).weight(3),
                s(&live[6]),
                s(&dead(13)).weight(3),
            ],
            clients[..60].to_vec(),
        ),
        scenario(
            "single_dead_is_never_marked",
            Method::RoundRobin,
            vec![s(&dead(14))],
            connects(4),
        ),
        scenario(
            "single_least_conn_and_hash",
            Method::LeastConn,
            vec![s(&dead(15)).max_fails(1)],
            connects(3),
        ),
        scenario(
            "single_hash_dead",
            Method::Hash,
            vec![s(&dead(16))],
            clients[..5].to_vec(),
        ),
        scenario(
            "single_max_conns",
            Method::RoundRobin,
            vec![s(&live[7]).max_conns(1)],
            vec![Step::Hold(2), Step::Release, Step::Connect],
        ),
        scenario(
            "hanging_server",
            Method::RoundRobin,
            vec![s(&hang.name).weight(2), s(&live[0])],
            connects(4),
        ),
    ];
    let results = run_all(&scenarios, 8).await;
    for (scenario, nginx, sluice) in &results {
        assert_same(scenario, nginx, sluice);
    }
}

/// Starts `count` live servers; returns their addresses.
async fn live_servers(count: usize) -> Vec<String> {
    let mut servers = Vec::with_capacity(count);
    for _ in 0..count {
        servers.push(live_server().await);
    }
    servers
}

// ---------------------------------------------------------------------------
// fail_timeout expiry and recovery (timed)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_peer_sits_out_then_ramps_back_as_nginx() {
    let mut flaky = Switchable::new().await;
    let (b, c) = (live_server().await, live_server().await);
    let scenario = Scenario {
        name: "recovery".into(),
        method: Method::RoundRobin,
        servers: vec![
            Server::new(&flaky.name)
                .weight(5)
                .max_fails(2)
                .fail_timeout(1),
            Server::new(&b),
            Server::new(&c),
        ],
        phases: Vec::new(),
    };
    let (nginx_ports, sluice_ports, ready) = with_ports(std::slice::from_ref(&scenario));
    let nginx = Nginx::start(&nginx_ports, ready).await;
    let sluice = Sluice::start(&sluice_ports).await;
    let (pn, ps) = (nginx_ports[0].1, sluice_ports[0].1);
    let mut all = (Vec::new(), Vec::new());
    let mut record = |(a, b): (Vec<Record>, Vec<Record>)| {
        all.0.extend(a);
        all.1.extend(b);
    };

    // The weight-5 peer refuses: two failures mark it (its working weight
    // drops by 5/2 each time).
    flaky.stop().await;
    let failed = Instant::now();
    record(phase_on_both("recovery", &nginx, &sluice, pn, ps, &connects(6)).await);
    // Well inside fail_timeout it is skipped.
    assert!(
        failed.elapsed() < Duration::from_millis(900),
        "too slow to stay inside fail_timeout"
    );
    record(phase_on_both("recovery", &nginx, &sluice, pn, ps, &connects(3)).await);
    // It comes back; well after fail_timeout (2 s, nginx's clock included)
    // one connection probes it and it ramps back to weight 5.
    flaky.start().await;
    tokio::time::sleep_until((failed + Duration::from_millis(2300)).into()).await;
    record(phase_on_both("recovery", &nginx, &sluice, pn, ps, &connects(20)).await);
    // It refuses again: the failure count starts from the forgiven state.
    flaky.stop().await;
    record(phase_on_both("recovery", &nginx, &sluice, pn, ps, &connects(8)).await);
    let (a, b) = all;
    let mut described = scenario.clone();
    described.phases = vec![vec![Step::Connect; a.len()]];
    assert_same(&described, &a, &b);
    assert!(
        a.iter()
            .skip(9)
            .take(20)
            .any(|r| r.served.as_deref() == Some(flaky.name.as_str())),
        "the recovered peer never served: {a:?}"
    );
}

// ---------------------------------------------------------------------------
// Seeded random groups

/// A small deterministic generator (xorshift*), so a seed names a run.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn random_group(rng: &mut Seeded, index: usize, live: &[String]) -> Scenario {
    let method = match rng.below(10) {
        0..=4 => Method::RoundRobin,
        5..=7 => Method::LeastConn,
        _ => Method::Hash,
    };
    let count = 1 + rng.below(6) as usize;
    let mut servers = Vec::new();
    let mut used = Vec::new();
    for n in 0..count {
        let address = if rng.chance(25) {
            dead_server(1000 + (index * 8 + n) as u16)
        } else {
            let mut pick = rng.below(live.len() as u64) as usize;
            while used.contains(&pick) {
                pick = (pick + 1) % live.len();
            }
            used.push(pick);
            live[pick].clone()
        };
        let mut server = Server::new(&address)
            .weight(1 + rng.below(10) as u32)
            .max_fails(rng.below(4) as u32);
        if rng.chance(10) {
            server = server.down();
        }
        if method != Method::Hash && n > 0 && rng.chance(25) {
            server = server.backup();
        }
        if rng.chance(10) {
            server = server.max_conns(1 + rng.below(2) as u32);
        }
        servers.push(server);
    }
    let mut steps = Vec::new();
    let length = 10 + rng.below(16);
    let mut holding = false;
    for _ in 0..length {
        let roll = rng.below(100);
        if roll < 10 {
            // Held connections come from 127.0.0.1: with hash, one key, so
            // its server fills up to max_conns and the walk moves on.
            steps.push(Step::Hold(1 + rng.below(3) as usize));
            holding = true;
        } else if roll < 15 && holding {
            steps.push(Step::Release);
            holding = false;
        } else if method == Method::Hash {
            steps.push(Step::ConnectFrom(Ipv4Addr::new(
                127,
                rng.below(4) as u8,
                rng.below(256) as u8,
                1 + rng.below(250) as u8,
            )));
        } else {
            steps.push(Step::Connect);
        }
    }
    Scenario {
        name: format!("group_{index}"),
        method,
        servers,
        phases: vec![steps],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_random_groups_pick_and_try_as_nginx() {
    let seed = env_number("PARITY_SEED", 0x5EED_0016);
    let groups = env_number("PARITY_GROUPS", 300) as usize;
    let live: Vec<String> = live_servers(10).await;
    let mut rng = Seeded(seed | 1);
    let scenarios: Vec<Scenario> = (0..groups)
        .map(|index| random_group(&mut rng, index, &live))
        .collect();
    // One pair of balancers per 300 groups keeps each start quick.
    for batch in scenarios.chunks(300) {
        for (scenario, nginx, sluice) in &run_all(batch, 16).await {
            assert_same(scenario, nginx, sluice);
        }
    }
    eprintln!("seed {seed:#x}: {groups} groups, all as nginx");
}

// ---------------------------------------------------------------------------
// random and random_two: what is deterministic

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_methods_agree_with_nginx_where_nginx_is_deterministic() {
    let live: Vec<String> = live_servers(4).await;
    let s = |address: &str| Server::new(address);
    let mut scenarios = Vec::new();
    for (method, tag) in [
        (Method::Random, "random"),
        (Method::RandomTwo, "random_two"),
    ] {
        scenarios.push(Scenario {
            name: format!("{tag}_dead_and_down"),
            method,
            servers: vec![
                s(&live[0]).weight(3),
                s(&dead_server(40 + tag.len() as u16))
                    .weight(2)
                    .max_fails(2),
                s(&live[1]),
                s(&live[2]).down(),
                s(&dead_server(50 + tag.len() as u16)).max_fails(1),
            ],
            phases: vec![connects(30)],
        });
        scenarios.push(Scenario {
            name: format!("{tag}_all_dead"),
            method,
            servers: vec![
                s(&dead_server(60 + tag.len() as u16)),
                s(&dead_server(70 + tag.len() as u16)).weight(4),
            ],
            phases: vec![connects(4)],
        });
        scenarios.push(Scenario {
            name: format!("{tag}_single"),
            method,
            servers: vec![s(&dead_server(80 + tag.len() as u16))],
            phases: vec![connects(3)],
        });
    }
    let results = run_all(&scenarios, 6).await;
    for (scenario, nginx, sluice) in &results {
        let describe = describe(scenario);
        let served = |records: &[Record]| -> Vec<bool> {
            records.iter().map(|r| r.served.is_some()).collect()
        };
        assert_eq!(
            served(nginx),
            served(sluice),
            "{describe}\n{nginx:?}\n{sluice:?}"
        );
        for (records, who) in [(nginx, "nginx"), (sluice, "sluice")] {
            for server in &scenario.servers {
                let tries = records
                    .iter()
                    .flat_map(|r| &r.tried)
                    .filter(|tried| **tried == server.address)
                    .count();
                let serves = records
                    .iter()
                    .filter(|r| r.served.as_deref() == Some(server.address.as_str()))
                    .count();
                if server.down {
                    assert_eq!(
                        tries, 0,
                        "{who} tried a down server\n{describe}\n{records:?}"
                    );
                }
                if server.address.starts_with("127.77.") {
                    assert_eq!(serves, 0, "{describe}");
                    if scenario.servers.len() > 1 {
                        // Marked after max_fails failures, inside fail_timeout.
                        assert!(
                            tries <= server.max_fails.max(1) as usize,
                            "{who} tried {} {tries} times\n{describe}\n{records:?}",
                            server.address
                        );
                    } else {
                        // A single server is never marked: tried every time.
                        assert_eq!(tries, records.len(), "{who}\n{describe}");
                    }
                }
            }
        }
        // A single server involves no draw: there the whole record is
        // deterministic.
        if scenario.name.ends_with("_single") {
            assert_same(scenario, nginx, sluice);
        }
    }
}
