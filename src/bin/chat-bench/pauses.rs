//! `pauses`: whether this machine stops running its CPUs now and then,
//! with no server at all.
//!
//! A latency figure's tail can be the machine's rather than the service's:
//! a host that does not run a vCPU for a while (with or without reporting
//! it as steal time), or a guest kernel that runs with interrupts off,
//! stops everything on that CPU. This scenario looks for such pauses: one
//! thread per CPU this process may use, pinned there, sleeps a millisecond
//! at a time and reads the monotonic clock when it wakes; a wake-up at
//! least the threshold late is a pause of that CPU. The threads sleep
//! nearly all the time, so the probe can run beside a benchmark; under
//! `chrt -f 1` (real-time priority: its wake-up preempts whatever runs)
//! other work on the CPU cannot delay it, so what it reports is the
//! machine's, while at normal priority a busy CPU's other threads can
//! delay it by about a scheduler slice (docs/benchmarks.md, twenty-eighth
//! VM). It does not see everything a busy thread suffers: a sleeper is let
//! in as soon as it wakes, so a heavier-weighted process that holds up a
//! busy server can pass unseen; a phase's `cpu.others` names such a
//! process ([`crate::processes`]; twenty-ninth VM).

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::{
    cores::{allowed_cpus, pin},
    tenths,
};

#[derive(Debug, clap::Args)]
pub struct PausesArgs {
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// A wake-up at least this late counts as a pause.
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration)]
    threshold: Duration,
}

/// Events listed one by one in a report: a CPU's pauses, or the `flushes`
/// scenario's stalls (the counts and totals cover them all).
const LISTED: usize = 100;

/// What one CPU's thread saw.
#[derive(Debug)]
struct Pauses {
    /// How long it watched.
    watched: Duration,
    /// Each pause: when it began (from the start) and how long it was.
    pauses: Vec<(Duration, Duration)>,
}

/// How long each watcher sleeps between two reads of the clock.
const PERIOD: Duration = Duration::from_millis(1);

/// Sleeps (`sleep`) a `PERIOD` at a time until `clock` reaches `until`,
/// and returns every wake-up at least `threshold` later than it should
/// have been, with how late.
fn watch(
    until: Instant,
    threshold: Duration,
    mut clock: impl FnMut() -> Instant,
    mut sleep: impl FnMut(Duration),
) -> Pauses {
    let started = clock();
    let mut last = started;
    let mut pauses = Vec::new();
    while last < until {
        sleep(PERIOD);
        let now = clock();
        let late = now.saturating_duration_since(last).saturating_sub(PERIOD);
        if late >= threshold {
            pauses.push((last - started, late));
        }
        last = now;
    }
    Pauses {
        watched: last - started,
        pauses,
    }
}

/// `d` in ms to a tenth, for reports.
pub fn ms(d: Duration) -> f64 {
    tenths(d.as_secs_f64() * 1e3)
}

/// The first [`LISTED`] of `events` (when each began, how long it lasted)
/// for a report: `[seconds, ms]` each.
pub fn listed(events: &[(Duration, Duration)]) -> Vec<Value> {
    events
        .iter()
        .take(LISTED)
        .map(|(at, took)| json!([seconds(*at), ms(*took)]))
        .collect()
}

/// `d` in seconds to a ms, for reports.
pub fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e3).round() / 1e3
}

impl Pauses {
    fn report(&self, cpu: usize) -> Value {
        let paused: Duration = self.pauses.iter().map(|(_, gap)| *gap).sum();
        let longest = self.pauses.iter().map(|(_, gap)| *gap).max();
        // The typical time from one pause to the next: a host that stops
        // the vCPU on a schedule shows a steady one.
        let mut between: Vec<Duration> = self
            .pauses
            .windows(2)
            .map(|pair| pair[1].0 - pair[0].0)
            .collect();
        between.sort_unstable();
        json!({
            "cpu": cpu,
            "watched_seconds": self.watched.as_secs_f64(),
            "pauses": self.pauses.len(),
            "paused_ms": ms(paused),
            "paused_percent": tenths(100.0 * paused.as_secs_f64() / self.watched.as_secs_f64().max(1e-9)),
            "longest_ms": longest.map(ms),
            "median_seconds_between": between.get(between.len() / 2).copied().map(seconds),
            "listed": listed(&self.pauses),
        })
    }
}

