//! Logs, traces and metrics.
//!
//! - **Logs**: `tracing-subscriber`, human-readable by default, JSON with
//!   `LOG_FORMAT=json`, filtered by `RUST_LOG` (default `info`). When traces
//!   are exported, lines logged inside a traced operation carry its
//!   `trace_id` (a field of the root span, shown with the span). Nothing
//!   logged carries a token or a message body: request logs name routes,
//!   never query strings.
//! - **Traces**: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, `tracing` spans are
//!   bridged to OpenTelemetry and exported over OTLP/HTTP; trace ids then
//!   appear in logs and travel between pods. Without an endpoint nothing is
//!   bridged (spans nobody would see made a loaded pod's latency tail 8 to
//!   20 times longer), so logs carry no trace id. The export runs on its own
//!   thread from a bounded queue, so a slow or absent collector costs dropped
//!   spans, never chat latency. The standard `OTEL_*` variables apply
//!   (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
//!   `OTEL_TRACES_SAMPLER_ARG`, …), and W3C `traceparent` is the propagation
//!   format, on HTTP requests and inside bus envelopes.
//! - **Metrics**: the [`METRICS`] table is every metric the service exports
//!   (`/metrics`, Prometheus text format); label values are always from small
//!   fixed sets — never user ids, room ids or tokens.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use opentelemetry::{
    global,
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tokio_util::sync::CancellationToken;
use tracing_log::AsLog;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter,
    filter::{LevelFilter, Targets},
    fmt,
    prelude::*,
};

use crate::config::LogFormat;

/// Keeps the tracer provider; dropping it flushes pending spans.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|var| std::env::var(var).is_ok_and(|v| !v.is_empty()))
}

/// Installs logging and tracing for the process (once; later calls keep
/// the first setup).
pub fn init(format: LogFormat) -> Telemetry {
    let exporter = if otlp_configured() {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .inspect_err(|err| eprintln!("OTLP exporter not started: {err}"))
            .ok()
    } else {
        None
    };
    let exporting = exporter.is_some();
    let mut builder = SdkTracerProvider::builder();
    if let Some(exporter) = exporter {
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());
    // Only when spans go somewhere: bridging every span to OpenTelemetry
    // costs allocations per span and, with enters and exits timed, work on
    // every poll of every connection's task. At `RUST_LOG=info` with nothing
    // exported it took the p99 of 1,500 msg/s into 10,000 connections from
    // 25–71 to 560 ms (docs/benchmarks.md).
    let otel = exporting.then(|| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("chat-service"))
            .with_tracked_inactivity(false)
    });

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let max_level = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(payload_cap())
        .with(otel);
    let result = match format {
        LogFormat::Text => registry.with(fmt::layer().with_target(false)).try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_span_list(true),
            )
            .try_init(),
    };
    if result.is_ok() {
        // `log` records (tungstenite writes a few per frame) are checked
        // against this before anything else. The subscriber set it from the
        // layers' combined hint, which `payload_cap`'s open default makes
        // TRACE, so each record went through the whole dispatch only to be
        // dropped by `RUST_LOG`: 2 % of a busy server's CPU.
        tracing_log::log::set_max_level(max_level.as_log());
    }
    // Already initialised: keep the first.
    describe_metrics();
    Telemetry { provider }
}

/// Libraries whose trace-level logs print whole WebSocket frames (a
/// `refresh` frame holds a token, a `message` frame a body) are capped at
/// `debug`. This filter applies on top of `RUST_LOG`, so no setting of it
/// turns them back on.
fn payload_cap() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("tungstenite", LevelFilter::DEBUG)
        .with_target("tokio_tungstenite", LevelFilter::DEBUG)
}

