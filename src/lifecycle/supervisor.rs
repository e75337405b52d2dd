//! What is running: the listeners and upstream groups built from one
//! configuration, and how a reload (SPEC §6) turns them into those of another.
//!
//! A reload is prepared completely (every upstream resolved, every new socket
//! bound) before anything running changes; if a step fails, what was prepared
//! is dropped and the running configuration stays as it was.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Address, Config, ListenerConfig, UpstreamConfig, ValueError};
use crate::net::listen::{
    accept_loop, bind, BindError, BoundSocket, ListenerCounts, ListenerReport,
};
use crate::proxy::recycle::{self, Reason};
use crate::proxy::{serve_connection, ListenerContext};
use crate::upstream::runtime::Runtime;
use crate::upstream::state_file::{self, Seed};
use crate::upstream::task::UpstreamTask;
use crate::upstream::{self, SharedUpstream, Upstream};

/// A listener that is accepting.
struct RunningListener {
    config: ListenerConfig,
    socket: Arc<BoundSocket>,
    /// Read by the accept loop for every client; a reload stores a new one.
    context: Arc<ArcSwap<ListenerContext>>,
    /// Stops this listener's accept loop only; a child of the supervisor's.
    stop: CancellationToken,
    /// For `/status`; kept while the listener keeps its name.
    counts: Arc<ListenerCounts>,
}

/// An upstream group, the configuration it was built from, and the
/// background tasks (health checks, DNS re-resolution) working on it.
struct RunningUpstream {
    config: UpstreamConfig,
    shared: SharedUpstream,
    tasks: Vec<UpstreamTask>,
}

/// Everything built from a configuration before it is put in place.
struct Prepared {
    config: Config,
    upstreams: Vec<(String, UpstreamPlan)>,
    /// Each listener's new context (TLS files read) and what to do with its socket.
    listeners: Vec<(ListenerContext, ListenerPlan)>,
}

enum UpstreamPlan {
    /// Same configuration, same peers: the running build stays, with its
    /// round-robin position.
    Keep,
    /// Present before: this build replaces the running one.
    Replace(Upstream),
    New(SharedUpstream),
}

enum ListenerPlan {
    /// Same name, same address: keeps its socket and accept loop; only its
    /// context is replaced.
    Keep,
    /// A new accept loop on this socket: newly bound, or taken over from a
    /// running listener on the same address.
    Start(Arc<BoundSocket>),
}

/// What a configuration builds before any socket is bound: each upstream's
/// group (every address resolved, TLS files read) and each listener's
/// context. Start, reload and `--check` all go through [`build`].
struct Built {
    upstreams: Vec<(String, UpstreamPlan)>,
    /// In configuration order.
    contexts: Vec<ListenerContext>,
}

/// Builds every upstream group and listener context of `config`. A group
/// also in `running` is built on the running one (its peers keep their
/// health) and kept as it is when nothing about it changed.
async fn build(
    config: &Config,
    running: &BTreeMap<String, RunningUpstream>,
    seed: &Seed,
) -> Result<Built, ValueError> {
    state_file::warn_unknown_upstreams(seed, config);
    let mut upstreams = Vec::with_capacity(config.upstreams.len());
    for (name, upstream) in &config.upstreams {
        let layer = state_file::layer_for(upstream, seed.get(name));
        let plan = match running.get(name) {
            Some(running) => {
                let old = running.shared.load_full();
                let same_runtime = old.runtime.api_layer() == layer;
                let runtime = old.runtime.successor(layer);
                let build = Upstream::resolve(upstream, Some(&old), runtime).await?;
                // A group with TLS is always rebuilt, so a reload
                // re-reads its certificate files.
                let uses_tls = build.peers.iter().any(|peer| peer.tls.is_some());
                if running.config == *upstream
                    && same_peers(&old, &build)
                    && !uses_tls
                    && same_runtime
                {
                    UpstreamPlan::Keep
                } else {
                    UpstreamPlan::Replace(build)
                }
            }
            None => {
                let runtime = Runtime::new(upstream);
                runtime.replace_api_layer(layer);
                let build = Upstream::resolve(upstream, None, runtime).await?;
                UpstreamPlan::New(Arc::new(ArcSwap::from_pointee(build)))
            }
        };
        upstreams.push((name.clone(), plan));
    }
    let mut contexts = Vec::with_capacity(config.listeners.len());
    for listener in &config.listeners {
        let shared = match upstreams
            .iter()
            .find(|(name, _)| *name == listener.upstream)
        {
            Some((_, UpstreamPlan::New(shared))) => Some(Arc::clone(shared)),
            _ => running
                .get(&listener.upstream)
                .map(|running| Arc::clone(&running.shared)),
        };
        let Some(shared) = shared else {
            return Err(ValueError::Unplaced(format!(
                "listener {:?}: unknown upstream {:?}",
                listener.name, listener.upstream
            )));
        };
        contexts.push(ListenerContext::new(listener.clone(), shared)?);
    }
    Ok(Built {
        upstreams,
        contexts,
    })
}

