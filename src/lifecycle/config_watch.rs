//! `--watch-config`: polls the configuration file and sends sluice a SIGHUP
//! when its content changes, so an edit (or a Kubernetes ConfigMap update)
//! takes exactly the reload path of `kill -HUP` (SPEC §6).

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

/// Which file to watch and how often to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWatch {
    pub path: PathBuf,
    pub interval: Duration,
}

/// Starts the watch; it stops when the handle is dropped. SIGHUP must already
/// be handled by the process, or the first change would terminate it.
pub fn spawn(watch: ConfigWatch) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(watch.run()))
}

impl ConfigWatch {
    async fn run(self) {
        let path = self.path.display().to_string();
        // Content, not the modification time or inode: a ConfigMap update
        // swaps the `..data` symlink, and a rewrite of the same bytes is no change.
        let mut last = tokio::fs::read(&self.path).await.ok();
        let mut unreadable = false;
        info!(path, interval = %humantime::format_duration(self.interval), "watching the configuration file for changes");

        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            match tokio::fs::read(&self.path).await {
                Ok(content) => {
                    unreadable = false;
                    if last.as_ref() == Some(&content) {
                        continue;
                    }
                    last = Some(content);
                    info!(path, "configuration file changed; sending SIGHUP to reload");
                    send_hangup();
                }
                Err(err) => {
                    // Once per outage, not at every tick.
                    if !unreadable {
                        warn!(path, error = %err, "cannot read the configuration file; the running configuration stays");
                    }
                    unreadable = true;
                }
            }
        }
    }
}

fn send_hangup() {
    let pid = std::process::id() as libc::pid_t;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot send SIGHUP to sluice itself");
    }
}