/// Records the span's OpenTelemetry trace id in its `trace_id` field, so
/// that every log line inside it shows the id to look up.
pub fn record_trace_id(span: &tracing::Span) {
    let context = span.context();
    let trace_id = context.span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// The current span's context as a W3C `traceparent`, for carrying across
/// the bus.
pub fn current_traceparent() -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote span a `traceparent` names.
pub fn adopt_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Kind of a metric, as Prometheus shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric: name, kind, labels, meaning. The docs and the dashboard
/// test are checked against this table.
pub const METRICS: &[(&str, MetricKind, &str, &str)] = &[
    (
        "chat_connections",
        MetricKind::Gauge,
        "",
        "WebSocket connections open on this pod",
    ),
    (
        "chat_runtime_info",
        MetricKind::Gauge,
        "flavor, workers",
        "Always 1; its labels name the pod's async scheduler (current_thread on one CPU, else multi_thread) and its worker threads",
    ),
    (
        "chat_runtime_loop_lag_seconds",
        MetricKind::Histogram,
        "",
        "How late the async runtime woke a task whose timer was due (probed every 50 ms; up to 1 ms is the timer's granularity): the time a ready task waits for the pod's CPU",
    ),
    (
        "chat_connections_total",
        MetricKind::Counter,
        "",
        "WebSocket connections accepted (after the upgrade)",
    ),
    (
        "chat_connections_refused_total",
        MetricKind::Counter,
        "reason",
        "WebSocket connection attempts refused before the upgrade, by error code",
    ),
    (
        "chat_messages_accepted_total",
        MetricKind::Counter,
        "transport",
        "Sends stored (new, not idempotent repeats), by transport: ws or rest",
    ),
    (
        "chat_messages_duplicate_total",
        MetricKind::Counter,
        "transport",
        "Sends answered with the original message (idempotent repeats)",
    ),
    (
        "chat_messages_refused_total",
        MetricKind::Counter,
        "transport, reason",
        "Sends refused, by error code (bad_request, invalid_message, message_too_long, rate_limited, forbidden, unavailable, …)",
    ),
    (
        "chat_deliveries_total",
        MetricKind::Counter,
        "",
        "Message frames queued to connections on this pod (one per recipient)",
    ),
    (
        "chat_send_ack_seconds",
        MetricKind::Histogram,
        "transport",
        "From receiving a send to answering it (ack or REST response)",
    ),
    (
        "chat_send_delivery_seconds",
        MetricKind::Histogram,
        "",
        "From receiving a send (on any pod) to queueing it for a recipient on this pod",
    ),
    (
        "chat_rate_limited_total",
        MetricKind::Counter,
        "kind",
        "Requests refused by a rate limit: send, connect or rest",
    ),
    (
        "chat_slow_consumer_closes_total",
        MetricKind::Counter,
        "",
        "Connections closed with 4008 (outbound queue full or write timeout)",
    ),
    (
        "chat_connection_closes_total",
        MetricKind::Counter,
        "code",
        "Connections closed by the server, by close code",
    ),
    (
        "chat_bus_reconnects_total",
        MetricKind::Counter,
        "",
        "Reconnections of the Redis Pub/Sub subscriber",
    ),
    (
        "chat_bus_publish_errors_total",
        MetricKind::Counter,
        "",
        "Events that could not be published to the bus (recovered from the database)",
    ),
    (
        "chat_gap_fills_total",
        MetricKind::Counter,
        "",
        "Messages delivered from the database because their bus event was late or lost",
    ),
    (
        "chat_fanout_held_total",
        MetricKind::Counter,
        "",
        "Events held for a big room's batched fan-out because the pod was behind",
    ),
    (
        "chat_fanout_writes_total",
        MetricKind::Counter,
        "path",
        "Socket writes of fan-out frames, by path: direct (the hub wrote to an idle connection at once) or session (the connection's session wrote what was queued for it)",
    ),
    (
        "chat_fanout_written_frames_total",
        MetricKind::Counter,
        "path",
        "Fan-out frames in those writes, by path; divided by chat_fanout_writes_total, the frames per system call",
    ),
    (
        "chat_db_query_seconds",
        MetricKind::Histogram,
        "op",
        "Duration of store operations, by operation",
    ),
    (
        "chat_db_errors_total",
        MetricKind::Counter,
        "op",
        "Store operations that failed, by operation",
    ),
    (
        "chat_store_batch_size",
        MetricKind::Histogram,
        "",
        "Messages stored per append transaction (group commit)",
    ),
    (
        "chat_http_header_timeouts_total",
        MetricKind::Counter,
        "",
        "Connections closed because a request head did not arrive in time (idle keep-alive closes not counted)",
    ),
    (
        "chat_http_request_duration_seconds",
        MetricKind::Histogram,
        "route, method, status",
        "HTTP requests, by route (operation id or fixed path), method and status",
    ),
    (
        "chat_rate_limit_check_seconds",
        MetricKind::Histogram,
        "kind",
        "Duration of rate-limit checks (a Redis round trip in cluster mode), by limit",
    ),
    (
        "chat_limiter_batch_size",
        MetricKind::Histogram,
        "",
        "Rate-limit checks decided per Redis script call",
    ),
    (
        "chat_limiter_fallback_total",
        MetricKind::Counter,
        "",
        "Rate-limit checks answered by the per-pod fallback because Redis failed",
    ),
    (
        "chat_cache_lookups_total",
        MetricKind::Counter,
        "kind, result",
        "Redis cache lookups (room, members, history) by result (hit, miss)",
    ),
    (
        "chat_cache_errors_total",
        MetricKind::Counter,
        "op, reason",
        "Redis cache operations that failed or were skipped",
    ),
];

/// Histogram buckets: 50 µs to 10 s, so that both in-memory fan-out and
/// a stalled database resolve, with the delivery objectives' bounds
/// (20 ms and 50 ms at p99 and p99.9, docs/benchmarks.md) among them, so
/// the share of deliveries within each is read exactly, not interpolated.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of the `*_batch_size` histograms: 1 to the largest batch (512).
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Registers every metric's help text, and makes the unlabelled counters and
/// gauges visible at zero from the start.
pub fn describe_metrics() {
    for (name, kind, labels, help) in METRICS {
        match kind {
            MetricKind::Counter => {
                metrics::describe_counter!(*name, *help);
                if labels.is_empty() {
                    metrics::counter!(*name).increment(0);
                }
            }
            MetricKind::Gauge => {
                metrics::describe_gauge!(*name, *help);
                if labels.is_empty() {
                    metrics::gauge!(*name).increment(0.0);
                }
            }
            MetricKind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
}

/// Records which async scheduler runs this process (`chat_runtime_info`),
/// when called on a tokio runtime.
pub fn record_runtime() {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let flavor = match runtime.runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => "current_thread",
        tokio::runtime::RuntimeFlavor::MultiThread => "multi_thread",
        _ => "other",
    };
    let workers = runtime.metrics().num_workers().to_string();
    metrics::gauge!("chat_runtime_info", "flavor" => flavor, "workers" => workers).set(1.0);
}

/// How often [`watch_loop_lag`] asks to be woken.
const LOOP_PROBE_EVERY: Duration = Duration::from_millis(50);

/// A probe at least this late marks the runtime as busy (see
/// [`runtime_busy`], and [`BusyMark`] for when it does not); the next one
/// under it clears the mark.
/// (10 ms kept more of the direct writes' gain at 2,000 msg/s in rooms
/// of 50 than 5 ms, and target 2's rate still queues; docs/benchmarks.md,
/// twenty-third VM.)
const BUSY_LAG: Duration = Duration::from_millis(10);

/// Whether this process's runtime was busy at the last probe.
static RUNTIME_BUSY: AtomicBool = AtomicBool::new(false);

/// Sessions' writes of what the hub queued for them, and the frames those
/// writes carried, since the last probe (see [`BusyMark`]).
static QUEUED_WRITES: AtomicU64 = AtomicU64::new(0);
static QUEUED_FRAMES: AtomicU64 = AtomicU64::new(0);

/// Counts a session's write of `frames` frames the hub queued for it: in
/// `chat_fanout_writes_total{path="session"}` and for [`BusyMark`].
pub fn record_backlog_write(frames: usize) {
    per_message().session_writes.record(frames);
    QUEUED_WRITES.fetch_add(1, Ordering::Relaxed);
    QUEUED_FRAMES.fetch_add(frames as u64, Ordering::Relaxed);
}

/// Probes a lifted mark stays lifted: one second.
const LIFTED_PROBES: u32 = 20;

/// Fewest queued writes in one probe's period for their yield to count.
const YIELD_SAMPLE: u64 = 50;

/// The busy mark, judged also by what queueing yields. A late pod queues
/// each frame for its session so that a session which waits its turn finds
/// several to write at once; where frames come slower than the pod is late
/// (ten a second per connection in rooms of 50, at a lag of 10–30 ms),
/// a woken session finds one, its wake costs more than the write it
/// carries, and queueing keeps the pod late. So while marked busy, a
/// probe's period of at least [`YIELD_SAMPLE`] queued writes carrying
/// under 1.5 frames each lifts the mark for [`LIFTED_PROBES`] probes; a
/// probe on time clears the mark and the lift.
#[derive(Debug, Default)]
struct BusyMark {
    busy: bool,
    lifted: u32,
}

impl BusyMark {
    /// The mark after a probe `late`, given the queued writes and their
    /// frames since the previous probe.
    fn probe(&mut self, late: Duration, writes: u64, frames: u64) -> bool {
        if late < BUSY_LAG {
            self.lifted = 0;
            self.busy = false;
        } else if self.lifted > 0 {
            self.lifted -= 1;
            self.busy = false;
        } else if self.busy && writes >= YIELD_SAMPLE && 2 * frames < 3 * writes {
            self.lifted = LIFTED_PROBES - 1;
            self.busy = false;
        } else {
            self.busy = true;
        }
        self.busy
    }
}

/// Whether the runtime got to the last probe at least [`BUSY_LAG`] late
/// (unless [`BusyMark`] lifted the mark): every ready task waits about
/// that long for its turn. The hub then
/// queues frames for their sessions instead of writing them itself, since
/// a session that waits that long for its turn finds more frames queued
/// and writes them together (one system call for several), which is how
/// a busy pod catches up. Without the probe running (tests of the hub on
/// their own), never busy.
pub fn runtime_busy() -> bool {
    RUNTIME_BUSY.load(Ordering::Relaxed)
}

/// Records, until `stop`, how late the runtime wakes a task whose timer is
/// due (`chat_runtime_loop_lag_seconds`). Every ready task (a connection's
/// frame to read, an answer to write, a commit's result) waits about as
/// long for its turn, so the lag is the delay a busy or stalled pod adds to
/// every message, whatever its cause: a saturated CPU, a throttled quota,
/// a task that blocks the thread. With several workers it is that of the
/// worker the probe runs on.
pub async fn watch_loop_lag(stop: CancellationToken) {
    let lag = metrics::histogram!("chat_runtime_loop_lag_seconds");
    let mut mark = BusyMark::default();
    probe_lateness(LOOP_PROBE_EVERY, stop.cancelled(), |late| {
        lag.record(late.as_secs_f64());
        let writes = QUEUED_WRITES.swap(0, Ordering::Relaxed);
        let frames = QUEUED_FRAMES.swap(0, Ordering::Relaxed);
        RUNTIME_BUSY.store(mark.probe(late, writes, frames), Ordering::Relaxed);
    })
    .await;
}

/// Asks the runtime to wake it every `every` until `stop` completes, and
/// hands `late` how late each wake-up came. After a long stall, one late
/// wake-up is one sample, not a burst of catch-up ones. Tokio's timers
/// round up to the millisecond, so up to 1 ms of each figure is theirs.
/// (The pods' [`watch_loop_lag`]; `chat-bench` probes its own loop too.)
pub async fn probe_lateness(
    every: Duration,
    stop: impl Future<Output = ()>,
    mut late: impl FnMut(Duration),
) {
    tokio::pin!(stop);
    let mut due = tokio::time::Instant::now() + every;
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep_until(due) => {
                let now = tokio::time::Instant::now();
                late(now.saturating_duration_since(due));
                due = (due + every).max(now);
            }
        }
    }
}