/// `--check`: builds everything `config` describes without binding or
/// starting anything, and returns each upstream's group for the summary.
pub async fn check(config: &Config) -> Result<BTreeMap<String, Arc<Upstream>>, ValueError> {
    let built = build(config, &BTreeMap::new(), &Seed::new()).await?;
    Ok(built
        .upstreams
        .into_iter()
        .filter_map(|(name, plan)| match plan {
            UpstreamPlan::New(shared) => Some((name, shared.load_full())),
            UpstreamPlan::Keep | UpstreamPlan::Replace(_) => None,
        })
        .collect())
}

/// Why a configuration could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A value that only fails when used, such as a host name that does not resolve.
    #[error(transparent)]
    Config(ValueError),
    #[error(transparent)]
    Bind(#[from] BindError),
}

pub struct Supervisor {
    config: Config,
    listeners: BTreeMap<String, RunningListener>,
    upstreams: BTreeMap<String, RunningUpstream>,
    /// Cancels every accept loop at once (shutdown).
    stop: CancellationToken,
    /// The workers' runtimes: each listener has an accept loop on every one.
    workers: Vec<Handle>,
    accept_loops: TaskTracker,
    connections: TaskTracker,
}

impl Supervisor {
    /// Builds and starts everything the configuration describes, with the
    /// listeners' connections served on `workers` and the runtime changes
    /// in `seed` (the state file's) applied.
    pub async fn start(
        config: Config,
        workers: Vec<Handle>,
        seed: &Seed,
    ) -> Result<Supervisor, PrepareError> {
        let mut supervisor = Supervisor {
            config: config.clone(),
            listeners: BTreeMap::new(),
            upstreams: BTreeMap::new(),
            stop: CancellationToken::new(),
            workers,
            accept_loops: TaskTracker::new(),
            connections: TaskTracker::new(),
        };
        let prepared = supervisor.prepare(config, seed).await?;
        supervisor.commit(prepared).await;
        Ok(supervisor)
    }

    /// Replaces the running configuration with `config`, and the runtime
    /// changes with those of `seed` (empty without a state file). On error
    /// nothing running has changed.
    pub async fn reload(
        &mut self,
        config: Config,
        seed: &Seed,
    ) -> Result<ReloadSummary, PrepareError> {
        let prepared = self.prepare(config, seed).await?;
        Ok(self.commit(prepared).await)
    }

