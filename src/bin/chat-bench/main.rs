//! `chat-bench`: the project's load generator.
//!
//! It drives one or more running instances (connections are spread
//! round-robin over `--url`s, so fan-out crosses pods through Redis), mints
//! its own tokens with `JWT_SECRET`, and prints one JSON line per run on
//! stdout and a readable summary on stderr. Scenarios:
//!
//! - `idle`: open N connections, hold them, report how many stayed open and
//!   the servers' RSS per connection (given their `--pid`s).
//! - `fanout`: rooms × members, senders at a fixed total rate; reports sent,
//!   acked, delivered vs expected (loss), deliveries/s (over the span from
//!   the first delivery to the last, so an overloaded server's late
//!   deliveries do not inflate it), latency percentiles and the slowest
//!   latency of each 250 ms of sends; `--warmup` sends at the rate
//!   unmeasured first; `--find-max` raises the rate until loss, an unacked
//!   send, p99 over the bound or senders that cannot keep the rate.
//! - `ingest`: WebSocket and REST sends as fast as acks come back.
//!
//! Three more need no server and describe the machine: `loopback` (what
//! its kernel charges for a delivery, [`loopback`]), `pauses` (when it does
//! not run its CPUs at all, [`pauses`]) and `flushes` (how long its disk
//! takes to make a write durable, [`flushes`]).
//!
//! `--generators N` runs a `fanout` or an `ingest` in N processes of this
//! program and merges their reports into one ([`generators`]).
//!
//! Every send carries a `client_id`, as the web client's do, so the
//! idempotency index and the retry lookup are part of what is measured.
//!
//! The generator keeps its own cost low: one runtime, bodies that carry only
//! the send time, connections that read and write frames in place without a
//! WebSocket library ([`member`]), and latency histograms sharded to avoid
//! lock contention. It reports its own CPU use, and that
//! of the servers given with `--pid`, over each measured phase (setup
//! excluded), so a reader can tell who was saturated, and what each message
//! (`ingest`) or delivery (`fanout`) cost each of them: on a machine whose
//! speed drifts, a run slowed by the machine shows there. Fan-out phases start
//! once the setup's `join` announcements have stopped arriving; the report's
//! `setup` says how long that took, how many frames it caused and the CPU it
//! cost (with `--join-concurrency`, a join storm). The server must run with
//! limits raised for load (see docs/benchmarks.md).

