//! Addresses as written in the configuration: `HOST:PORT`, `[IPv6]:PORT` or `unix:/absolute/path`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::de::{self, Deserialize, Deserializer};

use super::quoted;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    /// A host name or IP literal (IPv6 without brackets) and a port in 1-65535.
    Inet {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

impl Address {
    /// The host part of an `Inet` address, as TLS uses it for SNI by default.
    pub fn host(&self) -> Option<&str> {
        match self {
            Address::Inet { host, .. } => Some(host),
            Address::Unix(_) => None,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Inet { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Inet { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl FromStr for Address {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let shown = quoted(text);
        if let Some(path) = text.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!(
                    "address {shown}: a unix socket path must be absolute"
                ));
            }
            return Ok(Address::Unix(path));
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("address {shown}: missing ']' after the IPv6 address"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!(
                    "address {shown}: {} is not an IPv6 address",
                    quoted(host)
                ));
            }
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| format!("address {shown}: expected ':PORT' after ']'"))?;
            (host, port)
        } else {
            let (host, port) = text.rsplit_once(':').ok_or_else(|| {
                format!("address {shown}: expected HOST:PORT, [IPv6]:PORT or unix:/path")
            })?;
            if host.contains(':') {
                return Err(format!(
                    "address {shown}: write IPv6 addresses as [IPv6]:PORT"
                ));
            }
            (host, port)
        };
        if host.is_empty() {
            return Err(format!("address {shown}: the host is empty"));
        }
        let port = match port.parse::<u32>() {
            Ok(port @ 1..=65535) => port as u16,
            _ => {
                return Err(format!(
                    "address {shown}: port {} is not in 1-65535",
                    quoted(port)
                ))
            }
        };
        Ok(Address::Inet {
            host: host.to_owned(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            "127.0.0.1:80".parse::<Address>(),
            Ok(Address::Inet {
                host: "127.0.0.1".into(),
                port: 80
            })
        );
        assert_eq!(
            "[::1]:24224".parse::<Address>(),
            Ok(Address::Inet {
                host: "::1".into(),
                port: 24224
            })
        );
        assert_eq!(
            "unix:/run/x.sock".parse::<Address>(),
            Ok(Address::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            "[::1]:24224".parse::<Address>().map(|a| a.to_string()),
            Ok("[::1]:24224".to_string())
        );
    }

    #[test]
    fn rejects_bad_ports_and_forms() {
        for bad in [
            "h:0",
            "h:65536",
            "h:-1",
            "h:x",
            "h",
            ":80",
            "::1:80",
            "[::1]80",
            "[nothost]:80",
            "unix:relative",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad} was accepted");
        }
    }
}
