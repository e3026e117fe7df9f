//! `--generators N`: one run in several generator processes, for a load
//! one process cannot offer or read alone.
//!
//! This process starts N copies of itself, each with `--shard i/N`. In a
//! `fanout`, shard `i` takes the rooms whose index is `i` modulo N, their
//! members, and the senders whose room it took, at their share of the
//! rate: the shards' rooms are disjoint, so each counts its own
//! deliveries. In an `ingest` it takes the connections and REST workers
//! whose index is `i` modulo N. Each sets up on its own and then reports
//! ready (a line on its stdout); once all are, this process hands them one
//! start time (a line on their stdin), so their measured phases coincide.
//! Each then prints its report, carrying what the merge needs as well
//! (`shard`: a fan-out's histograms and delivery span, an ingest's
//! duration), and this process merges them into one report: counts added
//! up, latency percentiles from the merged histograms, rates over the
//! union of the phases, the generator's CPU summed over the processes
//! (`generator.processes`). The servers' CPU, the cores' and the servers'
//! own view are each shard's reading of the same servers over the same
//! phase: the first shard's is reported. Where this process may run on at
//! least N CPUs, shard `i` is pinned to the `i`-th of them
//! (`generator.cpus`); otherwise they share this process's.

use std::{process::Stdio, time::Duration};

use anyhow::Context;
use hdrhistogram::Histogram;
use nix::{
    sched::{CpuSet, sched_setaffinity},
    unistd::Pid,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::{
    DeliverySpan, FanoutArgs, cores::allowed_cpus, latency_histogram, percentiles, tenths,
    unix_micros,
};

/// How long after the last shard reported ready the phases start: time for
/// each to read its start line.
const START_AFTER: Duration = Duration::from_millis(200);

/// One share of a `--generators` run: `index` of `of`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub of: usize,
}

impl Shard {
    /// A run in one process: everything is its.
    pub const WHOLE: Self = Self { index: 0, of: 1 };

    /// Whether the run's `n`-th room (`fanout`), or connection or REST
    /// worker (`ingest`), is this shard's.
    pub fn owns(self, n: usize) -> bool {
        n % self.of == self.index
    }
}

/// `--shard`'s `i/N`.
pub fn parse_shard(text: &str) -> Result<Shard, String> {
    let (index, of) = text
        .split_once('/')
        .ok_or_else(|| format!("expected i/N, got {text:?}"))?;
    let parse = |n: &str| n.parse::<usize>().map_err(|e| format!("{n:?}: {e}"));
    let shard = Shard {
        index: parse(index)?,
        of: parse(of)?,
    };
    if shard.index >= shard.of {
        return Err(format!(
            "shard {} of {} does not exist",
            shard.index, shard.of
        ));
    }
    Ok(shard)
}

/// The senders (their indexes) of `shard`: those whose room it owns.
/// Sender `s` sends to room `s % rooms`.
pub fn senders_of(shard: Shard, rooms: usize, senders: usize) -> Vec<usize> {
    (0..senders.max(1))
        .filter(|s| shard.owns(s % rooms.max(1)))
        .collect()
}

/// Refuses a split that leaves a shard without rooms or senders, or a
/// `fanout` option the merge cannot honour.
pub fn check_fanout_split(args: &FanoutArgs, generators: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.find_max,
        "--find-max decides each step from one process's results; run it with one generator"
    );
    anyhow::ensure!(
        args.rooms >= generators,
        "--generators {generators} needs at least as many rooms (--rooms {})",
        args.rooms
    );
    for index in 0..generators {
        let shard = Shard {
            index,
            of: generators,
        };
        anyhow::ensure!(
            !senders_of(shard, args.rooms, args.senders).is_empty(),
            "with --senders {} over --rooms {}, generator {index} of {generators} has no sender; give each generator's rooms a sender",
            args.senders,
            args.rooms
        );
    }
    Ok(())
}