use std::{
    io::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use chat_service::{
    auth::JwtKeys,
    config::{Secret, ServeConfig},
};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::watch;

mod arrival;
mod cores;
mod flushes;
mod generators;
mod loop_lag;
mod loopback;
mod member;
mod pauses;
mod processes;
mod server_view;
mod wakeup;

use arrival::Stamped;
use generators::Shard;
use member::{Member, Reply};
use processes::{Processes, own_cpu_seconds, own_wakeups};

#[derive(Debug, Parser)]
#[command(name = "chat-bench", about = "Load generator for the chat service")]
struct Args {
    /// Base URLs of the instances (comma-separated); connections are spread
    /// round-robin over them.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8001")]
    url: Vec<String>,
    /// The service's JWT secret (tokens are minted locally; every scenario
    /// but `loopback`, `pauses` and `flushes` needs it).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Server PIDs (repeatable): their RSS for `idle`, their CPU over each
    /// measured phase for `fanout` and `ingest`.
    #[arg(long = "pid", global = true)]
    pids: Vec<u32>,
    /// A process name (as `pgrep -x` matches it; repeatable) whose
    /// processes' CPU each measured phase reports: the database and Redis
    /// beside the servers, say (`--watch postgres --watch redis-server`).
    /// The processes are those running when the phase starts. `ingest` also
    /// divides each one's CPU by the messages acked.
    #[arg(long = "watch", global = true)]
    watch: Vec<String>,
    /// Also report `fanout`'s latencies to when each frame reached the
    /// generator's socket, by the kernel's receive timestamps, which leave
    /// out the generator's own lateness in reading it. Costs the generator
    /// about a tenth more CPU (docs/benchmarks.md).
    #[arg(long, global = true)]
    arrival_stamps: bool,
    /// Never let the generator sleep in the kernel: it polls its sockets in
    /// a loop, at the lowest priority (nice 19) so that PostgreSQL and Redis
    /// on its core still run first. A delivery then does not have to wake
    /// it, a cost the servers pay on loopback that clients on other
    /// machines would not make them pay. The generator's CPU figures then
    /// include its polling (`generator.spin`). Needs the generator on one
    /// CPU (`taskset`); served scenarios only (docs/benchmarks.md,
    /// thirty-fourth VM).
    #[arg(long, global = true)]
    spin: bool,
    /// Run `fanout` or `ingest` in this many generator processes, each with
    /// a share of the rooms and connections, and print one report merged
    /// from theirs (`generator.processes`): for a load one process cannot
    /// offer or read alone. They start their measured phase together, each
    /// on a CPU of its own where this process may use N.
    #[arg(long, global = true, default_value_t = 1)]
    generators: usize,
    /// This process is one share of a `--generators` run (set by it).
    #[arg(long, hide = true, value_parser = generators::parse_shard)]
    shard: Option<Shard>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    #[command(flatten)]
    Served(Served),
    /// No server: what this machine's kernel charges for a delivery (a
    /// small frame written to a loopback TCP connection and read on another
    /// core), and what waking a thread asleep on the other core costs the
    /// waker (`wakeup`), to compare machines by.
    Loopback(loopback::LoopbackArgs),
    /// No server: how often, and for how long, this machine does not run
    /// each of its CPUs (a thread per CPU watching the clock), to tell a
    /// latency tail the machine made from one the service made.
    Pauses(pauses::PausesArgs),
    /// No server: how long this machine's disk takes to flush a small
    /// write, one after another (as a commit waits for its log), to tell a
    /// tail its disk made from one the service made.
    Flushes(flushes::FlushesArgs),
}

/// The scenarios that drive running servers.
#[derive(Debug, Subcommand)]
enum Served {
    /// Open connections and hold them.
    Idle {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// Connections per room (rooms are created for the run); 0 puts them
        /// all in `global`, where every arrival is announced to everyone.
        #[arg(long, default_value_t = 50)]
        room_size: usize,
    },
    /// Rooms × members, senders at a fixed total rate.
    Fanout(FanoutArgs),
    /// Sends as fast as acks come back, over WebSocket and REST.
    Ingest {
        /// WebSocket connections, each in its own room.
        #[arg(long, default_value_t = 50)]
        connections: usize,
        /// Sends in flight per connection.
        #[arg(long, default_value_t = 8)]
        window: usize,
        /// REST workers (each one request at a time).
        #[arg(long, default_value_t = 4)]
        rest_workers: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

#[derive(Debug, clap::Args)]
struct FanoutArgs {
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    #[arg(long, default_value_t = 50)]
    members: usize,
    /// Sending connections (spread over the rooms; not counted as members).
    #[arg(long, default_value_t = 20)]
    senders: usize,
    /// Messages per second, all senders together.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Send at the rate this long before each measured phase, without a
    /// pause between the two, and count nothing sent meanwhile: the first
    /// seconds of load after a quiet spell are slower than the rest
    /// (docs/benchmarks.md), and a rate's steady state is what a run is
    /// meant to measure.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Raise the rate by 1.5× per step until loss or p99 crosses the bound,
    /// or the senders cannot send at the rate.
    #[arg(long)]
    find_max: bool,
    /// p99 bound for --find-max, in milliseconds.
    #[arg(long, default_value_t = 50.0)]
    max_p99_ms: f64,
    /// Members connecting at once during set-up (1: one after another).
    /// Each arrival is announced to its room, so many at once is a join
    /// storm; the report's `setup` says how long it took to settle.
    #[arg(long, default_value_t = 1)]
    join_concurrency: usize,
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// CPU use of the generator, the given servers, the watched groups and
/// the machine's other processes over one measured phase.
struct CpuMeter {
    started: Instant,
    own: f64,
    own_wakeups: u64,
    servers: Vec<(u32, f64)>,
    /// The `--watch` names.
    watched: Vec<String>,
    /// Every process at the start ([`processes`]).
    processes: Processes,
    /// One share of a `--generators` run: its parent and the parent's
    /// other children are the run's too.
    shard: bool,
    cores: cores::Cores,
}

/// CPU seconds each used over a phase, and the phase's wall time.
struct CpuUsed {
    wall: f64,
    generator: f64,
    /// Times the generator slept and was woken ([`own_wakeups`]).
    generator_wakeups: u64,
    servers: Vec<(u32, f64)>,
    /// Per `--watch` name: its processes, and their CPU seconds.
    watched: Vec<(String, usize, f64)>,
    /// The busiest processes that are none of the above
    /// ([`Processes::others_since`]).
    others: serde_json::Value,
    /// Each core's busy and stolen share ([`cores::Cores::since`]).
    cores: serde_json::Value,
}

impl CpuMeter {
    fn start(bench: &Bench) -> Self {
        let processes = Processes::now();
        Self {
            started: Instant::now(),
            own: own_cpu_seconds(),
            own_wakeups: own_wakeups(),
            servers: bench
                .pids
                .iter()
                .map(|&pid| (pid, processes.cpu(pid)))
                .collect(),
            watched: bench.watched.clone(),
            processes,
            shard: bench.shard.is_some(),
            cores: cores::Cores::now(),
        }
    }

    fn wall_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64().max(1e-9)
    }

    fn used(&self) -> CpuUsed {
        let wall = self.wall_seconds();
        let now = Processes::now();
        CpuUsed {
            wall,
            generator: own_cpu_seconds() - self.own,
            generator_wakeups: own_wakeups().saturating_sub(self.own_wakeups),
            servers: self
                .servers
                .iter()
                .map(|&(pid, before)| (pid, now.cpu(pid) - before))
                .collect(),
            watched: self
                .watched
                .iter()
                .map(|name| {
                    let (processes, used) = now.named_since(&self.processes, name);
                    (name.clone(), processes, used)
                })
                .collect(),
            others: now.others_since(&self.processes, |pid, stat| self.is_ours(pid, stat), wall),
            cores: cores::Cores::now().since(&self.cores),
        }
    }

    /// Whether process `pid` is one of the run's: this one, a server, a
    /// watched one, or another generator of the same `--generators` run.
    fn is_ours(&self, pid: u32, stat: &processes::Stat) -> bool {
        let parent = || std::os::unix::process::parent_id();
        pid == std::process::id()
            || self.servers.iter().any(|&(server, _)| server == pid)
            || self.watched.contains(&stat.name)
            || (self.shard && (pid == parent() || stat.ppid == parent()))
    }

    /// Percent of one core each used since `start`.
    fn report(&self) -> serde_json::Value {
        self.used().report()
    }
}

impl CpuUsed {
    fn report(&self) -> serde_json::Value {
        let percent = |seconds: f64| tenths(100.0 * seconds / self.wall);
        let servers: Vec<serde_json::Value> = self
            .servers
            .iter()
            .map(|&(pid, used)| json!({"pid": pid, "percent_of_one_core": percent(used)}))
            .collect();
        let watched: Vec<serde_json::Value> = self
            .watched
            .iter()
            .map(|(name, processes, used)| {
                json!({"name": name, "processes": processes, "percent_of_one_core": percent(*used)})
            })
            .collect();
        json!({
            "wall_seconds": self.wall,
            "generator_percent_of_one_core": percent(self.generator),
            "generator_wakeups": self.generator_wakeups,
            "generator_wakeups_per_second": tenths(self.generator_wakeups as f64 / self.wall),
            "servers": servers,
            "watched": watched,
            "others": self.others,
            "cores": self.cores,
        })
    }

    /// Microseconds of CPU per message, for each of: the servers together,
    /// the generator, each watched group.
    fn per_message(&self, messages: u64) -> serde_json::Value {
        let each = |seconds: f64| tenths(1e6 * seconds / messages.max(1) as f64);
        let mut out = serde_json::Map::new();
        out.insert(
            "servers".into(),
            json!(each(self.servers.iter().map(|&(_, used)| used).sum())),
        );
        out.insert("generator".into(), json!(each(self.generator)));
        for (name, _, used) in &self.watched {
            out.insert(name.clone(), json!(each(*used)));
        }
        serde_json::Value::Object(out)
    }
}

/// A [`CpuUsed::per_message`] map as one line, by name: `generator 6.1,
/// postgres 0.8, redis-server 0.4, servers 7.4`.
fn per_unit_line(per_unit: &serde_json::Value) -> String {
    let named: Vec<String> = per_unit
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, us)| format!("{name} {us}"))
        .collect();
    named.join(", ")
}

/// Deliveries the generator read per time it slept and was woken (`null`
/// when it never slept, as with `--spin`). Near 1, nearly every delivery
/// woke it; on loopback that wake-up is paid by the server's write.
fn per_wakeup(delivered: u64, wakeups: u64) -> serde_json::Value {
    match wakeups {
        0 => serde_json::Value::Null,
        n => json!(tenths(delivered as f64 / n as f64)),
    }
}

/// A fan-out phase's wake-ups of the generator as one line.
fn wakeups_line(result: &serde_json::Value) -> String {
    let per_second = &result["cpu"]["generator_wakeups_per_second"];
    match &result["deliveries_per_generator_wakeup"] {
        serde_json::Value::Null => format!("the generator was woken {per_second} times/s"),
        each => format!("the generator was woken {per_second} times/s, once per {each} deliveries"),
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Latency histograms in shards, so recording is nearly contention-free,
/// and the slowest latency of the sends made in each [`SLICE_US`] of the
/// phase: a tail made by one stall shows as a few slices far above the
/// rest, one made by a steady overload as every slice high.
///
/// Each latency is kept to when the generator read the frame and, with
/// `--arrival-stamps`, to when it reached the generator's socket
/// ([`arrival`]).
struct Latencies {
    shards: Vec<Mutex<Pair>>,
    started_us: AtomicU64,
    slowest: Vec<AtomicU64>,
}

/// The width of one slice of [`Latencies`]'s timeline.
const SLICE_US: u64 = 250_000;

/// The longest latency a histogram tells apart: a minute, in µs.
const LONGEST_US: u64 = 60_000_000;

/// An empty latency histogram: µs from 1 to [`LONGEST_US`], three
/// significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LONGEST_US, 3).expect("histogram bounds")
}

/// `x` rounded to a tenth, for reports.
fn tenths(x: f64) -> f64 {
    (10.0 * x).round() / 10.0
}

/// µs as ms, for reports.
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// One shard's histograms: latencies to the read, and to the arrival.
struct Pair {
    read: Histogram<u64>,
    arrival: Histogram<u64>,
}

impl Pair {
    fn new() -> Self {
        Self {
            read: latency_histogram(),
            arrival: latency_histogram(),
        }
    }
}

impl Latencies {
    /// With a timeline for phases of up to `longest`.
    fn new(longest: Duration) -> Self {
        // On a current-thread runtime (the generator on one core) nothing
        // contends, and one shard keeps the counters it hits in cache:
        // sixteen spread them over 2 MB, and recording was 7 % of the
        // generator's samples at 500,000 deliveries/s.
        let one_thread = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
            runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
        });
        let shards = if one_thread { 1 } else { 16 };
        let shards = (0..shards).map(|_| Mutex::new(Pair::new())).collect();
        let slices = (longest.as_micros() as u64).div_ceil(SLICE_US) as usize;
        Self {
            shards,
            started_us: AtomicU64::new(0),
            slowest: (0..slices).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Records what was sent at `sent_us`, reached the generator's socket
    /// at `arrived_us` (when stamped) and was read at `now_us`. The
    /// timeline is the read's.
    fn record(&self, shard: usize, sent_us: u64, arrived_us: Option<u64>, now_us: u64) {
        let micros = now_us.saturating_sub(sent_us);
        let slice = sent_us.saturating_sub(self.started_us.load(Ordering::Relaxed)) / SLICE_US;
        // A sender's last tick can come a moment after the phase's end.
        let last = self.slowest.len().saturating_sub(1);
        if let Some(slowest) = self.slowest.get((slice as usize).min(last)) {
            slowest.fetch_max(micros, Ordering::Relaxed);
        }
        let mut h = self.shards[shard % self.shards.len()]
            .lock()
            .expect("histogram lock");
        let _ = h.read.record(micros.clamp(1, LONGEST_US));
        if let Some(arrived_us) = arrived_us {
            let arrival = arrived_us.min(now_us).saturating_sub(sent_us);
            let _ = h.arrival.record(arrival.clamp(1, LONGEST_US));
        }
    }

    fn merged(&self) -> Pair {
        let mut all = Pair::new();
        for shard in &self.shards {
            let shard = shard.lock().expect("histogram lock");
            let _ = all.read.add(&shard.read);
            let _ = all.arrival.add(&shard.arrival);
        }
        all
    }

    /// The slowest latency (ms) of the sends of each slice, in order.
    fn timeline(&self) -> Vec<f64> {
        self.slowest
            .iter()
            .map(|slowest| ms(slowest.load(Ordering::Relaxed)))
            .collect()
    }

    /// Empties the histograms and starts the timeline at `started_us`.
    fn reset(&self, started_us: u64) {
        for shard in &self.shards {
            let mut shard = shard.lock().expect("histogram lock");
            shard.read.reset();
            shard.arrival.reset();
        }
        for slowest in &self.slowest {
            slowest.store(0, Ordering::Relaxed);
        }
        self.started_us.store(started_us, Ordering::Relaxed);
    }
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p90_ms": ms(h.value_at_quantile(0.9)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

/// What a `--find-max` step showed.
struct Step {
    /// Sends due at the step's rate over its duration.
    due: f64,
    sent: u64,
    /// Deliveries missing, plus sends unanswered or refused.
    lost: u64,
    p99_ms: f64,
}

impl Step {
    /// Whether the step's rate was sustained: nothing lost, p99 within the
    /// bound, and the rate offered at all. A rate the senders could not
    /// offer (their sockets full: under 95 % of the sends due went out) is
    /// not one the server sustained, however low the latency of what got
    /// through.
    fn sustained(&self, max_p99_ms: f64) -> bool {
        self.sent as f64 >= 0.95 * self.due && self.lost == 0 && self.p99_ms <= max_p99_ms
    }
}

/// The three slices of a phase whose deliveries were slowest, with their
/// acks', as "+offset: delivery / ack" (a stall shows as an offset whose
/// acks were as slow).
fn slowest_slices(delivery: &[f64], ack: &[f64]) -> String {
    let mut slices: Vec<usize> = (0..delivery.len()).collect();
    slices.sort_by(|a, b| delivery[*b].total_cmp(&delivery[*a]));
    let worst: Vec<String> = slices
        .iter()
        .take(3)
        .map(|&n| {
            let offset = (n as u64 * SLICE_US) as f64 / 1e6;
            let ack = ack.get(n).copied().unwrap_or_default();
            format!("+{offset:.2} s: {:.1} / {ack:.1} ms", delivery[n])
        })
        .collect();
    format!(
        "slowest {} ms of sends (delivery / ack): {}",
        SLICE_US / 1000,
        worst.join(", ")
    )
}

/// The latencies to the frames' arrival in the generator's sockets.
fn arrival_summary(delivery: &Histogram<u64>, ack: &Histogram<u64>) -> String {
    let at = |h: &Histogram<u64>, q: f64| ms(h.value_at_quantile(q));
    format!(
        "to the frames' arrival in the generator's sockets: delivery p50 {:.2} / p99 {:.2} / p99.9 {:.2} ms, ack p50 {:.2} / p99 {:.2} ms",
        at(delivery, 0.5),
        at(delivery, 0.99),
        at(delivery, 0.999),
        at(ack, 0.5),
        at(ack, 0.99),
    )
}

struct Bench {
    urls: Vec<String>,
    keys: JwtKeys,
    http: reqwest::Client,
    run_id: String,
    pids: Vec<u32>,
    watched: Vec<String>,
    /// `--arrival-stamps`.
    arrival_stamps: bool,
    /// One share of a `--generators` run.
    shard: Option<Shard>,
}

impl Bench {
    fn token(&self, user: &str, roles: &[String]) -> anyhow::Result<String> {
        self.keys
            .mint(user, None, roles, Duration::from_secs(24 * 3600))
    }

    fn url(&self, n: usize) -> &str {
        &self.urls[n % self.urls.len()]
    }

    /// The WebSocket path of `room`, with `user`'s token.
    fn ws_path(&self, room: &str, user: &str) -> anyhow::Result<String> {
        Ok(format!("/ws/chat/{room}?token={}", self.token(user, &[])?))
    }

    /// A connection ([`Member`]), once it is `ready`.
    async fn connect(&self, n: usize, room: &str, user: &str) -> anyhow::Result<Member<Stamped>> {
        let mut member =
            Member::connect(self.url(n), &self.ws_path(room, user)?, self.arrival_stamps).await?;
        match member.next_text().await? {
            Some(frame) if memchr::memmem::find(frame, br#""type":"ready""#).is_some() => {
                Ok(member)
            }
            Some(frame) => anyhow::bail!("no ready frame: {}", String::from_utf8_lossy(frame)),
            None => anyhow::bail!("closed before its ready frame"),
        }
    }

    async fn create_room(&self, id: &str) -> anyhow::Result<()> {
        let token = self.token("bench-admin", &["admin".to_owned()])?;
        let response = self
            .http
            .post(format!("{}/api/v1/rooms", self.url(0)))
            .bearer_auth(token)
            .json(&json!({"id": id, "name": id, "kind": "public"}))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "creating room {id}: {}",
            response.status()
        );
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    // One runtime. On one CPU (the generator pinned to its core) a
    // current-thread scheduler: the same load measured with half the tail
    // latency of a one-worker multi-thread runtime (docs/benchmarks.md,
    // eleventh VM). With more CPUs it uses them all.
    let one_cpu = std::thread::available_parallelism().map_or(1, usize::from) == 1;
    let (mut builder, flavor) = if one_cpu {
        (
            tokio::runtime::Builder::new_current_thread(),
            "current_thread",
        )
    } else {
        (tokio::runtime::Builder::new_multi_thread(), "multi_thread")
    };
    builder.enable_all().build()?.block_on(run(flavor))
}

/// `--spin`: lowers this process's priority to the least and keeps a task
/// ready that only yields, so the runtime polls its sockets without
/// waiting (a zero timeout) instead of sleeping until one is ready.
fn spin(flavor: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        flavor == "current_thread",
        "--spin needs the generator on one CPU (taskset -c N chat-bench ...): with more, only one of its threads would poll"
    );
    // SAFETY: setpriority only reads its integer arguments.
    if unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, 19) } != 0 {
        return Err(std::io::Error::last_os_error()).context("lowering the generator's priority");
    }
    tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    });
    Ok(())
}

