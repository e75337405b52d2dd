//! Servers taken from a Fluent Bit Upstream file (SPEC §7): inside an
//! upstream with `from_fluent_bit`, or as the whole configuration with
//! `sluice --fluent-bit FILE --bind ADDR`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub mod reader;

use super::{
    defaults, quoted, Address, Balance, ClientTlsSettings, Config, ConfigError, FileLines,
    HashRing, KeyLine, ListenerConfig, PemKind, ProxyProtocol, ServerConfig, Syntax,
    UpstreamConfig,
};
use reader::{FluentBitError, Node, UpstreamFile};

impl Config {
    /// The configuration of `sluice --fluent-bit FILE --bind ADDR`: one
    /// listener on `bind` in front of the file's nodes, balanced round-robin
    /// as Fluent Bit does; listener and upstream are named after the file's
    /// `[UPSTREAM] name`. Every other setting takes its TOML default.
    pub fn from_fluent_bit(file: &Path, bind: &str) -> Result<Config, ConfigError> {
        let upstream_file = reader::load(file).map_err(config_error)?;
        let bind: Address = bind.parse().map_err(|message| ConfigError {
            file: PathBuf::from("--bind"),
            line: None,
            message,
        })?;
        let servers = servers_from_nodes(&upstream_file, None)?;
        let name = upstream_file.name;
        let listener = ListenerConfig {
            name: name.clone(),
            bind,
            upstream: name.clone(),
            connect_timeout: defaults::CONNECT_TIMEOUT,
            idle_timeout: Some(defaults::IDLE_TIMEOUT),
            next_upstream_tries: 0,
            next_upstream_timeout: None,
            unix_mode: defaults::UNIX_MODE,
            tls: None,
            tls_lines: FileLines::default(),
            access_log: true,
            delayed_ack: true,
            proxy_protocol: ProxyProtocol::Off,
            accept_proxy_protocol: false,
            recycle: super::RecycleConfig::default(),
        };
        let upstream = UpstreamConfig {
            name: name.clone(),
            balance: Balance::RoundRobin,
            hash_ring: HashRing::default(),
            servers,
            health_check: None,
            resolver: Vec::new(),
            queue: 0,
            queue_timeout: defaults::QUEUE_TIMEOUT,
        };
        Ok(Config {
            // `--admin ADDR` sets it afterwards, in this mode as in any other.
            admin: None,
            shutdown_timeout: defaults::SHUTDOWN_TIMEOUT,
            listeners: vec![listener],
            upstreams: BTreeMap::from([(name, upstream)]),
        })
    }
}

/// An upstream's `tls` table, for the nodes of its Fluent Bit file.
pub(in crate::config) struct GroupTls {
    pub settings: ClientTlsSettings,
    /// Where its files were named.
    pub lines: FileLines,
}

/// One server per node, in file order. A node's TLS is on only with `tls on`;
/// `group_tls` (the upstream's `tls` table) fills in the name, CA and client
/// certificate a node does not set; `tls.verify` is always the node's.
pub(in crate::config) fn servers_from_nodes(
    file: &UpstreamFile,
    group_tls: Option<&GroupTls>,
) -> Result<Vec<ServerConfig>, ConfigError> {
    file.nodes
        .iter()
        .map(|node| server_from_node(node, group_tls))
        .collect()
}

fn server_from_node(
    node: &Node,
    group_tls: Option<&GroupTls>,
) -> Result<ServerConfig, ConfigError> {
    let key_line = |key: &str| KeyLine {
        file: node.file.clone(),
        line: node.line_of(key),
        quote: None,
    };
    let mut tls_lines = FileLines::default();
    let tls = if node.tls {
        let group = group_tls.map(|group| &group.settings);
        // The node's own key, else the group's, noted with the line naming it.
        let mut file =
            |own: &Option<PathBuf>, key: &str, kind: PemKind, inherited: Option<&PathBuf>| {
                let line = match (own, inherited) {
                    (Some(path), _) => Some((path, key_line(key))),
                    (None, Some(path)) => group_tls
                        .and_then(|group| group.lines.of(path, Some(kind)))
                        .map(|line| (path, line.clone())),
                    (None, None) => None,
                };
                if let Some((path, line)) = line {
                    tls_lines.add(path, kind, line);
                }
                own.as_ref().or(inherited).cloned()
            };
        let settings = ClientTlsSettings {
            verify: node.tls_verify,
            server_name: node
                .tls_vhost
                .clone()
                .or_else(|| group.and_then(|group| group.server_name.clone())),
            ca_file: file(
                &node.tls_ca_file,
                "tls.ca_file",
                PemKind::Certificates,
                group.and_then(|group| group.ca_file.as_ref()),
            ),
            ca_path: file(
                &node.tls_ca_path,
                "tls.ca_path",
                PemKind::Certificates,
                None,
            ),
            cert_file: file(
                &node.tls_crt_file,
                "tls.crt_file",
                PemKind::Certificates,
                group.and_then(|group| group.cert_file.as_ref()),
            ),
            key_file: file(
                &node.tls_key_file,
                "tls.key_file",
                PemKind::PrivateKey,
                group.and_then(|group| group.key_file.as_ref()),
            ),
        };
        let problem = match (&settings.cert_file, &settings.key_file) {
            (Some(_), None) => Some("`tls.crt_file` is given without `tls.key_file`"),
            (None, Some(_)) => Some("`tls.key_file` is given without `tls.crt_file`"),
            _ => None,
        };
        if let Some(problem) = problem {
            return Err(ConfigError {
                file: node.file.clone(),
                line: Some(node.line),
                message: format!("node {}: {problem}", quoted(&node.name)),
            });
        }
        Some(settings)
    } else {
        None
    };
    let address = Address::Inet {
        host: node.host.clone(),
        port: node.port,
    };
    Ok(ServerConfig {
        name: Some(node.name.clone()),
        tls,
        tls_lines,
        plugin_keys: node.extra.clone(),
        ..ServerConfig::with_defaults(address, key_line("host"), Syntax::FluentBit)
    })
}

pub(in crate::config) fn config_error(err: FluentBitError) -> ConfigError {
    ConfigError {
        file: err.file,
        line: err.line,
        message: err.message,
    }
}