pub fn run(args: PausesArgs) -> anyhow::Result<Value> {
    let cpus = allowed_cpus();
    anyhow::ensure!(
        !cpus.is_empty(),
        "this process may run on no CPU it can name"
    );
    let until = Instant::now() + args.duration;
    let threshold = args.threshold;
    let watchers: Vec<_> = cpus
        .iter()
        .map(|&cpu| {
            std::thread::spawn(move || -> anyhow::Result<Pauses> {
                pin(cpu)?;
                Ok(watch(until, threshold, Instant::now, std::thread::sleep))
            })
        })
        .collect();
    let mut per_cpu = Vec::with_capacity(cpus.len());
    for (cpu, watcher) in cpus.iter().zip(watchers) {
        let pauses = watcher
            .join()
            .map_err(|_| anyhow::anyhow!("the watcher of CPU {cpu} panicked"))?
            .with_context(|| format!("watching CPU {cpu}"))?;
        per_cpu.push(pauses.report(*cpu));
    }
    Ok(json!({
        "scenario": "pauses",
        "duration_seconds": args.duration.as_secs_f64(),
        "threshold_ms": ms(threshold),
        "cpus": per_cpu,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that a sleep advances by what it was asked, and by `late`
    /// more at the sleeps listed in `late` (counted from 0).
    struct Fake {
        now: Instant,
        sleeps: usize,
        late: Vec<(usize, Duration)>,
    }

    impl Fake {
        fn watch(start: Instant, until: Duration, late: &[(usize, Duration)]) -> Pauses {
            let fake = std::cell::RefCell::new(Fake {
                now: start,
                sleeps: 0,
                late: late.to_vec(),
            });
            watch(
                start + until,
                Duration::from_millis(2),
                || fake.borrow().now,
                |asked| {
                    let mut fake = fake.borrow_mut();
                    let extra = fake
                        .late
                        .iter()
                        .find(|(at, _)| *at == fake.sleeps)
                        .map_or(Duration::ZERO, |(_, late)| *late);
                    fake.sleeps += 1;
                    fake.now += asked + extra;
                },
            )
        }
    }

    #[test]
    fn wake_ups_at_or_over_the_threshold_late_are_pauses() {
        let start = Instant::now();
        let late = [
            (10, Duration::from_millis(25)),
            // Just under the threshold: not a pause.
            (20, Duration::from_micros(1999)),
            (30, Duration::from_millis(2)),
        ];
        let seen = Fake::watch(start, Duration::from_millis(100), &late);
        // Sleep 10 starts 10 ms in; sleep 30 starts 30 ms and the two
        // late wake-ups before it in.
        assert_eq!(
            seen.pauses,
            [
                (Duration::from_millis(10), Duration::from_millis(25)),
                (
                    Duration::from_micros(30_000 + 25_000 + 1_999),
                    Duration::from_millis(2)
                ),
            ]
        );
        assert!(seen.watched >= Duration::from_millis(100));
        let report = seen.report(3);
        assert_eq!(report["cpu"], 3);
        assert_eq!(report["pauses"], 2);
        assert_eq!(report["paused_ms"], 27.0);
        assert_eq!(report["longest_ms"], 25.0);
        assert_eq!(report["median_seconds_between"], 0.047);
        assert_eq!(report["listed"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_machine_that_never_pauses_reports_none() {
        let seen = Fake::watch(Instant::now(), Duration::from_millis(5), &[]);
        assert!(seen.pauses.is_empty());
        let report = seen.report(0);
        assert_eq!(report["pauses"], 0);
        assert_eq!(report["longest_ms"], Value::Null);
        assert_eq!(report["median_seconds_between"], Value::Null);
    }
}
