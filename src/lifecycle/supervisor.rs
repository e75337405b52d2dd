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
use tracing::info;

use crate::config::{Address, Config, ListenerConfig, UpstreamConfig, ValueError};
use crate::net::listen::{accept_loop, bind, BindError, BoundSocket};
use crate::proxy::recycle::{self, Reason};
use crate::proxy::{serve_connection, ListenerContext};
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
    /// listeners' connections served on `workers`.
    pub async fn start(config: Config, workers: Vec<Handle>) -> Result<Supervisor, PrepareError> {
        let mut supervisor = Supervisor {
            config: config.clone(),
            listeners: BTreeMap::new(),
            upstreams: BTreeMap::new(),
            stop: CancellationToken::new(),
            workers,
            accept_loops: TaskTracker::new(),
            connections: TaskTracker::new(),
        };
        let prepared = supervisor.prepare(config).await?;
        supervisor.commit(prepared).await;
        Ok(supervisor)
    }

    /// Replaces the running configuration with `config`. On error nothing
    /// running has changed.
    pub async fn reload(&mut self, config: Config) -> Result<ReloadSummary, PrepareError> {
        let prepared = self.prepare(config).await?;
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

    /// Resolves every upstream and binds every listener socket `config` needs
    /// that is not open already. Changes nothing that runs.
    async fn prepare(&self, config: Config) -> Result<Prepared, PrepareError> {
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for (name, upstream) in &config.upstreams {
            let plan = match self.upstreams.get(name) {
                Some(running) => {
                    let old = running.shared.load_full();
                    let build = Upstream::resolve(upstream, Some(&old))
                        .await
                        .map_err(|err| PrepareError::Config(err.into()))?;
                    // A group with TLS is always rebuilt, so a reload
                    // re-reads its certificate files.
                    let uses_tls = build.peers.iter().any(|peer| peer.tls.is_some());
                    if running.config == *upstream && same_peers(&old, &build) && !uses_tls {
                        UpstreamPlan::Keep
                    } else {
                        UpstreamPlan::Replace(build)
                    }
                }
                None => {
                    let build = Upstream::resolve(upstream, None)
                        .await
                        .map_err(|err| PrepareError::Config(err.into()))?;
                    UpstreamPlan::New(Arc::new(ArcSwap::from_pointee(build)))
                }
            };
            upstreams.push((name.clone(), plan));
        }
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for listener in &config.listeners {
            let upstream = match upstreams
                .iter()
                .find(|(name, _)| *name == listener.upstream)
            {
                Some((_, UpstreamPlan::New(shared))) => Arc::clone(shared),
                _ => match self.upstreams.get(&listener.upstream) {
                    Some(running) => Arc::clone(&running.shared),
                    None => {
                        return Err(PrepareError::Config(ValueError::Unplaced(format!(
                            "listener {:?}: unknown upstream {:?}",
                            listener.name, listener.upstream
                        ))))
                    }
                },
            };
            let context =
                ListenerContext::new(listener.clone(), upstream).map_err(PrepareError::Config)?;
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
                    if let Some(old) = old {
                        // Moved to another address: the old accept loops stop.
                        old.stop.cancel();
                        info!(listener = listener.name.as_str(), address = %old.socket.local_addr(), "stopped accepting");
                        summary.listeners_changed.push(listener.name.clone());
                    } else {
                        summary.listeners_added.push(listener.name.clone());
                    }
                    self.spawn_listener(socket, context)
                }
                // prepare() plans Keep only for running listeners.
                (ListenerPlan::Keep, None) => continue,
            };
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
        }
    }

    /// The configuration running now.
    pub fn config(&self) -> &Config {
        &self.config
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