/// Handles of the metrics recorded for every message and delivery,
/// registered once. Looking a metric up by name (what the `metrics` macros
/// do on each call) builds its key, copies its labels and hashes it: a few
/// percent of a pod's CPU per message when done several times per send.
pub struct PerMessage {
    /// `chat_deliveries_total`.
    pub deliveries: metrics::Counter,
    /// `chat_send_delivery_seconds`.
    pub delivery_seconds: metrics::Histogram,
    pub ws: SendMetrics,
    pub rest: SendMetrics,
    /// `chat_rate_limit_check_seconds{kind="send"}`.
    pub send_check_seconds: metrics::Histogram,
    /// `chat_db_query_seconds{op="append"}`.
    pub append_seconds: metrics::Histogram,
    /// Fan-out writes by the hub, at once, to idle connections.
    pub direct_writes: FanOutWrites,
    /// Fan-out writes by sessions, of what was queued for them.
    pub session_writes: FanOutWrites,
}

/// `chat_fanout_writes_total` and `chat_fanout_written_frames_total` of
/// one path.
pub struct FanOutWrites {
    writes: metrics::Counter,
    frames: metrics::Counter,
}

impl FanOutWrites {
    fn register(path: &'static str) -> Self {
        Self {
            writes: metrics::counter!("chat_fanout_writes_total", "path" => path),
            frames: metrics::counter!("chat_fanout_written_frames_total", "path" => path),
        }
    }

