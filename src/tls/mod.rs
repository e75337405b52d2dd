//! TLS configurations built from certificate and key files.
//!
//! [`origin`] builds the client side used to originate TLS towards an upstream
//! server, [`acceptor`] the server side used to terminate TLS on a listener.
//! Both read every file once, when called; callers call them once per
//! configuration load and share the result across connections.
//!
//! The `ring` provider is passed explicitly to every builder, so nothing here
//! depends on a process-wide default provider being installed.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    ClientConfig, DigitallySignedStruct, InconsistentKeys, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use crate::config::limits::MAX_PEM_BYTES;
use crate::config::{parse_server_name, InvalidServerName, NamesFile};
pub use crate::config::{ClientTlsSettings, PemKind, ServerTlsSettings};

pub mod handshake_errors;
pub mod read_ahead;
mod sessions;

use handshake_errors::HandshakeError;
use read_ahead::ReadAhead;

/// A ready connector for one server: the client configuration and the name to
/// present (SNI) and check. Its sessions are kept for resumption; a clone
/// shares them, [`TlsOrigin::with_own_sessions`] does not.
#[derive(Clone)]
pub struct TlsOrigin {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

impl TlsOrigin {
    /// The same settings with an empty session store of its own: for another
    /// peer of the same server (a host name with several addresses), so no
    /// peer is offered another's tickets.
    pub fn with_own_sessions(&self) -> TlsOrigin {
        let mut config = ClientConfig::clone(self.connector.config());
        config.resumption = session_resumption();
        TlsOrigin {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: self.server_name.clone(),
        }
    }
}

fn session_resumption() -> Resumption {
    Resumption::store(Arc::new(sessions::SessionStore::default()))
}

impl fmt::Debug for TlsOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOrigin")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why a TLS configuration could not be built. Variants about a file name it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read PEM file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} contains no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} contains no PEM private key")]
    NoPrivateKey { path: PathBuf },
    #[error("invalid certificate in {path}: {source}")]
    InvalidCertificate {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("unusable private key in {path}: {source}")]
    UnusableKey {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("private key {key_file} does not match the certificate in {cert_file}")]
    KeyMismatch {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
    #[error("client certificate {cert_file} is given without a key file")]
    CertificateWithoutKey { cert_file: PathBuf },
    #[error("client key {key_file} is given without a certificate file")]
    KeyWithoutCertificate { key_file: PathBuf },
    #[error("cannot verify client certificates against {path}: {source}")]
    ClientVerifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("the system trust store yielded no certificates{details}")]
    NoSystemRoots { details: String },
    #[error(transparent)]
    InvalidServerName(#[from] InvalidServerName),
    #[error("the crypto provider rejects the default protocol versions: {0}")]
    ProtocolVersions(rustls::Error),
}

impl TlsError {
    /// The file (or `ca_path` directory, or file in it) the error is about,
    /// so the caller can name the setting that gave it, with what the file
    /// was read for when the error tells; for a key that does not match its
    /// certificate, the key.
    pub fn file(&self) -> Option<(&Path, Option<PemKind>)> {
        let certificates = Some(PemKind::Certificates);
        let private_key = Some(PemKind::PrivateKey);
        match self {
            TlsError::Read { path, .. } => Some((path, None)),
            TlsError::NoCertificate { path }
            | TlsError::InvalidCertificate { path, .. }
            | TlsError::ClientVerifier { path, .. } => Some((path, certificates)),
            TlsError::CertificateWithoutKey { cert_file } => Some((cert_file, certificates)),
            TlsError::NoPrivateKey { path } | TlsError::UnusableKey { path, .. } => {
                Some((path, private_key))
            }
            TlsError::KeyMismatch { key_file, .. }
            | TlsError::KeyWithoutCertificate { key_file } => Some((key_file, private_key)),
            TlsError::NoSystemRoots { .. }
            | TlsError::InvalidServerName(_)
            | TlsError::ProtocolVersions(_) => None,
        }
    }
}

impl NamesFile for TlsError {
    fn file(&self) -> Option<(&Path, Option<PemKind>)> {
        TlsError::file(self)
    }
}

