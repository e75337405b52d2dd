//! Test harness: the real sluice binary, real loopback backends.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::task::JoinSet;

pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// A port that was free a moment ago on 127.0.0.1 and that this process
/// has not handed out before: two binds in a row may be given the same free
/// port, and two listeners of one test would then collide.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..1000 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if HANDED_OUT.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("1,000 binds gave only ports handed out before");
}

pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// An address that refuses connections while the returned socket lives: it
/// is bound but never listens, so no other process can take the port meanwhile
/// (a released "free" port can be reused by parallel tests and answer).
pub fn refusing_addr() -> (String, socket2::Socket) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (addr.to_string(), socket)
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A running sluice process; killed when dropped.
pub struct Sluice {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    pub config_path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Sluice {
    /// Starts sluice on `config` and waits until every listener is bound.
    pub async fn start(config: &str) -> Sluice {
        Sluice::start_with_env(config, &[]).await
    }

    /// Like [`Sluice::start`], with extra environment variables.
    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Sluice {
        let listeners = config.matches("[[listener]]").count();
        let sluice = Sluice::spawn_with_env(config, &[], env);
        let ready = wait_until(Duration::from_secs(10), || {
            sluice
                .log_lines()
                .iter()
                .filter(|l| l.contains("listening"))
                .count()
                >= listeners
        })
        .await;
        assert!(ready, "sluice did not start; log:\n{}", sluice.log_text());
        sluice
    }

    /// Spawns sluice on `config` with extra arguments, without waiting.
    pub fn spawn(config: &str, args: &[&str]) -> Sluice {
        Sluice::spawn_with_env(config, args, &[])
    }

