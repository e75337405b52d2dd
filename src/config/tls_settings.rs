//! TLS settings as the configuration states them; [`crate::tls`] builds
//! connectors and acceptors from them.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rustls::pki_types::ServerName;

use super::quoted;

/// TLS origination settings of one upstream server, as written in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsSettings {
    /// Check the server's certificate chain and name. When false, any
    /// certificate is accepted (the caller is expected to warn about it) and
    /// `ca_file` is not read.
    pub verify: bool,
    /// Name sent as SNI and checked against the certificate; `None` uses the
    /// host of the server's address.
    pub server_name: Option<String>,
    /// PEM trust anchors; when neither this nor `ca_path` is set, the
    /// system's trust roots are used.
    pub ca_file: Option<PathBuf>,
    /// A directory whose files hold PEM trust anchors (every certificate of
    /// every regular file in it, symbolic links followed); adds to `ca_file`.
    pub ca_path: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl Default for ClientTlsSettings {
    /// Verification is on unless the configuration turns it off.
    fn default() -> Self {
        Self {
            verify: true,
            server_name: None,
            ca_file: None,
            ca_path: None,
            cert_file: None,
            key_file: None,
        }
    }
}

/// TLS termination settings of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsSettings {
    /// Server certificate chain (PEM), end-entity certificate first.
    pub cert_file: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of `cert_file`.
    pub key_file: PathBuf,
    /// When set, clients must present a certificate chaining to these PEM anchors.
    pub client_ca_file: Option<PathBuf>,
}

/// What a TLS setting's file holds: tells apart two settings naming one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemKind {
    Certificates,
    PrivateKey,
}

/// An error about one of the files a TLS setting names, so the configuration
/// can point at the line of that setting.
pub trait NamesFile {
    /// The file (or directory) the error is about, with what it was read for
    /// when the error tells.
    fn file(&self) -> Option<(&Path, Option<PemKind>)>;
}

/// A TLS server name that is neither a DNS name nor an IP address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid TLS server name {}: neither a DNS name nor an IP address", quoted(.name))]
pub struct InvalidServerName {
    pub name: String,
}

/// An IP literal (bare, or bracketed as in `[::1]:443`) is checked against the
/// certificate's IP SANs; anything else must be a valid DNS name.
pub fn parse_server_name(name: &str) -> Result<ServerName<'static>, InvalidServerName> {
    let unbracketed = name
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(name);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(name.to_owned()).map_err(|_| InvalidServerName {
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_dns_names_or_ip_addresses() {
        assert!(matches!(
            parse_server_name("backend.test"),
            Ok(ServerName::DnsName(name)) if name.as_ref() == "backend.test"
        ));
        assert!(matches!(
            parse_server_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        for ipv6 in ["::1", "[::1]"] {
            let Ok(ServerName::IpAddress(address)) = parse_server_name(ipv6) else {
                panic!("{ipv6} is an IP address");
            };
            assert_eq!(
                IpAddr::from(address),
                "::1".parse::<IpAddr>().expect("IPv6")
            );
        }
        for invalid in ["bad name", "[backend.test]", ""] {
            assert!(
                matches!(parse_server_name(invalid), Err(InvalidServerName { name }) if name == invalid),
                "{invalid}"
            );
        }
    }
}