    /// Stops accepting on every listener, then waits up to shutdown_timeout
    /// for open connections. Returns how many were still open.
    pub async fn drain(self) -> usize {
        self.stop.cancel();
        // Listeners that recycle close each connection at its next quiet
        // moment instead of waiting for shutdown_timeout to cut it.
        for running in self.listeners.values() {
            let context = running.context.load();
            if context.config.recycle.recycles() {
                context.recycling.request_all(Reason::Drain);
            }
        }
        for running in self.upstreams.into_values() {
            stop_tasks(running.tasks).await;
        }
        self.accept_loops.close();
        self.accept_loops.wait().await;
        for name in self.listeners.keys() {
            info!(listener = name.as_str(), "stopped accepting");
        }
        drop(self.listeners);
        self.connections.close();
        info!(open_connections = self.connections.len(), timeout = %humantime::format_duration(self.config.shutdown_timeout), "draining");
        if tokio::time::timeout(self.config.shutdown_timeout, self.connections.wait())
            .await
            .is_err()
        {
            return self.connections.len();
        }
        0
    }

    /// Builds what `config` describes (see [`build`]) and binds every
    /// listener socket it needs that is not open already. Changes nothing
    /// that runs.
    async fn prepare(&self, config: Config, seed: &Seed) -> Result<Prepared, PrepareError> {
        let Built {
            upstreams,
            contexts,
        } = build(&config, &self.upstreams, seed)
            .await
            .map_err(PrepareError::Config)?;
        let mut listeners = Vec::with_capacity(contexts.len());
        for context in contexts {
            let listener = &context.config;
            let kept = self
                .listeners
                .get(&listener.name)
                .is_some_and(|running| running.config.bind == listener.bind);
            let plan = if kept {
                ListenerPlan::Keep
            } else if let Some(socket) = self.socket_for(&listener.bind) {
                ListenerPlan::Start(Arc::clone(socket))
            } else {
                let socket = bind(
                    &listener.name,
                    &listener.bind,
                    listener.unix_mode,
                    self.workers.len(),
                )
                .await?;
                ListenerPlan::Start(Arc::new(socket))
            };
            listeners.push((context, plan));
        }
        Ok(Prepared {
            config,
            upstreams,
            listeners,
        })
    }

    /// The open socket on `address`, whichever listener holds it: a listener
    /// renamed, or moved onto an address another listener gives up, takes the
    /// socket over instead of binding it a second time.
    fn socket_for(&self, address: &Address) -> Option<&Arc<BoundSocket>> {
        self.listeners
            .values()
            .find(|running| running.config.bind == *address)
            .map(|running| &running.socket)
    }

