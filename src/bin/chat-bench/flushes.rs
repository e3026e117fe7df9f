//! `flushes`: how long this machine's disk takes to make a small write
//! durable, with no server at all.
//!
//! Every acknowledged message waits for its transaction's commit, and a
//! commit waits for the database to flush its log to the disk. A disk that
//! now and then takes tens of milliseconds over a flush holds every commit
//! in flight for that long, whatever the service does: a latency tail the
//! machine made. This scenario writes 8 KiB (a log page) to a file in
//! `--dir` and flushes it (`fdatasync`, as PostgreSQL's default
//! `wal_sync_method` does), over and over, one at a time, and reports how
//! long the flushes took and when the slow ones came. Point `--dir` at the
//! file system the database writes its log to; the file is removed at the
//! end.

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::{Value, json};

use crate::pauses::{listed, ms, seconds};

#[derive(Debug, clap::Args)]
pub struct FlushesArgs {
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// A flush that takes at least this long counts as a stall.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    threshold: Duration,
    /// Where the flushed file is made (and removed).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// A pause after each flush (0: back to back). With `10ms` the probe
    /// is light enough to run beside a benchmark and tell which of its
    /// spells of slow acks the disk made (`started_unix_ms` and `listed`
    /// against the run's `slowest_by_send_time`).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    interval: Duration,
}

/// Bytes written before each flush: one page of PostgreSQL's log.
const PAGE: usize = 8192;

/// The file's pages, rewritten in turn (as a log segment's are).
const PAGES: u64 = 128;

/// What a run saw.
#[derive(Debug)]
struct Flushes {
    /// How long it ran.
    ran: Duration,
    /// Every flush's time, in µs.
    took_us: Vec<u32>,
    /// Each stall: when it began (from the start) and how long it took.
    stalls: Vec<(Duration, Duration)>,
}

/// Runs `flush` (write and flush one page, the argument numbering it)
/// until `clock` reaches `until`, timing each by `clock`, and `rest`
/// after each; a flush that took at least `threshold` is a stall.
fn time_flushes(
    until: Instant,
    threshold: Duration,
    mut clock: impl FnMut() -> Instant,
    mut flush: impl FnMut(u64) -> io::Result<()>,
    mut rest: impl FnMut(),
) -> io::Result<Flushes> {
    let started = clock();
    let mut now = started;
    let mut took_us = Vec::new();
    let mut stalls = Vec::new();
    let mut page = 0;
    while now < until {
        flush(page)?;
        page += 1;
        let done = clock();
        let took = done.saturating_duration_since(now);
        took_us.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
        if took >= threshold {
            stalls.push((now - started, took));
        }
        rest();
        now = clock();
    }
    Ok(Flushes {
        ran: now - started,
        took_us,
        stalls,
    })
}

impl Flushes {
    fn report(mut self, threshold: Duration, started_unix_ms: u64) -> Value {
        self.took_us.sort_unstable();
        let count = self.took_us.len();
        let at = |q: f64| {
            let index = ((count as f64 * q) as usize).min(count.saturating_sub(1));
            self.took_us
                .get(index)
                .map(|&us| ms(Duration::from_micros(us.into())))
        };
        let stalled: Duration = self.stalls.iter().map(|(_, took)| *took).sum();
        json!({
            "scenario": "flushes",
            "threshold_ms": ms(threshold),
            "started_unix_ms": started_unix_ms,
            "ran_seconds": seconds(self.ran),
            "flushes": count,
            "flushes_per_second": (count as f64 / self.ran.as_secs_f64().max(1e-9)).round(),
            "p50_ms": at(0.5),
            "p99_ms": at(0.99),
            "p999_ms": at(0.999),
            "max_ms": at(1.0),
            "stalls": self.stalls.len(),
            "stalled_ms": ms(stalled),
            "listed": listed(&self.stalls),
        })
    }
}

/// The file being flushed, removed however the run ends.
struct Scratch {
    path: PathBuf,
    file: File,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn run(args: FlushesArgs) -> anyhow::Result<Value> {
    let path = args
        .dir
        .join(format!(".chat-bench-flushes-{}", std::process::id()));
    let file =
        File::create_new(&path).with_context(|| format!("making {} to flush", path.display()))?;
    let scratch = Scratch { path, file };
    let page = [0x5a_u8; PAGE];
    let started_unix_ms = crate::unix_micros() / 1000;
    let until = Instant::now() + args.duration;
    let flushes = time_flushes(
        until,
        args.threshold,
        Instant::now,
        |n| {
            scratch
                .file
                .write_all_at(&page, (n % PAGES) * PAGE as u64)?;
            scratch.file.sync_data()
        },
        || {
            if !args.interval.is_zero() {
                std::thread::sleep(args.interval);
            }
        },
    )
    .with_context(|| format!("writing and flushing {}", scratch.path.display()))?;
    Ok(flushes.report(args.threshold, started_unix_ms))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// Flushes that take `took(n)` each, with `rest` after each, on a
    /// clock only they advance.
    fn timed(until: Duration, rest: Duration, took: impl Fn(u64) -> Duration) -> Flushes {
        let start = Instant::now();
        let now = Cell::new(start);
        time_flushes(
            start + until,
            Duration::from_millis(5),
            || now.get(),
            |n| {
                now.set(now.get() + took(n));
                Ok(())
            },
            || now.set(now.get() + rest),
        )
        .expect("no flush fails")
    }

    #[test]
    fn flushes_at_or_over_the_threshold_are_stalls_listed_by_their_start() {
        let flushes = timed(Duration::from_millis(100), Duration::ZERO, |n| match n {
            3 => Duration::from_millis(40),
            // Just under the threshold: not a stall.
            5 => Duration::from_micros(4999),
            7 => Duration::from_millis(5),
            _ => Duration::from_millis(1),
        });
        assert_eq!(
            flushes.stalls,
            [
                (Duration::from_millis(3), Duration::from_millis(40)),
                (Duration::from_micros(49_999), Duration::from_millis(5)),
            ]
        );
        let report = flushes.report(Duration::from_millis(5), 1_000);
        assert_eq!(report["started_unix_ms"], 1_000);
        assert_eq!(report["stalls"], 2);
        assert_eq!(report["stalled_ms"], 45.0);
        assert_eq!(report["max_ms"], 40.0);
        assert_eq!(report["p50_ms"], 1.0);
        assert_eq!(report["listed"], json!([[0.003, 40.0], [0.05, 5.0]]));
    }

    /// The rest between flushes is neither a flush's time nor a stall,
    /// and stalls keep their place on the run's clock.
    #[test]
    fn the_rest_between_flushes_is_not_timed() {
        let flushes = timed(Duration::from_millis(100), Duration::from_millis(9), |n| {
            if n == 2 {
                Duration::from_millis(20)
            } else {
                Duration::from_millis(1)
            }
        });
        // Flushes start at 0, 10, 20, then 49 (after the 20 ms one), 59,
        // ... 99: nine before the run's 100 ms are up.
        assert_eq!(flushes.took_us.len(), 9);
        assert_eq!(
            flushes.stalls,
            [(Duration::from_millis(20), Duration::from_millis(20))]
        );
    }

    #[test]
    fn a_failed_flush_fails_the_run() {
        let start = Instant::now();
        let failed = time_flushes(
            start + Duration::from_secs(1),
            Duration::from_millis(5),
            || start,
            |_| Err(io::Error::other("disk full")),
            || {},
        );
        assert_eq!(failed.unwrap_err().to_string(), "disk full");
    }
}
