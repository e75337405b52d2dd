//! The TLS session store of one upstream peer, so its connections resume
//! instead of repeating the full handshake.
//!
//! A TLS 1.3 ticket resumes one connection only, so concurrent connects to a
//! peer each need their own: rustls's default store keeps 8 per server name,
//! which at 64 concurrent clients left about a fifth of the handshakes full.
//! This store keeps up to [`TICKETS_PER_SERVER`] per name. A TLS 1.2 session
//! (session ID or RFC 5077 ticket) may be resumed by many connections at
//! once, so one per name suffices, as rustls asks.
//!
//! Each peer gets its own store (see [`super::TlsOrigin::with_own_sessions`]):
//! a ticket is never offered to a server other than the one that issued it.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;
use rustls::NamedGroup;

/// TLS 1.3 tickets kept per server name: enough for this many concurrent
/// connects to resume. Each holds the ticket and a copy of the server's
/// certificate chain, so a peer's store stays within a few hundred KiB to a
/// few MiB.
pub const TICKETS_PER_SERVER: usize = 256;

/// Server names kept per store. A peer presents one name; the bound only
/// keeps the store finite whatever its caller asks.
const SERVER_NAMES: usize = 4;

#[derive(Debug, Default)]
pub struct SessionStore {
    /// Oldest name first; at most [`SERVER_NAMES`] entries.
    servers: Mutex<Vec<(ServerName<'static>, ServerSessions)>>,
}

#[derive(Debug, Default)]
struct ServerSessions {
    kx_hint: Option<NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
    /// Oldest first; at most [`TICKETS_PER_SERVER`].
    tls13: VecDeque<Tls13ClientSessionValue>,
}

impl SessionStore {
    fn servers(&self) -> MutexGuard<'_, Vec<(ServerName<'static>, ServerSessions)>> {
        // Every edit below leaves the lists consistent, so a poisoned lock
        // holds nothing to repair.
        self.servers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn edit(&self, name: ServerName<'static>, edit: impl FnOnce(&mut ServerSessions)) {
        let mut servers = self.servers();
        if let Some((_, sessions)) = servers.iter_mut().find(|(known, _)| *known == name) {
            edit(sessions);
            return;
        }
        if servers.len() == SERVER_NAMES {
            servers.remove(0);
        }
        let mut sessions = ServerSessions::default();
        edit(&mut sessions);
        servers.push((name, sessions));
    }

    fn read<T>(
        &self,
        name: &ServerName<'_>,
        read: impl FnOnce(&mut ServerSessions) -> T,
    ) -> Option<T> {
        let mut servers = self.servers();
        servers
            .iter_mut()
            .find(|(known, _)| known == name)
            .map(|(_, sessions)| read(sessions))
    }
}

impl ClientSessionStore for SessionStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.edit(server_name, |sessions| sessions.kx_hint = Some(group));
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.read(server_name, |sessions| sessions.kx_hint)
            .flatten()
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.edit(server_name, |sessions| sessions.tls12 = Some(value));
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.read(server_name, |sessions| sessions.tls12.clone())
            .flatten()
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.read(server_name, |sessions| sessions.tls12 = None);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.edit(server_name, |sessions| {
            if sessions.tls13.len() == TICKETS_PER_SERVER {
                sessions.tls13.pop_front();
            }
            sessions.tls13.push_back(value);
        });
    }

    /// The newest ticket: the least likely to have expired or to have been
    /// forgotten by the server.
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.read(server_name, |sessions| sessions.tls13.pop_back())
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::client::Resumption;
    use rustls::server::ServerSessionMemoryCache;
    use rustls::{HandshakeKind, ServerConfig};
    use tempfile::TempDir;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::tls::test_certs::{self, TestPki};
    use crate::tls::{acceptor, origin, ClientTlsSettings, ServerTlsSettings, TlsOrigin};

    fn pki() -> (TempDir, TestPki) {
        let dir = TempDir::new().expect("temporary directory");
        let pki = test_certs::generate_pki(dir.path());
        (dir, pki)
    }

    /// A server issuing `tickets` TLS 1.3 tickets per handshake.
    fn server_issuing(pki: &TestPki, tickets: usize) -> TlsAcceptor {
        let settings = ServerTlsSettings {
            cert_file: pki.server.cert.clone(),
            key_file: pki.server.key.clone(),
            client_ca_file: None,
        };
        let mut config = ServerConfig::clone(acceptor(&settings).expect("acceptor").config());
        config.send_tls13_tickets = tickets;
        config.session_storage = ServerSessionMemoryCache::new(2 * tickets);
        TlsAcceptor::from(Arc::new(config))
    }

    fn client(pki: &TestPki) -> TlsOrigin {
        let settings = ClientTlsSettings {
            ca_file: Some(pki.ca.clone()),
            ..ClientTlsSettings::default()
        };
        origin(&settings, "backend.test").expect("origin")
    }

    /// One connection over loopback; the client reads the server's reply,
    /// which follows the tickets, so they are stored when this returns.
    async fn connect_once(server: &TlsAcceptor, client: &TlsConnector) -> HandshakeKind {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let server = server.clone();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = server.accept(tcp).await.expect("server handshake");
            tls.write_all(b"done").await.expect("reply");
            tls.shutdown().await.expect("close");
        });
        let connection = async {
            let tcp = TcpStream::connect(address).await.expect("connect");
            let name = ServerName::try_from("backend.test").expect("name");
            let mut tls = client.connect(name, tcp).await.expect("client handshake");
            let mut reply = Vec::new();
            tls.read_to_end(&mut reply).await.expect("read");
            assert_eq!(reply, b"done");
            tls.get_ref().1.handshake_kind().expect("handshake done")
        };
        let kind = tokio::time::timeout(Duration::from_secs(20), connection)
            .await
            .expect("client in time");
        server.await.expect("server task");
        kind
    }

    fn tickets_for(store: &SessionStore, name: &str) -> usize {
        let name = ServerName::try_from(name.to_owned()).expect("name");
        store
            .read(&name, |sessions| sessions.tls13.len())
            .unwrap_or(0)
    }

    /// A connector like `origin`'s whose store the test can look into.
    fn watched(origin: &TlsOrigin) -> (TlsConnector, Arc<SessionStore>) {
        let store = Arc::new(SessionStore::default());
        let mut config = rustls::ClientConfig::clone(origin.connector.config());
        config.resumption = Resumption::store(store.clone());
        (TlsConnector::from(Arc::new(config)), store)
    }

    #[tokio::test]
    async fn keeps_the_newest_tickets_up_to_the_bound() {
        let (_dir, pki) = pki();
        let (connector, store) = watched(&client(&pki));
        connect_once(&server_issuing(&pki, TICKETS_PER_SERVER + 10), &connector).await;
        assert_eq!(tickets_for(&store, "backend.test"), TICKETS_PER_SERVER);

        let (connector, store) = watched(&client(&pki));
        connect_once(&server_issuing(&pki, 40), &connector).await;
        assert_eq!(tickets_for(&store, "backend.test"), 40);
        let name = ServerName::try_from("backend.test").expect("name");
        for taken in 0..40 {
            assert!(store.take_tls13_ticket(&name).is_some(), "ticket {taken}");
        }
        assert!(store.take_tls13_ticket(&name).is_none(), "each ticket once");
    }

    #[tokio::test]
    async fn another_peer_starts_without_the_first_ones_sessions() {
        let (_dir, pki) = pki();
        let server = server_issuing(&pki, 2);
        let first = client(&pki);
        assert_eq!(
            connect_once(&server, &first.connector).await,
            HandshakeKind::Full
        );
        assert_eq!(
            connect_once(&server, &first.connector).await,
            HandshakeKind::Resumed
        );
        let second = first.with_own_sessions();
        assert_eq!(
            connect_once(&server, &second.connector).await,
            HandshakeKind::Full
        );
        assert_eq!(
            connect_once(&server, &second.connector).await,
            HandshakeKind::Resumed
        );
    }

    #[test]
    fn keeps_a_bounded_number_of_server_names() {
        let store = SessionStore::default();
        let names: Vec<ServerName<'static>> = (0..=SERVER_NAMES)
            .map(|n| ServerName::try_from(format!("server-{n}.test")).expect("name"))
            .collect();
        for name in &names {
            store.set_kx_hint(name.clone(), NamedGroup::X25519);
        }
        assert_eq!(store.servers().len(), SERVER_NAMES);
        // The oldest name went first.
        assert_eq!(store.kx_hint(&names[0]), None);
        for name in &names[1..] {
            assert_eq!(store.kx_hint(name), Some(NamedGroup::X25519));
        }
    }
}
