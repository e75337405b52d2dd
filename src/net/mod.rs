//! Sockets: binding and accepting on listeners, connecting to peers, and the
//! stream type both ends are relayed through. Used by the proxy, the admin
//! endpoint and health checks; knows nothing of upstream groups.

pub mod connect;
pub mod listen;
pub mod stream;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use stream::Stream;

/// A client's address: TCP clients have one; UNIX-socket clients usually do not.
#[derive(Debug, Clone, Copy)]
pub enum ClientAddr {
    Inet(SocketAddr),
    Unix,
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientAddr::Inet(addr) => write!(f, "{addr}"),
            ClientAddr::Unix => f.write_str("unix"),
        }
    }
}

/// Where a peer is reached: one resolved address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerTarget {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for PeerTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerTarget::Tcp(addr) => write!(f, "{addr}"),
            PeerTarget::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}