    pub fn spawn_with_env(config: &str, args: &[&str], env: &[(&str, &str)]) -> Sluice {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("sluice.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut command = Command::new(SLUICE);
        command
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        Sluice::launch(command, dir, config_path)
    }

    /// Starts sluice with exactly these arguments (no --config) and waits
    /// until `listeners` listeners are bound.
    pub async fn start_args(args: &[&str], listeners: usize) -> Sluice {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("unused.toml");
        let mut command = Command::new(SLUICE);
        command.args(args).env_remove("SLUICE_CONFIG");
        let sluice = Sluice::launch(command, dir, config_path);
        let ready = wait_until(Duration::from_secs(10), || {
            sluice
                .log_lines()
                .iter()
                .filter(|l| l.contains("listening"))
                .count()
                >= listeners
        })
        .await;
        assert!(ready, "sluice did not start; log:\n{}", sluice.log_text());
        sluice
    }

    fn launch(mut command: Command, dir: tempfile::TempDir, config_path: PathBuf) -> Sluice {
        if !command.get_envs().any(|(key, _)| key == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Sluice {
            child,
            log,
            config_path,
            dir,
        }
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.log_lines().iter().any(|l| l.contains(needle))
        })
        .await
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits for the process to exit, polling.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs sluice to completion with these arguments; returns (exit code, stdout, stderr).
pub fn run_sluice(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> (i32, String, String) {
    let output = Command::new(SLUICE)
        .args(args)
        .env_remove("SLUICE_CONFIG")
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// What a backend does with each connection.
#[derive(Clone, Copy, Debug)]
pub enum Behavior {
    /// Echo every byte back; half-close back after the client's EOF.
    Echo,
    /// Write the backend's name first, then echo.
    Announce,
    /// Read to EOF, then answer with the SHA-256 of what was read and close.
    DigestOnEof,
}

/// A listener a [`Backend`] can accept connections on.
trait Accept: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_stream(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    async fn accept_stream(&self) -> std::io::Result<TcpStream> {
        Ok(self.accept().await?.0)
    }
}

impl Accept for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> std::io::Result<tokio::net::UnixStream> {
        Ok(self.accept().await?.0)
    }
}

/// An in-process backend on loopback that counts its connections. Panics in
/// its tasks fail the test through [`Backend::finish`].
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub accepted: Arc<AtomicUsize>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl Backend {
    pub async fn tcp(name: &str, behavior: Behavior) -> Backend {
        Backend::tcp_on("127.0.0.1:0", name, behavior).await
    }

    pub async fn tcp_on(addr: &str, name: &str, behavior: Behavior) -> Backend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        Backend::serving(listener, addr, name, behavior)
    }

    pub async fn unix(path: &Path, name: &str, behavior: Behavior) -> Backend {
        let listener = UnixListener::bind(path).unwrap();
        Backend::serving(listener, "0.0.0.0:0".parse().unwrap(), name, behavior)
    }

    /// Accepts on `listener` until finished, serving each connection in its own task.
    fn serving<L: Accept>(
        listener: L,
        addr: SocketAddr,
        name: &str,
        behavior: Behavior,
    ) -> Backend {
        let backend = Backend::new(addr, name);
        let (accepted, tasks, name) = (
            Arc::clone(&backend.accepted),
            Arc::clone(&backend.tasks),
            name.to_owned(),
        );
        backend.tasks.lock().unwrap().spawn(async move {
            loop {
                let Ok(stream) = listener.accept_stream().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                tasks
                    .lock()
                    .unwrap()
                    .spawn(serve(stream, name.clone(), behavior));
            }
        });
        backend
    }

    fn new(addr: SocketAddr, name: &str) -> Backend {
        Backend {
            addr,
            name: name.to_owned(),
            accepted: Arc::new(AtomicUsize::new(0)),
            tasks: Arc::new(Mutex::new(JoinSet::new())),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stops the backend and fails the test if any of its tasks panicked.
    pub async fn finish(self) {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        tasks.abort_all();
        while let Some(result) = tasks.join_next().await {
            if let Err(err) = result {
                assert!(!err.is_panic(), "backend {} panicked: {err}", self.name);
            }
        }
    }
}

pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    name: String,
    behavior: Behavior,
) {
    match behavior {
        Behavior::Echo => echo(&mut stream).await,
        Behavior::Announce => {
            if stream.write_all(name.as_bytes()).await.is_ok() {
                echo(&mut stream).await;
            }
        }
        Behavior::DigestOnEof => {
            let mut hasher = Sha256::new();
            let mut buf = vec![0; 64 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => hasher.update(&buf[..n]),
                    Err(_) => return,
                }
            }
            let _ = stream.write_all(&hasher.finalize()).await;
            let _ = stream.shutdown().await;
        }
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => {
                let _ = stream.shutdown().await;
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Connects to sluice and reads the backend's announced name (`len` bytes).
pub async fn announced(addr: &str, len: usize) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut name = vec![0; len];
    stream.read_exact(&mut name).await.unwrap();
    String::from_utf8(name).unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// Sends `data` through `stream` while reading the echo; returns the echo's digest.
pub async fn echo_digest<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    data: Vec<u8>,
) -> Vec<u8> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let expected = data.len();
    let write = tokio::spawn(async move {
        writer.write_all(&data).await.unwrap();
        writer.shutdown().await.unwrap();
    });
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 64 * 1024];
    let mut total = 0;
    loop {
        let n = reader.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n;
    }
    write.await.unwrap();
    assert_eq!(total, expected, "echo length");
    hasher.finalize().to_vec()
}

/// What a listener with `accept_proxy_protocol` reads first, and exactly:
/// bytes written together with it are surely waiting in the socket by the
/// time sluice has connected the client's peer.
pub const PROXY_HEADER: &[u8] = b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 80\r\n";

/// Sends `first` in one write with the PROXY header, then `rest` and the end
/// of stream, reading the echo meanwhile; returns the echo's digest.
pub async fn early_echo_digest(listen: &str, first: &[u8], rest: Vec<u8>) -> Vec<u8> {
    let stream = TcpStream::connect(listen).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(&[PROXY_HEADER, first].concat())
        .await
        .unwrap();
    let write = tokio::spawn(async move {
        writer.write_all(&rest).await.unwrap();
        writer.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut echoed))
        .await
        .expect("the echo did not end in time")
        .unwrap();
    write.await.unwrap();
    sha256(&echoed)
}

/// One listener `front` on `listen` in front of upstream `pool` with `servers`
/// (each a TOML table body); the extras are added to the listener and upstream tables.
pub fn config(
    listen: &str,
    listener_extra: &str,
    upstream_extra: &str,
    servers: &[String],
) -> String {
    let mut text = format!(
        "shutdown_timeout = \"5s\"\n\n[[listener]]\nname = \"front\"\nbind = \"{listen}\"\nupstream = \"pool\"\nconnect_timeout = \"1s\"\n{listener_extra}\n\n[upstream.pool]\n{upstream_extra}\n"
    );
    for server in servers {
        text.push_str("\n[[upstream.pool.server]]\n");
        text.push_str(server);
        text.push('\n');
    }
    text
}

pub fn server(addr: impl std::fmt::Display, extra: &str) -> String {
    format!("address = \"{addr}\"\n{extra}")
}

/// Segments this socket has received, handshake included (`tcpi_segs_in`
/// of Linux's `struct tcp_info`, at byte 140 since Linux 4.2).
pub fn segments_received(stream: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is valid for writes of `len` bytes; the descriptor is open.
    let status = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(status, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    assert!(len >= 144, "this kernel's tcp_info has no tcpi_segs_in");
    u32::from_ne_bytes(info[140..144].try_into().unwrap())
}

/// A backend that, for each client, reads `request_len` bytes, then sends
/// `reply` and its FIN in one segment (MSG_MORE holds the bytes for the
/// FIN). Its tasks end with the test's runtime.
pub async fn one_segment_backend(request_len: usize, reply: &'static [u8]) -> String {
    use std::os::fd::AsRawFd;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0; request_len];
                stream.read_exact(&mut request).await?;
                stream.writable().await?;
                stream.try_io(tokio::io::Interest::WRITABLE, || {
                    // SAFETY: `reply` is valid for reads of its length; the descriptor is open.
                    let sent = unsafe {
                        libc::send(
                            stream.as_raw_fd(),
                            reply.as_ptr().cast(),
                            reply.len(),
                            libc::MSG_MORE,
                        )
                    };
                    match usize::try_from(sent) {
                        Ok(sent) if sent == reply.len() => Ok(()),
                        Ok(_) => Err(std::io::ErrorKind::WriteZero.into()),
                        Err(_) => Err(std::io::Error::last_os_error()),
                    }
                })?;
                stream.shutdown().await?;
                stream.read_to_end(&mut Vec::new()).await
            });
        }
    });
    addr
}

