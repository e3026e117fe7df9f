//! The servers' own account of a measured phase: their latency histograms,
//! read from each pod's `/metrics` at the phase's start and end and
//! subtracted.
//!
//! What the generator measures includes every queue between it and the
//! service's code: both ends' sockets, both cores' run queues, its own event
//! loop. A pod times a send from the moment it has the frame to the moment
//! it answers, and its steps on the way (the rate limit check, the append),
//! and how late its runtime got to tasks that were ready (the loop lag).
//! Side by side, the two tell a tail made inside the service from one made
//! by a saturated machine.
//!
//! The histograms' buckets (`telemetry::LATENCY_BUCKETS`) include 5, 20 and
//! 50 ms, so the shares within those bounds are exact; quantiles are given
//! as the bucket bound they fall under.

use serde_json::{Value, json};

/// One histogram compared: its name in the report, the metric, and the
/// label a sample must carry (every sample of the metric when `None`).
struct Series {
    name: &'static str,
    metric: &'static str,
    label: Option<(&'static str, &'static str)>,
}

const SERIES: &[Series] = &[
    Series {
        name: "send_to_ack",
        metric: "chat_send_ack_seconds",
        label: None,
    },
    Series {
        name: "rate_limit_check",
        metric: "chat_rate_limit_check_seconds",
        label: Some(("kind", "send")),
    },
    Series {
        name: "append",
        metric: "chat_db_query_seconds",
        label: Some(("op", "append")),
    },
    Series {
        name: "send_to_delivery",
        metric: "chat_send_delivery_seconds",
        label: None,
    },
    Series {
        name: "loop_lag",
        metric: "chat_runtime_loop_lag_seconds",
        label: None,
    },
];

/// The fan-out's writes, by path (`path` label of both counters): the
/// hub's to idle connections, and the sessions' of what was queued.
const WRITE_PATHS: [&str; 2] = ["direct", "session"];

/// Bounds whose share is reported (they are bucket bounds), in ms.
const WITHIN_MS: [u32; 3] = [5, 20, 50];

/// One histogram summed over pods and label sets: cumulative bucket counts
/// by upper bound (seconds), and the total of the observations.
#[derive(Debug, Clone, Default, PartialEq)]
struct Histogram {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Histogram {
    fn add_bucket(&mut self, le: f64, count: f64) {
        match self.buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, total)) => *total += count,
            None => {
                self.buckets.push((le, count));
                self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
        }
    }

    /// What was observed after `before` (a reading of the same counters).
    fn since(&self, before: &Self) -> Self {
        let earlier = |le: f64| {
            before
                .buckets
                .iter()
                .find(|(bound, _)| *bound == le)
                .map_or(0.0, |(_, count)| *count)
        };
        Self {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, count)| (le, count - earlier(le)))
                .collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    /// The smallest bucket bound at or under which `quantile` of the
    /// observations fall, in ms.
    fn at_most_ms(&self, quantile: f64) -> Option<f64> {
        let rank = quantile * self.count;
        self.buckets
            .iter()
            .find(|(_, count)| *count >= rank)
            .map(|(le, _)| le * 1000.0)
    }

    fn report(&self) -> Value {
        if self.count < 1.0 {
            return json!({"count": 0});
        }
        let mut out = json!({
            "count": self.count.round() as u64,
            "mean_ms": crate::tenths(self.sum / self.count * 1e3),
            "p50_at_most_ms": self.at_most_ms(0.5),
            "p99_at_most_ms": self.at_most_ms(0.99),
        });
        for ms in WITHIN_MS {
            let share = self
                .buckets
                .iter()
                .find(|(le, _)| (le * 1000.0 - f64::from(ms)).abs() < 1e-9)
                .map(|(_, count)| (count / self.count * 1e4).round() / 1e4);
            out[format!("within_{ms}_ms")] = json!(share);
        }
        out
    }
}

/// The series of [`SERIES`] as read from some pods at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    series: Vec<Histogram>,
    /// Per path of [`WRITE_PATHS`]: the fan-out's writes and the frames
    /// they carried (in that order), summed over pods.
    writes: [[f64; 2]; WRITE_PATHS.len()],
    /// Pods whose `/metrics` could not be read.
    unread: usize,
}

