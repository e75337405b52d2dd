//! Agent checks (SPEC §13) through the binary, with real agents on loopback
//! and on a UNIX socket: a percentage scales the share, `drain` stops new
//! connections and keeps open ones, `up` restores, and an agent that is
//! silent, talks garbage or sends a line far too long changes nothing.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

/// What the agent does on each connection.
#[derive(Clone)]
enum Answer {
    /// Writes these bytes and closes.
    Line(Vec<u8>),
    /// Writes nothing and waits for sluice to give up.
    Silent,
}

/// A HAProxy-style agent: answers every connection with the current answer.
struct Agent {
    answer: Arc<Mutex<Answer>>,
    asked: Arc<AtomicUsize>,
    /// The request line read before answering, when the agent reads one.
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    accept: JoinHandle<()>,
}

impl Agent {
    async fn tcp(answer: &str) -> (Agent, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let agent = Agent::new(answer, false, move |agent| {
            tokio::spawn(async move {
                loop {
                    if let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(agent.clone().serve(stream));
                    }
                }
            })
        });
        (agent, port)
    }

    /// An agent on a UNIX socket that reads one request line first.
    fn unix(path: &PathBuf, answer: &str) -> Agent {
        let listener = UnixListener::bind(path).unwrap();
        Agent::new(answer, true, move |agent| {
            tokio::spawn(async move {
                loop {
                    if let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(agent.clone().serve(stream));
                    }
                }
            })
        })
    }

    fn new(
        answer: &str,
        reads_request: bool,
        start: impl FnOnce(Connection) -> JoinHandle<()>,
    ) -> Agent {
        let answer = Arc::new(Mutex::new(Answer::Line(answer.as_bytes().to_vec())));
        let asked = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let accept = start(Connection {
            answer: Arc::clone(&answer),
            asked: Arc::clone(&asked),
            requests: Arc::clone(&requests),
            reads_request,
        });
        Agent {
            answer,
            asked,
            requests,
            accept,
        }
    }

    fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn asked(&self) -> usize {
        self.asked.load(Ordering::SeqCst)
    }

    /// Waits until sluice has asked `more` more times than now.
    async fn wait_asked(&self, more: usize) {
        let target = self.asked() + more;
        assert!(
            wait_until(WAIT, || self.asked() >= target).await,
            "the agent was asked only {} times",
            self.asked()
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// What each accepted connection of an [`Agent`] shares.
#[derive(Clone)]
struct Connection {
    answer: Arc<Mutex<Answer>>,
    asked: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    reads_request: bool,
}

impl Connection {
    fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self,
        mut stream: S,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let answer = self.answer.lock().unwrap().clone();
        async move {
            if self.reads_request {
                let mut request = Vec::new();
                let mut byte = [0; 1];
                while request.len() < 64 && stream.read(&mut byte).await.unwrap_or(0) == 1 {
                    request.push(byte[0]);
                    if byte[0] == b'\n' {
                        break;
                    }
                }
                self.requests.lock().unwrap().push(request);
            }
            match answer {
                // sluice may close before a long answer is written: that is the point.
                Answer::Line(bytes) => {
                    let _ = stream.write_all(&bytes).await;
                    let _ = stream.shutdown().await;
                }
                Answer::Silent => {
                    let mut buf = [0; 64];
                    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                }
            }
        }
    }
}

async fn get(admin: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

async fn peer(admin: &str, name: &str) -> serde_json::Value {
    let status: serde_json::Value = serde_json::from_str(&get(admin, "/status").await).unwrap();
    status["upstreams"]["pool"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|peer| peer["name"] == name)
        .unwrap_or_else(|| panic!("no peer {name} in {status:#}"))
        .clone()
}

/// Polls `/status` until peer `name` satisfies `condition`.
async fn wait_peer(
    admin: &str,
    name: &str,
    what: &str,
    condition: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let peer = peer(admin, name).await;
        if condition(&peer) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "peer {name}: {what} never held; last: {peer:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `sluice_upstream_server_weight` of `server`.
async fn weight_metric(admin: &str, server: &str) -> f64 {
    let text = get(admin, "/metrics").await;
    let series = format!("sluice_upstream_server_weight{{upstream=\"pool\",server=\"{server}\"}} ");
    let line = text
        .lines()
        .find(|line| line.starts_with(&series))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    line[series.len()..].parse().unwrap()
}

/// Which backend served each of `count` connections made one after another.
async fn shares(listen: &str, count: usize) -> (usize, usize) {
    let mut a = 0;
    for _ in 0..count {
        if announced(listen, 1).await == "a" {
            a += 1;
        }
    }
    (a, count - a)
}

/// A listener in front of backends `a` (with `a_extra`) and `b` (with
/// `b_extra`), and an admin endpoint.
fn two_servers(
    listen: &str,
    admin: &str,
    a: &Backend,
    a_extra: &str,
    b: &Backend,
    b_extra: &str,
) -> String {
    let servers = [
        server(a.addr, &format!("name = \"a\"\n{a_extra}")),
        server(b.addr, &format!("name = \"b\"\n{b_extra}")),
    ];
    format!(
        "{}\n[admin]\nbind = \"{admin}\"\n",
        config(listen, "", "", &servers)
    )
}

fn agent_on_port(port: u16, timing: &str) -> String {
    format!("[upstream.pool.server.agent_check]\nport = {port}\n{timing}\n")
}

const FAST: &str = "interval = \"100ms\"\ntimeout = \"1s\"";

fn count_lines(sluice: &Sluice, needle: &str) -> usize {
    sluice
        .log_lines()
        .iter()
        .filter(|line| line.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_percentage_scales_the_share_and_the_weight_metric() {
    let (agent, port) = Agent::tcp("50% maxconn:5\n").await;
    let (a, b) = (
        Backend::tcp("a", Behavior::Announce).await,
        Backend::tcp("b", Behavior::Announce).await,
    );
    let (listen, admin) = (free_addr(), free_addr());
    let a_extra = format!("weight = 2\n{}", agent_on_port(port, FAST));
    let sluice = Sluice::start(&two_servers(
        &listen,
        &admin,
        &a,
        &a_extra,
        &b,
        "weight = 2",
    ))
    .await;

    wait_peer(&admin, "a", "weight 1", |peer| peer["weight"] == 1).await;
    let a_status = peer(&admin, "a").await;
    assert_eq!(a_status["max_conns"], 5);
    assert_eq!(a_status["state"], "up");
    assert_eq!(
        a_status["agent"],
        serde_json::json!({"weight": 1, "max_conns": 5})
    );
    assert!(peer(&admin, "b").await.get("agent").is_none());
    // Smooth round-robin over effective weights 1 and 2: exactly 1 in 3 to a.
    assert_eq!(shares(&listen, 30).await, (10, 20));
    assert_eq!(weight_metric(&admin, "a").await, 1.0);
    assert_eq!(weight_metric(&admin, "b").await, 2.0);

    // The same answer again is no change: one log line for the one change.
    agent.wait_asked(3).await;
    assert_eq!(
        count_lines(&sluice, "agent check: server changed"),
        1,
        "{}",
        sluice.log_text()
    );
    let change = sluice
        .log_lines()
        .into_iter()
        .find(|line| line.contains("agent check: server changed"))
        .unwrap();
    for field in [
        r#"server="a""#,
        r#"old="state=- weight=- max_conns=-""#,
        r#"new="state=- weight=1 max_conns=5""#,
        r#"reply="50% maxconn:5""#,
    ] {
        assert!(change.contains(field), "{field} not in {change}");
    }

    // 100% gives the configured weight back.
    agent.answer(Answer::Line(b"100%\n".to_vec()));
    wait_peer(&admin, "a", "weight 2", |peer| peer["weight"] == 2).await;
    assert_eq!(shares(&listen, 20).await, (10, 10));
    assert_eq!(weight_metric(&admin, "a").await, 2.0);
    a.finish().await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_open_connections_and_up_restores() {
    let (agent, port) = Agent::tcp("up\n").await;
    let (a, b) = (
        Backend::tcp("a", Behavior::Announce).await,
        Backend::tcp("b", Behavior::Announce).await,
    );
    let (listen, admin) = (free_addr(), free_addr());
    let sluice = Sluice::start(&two_servers(
        &listen,
        &admin,
        &a,
        &agent_on_port(port, FAST),
        &b,
        "",
    ))
    .await;
    agent.wait_asked(1).await;

    // An open connection to a, kept through the drain.
    let mut held = None;
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&listen).await.unwrap();
        let mut name = [0; 1];
        stream.read_exact(&mut name).await.unwrap();
        if &name == b"a" {
            held = Some(stream);
            break;
        }
    }
    let mut held = held.expect("equal weights: one of two connections goes to a");

    agent.answer(Answer::Line(b"drain\n".to_vec()));
    wait_peer(&admin, "a", "draining", |peer| peer["state"] == "draining").await;
    assert_eq!(peer(&admin, "a").await["active"], 1);
    assert_eq!(
        peer(&admin, "a").await["agent"],
        serde_json::json!({"state": "drain"})
    );
    assert_eq!(shares(&listen, 10).await, (0, 10));
    assert_eq!(weight_metric(&admin, "a").await, 0.0);
    held.write_all(b"still here").await.unwrap();
    let mut echo = [0; 10];
    held.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"still here");

    agent.answer(Answer::Line(b"ready\n".to_vec()));
    wait_peer(&admin, "a", "up", |peer| peer["state"] == "up").await;
    assert_eq!(shares(&listen, 10).await, (5, 5));
    assert_eq!(weight_metric(&admin, "a").await, 1.0);
    assert_eq!(
        count_lines(&sluice, "agent check: server changed"),
        2,
        "{}",
        sluice.log_text()
    );
    drop(held);
    a.finish().await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_changes_nothing() {
    let (agent, port) = Agent::tcp("").await;
    agent.answer(Answer::Silent);
    let (a, b) = (
        Backend::tcp("a", Behavior::Announce).await,
        Backend::tcp("b", Behavior::Announce).await,
    );
    let (listen, admin) = (free_addr(), free_addr());
    let a_extra = format!(
        "weight = 2\n{}",
        agent_on_port(port, "interval = \"100ms\"\ntimeout = \"200ms\"")
    );
    let sluice = Sluice::start(&two_servers(&listen, &admin, &a, &a_extra, &b, "")).await;
    // Checks of one server never overlap: by the fourth, three timed out.
    agent.wait_asked(4).await;

    let a_status = peer(&admin, "a").await;
    assert_eq!(
        (a_status["state"].as_str(), a_status["weight"].as_u64()),
        (Some("up"), Some(2))
    );
    assert_eq!(shares(&listen, 30).await, (20, 10));
    assert_eq!(weight_metric(&admin, "a").await, 2.0);
    assert_eq!(count_lines(&sluice, "agent check: server changed"), 0);
    assert_eq!(
        count_lines(&sluice, "agent does not answer"),
        1,
        "{}",
        sluice.log_text()
    );
    a.finish().await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_a_one_megabyte_line_change_nothing_and_warn_once() {
    let (agent, port) = Agent::tcp("50%\n").await;
    let (a, b) = (
        Backend::tcp("a", Behavior::Announce).await,
        Backend::tcp("b", Behavior::Announce).await,
    );
    let (listen, admin) = (free_addr(), free_addr());
    let a_extra = format!("weight = 2\n{}", agent_on_port(port, FAST));
    let sluice = Sluice::start(&two_servers(
        &listen,
        &admin,
        &a,
        &a_extra,
        &b,
        "weight = 2",
    ))
    .await;
    wait_peer(&admin, "a", "weight 1", |peer| peer["weight"] == 1).await;

    agent.answer(Answer::Line(b"\x00\xff\xfeHELLO there;\x1b[2J\n".to_vec()));
    agent.wait_asked(4).await;
    assert_eq!(
        count_lines(&sluice, "words it does not know"),
        1,
        "{}",
        sluice.log_text()
    );

    let mut huge = vec![b'7'; 1 << 20];
    huge.push(b'%');
    agent.answer(Answer::Line(huge));
    agent.wait_asked(4).await;
    assert_eq!(
        count_lines(&sluice, "more than 512 bytes"),
        1,
        "{}",
        sluice.log_text()
    );

    let a_status = peer(&admin, "a").await;
    assert_eq!(
        (a_status["state"].as_str(), a_status["weight"].as_u64()),
        (Some("up"), Some(1))
    );
    assert_eq!(shares(&listen, 30).await, (10, 20));
    assert_eq!(
        count_lines(&sluice, "agent check: server changed"),
        1,
        "{}",
        sluice.log_text()
    );
    drop(agent);
    a.finish().await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_a_unix_socket_is_sent_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let agent = Agent::unix(&path, "drain\n");
    let (a, b) = (
        Backend::tcp("a", Behavior::Announce).await,
        Backend::tcp("b", Behavior::Announce).await,
    );
    let (listen, admin) = (free_addr(), free_addr());
    let a_extra = format!(
        "[upstream.pool.server.agent_check]\naddress = \"unix:{}\"\nsend = \"pool/a\\n\"\n{FAST}\n",
        path.display()
    );
    let _sluice = Sluice::start(&two_servers(&listen, &admin, &a, &a_extra, &b, "")).await;
    wait_peer(&admin, "a", "draining", |peer| peer["state"] == "draining").await;
    assert_eq!(agent.requests.lock().unwrap()[0], b"pool/a\n");
    assert_eq!(shares(&listen, 6).await, (0, 6));
    a.finish().await;
    b.finish().await;
}

/// fluentd's monitor_agent as far as the example agent reads it: one output
/// plugin with a buffer queue of `queued` chunks.
async fn fake_monitor(queued: Arc<AtomicUsize>) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/plugins.json", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let queued = queued.load(Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0; 1];
                while head.len() < 8192 && !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let body = format!(
                    r#"{{"plugins":[{{"plugin_id":"in","plugin_category":"input","output_plugin":false}},{{"plugin_id":"out","plugin_category":"output","type":"forward","output_plugin":true,"buffer_queue_length":{queued},"retry_count":0}}]}}"#
                );
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    (url, task)
}

/// The example agent's process; killed when dropped.
struct Script(std::process::Child);

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One answer of the agent at `addr`: everything it writes before closing.
async fn ask_agent(addr: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.ok()?;
    Some(reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_fluentd_agent_answers_from_the_buffer_queue() {
    let queued = Arc::new(AtomicUsize::new(0));
    let (monitor, monitor_task) = fake_monitor(Arc::clone(&queued)).await;
    let agent_addr = free_addr();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/fluentd-agent.py");
    let _script = Script(
        std::process::Command::new("python3")
            .args([script, "--listen", &agent_addr, "--monitor", &monitor])
            .args(["--queue-limit", "64", "--floor", "10"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + WAIT;
    while TcpStream::connect(&agent_addr).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (chunks, line) in [
        (0, "up 100%\n"),
        (32, "up 55%\n"),
        (63, "up 11%\n"),
        (64, "drain\n"),
    ] {
        queued.store(chunks, Ordering::SeqCst);
        assert_eq!(
            ask_agent(&agent_addr).await.as_deref(),
            Some(line),
            "{chunks} chunks"
        );
    }

    // Through sluice: 55% of weight 4 is 2.
    queued.store(32, Ordering::SeqCst);
    let (a, b) = (
        Backend::tcp("a", Behavior::Announce).await,
        Backend::tcp("b", Behavior::Announce).await,
    );
    let (listen, admin) = (free_addr(), free_addr());
    let port = agent_addr.rsplit_once(':').unwrap().1.parse().unwrap();
    let a_extra = format!("weight = 4\n{}", agent_on_port(port, FAST));
    let _sluice = Sluice::start(&two_servers(&listen, &admin, &a, &a_extra, &b, "")).await;
    wait_peer(&admin, "a", "weight 2", |peer| peer["weight"] == 2).await;

    // Without monitor_agent the agent closes without a word.
    monitor_task.abort();
    let _ = monitor_task.await;
    assert_eq!(ask_agent(&agent_addr).await.as_deref(), Some(""));
    a.finish().await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_what_the_agent_set_until_the_check_is_removed() {
    let (agent, port) = Agent::tcp("50%\n").await;
    let (a, b) = (
        Backend::tcp("a", Behavior::Announce).await,
        Backend::tcp("b", Behavior::Announce).await,
    );
    let (listen, admin) = (free_addr(), free_addr());
    let a_extra = format!("weight = 2\n{}", agent_on_port(port, FAST));
    let sluice = Sluice::start(&two_servers(
        &listen,
        &admin,
        &a,
        &a_extra,
        &b,
        "weight = 2",
    ))
    .await;
    wait_peer(&admin, "a", "weight 1", |peer| peer["weight"] == 1).await;

    // The group is rebuilt (b's weight changes) and a keeps the agent's weight.
    let reload = |text: String| {
        std::fs::write(&sluice.config_path, text).unwrap();
        sluice.signal(nix::sys::signal::Signal::SIGHUP);
    };
    reload(two_servers(&listen, &admin, &a, &a_extra, &b, "weight = 3"));
    wait_peer(&admin, "b", "weight 3", |peer| peer["weight"] == 3).await;
    assert_eq!(peer(&admin, "a").await["weight"], 1);
    assert_eq!(shares(&listen, 20).await, (5, 15));
    agent.wait_asked(2).await;
    assert_eq!(
        count_lines(&sluice, "agent check: server changed"),
        1,
        "{}",
        sluice.log_text()
    );

    // Without its agent check, a is back to its configured weight.
    reload(two_servers(
        &listen,
        &admin,
        &a,
        "weight = 2",
        &b,
        "weight = 3",
    ));
    wait_peer(&admin, "a", "weight 2", |peer| peer["weight"] == 2).await;
    assert!(sluice.wait_for_log("agent check removed", WAIT).await);
    let asked = agent.asked();
    assert_eq!(shares(&listen, 25).await, (10, 15));
    assert!(
        agent.asked() <= asked + 1,
        "the removed agent is still asked"
    );
    a.finish().await;
    b.finish().await;
}