    /// Puts a prepared configuration in place. Connections already open keep
    /// the context and group build they started with.
    async fn commit(&mut self, prepared: Prepared) -> ReloadSummary {
        let mut summary = ReloadSummary::default();
        let mut old_upstreams = std::mem::take(&mut self.upstreams);
        for (name, plan) in prepared.upstreams {
            let config = prepared.config.upstreams[&name].clone();
            let running = match (plan, old_upstreams.remove(&name)) {
                (UpstreamPlan::Replace(build), Some(running)) => {
                    summary.note_peers(&running.shared.load(), &build);
                    summary.upstreams_changed.push(name.clone());
                    // Stopped first: a task of the old configuration must not
                    // store a build over the new one.
                    stop_tasks(running.tasks).await;
                    running.shared.store(Arc::new(build));
                    let tasks = upstream::start_tasks(&config, &running.shared);
                    RunningUpstream {
                        config,
                        shared: running.shared,
                        tasks,
                    }
                }
                (UpstreamPlan::Keep, Some(running)) => running,
                (UpstreamPlan::New(shared), _) => {
                    summary.upstreams_added.push(name.clone());
                    let tasks = upstream::start_tasks(&config, &shared);
                    RunningUpstream {
                        config,
                        shared,
                        tasks,
                    }
                }
                // prepare() plans Keep and Replace only for running upstreams.
                (UpstreamPlan::Keep | UpstreamPlan::Replace(_), None) => continue,
            };
            self.upstreams.insert(name, running);
        }
        for running in old_upstreams.values_mut() {
            stop_tasks(std::mem::take(&mut running.tasks)).await;
        }
        summary.upstreams_removed.extend(old_upstreams.into_keys());

        let mut old_listeners = std::mem::take(&mut self.listeners);
        for (mut context, plan) in prepared.listeners {
            let listener = context.config.clone();
            let running = match (plan, old_listeners.remove(&listener.name)) {
                (ListenerPlan::Keep, Some(running)) => {
                    if running.config != listener {
                        summary.listeners_changed.push(listener.name.clone());
                    }
                    // Its open connections stay registered for rebalancing.
                    context.recycling = Arc::clone(&running.context.load().recycling);
                    running.context.store(Arc::new(context));
                    RunningListener {
                        config: listener.clone(),
                        ..running
                    }
                }
                (ListenerPlan::Start(socket), old) => {
                    let counts = old
                        .as_ref()
                        .map_or_else(Arc::default, |old| Arc::clone(&old.counts));
                    if let Some(old) = old {
                        // Moved to another address: the old accept loops stop.
                        old.stop.cancel();
                        info!(listener = listener.name.as_str(), address = %old.socket.local_addr(), "stopped accepting");
                        summary.listeners_changed.push(listener.name.clone());
                    } else {
                        summary.listeners_added.push(listener.name.clone());
                    }
                    self.spawn_listener(socket, context, counts)
                }
                // prepare() plans Keep only for running listeners.
                (ListenerPlan::Keep, None) => continue,
            };
            // Set on every load: a socket kept or taken over may have been
            // set the other way by the listener that held it.
            if let Err(err) = running.socket.set_delayed_ack(listener.delayed_ack) {
                warn!(listener = listener.name.as_str(), reason = %err, "delayed_ack could not be set; the kernel's default stays");
            }
            self.listeners.insert(listener.name, running);
        }
        // Listeners no longer configured stop accepting; their open
        // connections carry on. A socket closes when its accept loop ends,
        // unless a listener on the same address took it over.
        for (name, running) in old_listeners {
            running.stop.cancel();
            info!(listener = name.as_str(), "stopped accepting");
            summary.listeners_removed.push(name);
        }
        self.config = prepared.config;
        summary
    }

    fn spawn_listener(
        &self,
        socket: Arc<BoundSocket>,
        context: ListenerContext,
        counts: Arc<ListenerCounts>,
    ) -> RunningListener {
        let config = context.config.clone();
        let context = Arc::new(ArcSwap::from_pointee(context));
        let stop = self.stop.child_token();
        for (index, worker) in self.workers.iter().enumerate() {
            // Each connection is served with the context current when it was
            // accepted; a reload stores a new one for later connections.
            let server = {
                let context = Arc::clone(&context);
                move || {
                    let context = context.load_full();
                    move |client, client_addr| serve_connection(client, client_addr, context)
                }
            };
            worker.spawn(self.accept_loops.track_future(accept_loop(
                config.name.clone(),
                Arc::clone(&socket),
                index,
                server,
                stop.clone(),
                self.connections.clone(),
                Arc::clone(&counts),
            )));
        }
        // On the control thread, like the upstreams' background tasks.
        tokio::spawn(recycle::run(Arc::clone(&context), stop.clone()));
        info!(listener = config.name.as_str(), address = %socket.local_addr(), upstream = config.upstream.as_str(), workers = self.workers.len(), "listening");
        RunningListener {
            config,
            socket,
            context,
            stop,
            counts,
        }
    }

    /// The configuration running now.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Every listener, in configuration order, as the admin endpoint reports them.
    pub fn listeners(&self) -> Vec<ListenerReport> {
        self.config
            .listeners
            .iter()
            .filter_map(|listener| self.listeners.get(&listener.name))
            .map(|running| ListenerReport {
                name: running.config.name.clone(),
                address: running.socket.local_addr(),
                upstream: running.config.upstream.clone(),
                counts: Arc::clone(&running.counts),
            })
            .collect()
    }

    /// Every upstream group by name, as the admin endpoint reports them.
    pub fn upstreams(&self) -> BTreeMap<String, SharedUpstream> {
        self.upstreams
            .iter()
            .map(|(name, running)| (name.clone(), Arc::clone(&running.shared)))
            .collect()
    }
}

