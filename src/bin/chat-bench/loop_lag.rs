//! How late the generator's own event loop runs during a measured phase.
//!
//! Every latency the generator reports is stamped by its one event loop:
//! an ack or a delivery read late is measured late. A task asks to wake
//! every [`PERIOD`] and records by how much each wake-up came late; when
//! that lag is near the latencies' tail, the tail was the generator's.
//! Tokio's timer rounds up to the millisecond, so up to 1 ms of every
//! figure is the timer's.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::ms;
use tokio::{sync::watch, task::JoinHandle, time::Instant};

/// How often the probe asks to wake.
const PERIOD: Duration = Duration::from_millis(10);

/// A running probe; [`LoopLag::finish`] stops it and reports.
pub struct LoopLag {
    stop: watch::Sender<bool>,
    task: JoinHandle<Histogram<u64>>,
}

impl LoopLag {
    pub fn start() -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            // Microseconds, up to a minute (a longer stall counts as one).
            let mut lag = crate::latency_histogram();
            let mut due = Instant::now() + PERIOD;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {
                        let now = Instant::now();
                        lag.saturating_record(now.saturating_duration_since(due).as_micros() as u64);
                        // After a long stall, one late wake-up is one
                        // sample, not a burst of catch-up ones.
                        due = (due + PERIOD).max(now);
                    }
                    _ = stopped.changed() => break,
                }
            }
            lag
        });
        Self { stop, task }
    }

    /// Stops the probe: the lag's p50, p99 and max (ms) and its samples.
    pub async fn finish(self) -> Value {
        let _ = self.stop.send(true);
        let Ok(lag) = self.task.await else {
            return Value::Null;
        };
        json!({
            "period_ms": PERIOD.as_millis() as u64,
            "samples": lag.len(),
            "p50_ms": ms(lag.value_at_quantile(0.5)),
            "p99_ms": ms(lag.value_at_quantile(0.99)),
            "max_ms": ms(lag.max()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop blocked for 80 ms shows it: one wake-up about that late.
    #[tokio::test(flavor = "current_thread")]
    async fn a_blocked_loop_shows_as_lag() {
        let probe = LoopLag::start();
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::thread::sleep(Duration::from_millis(80));
        tokio::time::sleep(Duration::from_millis(30)).await;
        let report = probe.finish().await;
        let max = report["max_ms"].as_f64().unwrap();
        assert!((60.0..1000.0).contains(&max), "{report}");
        assert!(report["p50_ms"].as_f64().unwrap() < max, "{report}");
        assert!(report["samples"].as_u64().unwrap() >= 3, "{report}");
    }
}
