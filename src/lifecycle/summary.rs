//! What `--check` prints: the configuration as sluice will run it, every
//! setting that changes behaviour, and no secret.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Balance, Config, HashKey, ProxyProtocol, ServerConfig};
use crate::tls::ClientTlsSettings;
use crate::upstream::Upstream;

/// Plugin keys of a Fluent Bit node whose values are secrets: named, never shown.
const SECRET_KEYS: &[&str] = &["shared_key", "password"];

pub fn summary(config: &Config, upstreams: &BTreeMap<String, Arc<Upstream>>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "shutdown_timeout {}",
        humantime::format_duration(config.shutdown_timeout)
    );
    if let Some(admin) = &config.admin {
        let _ = writeln!(out, "admin endpoint on {}", admin.bind);
        if let Some(path) = &admin.state_file {
            let _ = writeln!(out, "  runtime changes kept in {}", path.display());
        }
    }
    for listener in &config.listeners {
        let _ = writeln!(
            out,
            "listener {:?} on {} -> upstream {:?} (connect_timeout {}, idle_timeout {}, next_upstream_tries {}, next_upstream_timeout {}, proxy_protocol {}, accept_proxy_protocol {}, access_log {})",
            listener.name,
            listener.bind,
            listener.upstream,
            humantime::format_duration(listener.connect_timeout),
            optional_duration(listener.idle_timeout),
            match listener.next_upstream_tries {
                0 => "unlimited".to_owned(),
                tries => tries.to_string(),
            },
            optional_duration(listener.next_upstream_timeout),
            proxy_protocol(listener.proxy_protocol),
            on_off(listener.accept_proxy_protocol),
            on_off(listener.access_log),
        );
        let recycle = &listener.recycle;
        if recycle.recycles() {
            let _ = writeln!(
                out,
                "  recycling: protocol {} quiet_period {} max_connection_age {} rebalance {} rebalance_rate {}/s access_log_interval {}",
                recycle.protocol.name(),
                humantime::format_duration(recycle.quiet_period),
                optional_duration(recycle.max_connection_age),
                on_off(recycle.rebalance),
                recycle.rebalance_rate,
                optional_duration(recycle.access_log_interval),
            );
        }
        if let Some(tls) = &listener.tls {
            let _ = writeln!(
                out,
                "  tls termination cert_file {} key_file {} client_ca_file {}",
                tls.cert_file.display(),
                tls.key_file.display(),
                tls.client_ca_file
                    .as_ref()
                    .map_or("none (no client certificates)".into(), |p| p
                        .display()
                        .to_string()),
            );
        }
    }
    for (name, upstream) in upstreams {
        let Some(config) = config.upstreams.get(name) else {
            continue;
        };
        let queue = match config.queue {
            0 => String::new(),
            queue => format!(
                " queue {queue} queue_timeout {}",
                humantime::format_duration(config.queue_timeout)
            ),
        };
        let _ = writeln!(
            out,
            "upstream {:?} balance {}{queue}",
            upstream.name,
            balance(&upstream.balance)
        );
        if let Some(check) = &config.health_check {
            let _ = writeln!(
                out,
                "  health_check interval {} timeout {} fails {} passes {} send {} expect {}",
                humantime::format_duration(check.interval),
                humantime::format_duration(check.timeout),
                check.fails,
                check.passes,
                check
                    .send
                    .as_deref()
                    .map_or("none (a connect)".into(), quoted),
                check.expect.as_deref().map_or("none".into(), quoted),
            );
        }
        for peer in &upstream.peers {
            let server = &peer.server;
            let _ = writeln!(
                out,
                "  peer {:?} {} {}",
                peer.label,
                peer.target,
                server_settings(server)
            );
            if let Some(tls) = &server.tls {
                let _ = writeln!(out, "    tls {}", describe_client_tls(tls));
            }
            if !server.plugin_keys.is_empty() {
                let keys: Vec<String> = server
                    .plugin_keys
                    .iter()
                    .map(|(key, value)| {
                        if SECRET_KEYS.contains(&key.to_ascii_lowercase().as_str()) {
                            format!("{key}=(secret, not shown)")
                        } else {
                            format!("{key}={value}")
                        }
                    })
                    .collect();
                let _ = writeln!(out, "    kept, not used: {}", keys.join(" "));
            }
        }
    }
    out
}

fn server_settings(server: &ServerConfig) -> String {
    let mut text = format!(
        "weight {} max_conns {} max_fails {} fail_timeout {} slow_start {}",
        server.weight,
        match server.max_conns {
            0 => "unlimited".to_owned(),
            conns => conns.to_string(),
        },
        match server.max_fails {
            0 => "0 (never marked failed)".to_owned(),
            fails => fails.to_string(),
        },
        humantime::format_duration(server.fail_timeout),
        if server.slow_start.is_zero() {
            "off".to_owned()
        } else {
            humantime::format_duration(server.slow_start).to_string()
        },
    );
    if server.resolve {
        let _ = write!(
            text,
            " resolve every {}",
            humantime::format_duration(server.resolve_interval)
        );
    }
    if server.backup {
        text.push_str(" backup");
    }
    if server.down {
        text.push_str(" down");
    }
    text
}

fn balance(balance: &Balance) -> String {
    match balance {
        Balance::Hash(key) => format!(
            "hash hash_key {}",
            match key {
                HashKey::ClientIp => "client_ip",
                HashKey::ClientAddr => "client_addr",
            }
        ),
        other => other.name().to_owned(),
    }
}

fn proxy_protocol(version: ProxyProtocol) -> &'static str {
    match version {
        ProxyProtocol::Off => "off",
        ProxyProtocol::V1 => "v1",
        ProxyProtocol::V2 => "v2",
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

fn optional_duration(duration: Option<Duration>) -> String {
    duration.map_or("off".into(), |d| humantime::format_duration(d).to_string())
}

/// Bytes of a health check, printable: at most 64 characters, escaped.
fn quoted(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut shown: String = text.chars().take(64).collect();
    if text.chars().count() > 64 {
        shown.push_str("...");
    }
    format!("{shown:?}")
}

fn describe_client_tls(tls: &ClientTlsSettings) -> String {
    let mut text = format!("verify {}", on_off(tls.verify));
    if let Some(name) = &tls.server_name {
        let _ = write!(text, " server_name {name}");
    }
    let files = [
        ("ca_file", &tls.ca_file),
        ("ca_path", &tls.ca_path),
        ("cert_file", &tls.cert_file),
        ("key_file", &tls.key_file),
    ];
    for (key, path) in files {
        if let Some(path) = path {
            let _ = write!(text, " {key} {}", path.display());
        }
    }
    if tls.verify && tls.ca_file.is_none() && tls.ca_path.is_none() {
        text.push_str(" (system trust roots)");
    }
    text
}