    /// One write of `frames` frames.
    pub fn record(&self, frames: usize) {
        self.record_many(1, frames);
    }

    /// `writes` writes of `frames` frames in all.
    pub fn record_many(&self, writes: usize, frames: usize) {
        if writes > 0 {
            self.writes.increment(writes as u64);
            self.frames.increment(frames as u64);
        }
    }
}

/// The per-send metrics of one transport (`transport` label).
pub struct SendMetrics {
    /// `chat_messages_accepted_total`.
    pub accepted: metrics::Counter,
    /// `chat_messages_duplicate_total`.
    pub duplicate: metrics::Counter,
    /// `chat_send_ack_seconds`.
    pub ack_seconds: metrics::Histogram,
}

impl SendMetrics {
    fn register(transport: &'static str) -> Self {
        Self {
            accepted: metrics::counter!("chat_messages_accepted_total", "transport" => transport),
            duplicate: metrics::counter!("chat_messages_duplicate_total", "transport" => transport),
            ack_seconds: metrics::histogram!("chat_send_ack_seconds", "transport" => transport),
        }
    }
}

/// The process's [`PerMessage`] handles. The first call installs the
/// process's recorder if none is yet, so no handle is bound to the no-op
/// recorder that precedes it, and registers them on a thread of its own:
/// a thread-local recorder (a test's) must not capture them.
pub fn per_message() -> &'static PerMessage {
    static HANDLES: std::sync::OnceLock<PerMessage> = std::sync::OnceLock::new();
    HANDLES.get_or_init(|| {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    crate::app::metrics_handle();
                    PerMessage {
                        deliveries: metrics::counter!("chat_deliveries_total"),
                        delivery_seconds: metrics::histogram!("chat_send_delivery_seconds"),
                        ws: SendMetrics::register("ws"),
                        rest: SendMetrics::register("rest"),
                        send_check_seconds: metrics::histogram!("chat_rate_limit_check_seconds", "kind" => "send"),
                        append_seconds: metrics::histogram!("chat_db_query_seconds", "op" => "append"),
                        direct_writes: FanOutWrites::register("direct"),
                        session_writes: FanOutWrites::register("session"),
                    }
                })
                .join()
                .expect("registering metric handles does not panic")
        })
    })
}