/// The whole run; `flavor` names the runtime it runs on, for the report.
async fn run(flavor: &'static str) -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.generators >= 1, "--generators must be at least 1");
    if args.generators > 1 && args.shard.is_none() {
        match &args.scenario {
            Scenario::Served(Served::Fanout(fanout)) => {
                generators::check_fanout_split(fanout, args.generators)?;
            }
            Scenario::Served(Served::Ingest {
                connections,
                rest_workers,
                ..
            }) => generators::check_ingest_split(*connections, *rest_workers, args.generators)?,
            _ => anyhow::bail!("--generators applies to fanout and ingest only"),
        }
        let report = generators::run(args.generators).await?;
        println!("{report}");
        eprintln!("{}", summary(&report));
        return Ok(());
    }
    anyhow::ensure!(
        !args.spin || matches!(args.scenario, Scenario::Served(_)),
        "--spin applies to idle, fanout and ingest only"
    );
    let cpu_before = own_cpu_seconds();
    let started = Instant::now();
    let mut report = match args.scenario {
        Scenario::Loopback(loopback_args) => {
            tokio::task::spawn_blocking(move || loopback::run(loopback_args)).await??
        }
        Scenario::Pauses(pauses_args) => {
            tokio::task::spawn_blocking(move || pauses::run(pauses_args)).await??
        }
        Scenario::Flushes(flushes_args) => {
            tokio::task::spawn_blocking(move || flushes::run(flushes_args)).await??
        }
        Scenario::Served(scenario) => {
            if args.spin {
                spin(flavor)?;
            }
            let secret = args
                .jwt_secret
                .context("--jwt-secret (or JWT_SECRET) is required for this scenario")?;
            let config = ServeConfig::for_tests("sqlite::memory:", &secret);
            let bench = Arc::new(Bench {
                urls: args
                    .url
                    .iter()
                    .map(|u| u.trim_end_matches('/').to_owned())
                    .collect(),
                keys: JwtKeys::new(&Secret::new(secret), &config),
                http: reqwest::Client::new(),
                // Shards start together: their rooms and users must differ.
                run_id: match args.shard {
                    Some(shard) => format!("{:x}g{}", unix_micros(), shard.index),
                    None => format!("{:x}", unix_micros()),
                },
                pids: args.pids.clone(),
                watched: args.watch.clone(),
                arrival_stamps: args.arrival_stamps,
                shard: args.shard,
            });
            let mut report = match scenario {
                Served::Idle {
                    connections,
                    hold,
                    room_size,
                } => idle(&bench, connections, hold, room_size, &args.pids).await?,
                Served::Fanout(fanout_args) => fanout(&bench, fanout_args).await?,
                Served::Ingest {
                    connections,
                    window,
                    rest_workers,
                    duration,
                } => ingest(&bench, connections, window, rest_workers, duration).await?,
            };
            report["urls"] = json!(bench.urls);
            report
        }
    };
    let wall = started.elapsed().as_secs_f64();
    let cpu = own_cpu_seconds() - cpu_before;
    report["generator"] = json!({
        "processes": 1,
        "runtime": flavor,
        "spin": args.spin,
        "cpu_seconds": cpu,
        "cpu_percent_of_one_core": 100.0 * cpu / wall,
        "wall_seconds": wall,
    });
    println!("{report}");
    eprintln!("{}", summary(&report));
    Ok(())
}