impl Reading {
    /// Reads every pod's `/metrics`. A pod that does not answer is counted
    /// as unread, not an error: the run's own figures stand without it.
    pub async fn take(http: &reqwest::Client, urls: &[String]) -> Self {
        let mut reading = Self::empty();
        for url in urls {
            let text = async {
                http.get(format!("{url}/metrics"))
                    .send()
                    .await?
                    .error_for_status()?
                    .text()
                    .await
            };
            match text.await {
                Ok(text) => reading.add(&text),
                Err(_) => reading.unread += 1,
            }
        }
        reading
    }

    fn empty() -> Self {
        Self {
            series: vec![Histogram::default(); SERIES.len()],
            writes: Default::default(),
            unread: 0,
        }
    }

    /// Adds one pod's exposition (Prometheus text format) to the sums. The
    /// few lines wanted are read here: the `prometheus-parse` crate the
    /// tests use drops a labelled histogram's `_sum`.
    fn add(&mut self, text: &str) {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let label = |key: &str| {
                labels.split(',').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    (k == key).then(|| v.trim_matches('"'))
                })
            };
            let column = match name {
                "chat_fanout_writes_total" => Some(0),
                "chat_fanout_written_frames_total" => Some(1),
                _ => None,
            };
            if let Some(column) = column {
                if let Some(path) = WRITE_PATHS.iter().position(|p| label("path") == Some(p)) {
                    self.writes[path][column] += value;
                }
                continue;
            }
            for (i, series) in SERIES.iter().enumerate() {
                let Some(part) = name.strip_prefix(series.metric) else {
                    continue;
                };
                if series
                    .label
                    .is_some_and(|(key, value)| label(key) != Some(value))
                {
                    continue;
                }
                let histogram = &mut self.series[i];
                match part {
                    "_bucket" => {
                        let le = match label("le") {
                            Some("+Inf") => f64::INFINITY,
                            Some(bound) => match bound.parse() {
                                Ok(bound) => bound,
                                Err(_) => continue,
                            },
                            None => continue,
                        };
                        histogram.add_bucket(le, value);
                    }
                    "_sum" => histogram.sum += value,
                    "_count" => histogram.count += value,
                    _ => {}
                }
            }
        }
    }

    /// What the pods observed between `before` and this reading. Only
    /// when every pod was read both times: the difference of two sums over
    /// different pods would be nobody's.
    pub fn since(&self, before: &Self) -> Value {
        let unread = self.unread.max(before.unread);
        let mut out = json!({ "pods_unread": unread });
        for (series, (now, then)) in SERIES.iter().zip(self.series.iter().zip(&before.series)) {
            out[series.name] = if unread == 0 {
                now.since(then).report()
            } else {
                Value::Null
            };
        }
        out["fanout_writes"] = if unread == 0 {
            let mut paths = json!({});
            for (path, (now, then)) in WRITE_PATHS
                .iter()
                .zip(self.writes.iter().zip(&before.writes))
            {
                let (writes, frames) = (now[0] - then[0], now[1] - then[1]);
                paths[*path] = json!({
                    "writes": writes.round() as u64,
                    "frames": frames.round() as u64,
                    "frames_per_write": (writes >= 1.0).then(|| (frames / writes * 100.0).round() / 100.0),
                });
            }
            paths
        } else {
            Value::Null
        };
        out
    }
}