async fn stop_tasks(tasks: Vec<UpstreamTask>) {
    for task in tasks {
        task.stop().await;
    }
}

/// Two builds of a group have the same peers, in the same order, with the same settings.
fn same_peers(old: &Upstream, new: &Upstream) -> bool {
    old.peers.len() == new.peers.len()
        && old
            .peers
            .iter()
            .zip(&new.peers)
            .all(|(a, b)| a.label == b.label && a.target == b.target && a.server == b.server)
}

/// What a reload changed, for its one log line.
#[derive(Debug, Default)]
pub struct ReloadSummary {
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    pub listeners_changed: Vec<String>,
    pub upstreams_added: Vec<String>,
    pub upstreams_removed: Vec<String>,
    pub upstreams_changed: Vec<String>,
    /// `UPSTREAM/PEER` for peers added to or removed from groups present before and after.
    pub peers_added: Vec<String>,
    pub peers_removed: Vec<String>,
}

impl ReloadSummary {
    fn note_peers(&mut self, old: &Upstream, new: &Upstream) {
        let is_in = |peer: &crate::upstream::Peer, group: &Upstream| {
            group
                .peers
                .iter()
                .any(|other| other.label == peer.label && other.target == peer.target)
        };
        for peer in &new.peers {
            if !is_in(peer, old) {
                self.peers_added
                    .push(format!("{}/{}", new.name, peer.label));
            }
        }
        for peer in &old.peers {
            if !is_in(peer, new) {
                self.peers_removed
                    .push(format!("{}/{}", old.name, peer.label));
            }
        }
    }
}