fn summary(report: &serde_json::Value) -> String {
    let mut lines = vec![format!("scenario {}", report["scenario"])];
    if report["cpu"]["others"].is_array() {
        lines.push(format!(
            "  {}",
            processes::others_line(&report["cpu"]["others"])
        ));
    }
    if let Some(object) = report.as_object() {
        for (key, value) in object {
            if key != "scenario" {
                lines.push(format!("  {key}: {value}"));
            }
        }
    }
    lines.join("\n")
}

async fn idle(
    bench: &Arc<Bench>,
    connections: usize,
    hold: Duration,
    room_size: usize,
    pids: &[u32],
) -> anyhow::Result<serde_json::Value> {
    let room_of = |n: usize| match room_size {
        0 => "global".to_owned(),
        size => format!("idle-{}-{}", bench.run_id, n / size),
    };
    if room_size > 0 {
        for r in 0..connections.div_ceil(room_size) {
            bench.create_room(&room_of(r * room_size)).await?;
        }
    }
    let before: Vec<Option<u64>> = pids.iter().map(|p| rss_kib(*p)).collect();
    let (stop, stopped) = watch::channel(false);
    let open = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut failed = 0;
    for n in 0..connections {
        match bench
            .connect(n, &room_of(n), &format!("idle-{}-{n}", bench.run_id))
            .await
        {
            Ok(mut member) => {
                let open = Arc::clone(&open);
                let mut stopped = stopped.clone();
                open.fetch_add(1, Ordering::Relaxed);
                tasks.push(tokio::spawn(async move {
                    // Reading answers pings; leaving early means closed.
                    loop {
                        tokio::select! {
                            _ = stopped.changed() => return,
                            frame = member.next_text() => match frame {
                                Ok(Some(_)) => {}
                                _ => {
                                    open.fetch_sub(1, Ordering::Relaxed);
                                    return;
                                }
                            },
                        }
                    }
                }));
            }
            Err(_) => failed += 1,
        }
    }
    tokio::time::sleep(hold).await;
    let after: Vec<Option<u64>> = pids.iter().map(|p| rss_kib(*p)).collect();
    let still_open = open.load(Ordering::Relaxed);
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let per_connection: Vec<serde_json::Value> = before
        .iter()
        .zip(&after)
        .zip(pids)
        .map(|((b, a), pid)| {
            let delta = a.zip(*b).map(|(a, b)| a.saturating_sub(b));
            json!({
                "pid": pid,
                "rss_before_kib": b,
                "rss_after_kib": a,
                "rss_per_connection_kib": delta.map(|d| d as f64 * pids.len() as f64 / still_open.max(1) as f64),
            })
        })
        .collect();
    Ok(json!({
        "scenario": "idle",
        "connections": connections,
        "room_size": room_size,
        "failed_to_connect": failed,
        "open_after_hold": still_open,
        "hold_seconds": hold.as_secs_f64(),
        "servers": per_connection,
    }))
}

/// Shared counters of a fan-out run.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    acked: AtomicU64,
    refused: AtomicU64,
    delivered: AtomicU64,
    /// Every frame the members received, setup included (never reset).
    frames: AtomicU64,
    /// When a member last received a frame (µs since the epoch).
    last_frame_us: AtomicU64,
    /// When the phase's first and last messages were delivered (µs since
    /// the epoch).
    first_delivery_us: AtomicU64,
    last_delivery_us: AtomicU64,
}

/// How long after the end of a fan-out phase's sends a sender still waits
/// for its missing acks. An overloaded server acks seconds late; a send
/// whose ack never comes within this is reported as `unacked`.
const ACK_GRACE: Duration = Duration::from_secs(60);

/// A fan-out phase's deliveries in time: from its first delivery to its
/// last. The rate is taken over that span, not over the sending window: an
/// overloaded server delivers for seconds after the sends end, and counting
/// those deliveries against the window alone reports more than it can
/// sustain. (From the first delivery rather than the first send, so a
/// server that keeps up is credited with the rate it was offered, not that
/// rate less the last message's latency.)
struct DeliverySpan {
    seconds: f64,
    /// How long the deliveries went on after the sends ended: about the
    /// latency when the server kept up, the backlog it had left when not.
    drain_seconds: f64,
}

