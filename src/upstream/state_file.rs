//! `[admin] state_file` (SPEC §10): the runtime API's changes, written after
//! each one (temporary file, fsync, rename, so a crash leaves the old file
//! or the new one, never half of one) and applied on start and reload.
//! A file that cannot be read or parsed, and entries naming servers the
//! configuration does not have, are reported and ignored: never fatal.
//!
//! ```json
//! {"version": 1, "upstreams": {"pool": {
//!   "servers": {"a": {"state": "drain", "weight": 3}},
//!   "added": [{"name": "c", "address": "127.0.0.1:7000", "weight": 2, "max_conns": 0}],
//!   "removed": ["b"]}}}
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::resolve_address;
use super::runtime::{AddedServer, ApiLayer, Overrides, MAX_ADDED_SERVERS, WEIGHT_RANGE};
use crate::config::{Address, Config, ServerConfig, UpstreamConfig};

/// The largest state file read: far above what the API's own bounds
/// (servers added, name lengths) let it grow to.
const MAX_STATE_FILE_SIZE: u64 = 16 * 1024 * 1024;
const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    upstreams: BTreeMap<String, StoredUpstream>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredUpstream {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    servers: BTreeMap<String, Overrides>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    added: Vec<StoredServer>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    removed: BTreeSet<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredServer {
    name: String,
    address: String,
    weight: u32,
    max_conns: u32,
}

/// The API layer of each upstream, as the state file holds them.
pub type Seed = BTreeMap<String, ApiLayer>;

/// Reads the state file. A missing file is an empty seed; one that cannot
/// be read or parsed is reported and ignored (an empty seed too); an added
/// server whose address does not resolve is reported and left out.
pub async fn load(path: &Path) -> Seed {
    let file = match read(path) {
        Ok(Some(file)) => file,
        Ok(None) => return Seed::new(),
        Err(reason) => {
            warn!(file = %path.display(), reason = %reason, "state_file ignored: it cannot be used");
            return Seed::new();
        }
    };
    let mut seed = Seed::new();
    for (upstream, stored) in file.upstreams {
        let mut layer = ApiLayer {
            overrides: stored.servers,
            added: Vec::new(),
            removed: stored.removed,
        };
        for server in stored.added.into_iter().take(MAX_ADDED_SERVERS) {
            match added_server(&server).await {
                Ok(added) => layer.added.push(added),
                Err(reason) => {
                    warn!(file = %path.display(), upstream = upstream.as_str(), server = server.name.as_str(), reason = %reason, "state_file: added server left out")
                }
            }
        }
        seed.insert(upstream, layer);
    }
    info!(file = %path.display(), upstreams = seed.len(), "state_file read");
    seed
}

fn read(path: &Path) -> Result<Option<StateFile>, String> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err.to_string()),
    };
    let mut text = String::new();
    file.take(MAX_STATE_FILE_SIZE + 1)
        .read_to_string(&mut text)
        .map_err(|err| err.to_string())?;
    if text.len() as u64 > MAX_STATE_FILE_SIZE {
        return Err(format!("larger than {MAX_STATE_FILE_SIZE} bytes"));
    }
    let file: StateFile = serde_json::from_str(&text).map_err(|err| err.to_string())?;
    if file.version != VERSION {
        return Err(format!(
            "version {} is not {VERSION}, the one this sluice writes",
            file.version
        ));
    }
    Ok(Some(file))
}

async fn added_server(stored: &StoredServer) -> Result<AddedServer, String> {
    if !WEIGHT_RANGE.contains(&stored.weight) {
        return Err(format!("weight {} is not 1-1000", stored.weight));
    }
    let address: Address = stored.address.parse().map_err(|err| format!("{err}"))?;
    let targets = resolve_address(&address)
        .await
        .map_err(|err| format!("address {}: {err}", stored.address))?;
    Ok(AddedServer {
        config: ServerConfig::added_at_runtime(
            address,
            Some(stored.name.clone()),
            stored.weight,
            stored.max_conns,
        ),
        targets,
    })
}

/// The part of `stored` that applies to `config`'s servers; each entry
/// naming a server the configuration does not have is reported and dropped
/// (a reload that removed a server drops its runtime state).
pub fn layer_for(config: &UpstreamConfig, stored: Option<&ApiLayer>) -> ApiLayer {
    let Some(stored) = stored else {
        return ApiLayer::default();
    };
    let configured: BTreeSet<String> = config.servers.iter().map(ServerConfig::label).collect();
    let mut layer = ApiLayer::default();
    let mut labels = configured.clone();
    for label in &stored.removed {
        if configured.contains(label) {
            layer.removed.insert(label.clone());
        } else {
            warn!(upstream = config.name.as_str(), server = label.as_str(), "state_file: removed server is not in the configuration; entry ignored");
        }
    }
    for added in &stored.added {
        let label = added.config.label();
        let shadows = configured.contains(&label) && !layer.removed.contains(&label);
        if shadows || !labels.insert(label.clone()) {
            warn!(upstream = config.name.as_str(), server = label.as_str(), "state_file: added server has the name of another server; entry ignored");
            continue;
        }
        layer.added.push(added.clone());
    }
    for (label, overrides) in &stored.overrides {
        let removed = layer.removed.contains(label)
            && !layer.added.iter().any(|added| added.config.label() == *label);
        if labels.contains(label) && !removed {
            layer.overrides.insert(label.clone(), overrides.clone());
        } else {
            warn!(upstream = config.name.as_str(), server = label.as_str(), "state_file: server is not in the configuration; its runtime state is dropped");
        }
    }
    layer
}

/// Reports the state file's upstreams that the configuration does not have.
pub fn warn_unknown_upstreams(seed: &Seed, config: &Config) {
    for name in seed.keys().filter(|name| !config.upstreams.contains_key(*name)) {
        warn!(upstream = name.as_str(), "state_file: upstream is not in the configuration; its runtime state is dropped");
    }
}

/// Writes every group's API layer to `path` atomically.
pub fn write<'a>(
    path: &Path,
    layers: impl Iterator<Item = (&'a String, ApiLayer)>,
) -> io::Result<()> {
    let mut file = StateFile {
        version: VERSION,
        upstreams: BTreeMap::new(),
    };
    for (name, layer) in layers {
        if layer == ApiLayer::default() {
            continue;
        }
        let stored = StoredUpstream {
            servers: layer.overrides,
            added: layer
                .added
                .iter()
                .map(|added| StoredServer {
                    name: added.config.label(),
                    address: added.config.address.to_string(),
                    weight: added.config.weight,
                    max_conns: added.config.max_conns,
                })
                .collect(),
            removed: layer.removed,
        };
        file.upstreams.insert(name.clone(), stored);
    }
    let mut text = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
    text.push(b'\n');
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "state_file has no file name"))?;
    let mut temporary = name.to_owned();
    temporary.push(".tmp");
    let temporary = path.with_file_name(temporary);
    {
        let mut out = File::create(&temporary)?;
        out.write_all(&text)?;
        out.sync_all()?;
    }
    fs::rename(&temporary, path)?;
    // The rename is durable once the directory is.
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
