//! The status page (SPEC §12) in a real browser: Debian's chromium, headless,
//! driven over the DevTools protocol against the real binary with real
//! backends; and the `/status` fields the page reads (SPEC §5).

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHROMIUM: &str = "/usr/bin/chromium";

/// How long any one thing the browser does may take on a loaded machine.
const BROWSER_WAIT: Duration = Duration::from_secs(30);

const XSS_NAME: &str = "<img src=x onerror=alert(1)>";

/// Screenshots and browser logs go here, kept after the test.
fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Headless chromium with one page, driven over `--remote-debugging-pipe`:
/// JSON messages, each ended by a NUL byte, written to its fd 3 and read
/// from its fd 4. Killed when dropped.
struct Browser {
    child: Child,
    commands: std::io::PipeWriter,
    /// Every message chromium sent: replies and events.
    messages: Arc<Mutex<Vec<Value>>>,
    next_id: u64,
    session: Option<String>,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromium and opens a page, `width` x `height`, whose `alert`
    /// only sets `window.__alerted` (so a script that got in is seen, not
    /// blocked on a dialog).
    async fn launch(name: &str, width: u32, height: u32) -> Browser {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: the status page tests run Debian's chromium \
             (apt-get install chromium; .ci/run installs it)"
        );
        let profile = tempfile::tempdir().unwrap();
        let log = output_dir().join(format!("{name}.chromium.log"));
        let (browser_reads, commands) = std::io::pipe().unwrap();
        let (mut replies, browser_writes) = std::io::pipe().unwrap();
        let mut command = Command::new(CHROMIUM);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--window-size={width},{height}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let (read_fd, write_fd) = (browser_reads.as_raw_fd(), browser_writes.as_raw_fd());
        // SAFETY: between fork and exec only async-signal-safe calls run
        // (fcntl, dup2). Both ends move above fd 4 first, so neither lands
        // on the other's target; dup2 leaves 3 and 4 open across exec.
        unsafe {
            command.pre_exec(move || {
                let read = libc::fcntl(read_fd, libc::F_DUPFD_CLOEXEC, 10);
                let write = libc::fcntl(write_fd, libc::F_DUPFD_CLOEXEC, 10);
                if read < 0 || write < 0 || libc::dup2(read, 3) < 0 || libc::dup2(write, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {CHROMIUM}: {err}"));
        drop((browser_reads, browser_writes));
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&messages);
        std::thread::spawn(move || {
            let mut pending = Vec::new();
            let mut buf = vec![0; 64 * 1024];
            while let Ok(read) = replies.read(&mut buf) {
                if read == 0 {
                    break;
                }
                pending.extend_from_slice(&buf[..read]);
                while let Some(end) = pending.iter().position(|&byte| byte == 0) {
                    let message: Vec<u8> = pending.drain(..=end).collect();
                    if let Ok(value) = serde_json::from_slice(&message[..end]) {
                        sink.lock().unwrap().push(value);
                    }
                }
            }
        });
        let mut browser = Browser {
            child,
            commands,
            messages,
            next_id: 0,
            session: None,
            log,
            _profile: profile,
        };
        let target = browser
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        browser.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            browser.call(domain, json!({})).await;
        }
        browser
            .call(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
            )
            .await;
        browser
            .call(
                "Page.addScriptToEvaluateOnNewDocument",
                json!({"source": "window.alert = () => { window.__alerted = true; };"}),
            )
            .await;
        browser
    }

    /// Sends one command (to the page once attached) and waits for its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).unwrap();
        let deadline = Instant::now() + BROWSER_WAIT;
        loop {
            let reply = self
                .messages
                .lock()
                .unwrap()
                .iter()
                .find(|message| message["id"] == id)
                .cloned();
            if let Some(reply) = reply {
                assert!(
                    reply.get("error").is_none(),
                    "{method} failed: {}",
                    reply["error"]
                );
                return reply["result"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "{method}: no answer from chromium in {BROWSER_WAIT:?}; its log is {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
    }

    /// Runs `expression` in the page; returns its value (JSON-able).
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression} threw: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it gives something other than null or false.
    async fn wait_for(&mut self, what: &str, expression: &str) -> Value {
        let deadline = Instant::now() + BROWSER_WAIT;
        loop {
            let value = self.eval(expression).await;
            if !value.is_null() && value != json!(false) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not seen in {BROWSER_WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many times the page has fetched `/status`.
    async fn refreshes(&mut self) -> u64 {
        self.eval("Number(document.body.dataset.refreshes)")
            .await
            .as_u64()
            .unwrap()
    }

    /// Loads the page and waits for its first refresh.
    async fn open_status_page(&mut self, admin: &str) {
        self.navigate(&format!("http://{admin}/")).await;
        self.wait_for(
            "the first refresh",
            "document.body && Number(document.body.dataset.refreshes) >= 1 \
             && document.querySelector('tr.server') !== null",
        )
        .await;
    }

    /// Errors the page reported: exceptions, console errors, and log
    /// entries of level error (failed loads, refused policy).
    fn errors(&self) -> Vec<Value> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|message| {
                let params = &message["params"];
                match message["method"].as_str() {
                    Some("Runtime.exceptionThrown") => true,
                    Some("Runtime.consoleAPICalled") => {
                        params["type"] == "error" || params["type"] == "assert"
                    }
                    Some("Log.entryAdded") => params["entry"]["level"] == "error",
                    _ => false,
                }
            })
            .cloned()
            .collect()
    }

    fn dialogs(&self) -> usize {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|message| message["method"] == "Page.javascriptDialogOpening")
            .count()
    }

    async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        std::fs::write(path, base64_decode(shot["data"].as_str().unwrap())).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |byte: u8| match byte {
        b'A'..=b'Z' => u32::from(byte - b'A'),
        b'a'..=b'z' => u32::from(byte - b'a') + 26,
        b'0'..=b'9' => u32::from(byte - b'0') + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {byte}"),
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for chunk in text.as_bytes().chunks(4) {
        let digits: Vec<u32> = chunk
            .iter()
            .filter(|&&b| b != b'=')
            .map(|&b| value(b))
            .collect();
        let word = digits
            .iter()
            .enumerate()
            .fold(0, |word, (i, digit)| word | digit << (18 - 6 * i));
        for i in 0..digits.len().saturating_sub(1) {
            out.push((word >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// Two addresses free a moment ago, never the same one twice.
fn listen_and_admin() -> (String, String) {
    let listen = free_addr();
    let admin = std::iter::repeat_with(free_addr)
        .take(100)
        .find(|admin| *admin != listen)
        .expect("a second free port");
    (listen, admin)
}

/// Starts sluice with one listener `front` (on `unix_listen`, else a free
/// TCP port) in front of `servers`, and the admin endpoint on a free port;
/// returns it with the two addresses. The machine is shared: when another
/// process takes a port between the moment it was free and sluice's bind,
/// this tries fresh ports, at most 5 times.
async fn start_with_admin(
    unix_listen: Option<&str>,
    servers: &[String],
) -> (Sluice, String, String) {
    for _ in 0..5 {
        let (tcp_listen, admin) = listen_and_admin();
        let listen = unix_listen.map_or(tcp_listen, str::to_owned);
        let mut text = config(&listen, "", "", servers);
        text.push_str(&format!("\n[admin]\nbind = \"{admin}\"\n"));
        let sluice = Sluice::spawn(&text, &[]);
        let settled = wait_until(Duration::from_secs(20), || {
            sluice
                .log_lines()
                .iter()
                .any(|line| line.contains("cannot start") || line.contains("listening"))
        })
        .await;
        let log = sluice.log_text();
        assert!(settled, "sluice did not start; log:\n{log}");
        if !log.contains("cannot start") {
            return (sluice, listen, admin);
        }
        assert!(
            log.contains("Address already in use"),
            "sluice did not start; log:\n{log}"
        );
    }
    panic!("5 tries to start sluice, each on a port another process took");
}

/// Sends one request to the admin endpoint; returns (status, body).
async fn request(admin: &str, head: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let request = format!(
        "{head}\r\nHost: sluice\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

async fn status(admin: &str) -> Value {
    let (code, body) = request(admin, "GET /status HTTP/1.1", "").await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

/// Polls `/status` until `condition` holds; fails with the last answer.
async fn status_until(admin: &str, what: &str, condition: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = status(admin).await;
        if condition(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} never held: {status:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn peer<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["upstreams"]["pool"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|peer| peer["name"] == name)
        .unwrap_or_else(|| panic!("no peer {name} in {status:#}"))
}

fn total_relayed(status: &Value) -> u64 {
    status["upstreams"]["pool"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|peer| peer["total"].as_u64().unwrap())
        .sum()
}

/// Sends `len` bytes through sluice, reads the echo, and closes.
async fn relay_once(listen: &str, len: usize) {
    let mut stream = TcpStream::connect(listen).await.unwrap();
    let data = payload(len, len as u64);
    stream.write_all(&data).await.unwrap();
    let mut echo = vec![0; len];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(echo, data);
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

/// One server row of the page as the reader sees it.
#[derive(Debug, PartialEq, Eq, serde::Deserialize)]
struct Row {
    name: String,
    state: String,
    state_class: String,
    weight: String,
    active: String,
    total: String,
    failures: String,
    sent: String,
    received: String,
}

const ROWS: &str = r#"JSON.stringify([...document.querySelectorAll('tr.server')].map((row) => {
    const cell = (name) => row.querySelector('td.' + name).textContent;
    const badge = row.querySelector('.state');
    return { name: cell('name'), state: badge.textContent, state_class: badge.className,
             weight: cell('weight'), active: cell('active'), total: cell('total'),
             failures: cell('failures'), sent: cell('sent'), received: cell('received') };
}))"#;

async fn rows(browser: &mut Browser) -> Vec<Row> {
    let text = browser.eval(ROWS).await;
    serde_json::from_str(text.as_str().unwrap()).unwrap()
}

fn row(name: &str, state: &str, counts: [&str; 6]) -> Row {
    let [weight, active, total, failures, sent, received] = counts.map(str::to_owned);
    Row {
        name: name.to_owned(),
        state: state.to_owned(),
        state_class: format!("state state-{state}"),
        weight,
        active,
        total,
        failures,
        sent,
        received,
    }
}

/// Everything the page promises with three live servers, one down and one
/// backup: every server with its state and exact counts after known
/// traffic; a stopped backend shown failed within two refreshes; a name
/// made of markup shown as text with no script run; no JavaScript error;
/// and a refused control shows the server's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_every_server_and_follows_a_failure() {
    let alpha = Backend::tcp("alpha", Behavior::Echo).await;
    let beta = Backend::tcp("beta", Behavior::Echo).await;
    let markup = Backend::tcp("markup", Behavior::Echo).await;
    let (spare, _spare_socket) = refusing_addr();
    let (reserve, _reserve_socket) = refusing_addr();
    let failing = "fail_timeout = \"120s\"";
    let (sluice, listen, admin) = start_with_admin(
        None,
        &[
            server(alpha.addr, &format!("name = \"alpha\"\n{failing}")),
            server(beta.addr, &format!("name = \"beta\"\n{failing}")),
            server(markup.addr, &format!("name = \"{XSS_NAME}\"\n{failing}")),
            server(&spare, "name = \"spare\"\ndown = true"),
            server(&reserve, "name = \"reserve\"\nbackup = true"),
        ],
    )
    .await;

    // Round-robin over three equal servers: six clients, two each. The first
    // three stay open (one per server, each picked before the next client
    // comes), the last three send 100 bytes each and close.
    let mut held = Vec::new();
    for count in 1..=3 {
        held.push(TcpStream::connect(&listen).await.unwrap());
        status_until(&admin, "the held client relayed", |s| {
            total_relayed(s) == count
        })
        .await;
    }
    for _ in 0..3 {
        relay_once(&listen, 100).await;
    }
    status_until(&admin, "the closed clients counted", |s| {
        s["listeners"][0]["active"] == 3
            && ["alpha", "beta", XSS_NAME]
                .iter()
                .all(|name| peer(s, name)["bytes_received"] == 100)
    })
    .await;

    let mut browser = Browser::launch("servers", 1400, 900).await;
    browser.open_status_page(&admin).await;
    let live = ["1", "1", "2", "0", "100 B", "100 B"];
    let idle = ["1", "0", "0", "0", "0 B", "0 B"];
    assert_eq!(
        rows(&mut browser).await,
        vec![
            row("alpha", "up", live),
            row("beta", "up", live),
            row(XSS_NAME, "up", live),
            row("spare", "down", idle),
            row("reserve", "backup", idle),
        ]
    );
    let listener = browser
        .eval(
            "JSON.stringify([...document.querySelectorAll('tr.listener td')].map((td) => td.textContent))",
        )
        .await;
    let listener: Vec<String> = serde_json::from_str(listener.as_str().unwrap()).unwrap();
    assert_eq!(listener[..5], ["front", listen.as_str(), "pool", "6", "3"]);

    // The markup in the name is text: no element made of it, no script run.
    let escaped = browser
        .eval(&format!(
            "JSON.stringify({{ images: document.querySelectorAll('img').length, \
               alerted: window.__alerted === true, \
               shown: [...document.querySelectorAll('td.name')].some((td) => td.textContent === {name:?} \
                      && td.childElementCount === 0) }})",
            name = XSS_NAME
        ))
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(escaped.as_str().unwrap()).unwrap(),
        json!({"images": 0, "alerted": false, "shown": true})
    );

    // Stop beta; clients fail over, and the first attempt on beta marks it
    // failed (max_fails 1). From the moment /status says so, the page must
    // show it by its second refresh. The page notes beta's row at every
    // refresh as it happens, so a slow poll from here cannot blur which
    // refresh first showed it.
    browser
        .eval(
            "window.__beta = []; \
             new MutationObserver(() => { \
               const badge = document.querySelector('tr.server[data-name=\"beta\"] .state'); \
               window.__beta.push([Number(document.body.dataset.refreshes), \
                 badge && badge.textContent, badge && badge.className]); \
             }).observe(document.body, { attributes: true, attributeFilter: ['data-refreshes'] }); \
             true",
        )
        .await;
    beta.finish().await;
    for _ in 0..10 {
        relay_once(&listen, 10).await;
        if peer(&status(&admin).await, "beta")["state"] == "failed" {
            break;
        }
    }
    assert_eq!(peer(&status(&admin).await, "beta")["state"], "failed");
    let refreshes_before = browser.refreshes().await;
    let seen = browser
        .wait_for(
            "beta shown failed",
            "(() => { const first = window.__beta.find(([, label]) => label === 'failed'); \
               return first ? JSON.stringify(first) : null; })()",
        )
        .await;
    let (refresh, label, class): (u64, String, String) =
        serde_json::from_str(seen.as_str().unwrap()).unwrap();
    assert_eq!(
        (label.as_str(), class.as_str()),
        ("failed", "state state-failed")
    );
    assert!(
        refresh <= refreshes_before + 2,
        "failed first shown at refresh {refresh}; /status said so before refresh {}",
        refreshes_before + 1
    );
    assert_eq!(browser.errors(), Vec::<Value>::new(), "JavaScript errors");
    assert_eq!(browser.dialogs(), 0);
    // Some history for the sparklines, for the picture.
    let more = browser.refreshes().await + 2;
    browser
        .wait_for(
            "two more refreshes",
            &format!("Number(document.body.dataset.refreshes) >= {more}"),
        )
        .await;
    browser
        .screenshot(&output_dir().join("status-page.png"))
        .await;

    // The token stays in this tab's session storage only.
    browser
        .eval(
            "document.getElementById('token').value = 'page-test-token'; \
             document.getElementById('token-form').requestSubmit(); \
             JSON.stringify([sessionStorage.getItem('sluice.admin.token'), localStorage.length])",
        )
        .await;
    assert_eq!(
        browser
            .eval("JSON.stringify([sessionStorage.getItem('sluice.admin.token'), localStorage.length, document.getElementById('token').value])")
            .await,
        json!(r#"["page-test-token",0,""]"#)
    );
    // A weight the contract forbids (1-1000) is refused by the runtime API
    // (400); the page shows its answer.
    let path = "/api/upstreams/pool/servers/alpha";
    let (refused, _) = request(
        &admin,
        &format!("PATCH {path} HTTP/1.1\r\nAuthorization: Bearer page-test-token\r\nContent-Type: application/json"),
        r#"{"weight":5000}"#,
    )
    .await;
    assert_eq!(refused, 400, "weight 5000 was not refused");
    browser
        .eval(
            "document.querySelector('tr.server[data-name=\"alpha\"] button.manage').click(); \
             document.getElementById('control-weight').value = '5000'; \
             document.getElementById('control-set-weight').click(); true",
        )
        .await;
    let shown = browser
        .wait_for(
            "the refusal shown",
            "(() => { const result = document.getElementById('control-result'); \
               return result.className === 'error' && result.textContent; })()",
        )
        .await;
    let shown = shown.as_str().unwrap();
    assert!(
        shown.starts_with(&format!("weight 5000 refused: {refused} ")),
        "{shown}"
    );
    assert_eq!(peer(&status(&admin).await, "alpha")["weight"], 1);
    // An allowed weight and a drain take effect through the runtime API, and
    // the page says so.
    let confirmed = "(() => { const result = document.getElementById('control-result'); \
                     return result.className === 'ok' && result.textContent; })()";
    browser
        .eval(
            "document.getElementById('control-result').className = ''; \
             document.getElementById('control-weight').value = '3'; \
             document.getElementById('control-set-weight').click(); true",
        )
        .await;
    browser
        .wait_for("the weight change confirmed", confirmed)
        .await;
    status_until(&admin, "alpha at weight 3", |status| {
        peer(status, "alpha")["weight"] == 3
    })
    .await;
    browser
        .eval(
            "document.getElementById('control-result').className = ''; \
             document.getElementById('control-drain').click(); true",
        )
        .await;
    browser.wait_for("the drain confirmed", confirmed).await;
    status_until(&admin, "alpha draining", |status| {
        peer(status, "alpha")["state"] == "draining"
    })
    .await;
    browser
        .wait_for(
            "alpha shown draining",
            "document.querySelector('tr.server[data-name=\"alpha\"]').textContent.includes('draining')",
        )
        .await;
    // The one error logged since is the refused request itself.
    let errors = browser.errors();
    assert!(
        errors
            .iter()
            .all(|error| error["params"]["entry"]["source"] == "network"
                && error["params"]["entry"]["url"]
                    .as_str()
                    .is_some_and(|url| url.ends_with(path))),
        "{errors:#?}"
    );

    drop(held);
    drop(sluice);
    for backend in [alpha, markup] {
        backend.finish().await;
    }
}

/// 1,000 servers: `/status` stays fast, the page keeps a few dozen rows in
/// the DOM whatever the count, and scrolling and the filter reach any server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_stays_readable_at_a_thousand_servers() {
    // A UNIX listener: start-up takes a while with 1,000 servers, time
    // enough for a parallel test's connection to take a free port.
    let socket_dir = tempfile::tempdir().unwrap();
    let listen = format!("unix:{}", socket_dir.path().join("front.sock").display());
    // Nothing connects to them: no client is sent.
    let servers: Vec<String> = (0..1000)
        .map(|i| {
            server(
                format!("127.0.0.1:{}", 20000 + i),
                &format!("name = \"server-{i:04}\""),
            )
        })
        .collect();
    let (_sluice, _, admin) = start_with_admin(Some(&listen), &servers).await;

    let mut took = Vec::new();
    let mut size = 0;
    for _ in 0..20 {
        let started = Instant::now();
        let (code, body) = request(&admin, "GET /status HTTP/1.1", "").await;
        took.push(started.elapsed());
        assert_eq!(code, 200);
        size = body.len();
    }
    took.sort();
    eprintln!(
        "/status with 1000 servers: {size} bytes, median {:?}, slowest {:?} of 20",
        took[10], took[19]
    );
    assert!(took[10] < Duration::from_millis(500), "{took:?}");

    let mut browser = Browser::launch("thousand", 1400, 1000).await;
    browser.open_status_page(&admin).await;
    assert_eq!(
        browser
            .eval("document.querySelector('section.upstream .summary').textContent")
            .await,
        "1000 servers · 1000 up"
    );
    let window = "JSON.stringify([...document.querySelectorAll('tr.server')].map((row) => row.dataset.name))";
    let names: Vec<String> =
        serde_json::from_str(browser.eval(window).await.as_str().unwrap()).unwrap();
    assert_eq!(names.first().map(String::as_str), Some("server-0000"));
    assert!(
        (25..=50).contains(&names.len()),
        "{} rows in the DOM",
        names.len()
    );
    let render_ms = browser.eval("document.body.dataset.renderMs").await;
    eprintln!("page render with 1000 servers: {render_ms} ms");

    browser
        .eval("const s = document.querySelector('section.upstream .scroller'); s.scrollTop = s.scrollHeight; true")
        .await;
    browser
        .wait_for(
            "the last server scrolled into the DOM",
            "document.querySelector('tr.server[data-name=\"server-0999\"]') !== null",
        )
        .await;
    let names: Vec<String> =
        serde_json::from_str(browser.eval(window).await.as_str().unwrap()).unwrap();
    assert!((25..=50).contains(&names.len()), "{names:?}");
    assert_eq!(names.last().map(String::as_str), Some("server-0999"));

    browser
        .eval(
            "const f = document.querySelector('section.upstream input[type=search]'); \
             f.value = 'server-0500'; f.dispatchEvent(new Event('input')); true",
        )
        .await;
    let names: Vec<String> =
        serde_json::from_str(browser.eval(window).await.as_str().unwrap()).unwrap();
    assert_eq!(names, ["server-0500"]);
    assert_eq!(
        browser
            .eval("document.querySelector('section.upstream .shown').textContent")
            .await,
        "showing 1 of 1000"
    );
    assert_eq!(browser.errors(), Vec::<Value>::new(), "JavaScript errors");
}

/// `/` and `/ui` serve the page with a policy that lets only its own script
/// run and only its own origin be fetched; `/status` lists the listeners
/// with exact counts (kept across a reload) and how long each server has
/// been in its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_listeners_and_state_ages() {
    let backend = Backend::tcp("b", Behavior::Echo).await;
    let (dead, _dead_socket) = refusing_addr();
    let (sluice, listen, admin) = start_with_admin(
        None,
        &[
            server(&dead, "name = \"dead\"\nfail_timeout = \"120s\""),
            server(backend.addr, "name = \"live\""),
        ],
    )
    .await;

    for path in ["/", "/ui"] {
        let mut stream = TcpStream::connect(&admin).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            head.contains("content-type: text/html; charset=utf-8"),
            "{head}"
        );
        assert!(
            head.contains("content-security-policy: default-src 'none'; script-src 'sha256-"),
            "{head}"
        );
        assert!(head.contains("connect-src 'self'"), "{head}");
        assert!(body.starts_with("<!DOCTYPE html>") && body.contains("/status"));
    }

    // The first pick goes to the dead server, which fails over to the live one.
    let held = TcpStream::connect(&listen).await.unwrap();
    let status = status_until(&admin, "the held client relayed", |s| {
        peer(s, "live")["active"] == 1 && peer(s, "dead")["state"] == "failed"
    })
    .await;
    assert_eq!(
        status["listeners"],
        json!([{"name": "front", "address": listen, "upstream": "pool", "accepted": 1, "active": 1}])
    );
    let dead_since = peer(&status, "dead")["state_since_seconds"]
        .as_u64()
        .unwrap();
    // The state is sampled every second: the change is at most that old.
    assert!(dead_since <= 2, "{status:#}");
    // The live server has been up since start; its age grows while the
    // dead one's restarted at the failure.
    let later = status_until(&admin, "three seconds pass", |s| {
        peer(s, "dead")["state_since_seconds"].as_u64().unwrap() >= 3
    })
    .await;
    assert_eq!(peer(&later, "dead")["state"], "failed");
    assert!(
        peer(&later, "live")["state_since_seconds"]
            .as_u64()
            .unwrap()
            >= peer(&later, "dead")["state_since_seconds"]
                .as_u64()
                .unwrap(),
        "{later:#}"
    );

    relay_once(&listen, 10).await;
    drop(held);
    status_until(&admin, "both clients closed", |s| {
        s["listeners"][0] == json!({"name": "front", "address": listen, "upstream": "pool", "accepted": 2, "active": 0})
    })
    .await;
    // A reload keeps the listener, and so its counts.
    let text = std::fs::read_to_string(&sluice.config_path).unwrap();
    std::fs::write(&sluice.config_path, text.replace("\"5s\"", "\"6s\"")).unwrap();
    sluice.signal(Signal::SIGHUP);
    assert!(
        sluice
            .wait_for_log("configuration reloaded", Duration::from_secs(10))
            .await,
        "{}",
        sluice.log_text()
    );
    relay_once(&listen, 10).await;
    status_until(&admin, "the client after the reload counted", |s| {
        s["listeners"][0]["accepted"] == 3 && s["listeners"][0]["active"] == 0
    })
    .await;
    backend.finish().await;
}