impl DeliverySpan {
    /// From the first and last delivery and the end of the sends (µs since
    /// the epoch; no delivery: `first` > `last`).
    fn new(first_us: u64, last_us: u64, sends_ended_us: u64) -> Self {
        let seconds = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e6;
        Self {
            seconds: seconds(first_us, last_us),
            drain_seconds: seconds(sends_ended_us, last_us),
        }
    }

    /// Deliveries per second over the span (0 when there is no span).
    fn rate(&self, delivered: u64) -> f64 {
        if self.seconds > 0.0 {
            delivered as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// How long the members must have received nothing for the setup to count
/// as settled.
const SETTLED_AFTER: Duration = Duration::from_millis(500);

/// Waits until the members stop receiving frames (at most a minute): every
/// arrival of the setup was announced to its whole room, and a phase that
/// starts before those frames are out measures their backlog. Returns when
/// the last frame came (µs since the epoch).
async fn settle(counts: &Counts) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let last = counts.last_frame_us.load(Ordering::Relaxed);
        let quiet = Duration::from_micros(unix_micros().saturating_sub(last));
        if quiet >= SETTLED_AFTER || Instant::now() > deadline {
            return last;
        }
    }
}

async fn fanout(bench: &Arc<Bench>, args: FanoutArgs) -> anyhow::Result<serde_json::Value> {
    let FanoutArgs {
        rooms,
        members,
        senders,
        rate,
        duration,
        warmup,
        find_max,
        max_p99_ms,
        join_concurrency,
    } = args;
    // A `--generators` shard takes its share of the rooms and of the
    // senders, who send to room `s % rooms`; one process takes them all.
    let shard = bench.shard.unwrap_or(Shard::WHOLE);
    let room_name = |r: usize| format!("bench-{}-{r}", bench.run_id);
    let room_ids: Vec<String> = (0..rooms)
        .filter(|&r| shard.owns(r))
        .map(room_name)
        .collect();
    let sender_indexes = generators::senders_of(shard, rooms, senders);
    for room in &room_ids {
        bench.create_room(room).await?;
    }
    let counts = Arc::new(Counts::default());
    let delivery = Arc::new(Latencies::new(duration));
    let ack = Arc::new(Latencies::new(duration));
    // Phase numbers are carried in bodies so that stragglers of a previous
    // phase are not counted in the next.
    let phase = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = watch::channel(false);
    let mut receivers = Vec::new();
    let setup_started = unix_micros();
    let setup_cpu = CpuMeter::start(bench);
    let joins = room_ids
        .iter()
        .flat_map(|room| (0..members).map(move |m| (room, m)))
        .enumerate()
        .map(|(n, (room, m))| async move {
            let member = bench
                .connect(n, room, &format!("m-{}-{n}", bench.run_id))
                .await;
            (m, member)
        });
    let mut joins = futures_util::stream::iter(joins).buffer_unordered(join_concurrency.max(1));
    let mut n = room_ids.len() * members;
    while let Some((m, member)) = joins.next().await {
        let mut member = member?;
        let (counts, delivery, phase, mut stopped) = (
            Arc::clone(&counts),
            Arc::clone(&delivery),
            Arc::clone(&phase),
            stopped.clone(),
        );
        receivers.push(tokio::spawn(async move {
            // One wait for the stop across all frames: a new one per frame
            // registered and dropped a waiter each time (3.5 % of the
            // generator's samples at 100,000 deliveries/s).
            let stop = stopped.changed();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    frame = member.next_text() => {
                        let Ok(Some(frame)) = frame else { return };
                        let stamp = member::delivery_stamp(frame);
                        let now = member.read_us();
                        counts.frames.fetch_add(1, Ordering::Relaxed);
                        counts.last_frame_us.store(now, Ordering::Relaxed);
                        let Some((sent, in_phase)) = stamp else { continue };
                        if in_phase != phase.load(Ordering::Relaxed) { continue; }
                        delivery.record(m, sent, member.arrived_us(), now);
                        counts.delivered.fetch_add(1, Ordering::Relaxed);
                        counts.first_delivery_us.fetch_min(now, Ordering::Relaxed);
                        counts.last_delivery_us.fetch_max(now, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let mut sender_sockets = Vec::new();
    for &s in &sender_indexes {
        let room = room_name(s % rooms);
        sender_sockets.push(
            bench
                .connect(n, &room, &format!("s-{}-{s}", bench.run_id))
                .await?,
        );
        n += 1;
    }

    let last_frame = settle(&counts).await;
    // From the first connection to the last frame the setup caused.
    let setup = json!({
        "join_concurrency": join_concurrency.max(1),
        "seconds": last_frame.saturating_sub(setup_started) as f64 / 1e6,
        "frames": counts.frames.load(Ordering::Relaxed),
        "cpu": setup_cpu.report(),
    });
    if let Some(shard) = bench.shard {
        generators::ready_then_wait(shard).await?;
    }

    let mut phases = Vec::new();
    // This process's share of the rate (all of it without shards).
    let mut current = rate * sender_indexes.len() as f64 / senders.max(1) as f64;
    let mut best: Option<f64> = None;
    let mut sockets = sender_sockets;
    loop {
        counts.sent.store(0, Ordering::Relaxed);
        counts.acked.store(0, Ordering::Relaxed);
        counts.refused.store(0, Ordering::Relaxed);
        counts.delivered.store(0, Ordering::Relaxed);
        counts.first_delivery_us.store(u64::MAX, Ordering::Relaxed);
        counts.last_delivery_us.store(0, Ordering::Relaxed);
        let this_phase = phase.fetch_add(1, Ordering::Relaxed) + 1;
        let started = Instant::now() + warmup;
        let started_us = unix_micros() + warmup.as_micros() as u64;
        delivery.reset(started_us);
        ack.reset(started_us);
        let per_sender = current / sockets.len() as f64;
        let period = Duration::from_secs_f64(1.0 / per_sender.max(0.001));
        let senders = sockets.len();
        let mut tasks = Vec::new();
        for (i, mut socket) in sockets.into_iter().enumerate() {
            let (counts, ack) = (Arc::clone(&counts), Arc::clone(&ack));
            // Senders start evenly spread over one period, so the total is
            // a steady rate rather than every sender at the same instant
            // (which measures bursts of `senders` sends, not the rate).
            let first = started - warmup + period.mul_f64(i as f64 / senders as f64);
            tasks.push(tokio::spawn(async move {
                let mut ticker = tokio::time::interval_at(tokio::time::Instant::from_std(first), period);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let end = started + duration;
                // Acks still missing this long after the end are given up on
                // (and reported as `unacked`).
                let give_up = end + ACK_GRACE;
                let mut in_flight = std::collections::VecDeque::new();
                let (mut sends, mut text) = (0u64, Vec::new());
                loop {
                    if Instant::now() >= end && in_flight.is_empty() {
                        break;
                    }
                    tokio::select! {
                        tick = ticker.tick(), if Instant::now() < end => {
                            // By when the send was due, so that a late tick
                            // of the warm-up is not counted, nor one due at
                            // the end that fired after the guard was read.
                            let due = tick.into_std();
                            if due >= end { continue; }
                            let measured = due >= started;
                            let now = unix_micros();
                            sends += 1;
                            // Phase 0 is no phase: the members skip what
                            // the warm-up sent.
                            let counted = if measured { this_phase } else { 0 };
                            text.clear();
                            let _ = write!(text, r#"{{"type":"message","body":"t:{now}:{counted}","client_id":"{this_phase}-{sends}"}}"#);
                            if socket.send_text(&text).await.is_err() { break; }
                            if measured { counts.sent.fetch_add(1, Ordering::Relaxed); }
                            in_flight.push_back((now, measured));
                        }
                        frame = socket.next_text() => {
                            let Ok(Some(frame)) = frame else { break };
                            match member::reply(frame) {
                                Reply::Ack => {
                                    let Some((t, measured)) = in_flight.pop_front() else { continue };
                                    if measured {
                                        counts.acked.fetch_add(1, Ordering::Relaxed);
                                        ack.record(i, t, socket.arrived_us(), unix_micros());
                                    }
                                }
                                Reply::Error => {
                                    let measured = in_flight.pop_front().is_some_and(|(_, measured)| measured);
                                    counts.refused.fetch_add(u64::from(measured), Ordering::Relaxed);
                                }
                                Reply::Other => {}
                            }
                        }
                        () = tokio::time::sleep_until(give_up.into()) => break,
                    }
                }
                socket
            }));
        }
        // The CPU of the measured part only.
        tokio::time::sleep_until(tokio::time::Instant::from_std(started)).await;
        let cpu = CpuMeter::start(bench);
        let server_before = server_view::Reading::take(&bench.http, &bench.urls).await;
        let lag = loop_lag::LoopLag::start();
        let mut back = Vec::new();
        for task in tasks {
            back.push(task.await?);
        }
        sockets = back;
        // Let the last deliveries arrive: until the members have heard
        // nothing for a while.
        settle(&counts).await;
        let lag = lag.finish().await;
        let server = server_view::Reading::take(&bench.http, &bench.urls)
            .await
            .since(&server_before);
        let elapsed = started.elapsed().as_secs_f64();
        let (sent, acked, refused) = (
            counts.sent.load(Ordering::Relaxed),
            counts.acked.load(Ordering::Relaxed),
            counts.refused.load(Ordering::Relaxed),
        );
        let unacked = sent.saturating_sub(acked + refused);
        let delivered = counts.delivered.load(Ordering::Relaxed);
        let expected = acked * members as u64;
        let (latency, ack_latency) = (delivery.merged(), ack.merged());
        let p99_ms = ms(latency.read.value_at_quantile(0.99));
        let loss = expected.saturating_sub(delivered);
        let span = DeliverySpan::new(
            counts.first_delivery_us.load(Ordering::Relaxed),
            counts.last_delivery_us.load(Ordering::Relaxed),
            started_us + duration.as_micros() as u64,
        );
        let rate = span.rate(delivered);
        let (delivery_slices, ack_slices) = (delivery.timeline(), ack.timeline());
        let used = cpu.used();
        let mut result = json!({
            "target_rate": current,
            "sent": sent,
            "acked": acked,
            "refused": refused,
            "unacked": unacked,
            "delivered": delivered,
            "expected": expected,
            "loss": loss,
            "deliveries_per_second": rate,
            "delivery_seconds": span.seconds,
            "drain_seconds": span.drain_seconds,
            "elapsed_seconds": elapsed,
            "send_to_delivery": percentiles(&latency.read),
            "send_to_ack": percentiles(&ack_latency.read),
            "slowest_by_send_time": {
                "slice_ms": SLICE_US / 1000,
                "started_unix_ms": started_us / 1000,
                "delivery_ms": &delivery_slices,
                "ack_ms": &ack_slices,
            },
            "cpu": used.report(),
            "cpu_us_per_delivery": used.per_message(delivered),
            "deliveries_per_generator_wakeup": per_wakeup(delivered, used.generator_wakeups),
            "server_view": server,
            "generator_loop_lag": lag,
        });
        if bench.arrival_stamps {
            // To when the frame reached the generator's socket: without the
            // generator's own lateness in reading it.
            result["send_to_delivery_arrival"] = percentiles(&latency.arrival);
            result["send_to_ack_arrival"] = percentiles(&ack_latency.arrival);
        }
        if bench.shard.is_some() {
            // What the parent needs to merge the shards' results.
            result["shard"] = json!({
                "delivery": generators::histogram_to_json(&latency.read),
                "ack": generators::histogram_to_json(&ack_latency.read),
                "first_delivery_us": counts.first_delivery_us.load(Ordering::Relaxed),
                "last_delivery_us": counts.last_delivery_us.load(Ordering::Relaxed),
                "sends_ended_us": started_us + duration.as_micros() as u64,
            });
            if bench.arrival_stamps {
                result["shard"]["delivery_arrival"] =
                    generators::histogram_to_json(&latency.arrival);
                result["shard"]["ack_arrival"] =
                    generators::histogram_to_json(&ack_latency.arrival);
            }
        }
        let passed = Step {
            due: current * duration.as_secs_f64(),
            sent,
            lost: loss + unacked + refused,
            p99_ms,
        }
        .sustained(max_p99_ms);
        eprintln!(
            "rate {current:.0}/s: delivered {delivered}/{expected} ({rate:.0}/s over {:.2} s, the last {:.2} s after the sends ended), unacked {unacked}, p99 {p99_ms:.2} ms",
            span.seconds, span.drain_seconds,
        );
        eprintln!("  {}", slowest_slices(&delivery_slices, &ack_slices));
        if bench.arrival_stamps {
            eprintln!(
                "  {}",
                arrival_summary(&latency.arrival, &ack_latency.arrival)
            );
        }
        eprintln!("  {}", server_view::summary(&result["server_view"]));
        eprintln!(
            "  the generator's event loop ran late by p50 {} / p99 {} / max {} ms",
            result["generator_loop_lag"]["p50_ms"],
            result["generator_loop_lag"]["p99_ms"],
            result["generator_loop_lag"]["max_ms"],
        );
        eprintln!("  {}", processes::others_line(&result["cpu"]["others"]));
        eprintln!(
            "  CPU per delivery, µs: {}",
            per_unit_line(&result["cpu_us_per_delivery"])
        );
        eprintln!("  {}", wakeups_line(&result));
        phases.push(result);
        if !find_max || !passed {
            break;
        }
        best = Some(current);
        current *= 1.5;
    }
    let _ = stop.send(true);
    for receiver in receivers {
        let _ = receiver.await;
    }
    let mut report = json!({
        "scenario": "fanout",
        "rooms": rooms,
        "members": members,
        "senders": senders,
        "duration_seconds": duration.as_secs_f64(),
        "setup": setup,
        "result": phases.first().cloned(),
    });
    if !warmup.is_zero() {
        report["warmup_seconds"] = json!(warmup.as_secs_f64());
    }
    if find_max {
        report["steps"] = json!(phases);
        report["max_sustained_rate"] = json!(best);
        report["max_p99_ms"] = json!(max_p99_ms);
    }
    Ok(report)
}

/// How an ingest connection's sending ended: its sends (their `client_id`s
/// count them), how many were still in flight, and why the answers stopped
/// (`None`: the run was done with it, every send answered).
struct Sending {
    sends: u64,
    in_flight: usize,
    why: Option<Silence>,
}

/// One ingest connection: keeps `window` sends in flight until `end`, then
/// waits until `give_up` for the answers of those still in flight.
async fn ingest_connection<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    socket: &mut Member<S>,
    window: usize,
    end: Instant,
    give_up: tokio::time::Instant,
    counts: &IngestCounts,
) -> Sending {
    let (mut in_flight, mut sends, mut text) = (0, 0u64, Vec::new());
    let why = 'sending: loop {
        // What the window has room for leaves in one write.
        while in_flight < window && Instant::now() < end {
            sends += 1;
            text.clear();
            let _ = write!(
                text,
                r#"{{"type":"message","body":"ingest","client_id":"{sends}"}}"#
            );
            socket.queue_text(&text);
            counts.ws_sent.fetch_add(1, Ordering::Relaxed);
            in_flight += 1;
        }
        if socket.flush().await.is_err() {
            break Silence::Lost;
        }
        if in_flight == 0 {
            return Sending {
                sends,
                in_flight,
                why: None,
            };
        }
        // Every answer that came in the same read is taken before the
        // window is refilled, so the sends it frees leave in one write, as
        // a pipelining client's would, not one write per answer.
        loop {
            let answer = match tokio::time::timeout_at(give_up, socket.next_text()).await {
                Ok(Ok(Some(frame))) => member::reply(frame),
                Ok(Ok(None)) => {
                    break 'sending socket.closed_with().map_or(Silence::Lost, Silence::Closed);
                }
                Ok(Err(_)) => break 'sending Silence::Lost,
                Err(_) => break 'sending Silence::GaveUp,
            };
            let counter = match answer {
                Reply::Ack => Some(&counts.ws_acked),
                Reply::Error => Some(&counts.refused),
                Reply::Other => None,
            };
            if let Some(counter) = counter {
                if in_flight == 0 {
                    // An answer to no send: counted apart, so that it
                    // cannot stand in for the next send's.
                    counts.unpaired.fetch_add(1, Ordering::Relaxed);
                } else {
                    counter.fetch_add(1, Ordering::Relaxed);
                    in_flight -= 1;
                }
            }
            if !socket.text_buffered() {
                break;
            }
        }
    };
    Sending {
        sends,
        in_flight,
        why: Some(why),
    }
}

/// What an ingest run's connections and REST workers counted.
#[derive(Default)]
struct IngestCounts {
    ws_sent: AtomicU64,
    ws_acked: AtomicU64,
    rest_acked: AtomicU64,
    /// Sends answered with an error, over either transport.
    refused: AtomicU64,
    /// Acks and errors that came with no send of the connection in flight.
    unpaired: AtomicU64,
}

/// An ingest connection whose answers stopped before the run was done with
/// it: its room, the `client_id`s of its sends that got no answer (ack or
/// error; none when it stopped between answers), and why.
struct Stopped {
    room: String,
    client_ids: Vec<u64>,
    why: Silence,
}

/// Why an ingest connection stopped waiting for its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Silence {
    /// None came within [`ACK_GRACE`] of the run's end.
    GaveUp,
    /// The server closed the connection, with this close frame's code.
    Closed(u16),
    /// The connection failed, or ended without a close frame.
    Lost,
}

impl Silence {
    fn describe(self) -> String {
        match self {
            Self::GaveUp => format!("no answer {} s after the end", ACK_GRACE.as_secs()),
            Self::Closed(code) => format!("closed by the server ({code})"),
            Self::Lost => "connection lost".to_owned(),
        }
    }
}

impl Stopped {
    /// How many are listed by name in a report: enough to look them up.
    const LISTED: usize = 10;

    /// The connection in `room` as its `sending` left it, if its answers
    /// stopped: the last `in_flight` of its sends are the unanswered ones.
    fn new(room: String, sending: &Sending) -> Option<Self> {
        let &Sending {
            sends,
            in_flight,
            why,
        } = sending;
        Some(Self {
            room,
            client_ids: (sends + 1 - in_flight as u64..=sends).collect(),
            why: why?,
        })
    }

    /// The first [`Self::LISTED`] unanswered sends, each as its room,
    /// `client_id` and why it went unanswered.
    fn listed_sends(all: &[Self]) -> serde_json::Value {
        let sends = all.iter().flat_map(|u| {
            let why = u.why.describe();
            u.client_ids
                .iter()
                .map(move |id| json!({"room": u.room, "client_id": id.to_string(), "why": why}))
        });
        json!(sends.take(Self::LISTED).collect::<Vec<_>>())
    }

    /// The first [`Self::LISTED`] connections, each as its room, why it
    /// stopped and how many of its sends went unanswered.
    fn listed(all: &[Self]) -> serde_json::Value {
        let connections = all.iter().take(Self::LISTED).map(
            |u| json!({"room": u.room, "why": u.why.describe(), "unanswered": u.client_ids.len()}),
        );
        json!(connections.collect::<Vec<_>>())
    }
}

async fn ingest(
    bench: &Arc<Bench>,
    connections: usize,
    window: usize,
    rest_workers: usize,
    duration: Duration,
) -> anyhow::Result<serde_json::Value> {
    let counts = Arc::new(IngestCounts::default());
    // A `--generators` shard takes every N-th connection and REST worker.
    let shard = bench.shard.unwrap_or(Shard::WHOLE);
    // Everything is connected before anything is sent, so the whole run
    // has every sender at work.
    let setup_started = Instant::now();
    let mut sockets = Vec::with_capacity(connections);
    for c in (0..connections).filter(|&c| shard.owns(c)) {
        let room = format!("ingest-{}-{c}", bench.run_id);
        bench.create_room(&room).await?;
        let socket = bench
            .connect(c, &room, &format!("w-{}-{c}", bench.run_id))
            .await?;
        sockets.push((socket, room));
    }
    let mut rest_rooms = Vec::with_capacity(rest_workers);
    for w in (0..rest_workers).filter(|&w| shard.owns(w)) {
        let room = format!("ingest-{}-rest-{w}", bench.run_id);
        bench.create_room(&room).await?;
        rest_rooms.push((w, room));
    }
    if let Some(shard) = bench.shard {
        generators::ready_then_wait(shard).await?;
    }
    // Reported: the server pings a connection 25 s after it opened, so a
    // long set-up puts pings inside the phase.
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    let cpu = CpuMeter::start(bench);
    let server_before = server_view::Reading::take(&bench.http, &bench.urls).await;
    let end = Instant::now() + duration;
    // Answers still missing this long after the end are given up on, and
    // their sends reported as `unanswered`.
    let give_up = tokio::time::Instant::from_std(end + ACK_GRACE);
    let mut tasks = Vec::new();
    for (mut socket, room) in sockets {
        let counts = Arc::clone(&counts);
        tasks.push(tokio::spawn(async move {
            let sending = ingest_connection(&mut socket, window, end, give_up, &counts).await;
            Stopped::new(room, &sending)
        }));
    }
    let mut rest_tasks = Vec::new();
    for (w, room) in &rest_rooms {
        let w = *w;
        let url = format!("{}/api/v1/rooms/{room}/messages", bench.url(w));
        let token = bench.token(&format!("r-{}-{w}", bench.run_id), &[])?;
        let (http, counts) = (bench.http.clone(), Arc::clone(&counts));
        rest_tasks.push(tokio::spawn(async move {
            let mut sends = 0u64;
            while Instant::now() < end {
                sends += 1;
                match http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"body": "ingest", "client_id": sends.to_string()}))
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => {
                        counts.rest_acked.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => counts.refused.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for task in rest_tasks {
        let _ = task.await;
    }
    let mut stopped = Vec::new();
    for task in tasks {
        stopped.extend(task.await.ok().flatten());
    }
    let used = cpu.used();
    let server = server_view::Reading::take(&bench.http, &bench.urls)
        .await
        .since(&server_before);
    let elapsed = used.wall.max(duration.as_secs_f64());
    let load = |count: &AtomicU64| count.load(Ordering::Relaxed);
    let (ws, rest) = (load(&counts.ws_acked), load(&counts.rest_acked));
    let mut report = json!({
        "scenario": "ingest",
        "connections": connections,
        "window": window,
        "rest_workers": rest_workers,
        "duration_seconds": duration.as_secs_f64(),
        "setup_seconds": setup_seconds,
        "ws_sent": load(&counts.ws_sent),
        "ws_acked": ws,
        "rest_acked": rest,
        "refused": load(&counts.refused),
        "unanswered": stopped.iter().map(|u| u.client_ids.len()).sum::<usize>(),
        "unanswered_sends": Stopped::listed_sends(&stopped),
        "connections_stopped": stopped.len(),
        "stopped_connections": Stopped::listed(&stopped),
        "unpaired_answers": load(&counts.unpaired),
        "acked_per_second": (ws + rest) as f64 / elapsed,
        "cpu": used.report(),
        "cpu_us_per_acked": used.per_message(ws + rest),
        "server_view": server,
    });
    if bench.shard.is_some() {
        // What the parent needs to merge the shards' results.
        report["shard"] = json!({"elapsed_seconds": elapsed});
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What each process spent per message: the servers' CPU over the
    /// messages, and the summary's line of it.
    #[test]
    fn cpu_per_message_divides_each_process_cpu_by_the_messages() {
        let used = CpuUsed {
            wall: 2.0,
            generator: 0.5,
            generator_wakeups: 40,
            servers: vec![(10, 1.0), (11, 0.5)],
            watched: vec![("postgres".into(), 3, 0.25)],
            others: json!([]),
            cores: json!([]),
        };
        assert_eq!(used.report()["generator_wakeups_per_second"], 20.0);
        let per = used.per_message(100_000);
        assert_eq!(
            per,
            json!({"servers": 15.0, "generator": 5.0, "postgres": 2.5})
        );
        assert_eq!(
            per_unit_line(&per),
            "generator 5.0, postgres 2.5, servers 15.0"
        );
    }

    /// How often the generator slept, and how many deliveries it read per
    /// wake-up; a generator that never slept (`--spin`) has no such ratio.
    #[test]
    fn the_generators_wake_ups_are_counted_per_delivery() {
        let result = |delivered, wakeups| {
            json!({
                "cpu": {"generator_wakeups_per_second": wakeups as f64 / 10.0},
                "deliveries_per_generator_wakeup": per_wakeup(delivered, wakeups),
            })
        };
        assert_eq!(
            wakeups_line(&result(1_000, 400)),
            "the generator was woken 40.0 times/s, once per 2.5 deliveries"
        );
        assert_eq!(
            wakeups_line(&result(1_000, 0)),
            "the generator was woken 0.0 times/s"
        );
    }

    /// An overloaded phase: sends for 15 s, deliveries until 20 s. Its rate
    /// is what it delivered over those 20 s, not over the 15 s of sending.
    #[test]
    fn the_delivery_rate_counts_the_deliveries_after_the_sends_ended() {
        let start = 1_000_000_000;
        let span = DeliverySpan::new(start + 1_000, start + 20_001_000, start + 15_000_000);
        assert_eq!(span.rate(2_000_000), 100_000.0);
        assert_eq!(span.seconds, 20.0);
        assert_eq!(span.drain_seconds, 5.001);
    }

    /// A run's unanswered sends are listed by room and `client_id`, the
    /// first ten of them, so that they can be looked up in the database;
    /// the connections whose answers stopped are listed too, those that
    /// stopped between answers among them.
    #[test]
    fn stopped_connections_and_their_unanswered_sends_are_listed() {
        let stopped = |room: &str, sends, in_flight, why| {
            let sending = Sending {
                sends,
                in_flight,
                why,
            };
            Stopped::new(room.to_owned(), &sending)
        };
        assert!(stopped("a", 40, 0, None).is_none(), "answered to the end");
        let all = [
            stopped("a", 41, 1, Some(Silence::GaveUp)),
            stopped("b", 14, 12, Some(Silence::Closed(4008))),
            stopped("c", 9, 0, Some(Silence::Lost)),
        ]
        .map(Option::unwrap);
        let listed = Stopped::listed_sends(&all);
        let listed = listed.as_array().unwrap();
        assert_eq!(listed.len(), Stopped::LISTED);
        let send = |room, client_id, why| json!({"room": room, "client_id": client_id, "why": why});
        assert_eq!(listed[0], send("a", "41", "no answer 60 s after the end"));
        assert_eq!(listed[1], send("b", "3", "closed by the server (4008)"));
        assert_eq!(listed[9], send("b", "11", "closed by the server (4008)"));
        assert_eq!(Stopped::listed_sends(&[]), json!([]));
        assert_eq!(
            Stopped::listed(&all),
            json!([
                {"room": "a", "why": "no answer 60 s after the end", "unanswered": 1},
                {"room": "b", "why": "closed by the server (4008)", "unanswered": 12},
                {"room": "c", "why": "connection lost", "unanswered": 0},
            ])
        );
    }

    /// A connection the server closes right after an answer, with nothing
    /// of it in flight, stops sending: it is reported as stopped, with no
    /// send unanswered, instead of going quiet unnoticed.
    #[tokio::test]
    async fn an_ingest_connection_closed_between_answers_is_reported() {
        use tokio::io::AsyncWriteExt;

        let (mut socket, mut server) = member::testing::connected(&[]).await;
        let counts = IngestCounts::default();
        let end = Instant::now() + Duration::from_secs(60);
        let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
        let serve = async {
            let (opcode, send) = member::testing::read_client_frame(&mut server).await;
            assert_eq!(opcode, 0x1, "a text frame");
            assert!(
                String::from_utf8(send)
                    .unwrap()
                    .contains(r#""client_id":"1""#)
            );
            // The answer and the close in one write: one read takes both.
            let mut answer = member::testing::text(br#"{"type":"ack","client_id":"1"}"#);
            answer.extend(member::testing::close(4008));
            server.write_all(&answer).await.unwrap();
            server
        };
        let (sending, _server) = tokio::join!(
            ingest_connection(&mut socket, 1, end, give_up, &counts),
            serve
        );
        assert_eq!(sending.why, Some(Silence::Closed(4008)));
        assert_eq!((sending.sends, sending.in_flight), (1, 0));
        assert_eq!(counts.ws_acked.load(Ordering::Relaxed), 1);
        let stopped = Stopped::new("r".to_owned(), &sending).expect("reported");
        assert!(stopped.client_ids.is_empty());
    }

    /// A step passes only when everything got through in time and the
    /// senders could send what was due.
    #[test]
    fn a_step_is_sustained_only_when_offered_delivered_and_in_time() {
        let step = |sent, lost, p99_ms| Step {
            due: 1_000.0,
            sent,
            lost,
            p99_ms,
        };
        assert!(step(1_000, 0, 40.0).sustained(50.0));
        assert!(step(950, 0, 40.0).sustained(50.0));
        assert!(!step(870, 0, 40.0).sustained(50.0), "not offered");
        assert!(!step(1_000, 1, 40.0).sustained(50.0), "one lost");
        assert!(!step(1_000, 0, 50.5).sustained(50.0), "too slow");
    }

    /// A server that keeps up delivers over the sending window shifted by
    /// the latency: it is credited with the rate offered. A phase with no
    /// delivery has no span and no rate.
    #[test]
    fn a_phase_that_kept_up_is_credited_with_the_rate_offered() {
        let start = 1_000_000_000;
        // 10 s of sends at 1,000 msg/s, each delivered 2 ms later.
        let span = DeliverySpan::new(start + 2_000, start + 9_999_000 + 2_000, start + 10_000_000);
        assert!(
            (span.rate(10_000) - 1_000.0).abs() < 0.2,
            "{}",
            span.rate(10_000)
        );
        assert!((span.drain_seconds - 0.001).abs() < 1e-9);
        let none = DeliverySpan::new(u64::MAX, 0, start + 10_000_000);
        assert_eq!(
            (none.rate(0), none.seconds, none.drain_seconds),
            (0.0, 0.0, 0.0)
        );
    }
}