/// Builds the connector for one upstream server. `default_host` (the host of
/// the server's address) is the name used when `settings.server_name` is unset.
pub fn origin(settings: &ClientTlsSettings, default_host: &str) -> Result<TlsOrigin, TlsError> {
    let server_name = parse_server_name(settings.server_name.as_deref().unwrap_or(default_host))?;
    let client_identity = match (&settings.cert_file, &settings.key_file) {
        (Some(cert_file), Some(key_file)) => Some((cert_file, key_file)),
        (Some(cert_file), None) => {
            return Err(TlsError::CertificateWithoutKey {
                cert_file: cert_file.clone(),
            })
        }
        (None, Some(key_file)) => {
            return Err(TlsError::KeyWithoutCertificate {
                key_file: key_file.clone(),
            })
        }
        (None, None) => None,
    };

    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ProtocolVersions)?;
    let builder = if settings.verify {
        let roots = match (&settings.ca_file, &settings.ca_path) {
            (None, None) => load_system_roots()?,
            (ca_file, ca_path) => {
                let mut roots = RootCertStore::empty();
                if let Some(ca_file) = ca_file {
                    add_roots(&mut roots, ca_file)?;
                }
                if let Some(ca_path) = ca_path {
                    add_roots_from_directory(&mut roots, ca_path)?;
                }
                roots
            }
        };
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert {
                algorithms: provider.signature_verification_algorithms,
            }))
    };
    let mut config = match client_identity {
        Some((cert_file, key_file)) => {
            let identity = load_certified_key(cert_file, key_file, &provider)?;
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(identity)))
        }
        None => builder.with_no_client_auth(),
    };
    config.resumption = session_resumption();
    Ok(TlsOrigin {
        connector: TlsConnector::from(Arc::new(config)),
        server_name,
    })
}

/// Builds the acceptor terminating TLS on a listener.
pub fn acceptor(settings: &ServerTlsSettings) -> Result<TlsAcceptor, TlsError> {
    let provider = crypto_provider();
    let identity = load_certified_key(&settings.cert_file, &settings.key_file, &provider)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ProtocolVersions)?;
    let builder = match &settings.client_ca_file {
        Some(client_ca_file) => {
            let roots = load_roots(client_ca_file)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    path: client_ca_file.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(identity)));
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A PEM file's content. At most [`MAX_PEM_BYTES`] are read: a device or a
/// file that never ends fails at the limit.
fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_error = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let mut pem = Vec::new();
    File::open(path)
        .and_then(|file| file.take(MAX_PEM_BYTES + 1).read_to_end(&mut pem))
        .map_err(read_error)?;
    if pem.len() as u64 > MAX_PEM_BYTES {
        return Err(read_error(io::Error::other(format!(
            "the file is larger than {MAX_PEM_BYTES} bytes"
        ))));
    }
    Ok(pem)
}

/// A PEM file that cannot be decoded is reported as unreadable, naming it.
fn pem_error(path: &Path, err: pem::Error) -> TlsError {
    let source = match err {
        pem::Error::Io(source) => source,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    };
    TlsError::Read {
        path: path.to_owned(),
        source,
    }
}

/// All certificates of a PEM file, in file order; at least one.
fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(&read_pem(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_error(path, err))?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}

/// Trust anchors from a PEM file; every certificate in it must be usable, so
/// a typo in one does not silently shrink the trusted set.
fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    add_roots(&mut roots, path)?;
    Ok(roots)
}

