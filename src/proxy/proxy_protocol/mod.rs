//! PROXY protocol on the data path: reading a client's header
//! (`accept_proxy_protocol`) and the header sent to the upstream
//! (`proxy_protocol`). The wire format itself is in [`codec`].

pub mod codec;

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::ProxyProtocol;
use crate::net::{ClientAddr, Stream};
use codec::{encode_v1, encode_v2, read_header, ProxiedAddrs, ProxyHeaderError};

/// Why a client's PROXY header was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error(transparent)]
    Header(#[from] ProxyHeaderError),
    #[error("no complete PROXY header within connect_timeout ({})", humantime::format_duration(*.0))]
    Timeout(Duration),
}

/// Where a client connection comes from and what it reached, as far as sluice knows.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    /// Used for `hash_key` and logs: the carried source when a header gave one.
    pub client: ClientAddr,
    /// What goes into the header sent upstream.
    pub addrs: ProxiedAddrs,
}

impl Origin {
    /// The real connection's endpoints; a UNIX client (or an unknown local
    /// address) can only be described as unknown.
    pub fn of_connection(client: ClientAddr, local: Option<SocketAddr>) -> Origin {
        let addrs = match (client, local) {
            (ClientAddr::Inet(source), Some(destination)) => ProxiedAddrs::Inet {
                source,
                destination,
            },
            _ => ProxiedAddrs::Unknown,
        };
        Origin { client, addrs }
    }

    /// Reads the client's header within `timeout` and returns the origin it
    /// carries; a header without addresses (`UNKNOWN`, `LOCAL`) leaves the
    /// connection's own.
    pub async fn receive(
        client: &mut Stream,
        connection: Origin,
        timeout: Duration,
    ) -> Result<Origin, Rejected> {
        let addrs = tokio::time::timeout(timeout, read_header(client))
            .await
            .map_err(|_| Rejected::Timeout(timeout))??;
        Ok(match addrs {
            ProxiedAddrs::Inet { source, .. } => Origin {
                client: ClientAddr::Inet(source),
                addrs,
            },
            ProxiedAddrs::Unknown => connection,
        })
    }

    /// The header to send upstream first; empty when `version` is off.
    pub fn header(&self, version: ProxyProtocol) -> Vec<u8> {
        match version {
            ProxyProtocol::Off => Vec::new(),
            ProxyProtocol::V1 => encode_v1(&self.addrs),
            ProxyProtocol::V2 => encode_v2(&self.addrs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_client_is_unknown() {
        let origin = Origin::of_connection(ClientAddr::Unix, None);
        assert_eq!(origin.header(ProxyProtocol::V1), b"PROXY UNKNOWN\r\n");
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        v2.extend_from_slice(&[0x21, 0x00, 0x00, 0x00]);
        assert_eq!(origin.header(ProxyProtocol::V2), v2);
        assert!(origin.header(ProxyProtocol::Off).is_empty());
    }

    #[test]
    fn a_tcp_client_carries_both_endpoints() {
        let origin = Origin::of_connection(
            ClientAddr::Inet("192.168.0.1:56324".parse().unwrap()),
            Some("192.168.0.11:443".parse().unwrap()),
        );
        assert_eq!(
            origin.header(ProxyProtocol::V1),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
    }
}