/// Refuses an `ingest` split that leaves a process with nothing to send.
pub fn check_ingest_split(
    connections: usize,
    rest_workers: usize,
    generators: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        connections.max(rest_workers) >= generators,
        "--generators {generators} needs at least as many connections or REST workers (--connections {connections}, --rest-workers {rest_workers})"
    );
    Ok(())
}

/// Announces this shard ready and waits for the start time its parent
/// hands out; returns once that time has come.
pub async fn ready_then_wait(shard: Shard) -> anyhow::Result<()> {
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(format!("{}\n", json!({"shard_ready": shard.index})).as_bytes())
        .await?;
    stdout.flush().await?;
    let mut line = String::new();
    BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await?;
    let start_us: u64 = line
        .trim()
        .parse()
        .with_context(|| format!("a start time from the parent, got {line:?}"))?;
    let wait = Duration::from_micros(start_us.saturating_sub(unix_micros()));
    tokio::time::sleep(wait).await;
    Ok(())
}

/// A histogram as `[[value, count], …]` over its recorded values: what
/// [`histogram_from_json`] rebuilds.
pub fn histogram_to_json(h: &Histogram<u64>) -> Value {
    h.iter_recorded()
        .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
        .collect()
}

fn histogram_from_json(pairs: &Value, into: &mut Histogram<u64>) -> anyhow::Result<()> {
    for pair in pairs.as_array().context("a histogram is an array")? {
        let (Some(value), Some(count)) = (pair[0].as_u64(), pair[1].as_u64()) else {
            anyhow::bail!("a histogram entry is [value, count], got {pair}");
        };
        into.record_n(value, count)?;
    }
    Ok(())
}

/// Each process's CPU when there is one for each (process `i` on the
/// `i`-th allowed CPU, where it runs the one-thread runtime); otherwise
/// none, and they share the CPUs this process may use.
fn cpu_per_process(allowed: &[usize], generators: usize) -> Option<Vec<usize>> {
    (allowed.len() >= generators).then(|| allowed[..generators].to_vec())
}

/// Runs this program's scenario in `generators` processes and returns
/// their reports merged into one, as a single process would report.
pub async fn run(generators: usize) -> anyhow::Result<Value> {
    let exe = std::env::current_exe().context("this program's path")?;
    let args = child_args(std::env::args().skip(1));
    let cpus = cpu_per_process(&allowed_cpus(), generators);
    let mut children = Vec::new();
    for index in 0..generators {
        let mut command = tokio::process::Command::new(&exe);
        command
            .arg(format!("--shard={index}/{generators}"))
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if let Some(cpu) = cpus.as_ref().map(|cpus| cpus[index]) {
            let mut set = CpuSet::new();
            set.set(cpu)?;
            // SAFETY: between fork and exec the child only makes one system
            // call on a set built before the fork; nothing allocates or locks.
            unsafe {
                command.pre_exec(move || {
                    sched_setaffinity(Pid::from_raw(0), &set).map_err(std::io::Error::from)
                });
            }
        }
        children.push(command.spawn().context("starting a generator process")?);
    }
    let mut lines = Vec::new();
    for (index, child) in children.iter_mut().enumerate() {
        let stdout = child.stdout.take().context("a generator's stdout")?;
        let mut stdout = BufReader::new(stdout).lines();
        let ready = stdout.next_line().await?;
        anyhow::ensure!(
            ready.as_deref().is_some_and(|l| l.contains("shard_ready")),
            "generator {index} ended before its setup was done (its errors are above)"
        );
        lines.push(stdout);
    }
    let start = format!("{}\n", unix_micros() + START_AFTER.as_micros() as u64);
    for child in &mut children {
        let stdin = child.stdin.as_mut().context("a generator's stdin")?;
        stdin.write_all(start.as_bytes()).await?;
        stdin.flush().await?;
    }
    let mut reports = Vec::new();
    for (index, (child, mut stdout)) in children.into_iter().zip(lines).enumerate() {
        let report = stdout.next_line().await?;
        let status = child.wait_with_output().await?.status;
        let report = report.filter(|_| status.success()).with_context(|| {
            format!("generator {index} failed ({status}; its errors are above)")
        })?;
        reports.push(serde_json::from_str(&report).context("a generator's report")?);
    }
    let mut report = merge(&reports)?;
    report["generator"]["cpus"] = json!(cpus);
    Ok(report)
}