fn add_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsError> {
    for certificate in load_certificates(path)? {
        roots
            .add(certificate)
            .map_err(|source| TlsError::InvalidCertificate {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(())
}

/// Trust anchors from every regular file of a directory (an OpenSSL-style
/// CA directory, hash-named links included). Files holding no PEM
/// certificate are skipped, as OpenSSL skips them; a directory yielding no
/// certificate at all is an error.
fn add_roots_from_directory(roots: &mut RootCertStore, dir: &Path) -> Result<(), TlsError> {
    let read_error = |source| TlsError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        // `metadata` follows symbolic links, so hash-named links count.
        if std::fs::metadata(&path).is_ok_and(|metadata| metadata.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    let before = roots.len();
    for path in files {
        match add_roots(roots, &path) {
            Ok(()) | Err(TlsError::NoCertificate { .. }) => {}
            Err(err) => return Err(err),
        }
    }
    if roots.len() == before {
        return Err(TlsError::NoCertificate {
            path: dir.to_owned(),
        });
    }
    Ok(())
}

/// The platform's trust anchors. Individual unreadable entries are skipped
/// (system stores routinely hold a few); only an empty result is an error.
fn load_system_roots() -> Result<RootCertStore, TlsError> {
    let native = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(native.certs);
    if roots.is_empty() {
        let errors: Vec<String> = native.errors.iter().map(ToString::to_string).collect();
        let details = if errors.is_empty() {
            String::new()
        } else {
            format!(" ({})", errors.join("; "))
        };
        return Err(TlsError::NoSystemRoots { details });
    }
    Ok(roots)
}

/// A certificate chain with its private key, checked to belong together so a
/// mismatch is reported at load time rather than as failing handshakes.
fn load_certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = load_certificates(cert_file)?;
    let key = match PrivateKeyDer::from_pem_slice(&read_pem(key_file)?) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            return Err(TlsError::NoPrivateKey {
                path: key_file.to_owned(),
            })
        }
        Err(err) => return Err(pem_error(key_file, err)),
    };
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::UnusableKey {
            path: key_file.to_owned(),
            source,
        })?;
    let certified_key = CertifiedKey::new(chain, signing_key);
    match certified_key.keys_match() {
        // `Unknown`: the key type cannot report its public key; rustls's own
        // builders accept that too, and the handshake will fail if it is wrong.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            Ok(certified_key)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
        }),
        Err(source) => Err(TlsError::InvalidCertificate {
            path: cert_file.to_owned(),
            source,
        }),
    }
}

/// Server certificate verifier for `verify = false`: any certificate and name
/// is accepted, but the handshake signatures are still checked against the
/// presented certificate, so the peer must hold that certificate's key.
#[derive(Debug)]
struct AcceptAnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Shared with the integration tests, so there is one copy of the generator.
#[cfg(test)]
#[path = "../../tests/common/certs.rs"]
mod test_certs;

/// Originates TLS towards a peer over `stream`; an error says it was the handshake.
pub async fn originate<S>(tls: &TlsOrigin, stream: S) -> io::Result<client::TlsStream<ReadAhead<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tls.connector
        .connect(tls.server_name.clone(), ReadAhead::new(stream))
        .await
        .map_err(|err| io::Error::new(err.kind(), format!("TLS handshake failed: {err}")))
}