/// One line for the readable summary.
pub fn summary(view: &Value) -> String {
    if view["pods_unread"].as_u64() != Some(0) {
        return format!(
            "the servers' own time: not reported, {} pod(s) did not answer /metrics",
            view["pods_unread"]
        );
    }
    let part = |name: &str, label: &str| {
        let series = &view[name];
        match series["mean_ms"].as_f64() {
            Some(mean) => format!(
                "{label} mean {mean:.1} ms (p50 ≤ {}, p99 ≤ {} ms)",
                series["p50_at_most_ms"], series["p99_at_most_ms"]
            ),
            None => format!("{label}: none"),
        }
    };
    let writes = |path: &str| {
        let path_writes = &view["fanout_writes"][path];
        match path_writes["frames_per_write"].as_f64() {
            Some(each) => format!("{path} {} ({each:.2} frames each)", path_writes["writes"]),
            None => format!("{path} none"),
        }
    };
    format!(
        "the servers' own time (their /metrics over the phase): {}; {}; {}; {}; fan-out writes: {}, {}",
        part("send_to_ack", "send→ack"),
        part("rate_limit_check", "rate limit check"),
        part("append", "append"),
        part("loop_lag", "runtime lag"),
        writes("direct"),
        writes("session"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two pods' expositions, as `metrics-exporter-prometheus` writes them.
    fn exposition(ack_fast: u32, ack_slow: u32, sum: f64) -> String {
        let fast = f64::from(ack_fast);
        let all = f64::from(ack_fast + ack_slow);
        format!(
            "# TYPE chat_send_ack_seconds histogram\n\
             chat_send_ack_seconds_bucket{{transport=\"ws\",le=\"0.005\"}} {fast}\n\
             chat_send_ack_seconds_bucket{{transport=\"ws\",le=\"0.02\"}} {fast}\n\
             chat_send_ack_seconds_bucket{{transport=\"ws\",le=\"0.05\"}} {all}\n\
             chat_send_ack_seconds_bucket{{transport=\"ws\",le=\"+Inf\"}} {all}\n\
             chat_send_ack_seconds_sum{{transport=\"ws\"}} {sum}\n\
             chat_send_ack_seconds_count{{transport=\"ws\"}} {all}\n\
             chat_db_query_seconds_bucket{{op=\"history\",le=\"0.005\"}} 7\n\
             chat_db_query_seconds_sum{{op=\"history\"}} 0.01\n\
             chat_db_query_seconds_count{{op=\"history\"}} 7\n\
             chat_fanout_writes_total{{path=\"direct\"}} {all}\n\
             chat_fanout_written_frames_total{{path=\"direct\"}} {all}\n\
             chat_fanout_writes_total{{path=\"session\"}} {fast}\n\
             chat_fanout_written_frames_total{{path=\"session\"}} {frames}\n",
            frames = 3 * ack_fast,
        )
    }

    #[test]
    fn a_phase_is_what_the_pods_counted_between_two_readings() {
        let mut before = Reading::empty();
        before.add(&exposition(10, 0, 0.02));
        before.add(&exposition(5, 0, 0.01));
        let mut after = Reading::empty();
        // Since then: pod one answered 90 more within 5 ms and 10 within
        // 50 ms, pod two none.
        after.add(&exposition(100, 10, 0.02 + 0.09 + 0.3));
        after.add(&exposition(5, 0, 0.01));

        let view = after.since(&before);
        let ack = &view["send_to_ack"];
        assert_eq!(ack["count"], 100);
        assert_eq!(ack["mean_ms"], 3.9);
        assert_eq!(ack["within_5_ms"], 0.9);
        assert_eq!(ack["within_20_ms"], 0.9);
        assert_eq!(ack["within_50_ms"], 1.0);
        assert_eq!(ack["p50_at_most_ms"], 5.0);
        assert_eq!(ack["p99_at_most_ms"], 50.0);
        // Another operation of the same histogram is not an append.
        assert_eq!(view["append"], json!({"count": 0}));
        assert_eq!(view["pods_unread"], 0);
        assert!(summary(&view).contains("send→ack mean 3.9 ms (p50 ≤ 5.0, p99 ≤ 50.0 ms)"));
        // The fan-out's writes, by path: pod one wrote 100 more directly, one
        // frame each, and its sessions 90 more, three frames each.
        assert_eq!(
            view["fanout_writes"],
            json!({
                "direct": {"writes": 100, "frames": 100, "frames_per_write": 1.0},
                "session": {"writes": 90, "frames": 270, "frames_per_write": 3.0},
            })
        );
        assert!(summary(&view).contains(
            "fan-out writes: direct 100 (1.00 frames each), session 90 (3.00 frames each)"
        ));
    }

    #[tokio::test]
    async fn a_pod_that_does_not_answer_is_counted_not_fatal() {
        let reading = Reading::take(&reqwest::Client::new(), &["http://127.0.0.1:9".into()]).await;
        assert_eq!(reading.unread, 1);
        let view = reading.since(&reading);
        assert_eq!(view["send_to_ack"], Value::Null);
        assert!(summary(&view).contains("1 pod(s) did not answer"));
    }
}
