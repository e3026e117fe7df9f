//! How late the generator's own event loop runs during a measured phase.
//!
//! Every latency the generator reports is stamped by its one event loop:
//! an ack or a delivery read late is measured late. A task asks to wake
//! every [`PERIOD`] and records by how much each wake-up came late
//! (`telemetry::probe_lateness`, which the pods' runtime lag uses too);
//! when that lag is near the latencies' tail, the tail was the generator's.
//! Up to 1 ms of every figure is the timer's.

use std::time::Duration;

use chat_service::telemetry::probe_lateness;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle};

use crate::ms;

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
            let stop = async {
                let _ = stopped.changed().await;
            };
            probe_lateness(PERIOD, stop, |late| {
                lag.saturating_record(late.as_micros() as u64);
            })
            .await;
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