/// Lets a repeated warning through at most once per period, so that an
/// outage logs a line every few seconds instead of one per failed call.
/// Lock-free: it is asked on per-message paths.
pub struct LogThrottle {
    every: std::time::Duration,
    epoch: std::time::Instant,
    /// When the next line may be logged, in ms since `epoch`.
    next_ms: std::sync::atomic::AtomicU64,
}

impl LogThrottle {
    pub fn new(every: std::time::Duration) -> Self {
        Self {
            every,
            epoch: std::time::Instant::now(),
            next_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether the caller may log now; `true` for one caller per period.
    pub fn allow(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.epoch.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Relaxed);
        now >= next
            && self
                .next_ms
                .compare_exchange(next, now + self.every.as_millis() as u64, Relaxed, Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_through_per_period() {
        // An hour: a stalled machine cannot end the period between calls.
        let hourly = LogThrottle::new(std::time::Duration::from_secs(3600));
        assert!(hourly.allow(), "the first line");
        assert!(!hourly.allow(), "a second within the period");
        let brief = LogThrottle::new(std::time::Duration::from_millis(50));
        assert!(brief.allow());
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert!(brief.allow(), "the next period's first");
    }

    #[test]
    fn a_late_pod_stops_queueing_for_a_second_when_its_sessions_find_one_frame_each() {
        let late = BUSY_LAG;
        let on_time = BUSY_LAG / 2;
        let mut mark = BusyMark::default();
        assert!(!mark.probe(on_time, 0, 0), "on time: not busy");
        // Frames queued while the pod was not busy say nothing of queueing.
        assert!(
            mark.probe(late, 500, 500),
            "late: busy, whatever came before"
        );
        // Queueing paid: sessions wrote two frames a write.
        assert!(mark.probe(late, 500, 1000), "busy while queueing pays");
        // Too few writes to judge by.
        assert!(mark.probe(late, YIELD_SAMPLE - 1, YIELD_SAMPLE - 1));
        // Queueing did not pay: lifted for a second, however late the pod.
        assert!(
            !mark.probe(late, 500, 600),
            "under 1.5 frames a write lifts it"
        );
        for probe in 1..LIFTED_PROBES {
            assert!(
                !mark.probe(late * 10, 0, 0),
                "still lifted at probe {probe}"
            );
        }
        assert!(mark.probe(late, 0, 0), "busy again after a second");
        // A probe on time ends a lift too.
        assert!(!mark.probe(late, 500, 500));
        assert!(!mark.probe(on_time, 0, 0));
        assert!(mark.probe(late, 0, 0), "busy at once: the lift ended");
    }
}
