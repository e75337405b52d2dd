//! TLS backends and TLS clients on loopback for the TLS tests, built on
//! rustls through sluice's own `tls` module. Include with
//! `#[path = "common/tls_backend.rs"] mod tls_backend;` next to `mod common;`.
#![allow(dead_code)] // each test binary uses a different part

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustls::HandshakeKind;
use sluice::tls::{self, ClientTlsSettings, ServerTlsSettings};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::common::{serve, Behavior};

/// A TLS server on loopback serving every completed handshake with `behavior`.
pub struct TlsBackend {
    pub addr: SocketAddr,
    pub name: String,
    /// TCP connections accepted.
    pub accepted: Arc<AtomicUsize>,
    /// Handshakes completed.
    pub handshakes: Arc<AtomicUsize>,
    /// Of those, the ones that resumed an earlier session.
    pub resumed: Arc<AtomicUsize>,
    /// Handshakes that failed (refused certificate, alert from the client, ...).
    pub failed_handshakes: Arc<AtomicUsize>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl TlsBackend {
    pub async fn start(name: &str, settings: ServerTlsSettings, behavior: Behavior) -> TlsBackend {
        TlsBackend::with_acceptor(name, tls::acceptor(&settings).unwrap(), behavior).await
    }

    /// A TLS server with a configuration of the test's own.
    pub async fn with_acceptor(
        name: &str,
        acceptor: TlsAcceptor,
        behavior: Behavior,
    ) -> TlsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = TlsBackend {
            addr: listener.local_addr().unwrap(),
            name: name.to_owned(),
            accepted: Arc::default(),
            handshakes: Arc::default(),
            resumed: Arc::default(),
            failed_handshakes: Arc::default(),
            tasks: Arc::default(),
        };
        let (accepted, handshakes, resumed, failed, tasks, name) = (
            Arc::clone(&backend.accepted),
            Arc::clone(&backend.handshakes),
            Arc::clone(&backend.resumed),
            Arc::clone(&backend.failed_handshakes),
            Arc::clone(&backend.tasks),
            name.to_owned(),
        );
        backend.tasks.lock().unwrap().spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (acceptor, handshakes, resumed, failed, name) = (
                    acceptor.clone(),
                    Arc::clone(&handshakes),
                    Arc::clone(&resumed),
                    Arc::clone(&failed),
                    name.clone(),
                );
                tasks.lock().unwrap().spawn(async move {
                    match acceptor.accept(stream).await {
                        Ok(tls) => {
                            if tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed) {
                                resumed.fetch_add(1, Ordering::SeqCst);
                            }
                            handshakes.fetch_add(1, Ordering::SeqCst);
                            serve(tls, name, behavior).await;
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        backend
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    pub fn resumed(&self) -> usize {
        self.resumed.load(Ordering::SeqCst)
    }

    pub fn failed_handshakes(&self) -> usize {
        self.failed_handshakes.load(Ordering::SeqCst)
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

/// Server settings with this certificate and key, no client certificates.
pub fn server_settings(cert: &Path, key: &Path) -> ServerTlsSettings {
    ServerTlsSettings {
        cert_file: cert.to_owned(),
        key_file: key.to_owned(),
        client_ca_file: None,
    }
}

/// Connects to `addr` over TLS as `name`, trusting `ca`, optionally with a
/// client certificate.
pub async fn tls_client(
    addr: &str,
    name: &str,
    ca: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let settings = ClientTlsSettings {
        ca_file: Some(ca.to_owned()),
        cert_file: client_cert.map(|(cert, _)| cert.to_owned()),
        key_file: client_cert.map(|(_, key)| key.to_owned()),
        ..ClientTlsSettings::default()
    };
    let origin = tls::origin(&settings, name).unwrap();
    let tcp = TcpStream::connect(addr).await?;
    origin.connector.connect(origin.server_name, tcp).await
}
