//! Helpers of the recycling tests (SPEC §9): reloads, metric reads, and
//! counting each backend's open connections.
#![allow(dead_code)] // each test binary uses a different part

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{wait_until, Sluice};

/// A client's look, between two requests, at whether sluice closed the
/// connection: `Ok(0)` at its end, `Ok(1)` for a byte nobody asked for, or
/// `WouldBlock`. It asks the kernel (a `MSG_PEEK` read): tokio's `try_read`
/// answers from the runtime's last look at the socket, which on a busy
/// machine can predate sluice's FIN; the client then sent a request into a
/// recycle that had already begun and counted it as unanswered.
pub fn peek_end(stream: &TcpStream) -> std::io::Result<usize> {
    let mut byte = [std::mem::MaybeUninit::uninit()];
    socket2::SockRef::from(stream).peek(&mut byte)
}

/// Writes `config` over sluice's file, sends SIGHUP and waits until the
/// reload is logged as done; panics if it failed.
pub async fn reload(sluice: &Sluice, config: &str) {
    let outcomes = |sluice: &Sluice| {
        sluice
            .log_lines()
            .into_iter()
            .filter(|l| l.contains("configuration reloaded") || l.contains("reload failed"))
            .collect::<Vec<_>>()
    };
    std::fs::write(&sluice.config_path, config).unwrap();
    let before = outcomes(sluice).len();
    sluice.signal(Signal::SIGHUP);
    let done = wait_until(Duration::from_secs(10), || outcomes(sluice).len() > before).await;
    assert!(done, "no reload outcome logged:\n{}", sluice.log_text());
    let outcome = outcomes(sluice)[before].clone();
    assert!(outcome.contains("configuration reloaded"), "{outcome}");
}

/// The text of `/metrics` on `admin`.
pub async fn metrics_text(admin: &str) -> String {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// The value of one series in `/metrics` on `admin` (0 when absent), e.g.
/// `sluice_connections_recycled_total{listener="front",reason="age"}`.
pub async fn metric(admin: &str, series: &str) -> f64 {
    metrics_text(admin)
        .await
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A backend's open connections, counted by the guards its connection
/// tasks hold.
#[derive(Clone, Default)]
pub struct OpenCount(Arc<AtomicUsize>);

impl OpenCount {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Counts one connection until the guard drops.
    pub fn hold(&self) -> OpenGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        OpenGuard(Arc::clone(&self.0))
    }
}

pub struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
