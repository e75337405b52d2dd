//! `--watch-config`: polls the configuration file and sends sluice a SIGHUP
//! when its content changes, so an edit (or a Kubernetes ConfigMap update)
//! takes exactly the reload path of `kill -HUP` (SPEC §6).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::MissedTickBehavior;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use crate::config::limits::MAX_FILE_BYTES;

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
        let mut last = read_capped(&self.path).await.ok();
        let mut unreadable = false;
        info!(path, interval = %humantime::format_duration(self.interval), "watching the configuration file for changes");

        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            match read_capped(&self.path).await {
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

/// The file's content up to one byte past the largest configuration sluice
/// reads: enough to see any change of a file it can load (a larger one fails
/// at the reload), and a device that never ends is not read for ever.
async fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut content = Vec::new();
    tokio::fs::File::open(path)
        .await?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut content)
        .await?;
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_is_read_only_up_to_the_configuration_limit() {
        let content = read_capped(Path::new("/dev/zero")).await.unwrap();
        assert_eq!(content.len() as u64, MAX_FILE_BYTES + 1);
    }
}