/// This program's arguments for a shard: `--generators` (with its value)
/// left out.
fn child_args(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if arg == "--generators" {
            skip_value = true;
        } else if !arg.starts_with("--generators=") {
            out.push(arg);
        }
    }
    out
}

/// The shards' reports as one (see the module's doc).
pub fn merge(reports: &[Value]) -> anyhow::Result<Value> {
    let first = reports.first().context("no generator reported")?;
    let mut report = if first["scenario"] == "ingest" {
        merge_ingest(reports)
    } else {
        merge_fanout(reports)?
    };
    let generators = || reports.iter().map(|r| &r["generator"]);
    report["generator"] = json!({
        "processes": reports.len(),
        "runtime": first["generator"]["runtime"],
        "spin": first["generator"]["spin"],
        "cpu_seconds": sum_f64(generators(), "cpu_seconds"),
        "cpu_percent_of_one_core": sum_f64(generators(), "cpu_percent_of_one_core"),
        "wall_seconds": max_f64(generators(), "wall_seconds"),
    });
    Ok(report)
}

/// `key` of each of `parts`, added up (those without it count as none).
fn sum_u64<'a>(parts: impl Iterator<Item = &'a Value>, key: &str) -> u64 {
    parts.filter_map(|part| part[key].as_u64()).sum()
}

fn sum_f64<'a>(parts: impl Iterator<Item = &'a Value>, key: &str) -> f64 {
    parts.filter_map(|part| part[key].as_f64()).sum()
}

/// The largest `key` of `parts` (0 without any).
fn max_f64<'a>(parts: impl Iterator<Item = &'a Value>, key: &str) -> f64 {
    parts
        .filter_map(|part| part[key].as_f64())
        .fold(0.0, f64::max)
}

/// Sets `cpu`'s generator figures to the sum of the generators' (`cpus`,
/// each report's `cpu`): their CPU over the phase and their wake-ups.
fn add_generators_cpu(cpu: &mut Value, cpus: &[&Value]) {
    let each = || cpus.iter().copied();
    cpu["generator_percent_of_one_core"] =
        json!(tenths(sum_f64(each(), "generator_percent_of_one_core")));
    cpu["generator_wakeups"] = json!(sum_u64(each(), "generator_wakeups"));
    cpu["generator_wakeups_per_second"] =
        json!(tenths(sum_f64(each(), "generator_wakeups_per_second")));
}

/// Ingest: acks added up over the longest of the phases; what an acked
/// message cost the servers and the watched processes is the first
/// shard's reading of them spread over all the acks, the generators' the
/// sum of theirs.
fn merge_ingest(reports: &[Value]) -> Value {
    let first = &reports[0];
    let mut report = first.clone();
    let sum = |key: &str| sum_u64(reports.iter(), key);
    for key in [
        "ws_sent",
        "ws_acked",
        "rest_acked",
        "refused",
        "unanswered",
        "unpaired_answers",
        "connections_stopped",
    ] {
        report[key] = json!(sum(key));
    }
    for key in ["unanswered_sends", "stopped_connections"] {
        let listed: Vec<&Value> = reports
            .iter()
            .filter_map(|r| r[key].as_array())
            .flatten()
            .take(crate::Stopped::LISTED)
            .collect();
        report[key] = json!(listed);
    }
    report["setup_seconds"] = json!(max_f64(reports.iter(), "setup_seconds"));
    let acked = sum("ws_acked") + sum("rest_acked");
    let elapsed = max_f64(reports.iter().map(|r| &r["shard"]), "elapsed_seconds");
    report["acked_per_second"] = json!(if elapsed > 0.0 {
        acked as f64 / elapsed
    } else {
        0.0
    });
    let own_acks =
        |r: &Value| r["ws_acked"].as_u64().unwrap_or(0) + r["rest_acked"].as_u64().unwrap_or(0);
    report["cpu_us_per_acked"] = cpu_per_unit(
        reports
            .iter()
            .map(|r| (&r["cpu_us_per_acked"], own_acks(r))),
        acked,
    );
    let cpus: Vec<&Value> = reports.iter().map(|r| &r["cpu"]).collect();
    add_generators_cpu(&mut report["cpu"], &cpus);
    if let Some(object) = report.as_object_mut() {
        object.remove("shard");
    }
    report
}