impl fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = [
            ("listeners added", &self.listeners_added),
            ("listeners removed", &self.listeners_removed),
            ("listeners changed", &self.listeners_changed),
            ("upstreams added", &self.upstreams_added),
            ("upstreams removed", &self.upstreams_removed),
            ("upstreams changed", &self.upstreams_changed),
            ("peers added", &self.peers_added),
            ("peers removed", &self.peers_removed),
        ];
        let mut any = false;
        for (what, names) in parts.iter().filter(|(_, names)| !names.is_empty()) {
            if any {
                f.write_str("; ")?;
            }
            write!(f, "{what}: {}", names.join(", "))?;
            any = true;
        }
        if !any {
            f.write_str("nothing changed")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Listeners `(name, bind)` on upstream `pool` of `servers` (addresses
    /// that are never connected to here).
    fn config(listeners: &[(&str, &str)], servers: &[&str]) -> Config {
        let mut text = String::new();
        for (name, bind) in listeners {
            text.push_str(&format!(
                "[[listener]]\nname = \"{name}\"\nbind = \"{bind}\"\nupstream = \"pool\"\n"
            ));
        }
        text.push_str("[upstream.pool]\n");
        for server in servers {
            text.push_str(&format!(
                "[[upstream.pool.server]]\naddress = \"{server}\"\n"
            ));
        }
        Config::parse(&text, Path::new("test.toml")).expect("a valid configuration")
    }

    /// A UNIX listener address in a fresh directory (port 0 is not a valid address).
    fn socket_in(dir: &tempfile::TempDir, name: &str) -> String {
        format!("unix:{}", dir.path().join(name).display())
    }

    async fn start(config: Config) -> Supervisor {
        Supervisor::start(config, vec![Handle::current()], &Seed::new())
            .await
            .expect("started")
    }

    fn listener_address(supervisor: &Supervisor, name: &str) -> String {
        supervisor.listeners[name].socket.local_addr()
    }

    #[tokio::test]
    async fn reloading_the_same_configuration_changes_nothing() {
        let dir = tempfile::tempdir().expect("a directory");
        let config = config(&[("front", &socket_in(&dir, "front"))], &["127.0.0.1:1"]);
        let mut supervisor = start(config.clone()).await;
        let before = supervisor.upstreams()["pool"].load_full();
        let summary = supervisor
            .reload(config, &Seed::new())
            .await
            .expect("reloaded");
        assert_eq!(summary.to_string(), "nothing changed");
        // The same build stays, with its round-robin position.
        assert!(Arc::ptr_eq(
            &before,
            &supervisor.upstreams()["pool"].load_full()
        ));
    }

    #[tokio::test]
    async fn a_server_added_and_one_removed_are_named_and_health_is_kept() {
        let dir = tempfile::tempdir().expect("a directory");
        let front = socket_in(&dir, "front");
        let mut supervisor = start(config(
            &[("front", &front)],
            &["127.0.0.1:1", "127.0.0.1:2"],
        ))
        .await;
        let shared = supervisor.upstreams()["pool"].clone();
        let kept_health = Arc::clone(&shared.load().peers[1].health);
        let summary = supervisor
            .reload(
                config(&[("front", &front)], &["127.0.0.1:2", "127.0.0.1:3"]),
                &Seed::new(),
            )
            .await
            .expect("reloaded");
        assert_eq!(
            summary.to_string(),
            "upstreams changed: pool; peers added: pool/127.0.0.1:3; peers removed: pool/127.0.0.1:1"
        );
        // The group is replaced in the same shared slot the listeners read.
        let build = shared.load();
        assert_eq!(build.peers.len(), 2);
        assert!(Arc::ptr_eq(&build.peers[0].health, &kept_health));
    }

    #[tokio::test]
    async fn listeners_added_removed_and_renamed_onto_the_same_socket() {
        let dir = tempfile::tempdir().expect("a directory");
        let mut supervisor = start(config(&[("a", &socket_in(&dir, "a"))], &["127.0.0.1:1"])).await;
        let a_address = listener_address(&supervisor, "a");
        // Renamed: the new name takes the running socket instead of binding again.
        let summary = supervisor
            .reload(
                config(
                    &[("b", &socket_in(&dir, "b")), ("c", &a_address)],
                    &["127.0.0.1:1"],
                ),
                &Seed::new(),
            )
            .await
            .expect("reloaded");
        assert_eq!(
            summary.to_string(),
            "listeners added: b, c; listeners removed: a"
        );
        assert_eq!(listener_address(&supervisor, "c"), a_address);
        assert!(!supervisor.listeners.contains_key("a"));
    }

    #[tokio::test]
    async fn a_failed_reload_leaves_everything_running_as_it_was() {
        let dir = tempfile::tempdir().expect("a directory");
        let front = socket_in(&dir, "front");
        let config_before = config(&[("front", &front)], &["127.0.0.1:1"]);
        let mut supervisor = start(config_before.clone()).await;
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bound");
        let taken_address = taken.local_addr().expect("an address").to_string();
        let err = supervisor
            .reload(
                config(
                    &[("front", &front), ("second", &taken_address)],
                    &["127.0.0.1:9"],
                ),
                &Seed::new(),
            )
            .await
            .expect_err("the address is in use");
        assert!(matches!(err, PrepareError::Bind(_)), "{err}");
        assert_eq!(supervisor.config(), &config_before);
        let peers: Vec<String> = supervisor.upstreams()["pool"]
            .load()
            .peers
            .iter()
            .map(|peer| peer.label.clone())
            .collect();
        assert_eq!(peers, ["127.0.0.1:1"]);
        assert_eq!(supervisor.listeners.len(), 1);
    }

    #[tokio::test]
    async fn check_builds_every_group_without_binding() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bound");
        let taken_address = taken.local_addr().expect("an address").to_string();
        // The address is in use (by the running instance, say): --check does
        // not bind, so it is no error.
        let groups = check(&config(&[("front", &taken_address)], &["127.0.0.1:1"]))
            .await
            .expect("valid");
        assert_eq!(groups["pool"].peers.len(), 1);
    }
}