/// Sends `request` on a new connection to `listen` and reads to the end:
/// the reply, the segments the client received on that connection, and the
/// time from the request written to the reply's end.
pub async fn exchange_segments(listen: &str, request: &[u8]) -> (Vec<u8>, u32, Duration) {
    let mut stream = TcpStream::connect(listen).await.unwrap();
    stream.write_all(request).await.unwrap();
    let asked = Instant::now();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply))
        .await
        .expect("the reply did not end in time")
        .unwrap();
    let took = asked.elapsed();
    let segments = segments_received(&stream);
    (reply, segments, took)
}

/// `delayed_ack` on: the ACK of the request rides on the reply, so the
/// client receives two segments (SYN-ACK; the reply with its FIN and the
/// ACK). The kernel sends the ACK alone once its delayed-ACK time (40 ms)
/// passes without a reply; an exchange that took 30 ms or more on a busy
/// machine may have seen that, so it is tried again, up to 10 times.
pub async fn assert_ack_rides_on_reply(listen: &str, request: &[u8], reply: &[u8]) {
    for _ in 0..10 {
        let (heard, segments, took) = exchange_segments(listen, request).await;
        assert_eq!(heard, reply);
        if took < Duration::from_millis(30) {
            assert_eq!(segments, 2, "the ACK went alone in an exchange of {took:?}");
            return;
        }
    }
    panic!("10 exchanges each took 30 ms or more: the delayed ACK cannot be told apart");
}

/// `delayed_ack` off: the client gets the ACK of its request at once, a
/// segment of its own (three in all).
pub async fn assert_ack_goes_alone(listen: &str, request: &[u8], reply: &[u8]) {
    let (heard, segments, _) = exchange_segments(listen, request).await;
    assert_eq!(heard, reply);
    assert_eq!(segments, 3);
}