/// Terminates a client's TLS handshake within `timeout`.
pub async fn terminate<S>(
    acceptor: &TlsAcceptor,
    stream: S,
    timeout: Duration,
) -> Result<server::TlsStream<ReadAhead<S>>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(timeout, acceptor.accept(ReadAhead::new(stream))).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(err)) => Err(HandshakeError::from_io(&err)),
        Err(_) => Err(HandshakeError::timed_out(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::test_certs::{self, TestPki};
    use super::*;
    use std::io;
    use std::time::Duration;
    use tempfile::TempDir;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn pki() -> (TempDir, TestPki) {
        let dir = TempDir::new().expect("temporary directory");
        let pki = test_certs::generate_pki(dir.path());
        (dir, pki)
    }

    fn server_settings(pki: &TestPki) -> ServerTlsSettings {
        ServerTlsSettings {
            cert_file: pki.server.cert.clone(),
            key_file: pki.server.key.clone(),
            client_ca_file: None,
        }
    }

    fn trusting_ca(pki: &TestPki) -> ClientTlsSettings {
        ClientTlsSettings {
            ca_file: Some(pki.ca.clone()),
            ..ClientTlsSettings::default()
        }
    }

    /// Outcome of one loopback exchange: each side's view.
    struct Exchange {
        client: io::Result<()>,
        server: io::Result<()>,
    }

    impl Exchange {
        fn succeeded(&self) -> bool {
            self.client.is_ok() && self.server.is_ok()
        }
    }

    /// Runs a real handshake over loopback, then a ping/pong so that failures
    /// reported after the client's last flight (TLS 1.3 client auth) surface.
    async fn exchange(acceptor: TlsAcceptor, origin: &TlsOrigin) -> Exchange {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local address");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            let mut ping = [0u8; 4];
            tls.read_exact(&mut ping).await?;
            tls.write_all(b"pong").await?;
            tls.shutdown().await
        });
        let client = async {
            let tcp = TcpStream::connect(address).await?;
            let mut tls = origin
                .connector
                .connect(origin.server_name.clone(), tcp)
                .await?;
            tls.write_all(b"ping").await?;
            let mut pong = [0u8; 4];
            tls.read_exact(&mut pong).await?;
            assert_eq!(&pong, b"pong");
            Ok(())
        };
        let limit = Duration::from_secs(10);
        let client = tokio::time::timeout(limit, client)
            .await
            .expect("client finishes");
        let server = tokio::time::timeout(limit, server)
            .await
            .expect("server finishes")
            .expect("server task");
        Exchange { client, server }
    }

    /// The rustls error a failed client handshake carries, for precise asserts.
    fn rustls_error(result: &io::Result<()>) -> Option<&rustls::Error> {
        result
            .as_ref()
            .err()?
            .get_ref()?
            .downcast_ref::<rustls::Error>()
    }

    #[tokio::test]
    async fn verified_by_dns_name() {
        let (_dir, pki) = pki();
        let acceptor = acceptor(&server_settings(&pki)).expect("acceptor");
        let origin = origin(&trusting_ca(&pki), "backend.test").expect("origin");
        let outcome = exchange(acceptor, &origin).await;
        assert!(
            outcome.succeeded(),
            "{:?} {:?}",
            outcome.client,
            outcome.server
        );
    }

    #[tokio::test]
    async fn verified_by_ip_address() {
        let (_dir, pki) = pki();
        let acceptor = acceptor(&server_settings(&pki)).expect("acceptor");
        let origin = origin(&trusting_ca(&pki), "127.0.0.1").expect("origin");
        assert!(matches!(origin.server_name, ServerName::IpAddress(_)));
        let outcome = exchange(acceptor, &origin).await;
        assert!(
            outcome.succeeded(),
            "{:?} {:?}",
            outcome.client,
            outcome.server
        );
    }

    #[tokio::test]
    async fn configured_server_name_overrides_address_host() {
        let (_dir, pki) = pki();
        let acceptor = acceptor(&server_settings(&pki)).expect("acceptor");
        let settings = ClientTlsSettings {
            server_name: Some("backend.test".into()),
            ..trusting_ca(&pki)
        };
        let origin = origin(&settings, "10.9.9.9").expect("origin");
        let outcome = exchange(acceptor, &origin).await;
        assert!(
            outcome.succeeded(),
            "{:?} {:?}",
            outcome.client,
            outcome.server
        );
    }

    #[tokio::test]
    async fn sec1_server_key_is_accepted() {
        let (_dir, pki) = pki();
        let settings = ServerTlsSettings {
            key_file: pki.server_sec1_key.clone(),
            ..server_settings(&pki)
        };
        let acceptor = acceptor(&settings).expect("acceptor with SEC1 key");
        let origin = origin(&trusting_ca(&pki), "backend.test").expect("origin");
        let outcome = exchange(acceptor, &origin).await;
        assert!(
            outcome.succeeded(),
            "{:?} {:?}",
            outcome.client,
            outcome.server
        );
    }

    #[tokio::test]
    async fn certificate_from_another_ca_is_refused() {
        let (_dir, pki) = pki();
        let settings = ServerTlsSettings {
            cert_file: pki.impostor.cert.clone(),
            key_file: pki.impostor.key.clone(),
            client_ca_file: None,
        };
        let acceptor = acceptor(&settings).expect("acceptor");
        let origin = origin(&trusting_ca(&pki), "backend.test").expect("origin");
        let outcome = exchange(acceptor, &origin).await;
        assert!(
            matches!(
                rustls_error(&outcome.client),
                Some(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                ))
            ),
            "{:?}",
            outcome.client
        );
        assert!(outcome.server.is_err());
    }

    #[tokio::test]
    async fn wrong_name_is_refused() {
        let (_dir, pki) = pki();
        let acceptor = acceptor(&server_settings(&pki)).expect("acceptor");
        let origin = origin(&trusting_ca(&pki), "other.test").expect("origin");
        let outcome = exchange(acceptor, &origin).await;
        assert!(
            matches!(
                rustls_error(&outcome.client),
                Some(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. }
                ))
            ),
            "{:?}",
            outcome.client
        );
    }

    #[tokio::test]
    async fn wrong_ip_address_is_refused() {
        let (_dir, pki) = pki();
        let acceptor = acceptor(&server_settings(&pki)).expect("acceptor");
        let origin = origin(&trusting_ca(&pki), "[::1]").expect("origin");
        let outcome = exchange(acceptor, &origin).await;
        assert!(
            matches!(
                rustls_error(&outcome.client),
                Some(rustls::Error::InvalidCertificate(_))
            ),
            "{:?}",
            outcome.client
        );
    }

    #[tokio::test]
    async fn unverified_origin_accepts_the_impostor() {
        let (dir, pki) = pki();
        let settings = ServerTlsSettings {
            cert_file: pki.impostor.cert.clone(),
            key_file: pki.impostor.key.clone(),
            client_ca_file: None,
        };
        let acceptor = acceptor(&settings).expect("acceptor");
        let unverified = ClientTlsSettings {
            verify: false,
            // Not read when verification is off.
            ca_file: Some(dir.path().join("absent-ca.pem")),
            ..ClientTlsSettings::default()
        };
        let origin = origin(&unverified, "anything.test").expect("origin");
        let outcome = exchange(acceptor, &origin).await;
        assert!(
            outcome.succeeded(),
            "{:?} {:?}",
            outcome.client,
            outcome.server
        );
    }

    #[tokio::test]
    async fn unverified_origin_still_checks_handshake_signatures() {
        let (_dir, pki) = pki();
        // A server presenting the impostor's certificate without holding its
        // key: built by hand because `acceptor` refuses the mismatched pair.
        let provider = crypto_provider();
        let chain = load_certificates(&pki.impostor.cert).expect("impostor certificate");
        let key = PrivateKeyDer::from_pem_slice(&read_pem(&pki.server.key).expect("read key"))
            .expect("a key");
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .expect("signing key");
        let stolen_certificate = CertifiedKey::new(chain, signing_key);
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(stolen_certificate)));
        let unverified = ClientTlsSettings {
            verify: false,
            ..ClientTlsSettings::default()
        };
        let origin = origin(&unverified, "backend.test").expect("origin");
        let outcome = exchange(TlsAcceptor::from(Arc::new(config)), &origin).await;
        assert!(
            matches!(
                rustls_error(&outcome.client),
                Some(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::BadSignature
                ))
            ),
            "{:?}",
            outcome.client
        );
    }

    #[tokio::test]
    async fn system_roots_do_not_trust_the_test_ca() {
        let (_dir, pki) = pki();
        match origin(&ClientTlsSettings::default(), "backend.test") {
            Ok(origin) => {
                let acceptor = acceptor(&server_settings(&pki)).expect("acceptor");
                let outcome = exchange(acceptor, &origin).await;
                assert!(
                    matches!(
                        rustls_error(&outcome.client),
                        Some(rustls::Error::InvalidCertificate(
                            rustls::CertificateError::UnknownIssuer
                        ))
                    ),
                    "{:?}",
                    outcome.client
                );
            }
            // A machine without a trust store must report exactly that.
            Err(error) => assert!(matches!(error, TlsError::NoSystemRoots { .. }), "{error}"),
        }
    }

    fn mutual_tls_acceptor(pki: &TestPki) -> TlsAcceptor {
        let settings = ServerTlsSettings {
            client_ca_file: Some(pki.ca.clone()),
            ..server_settings(pki)
        };
        acceptor(&settings).expect("acceptor")
    }

    #[tokio::test]
    async fn mutual_tls_with_client_certificate_is_accepted() {
        let (_dir, pki) = pki();
        let settings = ClientTlsSettings {
            cert_file: Some(pki.client.cert.clone()),
            key_file: Some(pki.client.key.clone()),
            ..trusting_ca(&pki)
        };
        let origin = origin(&settings, "backend.test").expect("origin");
        let outcome = exchange(mutual_tls_acceptor(&pki), &origin).await;
        assert!(
            outcome.succeeded(),
            "{:?} {:?}",
            outcome.client,
            outcome.server
        );
    }

    #[tokio::test]
    async fn mutual_tls_without_client_certificate_is_refused() {
        let (_dir, pki) = pki();
        let origin = origin(&trusting_ca(&pki), "backend.test").expect("origin");
        let outcome = exchange(mutual_tls_acceptor(&pki), &origin).await;
        let server_error = outcome.server.as_ref().expect_err("server refuses");
        assert!(
            matches!(
                server_error
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<rustls::Error>()),
                Some(rustls::Error::NoCertificatesPresented)
            ),
            "{server_error:?}"
        );
        assert!(outcome.client.is_err());
    }

    #[tokio::test]
    async fn mutual_tls_with_untrusted_client_certificate_is_refused() {
        let (_dir, pki) = pki();
        let settings = ClientTlsSettings {
            cert_file: Some(pki.impostor.cert.clone()),
            key_file: Some(pki.impostor.key.clone()),
            ..trusting_ca(&pki)
        };
        let origin = origin(&settings, "backend.test").expect("origin");
        let outcome = exchange(mutual_tls_acceptor(&pki), &origin).await;
        assert!(outcome.server.is_err());
        assert!(outcome.client.is_err());
    }

    #[tokio::test]
    async fn ca_path_directory_trusts_the_certificates_in_it() {
        let (dir, pki) = pki();
        let cas = dir.path().join("cas");
        std::fs::create_dir(&cas).expect("CA directory");
        std::fs::copy(&pki.ca, cas.join("ca.pem")).expect("copy CA");
        std::fs::write(cas.join("README"), "not a certificate").expect("write");
        std::os::unix::fs::symlink(cas.join("ca.pem"), cas.join("5ed36f99.0")).expect("link");
        let settings = ClientTlsSettings {
            ca_path: Some(cas),
            ..ClientTlsSettings::default()
        };
        let origin = origin(&settings, "backend.test").expect("origin");
        let outcome = exchange(acceptor(&server_settings(&pki)).expect("acceptor"), &origin).await;
        assert!(
            outcome.succeeded(),
            "{:?} {:?}",
            outcome.client,
            outcome.server
        );
    }

    #[test]
    fn ca_path_without_certificates_or_missing_is_named() {
        let (dir, _pki) = pki();
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).expect("directory");
        std::fs::write(empty.join("notes.txt"), "nothing here").expect("write");
        for path in [empty, dir.path().join("absent")] {
            let settings = ClientTlsSettings {
                ca_path: Some(path.clone()),
                ..ClientTlsSettings::default()
            };
            let error = origin(&settings, "backend.test").expect_err("refused");
            assert!(
                error.to_string().contains(&path.display().to_string()),
                "{error}"
            );
        }
    }

    #[test]
    fn mismatched_server_key_names_both_files() {
        let (_dir, pki) = pki();
        let settings = ServerTlsSettings {
            key_file: pki.impostor.key.clone(),
            ..server_settings(&pki)
        };
        let error = acceptor(&settings).err().expect("mismatch");
        match &error {
            TlsError::KeyMismatch {
                cert_file,
                key_file,
            } => {
                assert_eq!(cert_file, &pki.server.cert);
                assert_eq!(key_file, &pki.impostor.key);
            }
            other => panic!("unexpected {other}"),
        }
        let message = error.to_string();
        assert!(message.contains(&pki.server.cert.display().to_string()));
        assert!(message.contains(&pki.impostor.key.display().to_string()));
        // The key is what the configuration's error line points at.
        assert_eq!(
            error.file(),
            Some((pki.impostor.key.as_path(), Some(PemKind::PrivateKey)))
        );
    }

    #[test]
    fn mismatched_client_key_names_both_files() {
        let (_dir, pki) = pki();
        let settings = ClientTlsSettings {
            cert_file: Some(pki.client.cert.clone()),
            key_file: Some(pki.server.key.clone()),
            ..trusting_ca(&pki)
        };
        let error = origin(&settings, "backend.test").expect_err("mismatch");
        assert!(
            matches!(&error, TlsError::KeyMismatch { cert_file, key_file }
                if cert_file == &pki.client.cert && key_file == &pki.server.key),
            "{error}"
        );
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let (dir, pki) = pki();
        let missing = dir.path().join("missing-ca.pem");
        let settings = ClientTlsSettings {
            ca_file: Some(missing.clone()),
            ..ClientTlsSettings::default()
        };
        let error = origin(&settings, "backend.test").expect_err("missing file");
        assert!(
            matches!(&error, TlsError::Read { path, .. } if path == &missing),
            "{error}"
        );
        assert!(error.to_string().contains(&missing.display().to_string()));

        let settings = ServerTlsSettings {
            key_file: missing.clone(),
            ..server_settings(&pki)
        };
        let error = acceptor(&settings).err().expect("missing key file");
        assert!(matches!(&error, TlsError::Read { path, .. } if path == &missing));
    }

    #[test]
    fn certificate_without_key_is_an_error() {
        let (_dir, pki) = pki();
        let settings = ClientTlsSettings {
            cert_file: Some(pki.client.cert.clone()),
            ..trusting_ca(&pki)
        };
        let error = origin(&settings, "backend.test").expect_err("no key");
        assert!(
            matches!(&error, TlsError::CertificateWithoutKey { cert_file } if cert_file == &pki.client.cert),
            "{error}"
        );
        assert!(error
            .to_string()
            .contains(&pki.client.cert.display().to_string()));
    }

    #[test]
    fn key_without_certificate_is_an_error() {
        let (_dir, pki) = pki();
        let settings = ClientTlsSettings {
            key_file: Some(pki.client.key.clone()),
            ..trusting_ca(&pki)
        };
        let error = origin(&settings, "backend.test").expect_err("no certificate");
        assert!(
            matches!(&error, TlsError::KeyWithoutCertificate { key_file } if key_file == &pki.client.key),
            "{error}"
        );
    }

    #[test]
    fn file_without_certificate_is_an_error() {
        let (_dir, pki) = pki();
        // A key file holds no certificate.
        let settings = ClientTlsSettings {
            ca_file: Some(pki.server.key.clone()),
            ..ClientTlsSettings::default()
        };
        let error = origin(&settings, "backend.test").expect_err("no certificate");
        assert!(
            matches!(&error, TlsError::NoCertificate { path } if path == &pki.server.key),
            "{error}"
        );
    }

    #[test]
    fn key_file_without_key_is_an_error() {
        let (_dir, pki) = pki();
        let settings = ServerTlsSettings {
            key_file: pki.server.cert.clone(),
            ..server_settings(&pki)
        };
        let error = acceptor(&settings).err().expect("no key");
        assert!(
            matches!(&error, TlsError::NoPrivateKey { path } if path == &pki.server.cert),
            "{error}"
        );
    }

    #[test]
    fn client_ca_file_without_certificate_is_an_error() {
        let (_dir, pki) = pki();
        let settings = ServerTlsSettings {
            client_ca_file: Some(pki.client.key.clone()),
            ..server_settings(&pki)
        };
        let error = acceptor(&settings).err().expect("no client CA");
        assert!(
            matches!(&error, TlsError::NoCertificate { path } if path == &pki.client.key),
            "{error}"
        );
    }

    #[test]
    fn default_settings_verify() {
        assert!(ClientTlsSettings::default().verify);
    }

    #[test]
    fn a_pem_file_is_read_only_up_to_its_limit() {
        let settings = ServerTlsSettings {
            cert_file: PathBuf::from("/dev/zero"),
            key_file: PathBuf::from("/dev/zero"),
            client_ca_file: None,
        };
        let error = acceptor(&settings)
            .err()
            .expect("/dev/zero is no certificate");
        assert!(
            matches!(&error, TlsError::Read { path, source }
                if path == Path::new("/dev/zero") && source.to_string().contains("larger than")),
            "{error}"
        );
    }
}