/// What a unit of work (an acked message, a delivery) cost each process, from
/// each report's `(per_unit, own units)`, over all `units`: the generators'
/// cost is the sum of every report's share; the servers' and the watched
/// processes' is the first report's reading (each shard reads the same
/// processes over the same phase) spread over all the units.
fn cpu_per_unit<'a>(parts: impl Iterator<Item = (&'a Value, u64)>, units: u64) -> Value {
    let parts: Vec<(&Value, u64)> = parts.collect();
    let Some(names) = parts.first().and_then(|(first, _)| first.as_object()) else {
        return Value::Null;
    };
    let share = |(per_unit, own): &(&Value, u64), name: &str| {
        per_unit[name].as_f64().unwrap_or(0.0) * *own as f64 / units.max(1) as f64
    };
    let merged = names.keys().map(|name| {
        let us = if name == "generator" {
            parts.iter().map(|part| share(part, name)).sum()
        } else {
            share(&parts[0], name)
        };
        (name.clone(), json!(tenths(us)))
    });
    Value::Object(merged.collect())
}

/// Fan-out: see the module's doc.
fn merge_fanout(reports: &[Value]) -> anyhow::Result<Value> {
    let first = &reports[0];
    let results: Vec<&Value> = reports.iter().map(|r| &r["result"]).collect();
    let shard = |key: &'static str| results.iter().map(move |r| &r["shard"][key]);

    let mut result = first["result"].clone();
    for key in [
        "sent",
        "acked",
        "refused",
        "unacked",
        "delivered",
        "expected",
        "loss",
    ] {
        result[key] = json!(sum_u64(results.iter().copied(), key));
    }
    result["target_rate"] = json!(sum_f64(results.iter().copied(), "target_rate"));
    result["elapsed_seconds"] = json!(max_f64(results.iter().copied(), "elapsed_seconds"));
    let first_us = shard("first_delivery_us").filter_map(Value::as_u64).min();
    let last_us = shard("last_delivery_us").filter_map(Value::as_u64).max();
    let ended_us = shard("sends_ended_us").filter_map(Value::as_u64).max();
    let span = DeliverySpan::new(
        first_us.unwrap_or(u64::MAX),
        last_us.unwrap_or(0),
        ended_us.unwrap_or(0),
    );
    result["deliveries_per_second"] = json!(span.rate(result["delivered"].as_u64().unwrap_or(0)));
    result["delivery_seconds"] = json!(span.seconds);
    result["drain_seconds"] = json!(span.drain_seconds);
    for (histogram, field) in [
        ("delivery", "send_to_delivery"),
        ("ack", "send_to_ack"),
        ("delivery_arrival", "send_to_delivery_arrival"),
        ("ack_arrival", "send_to_ack_arrival"),
    ] {
        if first["result"]["shard"][histogram].is_null() {
            continue;
        }
        let mut merged = latency_histogram();
        for pairs in shard(histogram) {
            histogram_from_json(pairs, &mut merged)?;
        }
        result[field] = percentiles(&merged);
    }
    for series in ["delivery_ms", "ack_ms"] {
        let mut slowest: Vec<f64> = Vec::new();
        for r in &results {
            let slices = r["slowest_by_send_time"][series].as_array();
            for (n, slice) in slices.into_iter().flatten().enumerate() {
                let slice = slice.as_f64().unwrap_or(0.0);
                match slowest.get_mut(n) {
                    Some(s) => *s = s.max(slice),
                    None => slowest.push(slice),
                }
            }
        }
        result["slowest_by_send_time"][series] = json!(slowest);
    }
    let cpus: Vec<&Value> = results.iter().map(|r| &r["cpu"]).collect();
    add_generators_cpu(&mut result["cpu"], &cpus);
    result["deliveries_per_generator_wakeup"] = crate::per_wakeup(
        result["delivered"].as_u64().unwrap_or(0),
        result["cpu"]["generator_wakeups"].as_u64().unwrap_or(0),
    );
    result["cpu_us_per_delivery"] = cpu_per_unit(
        results.iter().map(|r| {
            (
                &r["cpu_us_per_delivery"],
                r["delivered"].as_u64().unwrap_or(0),
            )
        }),
        result["delivered"].as_u64().unwrap_or(0),
    );
    // The most late of the processes' loops, and each one's.
    let lags: Vec<Value> = results
        .iter()
        .map(|r| r["generator_loop_lag"].clone())
        .collect();
    result["generator_loop_lag"] = lags
        .iter()
        .max_by(|a, b| {
            let p99 = |v: &Value| v["p99_ms"].as_f64().unwrap_or(0.0);
            p99(a).total_cmp(&p99(b))
        })
        .cloned()
        .unwrap_or(Value::Null);
    result["generator_loop_lag_by_process"] = json!(lags);
    if let Some(object) = result.as_object_mut() {
        object.remove("shard");
    }

    let mut report = first.clone();
    report["result"] = result;
    report["setup"] = reports.iter().map(|r| r["setup"].clone()).collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_rooms_and_their_senders_between_them() {
        let shard = |index| Shard { index, of: 3 };
        assert_eq!(parse_shard("1/3"), Ok(shard(1)));
        assert!(parse_shard("3/3").is_err());
        assert!(parse_shard("1").is_err());
        // Seven senders over five rooms: sender s sends to room s % 5.
        let all: Vec<Vec<usize>> = (0..3).map(|i| senders_of(shard(i), 5, 7)).collect();
        assert_eq!(all, [vec![0, 3, 5], vec![1, 4, 6], vec![2]]);
        assert!(shard(2).owns(5) && !shard(2).owns(4));
    }

    #[test]
    fn a_split_that_leaves_a_generator_idle_is_refused() {
        let args = |rooms, senders, find_max| FanoutArgs {
            rooms,
            members: 2,
            senders,
            rate: 10.0,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            find_max,
            max_p99_ms: 50.0,
            join_concurrency: 1,
        };
        assert!(check_fanout_split(&args(4, 4, false), 2).is_ok());
        let refused = |a: FanoutArgs, n| check_fanout_split(&a, n).unwrap_err().to_string();
        assert!(refused(args(1, 4, false), 2).contains("--rooms"));
        assert!(refused(args(4, 1, false), 2).contains("has no sender"));
        assert!(refused(args(4, 4, true), 2).contains("--find-max"));
    }

    #[test]
    fn an_ingest_split_needs_something_to_send_in_every_process() {
        assert!(check_ingest_split(3, 0, 3).is_ok());
        assert!(check_ingest_split(0, 2, 2).is_ok());
        let refused = check_ingest_split(2, 1, 3).unwrap_err().to_string();
        assert!(refused.contains("--connections 2"), "{refused}");
    }

    #[test]
    fn merged_ingest_reports_add_up_acks_and_spread_the_servers_cost_over_them() {
        let shard = |ws: u64, rest: u64, elapsed: f64, generator_us: f64| {
            json!({
                "scenario": "ingest",
                "ws_sent": ws + 2, "ws_acked": ws, "rest_acked": rest, "refused": 1,
                "unanswered": 1, "unpaired_answers": 0,
                "unanswered_sends": [{"room": format!("r{ws}"), "client_id": "7"}],
                "connections_stopped": 1,
                "stopped_connections": [{"room": format!("r{ws}"), "unanswered": 1}],
                "setup_seconds": ws as f64 / 1_000.0,
                "acked_per_second": (ws + rest) as f64 / elapsed,
                "cpu": {"generator_percent_of_one_core": 20.0, "servers": [],
                        "generator_wakeups": 30, "generator_wakeups_per_second": 10.0},
                // Each shard read the same server: 100 ms of CPU over the
                // phase, 100 µs per ack of the first's 1,000.
                "cpu_us_per_acked": {"servers": 100_000.0 / (ws + rest) as f64,
                                     "generator": generator_us},
                "generator": {"processes": 1, "cpu_seconds": 1.0,
                              "cpu_percent_of_one_core": 20.0, "wall_seconds": 3.0},
                "shard": {"elapsed_seconds": elapsed},
            })
        };
        let merged = merge(&[shard(900, 100, 2.0, 10.0), shard(3_000, 0, 2.5, 30.0)]).unwrap();
        assert_eq!(merged["ws_sent"], 3_904);
        assert_eq!(merged["ws_acked"], 3_900);
        assert_eq!(merged["rest_acked"], 100);
        assert_eq!(merged["refused"], 2);
        assert_eq!(merged["unanswered"], 2);
        assert_eq!(merged["connections_stopped"], 2);
        assert_eq!(
            merged["stopped_connections"],
            json!([{"room": "r900", "unanswered": 1}, {"room": "r3000", "unanswered": 1}])
        );
        assert_eq!(
            merged["unanswered_sends"],
            json!([{"room": "r900", "client_id": "7"}, {"room": "r3000", "client_id": "7"}])
        );
        // The slower set-up; 4,000 acks over the longer phase.
        assert_eq!(merged["setup_seconds"], 3.0);
        assert_eq!(merged["acked_per_second"], 1_600.0);
        // The server's 100 ms over 4,000 acks; the generators' 10 ms and
        // 90 ms over the same.
        assert_eq!(merged["cpu_us_per_acked"]["servers"], 25.0);
        assert_eq!(merged["cpu_us_per_acked"]["generator"], 25.0);
        assert_eq!(merged["cpu"]["generator_percent_of_one_core"], 40.0);
        assert_eq!(merged["cpu"]["generator_wakeups"], 60);
        assert_eq!(merged["cpu"]["generator_wakeups_per_second"], 20.0);
        assert_eq!(merged["generator"]["processes"], 2);
        assert!(merged.get("shard").is_none(), "{merged}");
    }

    #[test]
    fn each_process_gets_a_cpu_of_its_own_when_there_are_enough() {
        assert_eq!(cpu_per_process(&[2, 5, 7], 2), Some(vec![2, 5]));
        assert_eq!(cpu_per_process(&[2, 5], 2), Some(vec![2, 5]));
        assert_eq!(cpu_per_process(&[1], 2), None);
    }

    #[test]
    fn the_arguments_of_a_shard_leave_out_the_generators() {
        let args = [
            "fanout",
            "--generators",
            "2",
            "--rooms",
            "4",
            "--generators=3",
        ];
        assert_eq!(
            child_args(args.iter().map(|a| a.to_string())),
            ["fanout", "--rooms", "4"]
        );
    }

    /// A shard's report as `fanout` prints it, with what `merge` reads.
    fn shard_report(latencies_us: &[u64], first_us: u64, last_us: u64, wakeups: u64) -> Value {
        let mut h = latency_histogram();
        for &us in latencies_us {
            h.record(us).unwrap();
        }
        let n = latencies_us.len() as u64;
        json!({
            "scenario": "fanout",
            "setup": {"frames": n},
            "generator": {"processes": 1, "runtime": "current_thread", "cpu_seconds": 1.5,
                          "cpu_percent_of_one_core": 30.0, "wall_seconds": 5.0},
            "result": {
                "target_rate": 100.0, "sent": n, "acked": n, "refused": 0, "unacked": 0,
                "delivered": 2 * n, "expected": 2 * n, "loss": 0, "elapsed_seconds": 2.0,
                "slowest_by_send_time": {"delivery_ms": [1.0, 9.0], "ack_ms": [2.0]},
                "cpu": {"generator_percent_of_one_core": 25.0, "servers": [],
                        "generator_wakeups": wakeups,
                        "generator_wakeups_per_second": wakeups as f64 / 2.0},
                // Each shard read the same server: 48 µs of CPU over the
                // phase. Each generator spent 60 µs on its deliveries.
                "cpu_us_per_delivery": {"servers": 48.0 / (2 * n) as f64,
                                        "generator": 60.0 / (2 * n) as f64},
                "generator_loop_lag": {"p99_ms": n as f64},
                "shard": {
                    "delivery": histogram_to_json(&h), "ack": histogram_to_json(&h),
                    "first_delivery_us": first_us, "last_delivery_us": last_us,
                    "sends_ended_us": last_us,
                },
            },
        })
    }

    #[test]
    fn merged_reports_add_up_counts_and_histograms() {
        let a = shard_report(&[1_000, 2_000, 3_000], 10_000_000, 11_000_000, 3);
        let b = shard_report(&[50_000], 10_500_000, 12_000_000, 1);
        let merged = merge(&[a, b]).unwrap();
        let result = &merged["result"];
        assert_eq!(result["sent"], 4);
        assert_eq!(result["delivered"], 8);
        assert_eq!(result["target_rate"], 200.0);
        // Over the union of the spans: 8 deliveries in 2 s.
        assert_eq!(result["delivery_seconds"], 2.0);
        assert_eq!(result["deliveries_per_second"], 4.0);
        // As if one process had recorded all four.
        let mut all = latency_histogram();
        for us in [1_000, 2_000, 3_000, 50_000] {
            all.record(us).unwrap();
        }
        assert_eq!(result["send_to_delivery"], percentiles(&all));
        assert_eq!(result["send_to_ack"]["count"], 4);
        assert_eq!(
            result["slowest_by_send_time"]["delivery_ms"],
            json!([1.0, 9.0])
        );
        assert_eq!(result["cpu"]["generator_percent_of_one_core"], 50.0);
        // Four wake-ups of the generators for eight deliveries.
        assert_eq!(result["cpu"]["generator_wakeups"], 4);
        assert_eq!(result["cpu"]["generator_wakeups_per_second"], 2.0);
        assert_eq!(result["deliveries_per_generator_wakeup"], 2.0);
        // The server's 48 µs over all 8 deliveries; the generators' 120.
        assert_eq!(result["cpu_us_per_delivery"]["servers"], 6.0);
        assert_eq!(result["cpu_us_per_delivery"]["generator"], 15.0);
        assert_eq!(result["generator_loop_lag"]["p99_ms"], 3.0);
        assert!(result.get("shard").is_none(), "{merged}");
        assert_eq!(merged["generator"]["processes"], 2);
        assert_eq!(merged["generator"]["cpu_seconds"], 3.0);
        assert_eq!(merged["setup"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn generators_that_never_slept_have_no_deliveries_per_wake_up() {
        let spinning = || shard_report(&[1_000], 10_000_000, 11_000_000, 0);
        let merged = merge(&[spinning(), spinning()]).unwrap();
        assert_eq!(merged["result"]["cpu"]["generator_wakeups"], 0);
        assert_eq!(
            merged["result"]["deliveries_per_generator_wakeup"],
            Value::Null
        );
    }
}
