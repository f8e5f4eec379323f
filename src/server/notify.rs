//! systemd's service notification protocol (`sd_notify(3)`), for `Type=notify` units.
//!
//! What the broker tells its service manager over `$NOTIFY_SOCKET`:
//! - `STATUS=recovering partitions: N of M` about once a second while the shards recover
//!   (what `systemctl status` shows during a long start),
//! - `READY=1` with `STATUS=serving on …` once `ServerHandle::start` has returned: every
//!   shard has recovered its partitions and listens,
//! - `WATCHDOG=1` every half `$WATCHDOG_USEC`, but only while every shard's loop answers
//!   a ping (the same ping as `/health/live`, `metrics::http::Endpoint::ask_shards`): a
//!   stalled shard stops the pings, and systemd restarts the broker after `WatchdogSec`,
//! - `STOPPING=1` when SIGTERM or SIGINT arrives, before the partitions are flushed.
//!
//! Runs on threads of its own, never on a shard. Without `$NOTIFY_SOCKET` every send is
//! a no-op (and no thread starts); without `$WATCHDOG_USEC` (or with a `$WATCHDOG_PID`
//! that is not this process) the watchdog thread does not start.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::metrics::http::Endpoint;

/// How often the recovery progress is sent while the shards recover.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Whether a service manager listens at all.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Sends `states`; a failure is reported on stderr and otherwise ignored (the broker
/// serves whether or not its supervisor hears it).
pub fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(error = %error, "cannot notify the service manager ($NOTIFY_SOCKET): {error}");
    }
}

/// Start-up progress: partitions recovered so far over every shard, and how many the
/// catalog holds (unknown until the data directory has been read).
#[derive(Default)]
pub struct RecoveryProgress {
    pub recovered: AtomicU32,
    pub total: OnceLock<u32>,
}

impl RecoveryProgress {
    pub fn status(&self) -> String {
        let recovered = self.recovered.load(Ordering::Relaxed);
        match self.total.get() {
            // A topic created on a shard that already serves while its siblings still
            // recover can push the count past the catalog read at start.
            Some(&total) => format!("recovering partitions: {} of {total}", recovered.min(total)),
            None => format!("recovering partitions: {recovered} so far"),
        }
    }
}

/// A thread that runs `tick` every `interval` until it is stopped; `stop` (or dropping
/// it) wakes the thread at once and waits for it.
pub struct Ticker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn spawn(name: &str, interval: Duration, mut tick: impl FnMut() + Send + 'static) -> Ticker {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || loop {
                let started = Instant::now();
                tick();
                // A tick can take a while (the watchdog waits for every shard's answer):
                // the next one starts `interval` after this one started.
                let left = interval.saturating_sub(started.elapsed());
                match stopped.recv_timeout(left) {
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    // Stopped, or the ticker was dropped.
                    _ => return,
                }
            });
        match thread {
            Ok(thread) => Ticker {
                stop: Some(stop),
                thread: Some(thread),
            },
            Err(error) => {
                tracing::error!(thread = name, error = %error, "cannot start the {name} thread: {error}");
                Ticker {
                    stop: None,
                    thread: None,
                }
            }
        }
    }

    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Sends the recovery progress every second until stopped (only with `$NOTIFY_SOCKET`).
pub fn report_progress(progress: Arc<RecoveryProgress>) -> Option<Ticker> {
    if !enabled() {
        return None;
    }
    Some(Ticker::spawn(
        "shardq-notify",
        PROGRESS_INTERVAL,
        move || send(&[NotifyState::Status(&progress.status())]),
    ))
}

/// The watchdog interval systemd asked for, if it asked this process.
pub fn watchdog_interval() -> Option<Duration> {
    if !enabled() {
        return None;
    }
    sd_notify::watchdog_enabled().filter(|interval| !interval.is_zero())
}

/// Pings the watchdog every half `interval` while every shard answers. A shard that does
/// not answer within `metrics_shard_answer_timeout_ms` withholds the ping, and says so
/// once per stall.
/// `serving` is the status line to show again once a stall is over.
pub fn watchdog(endpoint: Arc<Endpoint>, interval: Duration, serving: String) -> Ticker {
    let mut stalled: Vec<u16> = Vec::new();
    Ticker::spawn("shardq-watchdog", interval / 2, move || {
        let silent = endpoint.ask_shards(false);
        if silent.is_empty() {
            if stalled.is_empty() {
                send(&[NotifyState::Watchdog]);
            } else {
                tracing::info!("every shard answers again; watchdog pings resume");
                stalled.clear();
                send(&[NotifyState::Watchdog, NotifyState::Status(&serving)]);
            }
        } else if silent != stalled {
            tracing::error!(
                shards = ?silent,
                "shards {silent:?} did not answer a ping (metrics_shard_answer_timeout_ms); withholding the systemd watchdog ping"
            );
            send(&[NotifyState::Status(&format!(
                "shards {silent:?} not answering; watchdog pings withheld"
            ))]);
            stalled = silent;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_status_before_and_after_the_catalog_is_read() {
        let progress = RecoveryProgress::default();
        progress.recovered.store(3, Ordering::Relaxed);
        assert_eq!(progress.status(), "recovering partitions: 3 so far");
        progress.total.set(8).unwrap();
        assert_eq!(progress.status(), "recovering partitions: 3 of 8");
        progress.recovered.store(9, Ordering::Relaxed);
        assert_eq!(progress.status(), "recovering partitions: 8 of 8");
    }
}
