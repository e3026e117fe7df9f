//! The chaos suite: three pods of the real binary on a PostgreSQL and a Redis
//! that the suite owns, a few hundred clients in several rooms sending
//! steadily, and faults injected while they do: Redis restarts, a pod is
//! killed (SIGKILL), another is stopped (SIGTERM), PostgreSQL goes away for a
//! few seconds, and a few clients stop reading until the server drops them as
//! slow consumers. Every client behaves as the contract tells clients to:
//! it resumes with `since` after any close, and retries an unacked send with
//! the same `client_id`.
//!
//! At the end the suite checks, from the clients' own logs and the database:
//! every stored message reached every client exactly once and in `seq`
//! order, from the point it joined until the end (or until it left); every
//! ack matches the stored row; the database has no `seq` gap and no
//! `client_id` stored twice; presence equals the connected users within its
//! bound; the pods' memory is back near its baseline. The figures go to
//! standard output and `target/chaos-report.json`.
//!
//! Size: `CHAOS_SECONDS` (fault phase, default 30) and `CHAOS_CLIENTS`
//! (default 150) — the CI size. `scripts/reliability.sh` runs the long one.
//! See docs/reliability.md.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;
#[allow(dead_code)]
#[path = "api/servers.rs"]
mod servers;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chat_service::{
    auth::JwtKeys,
    config::{Secret, ServeConfig},
};
use futures_util::{SinkExt, StreamExt};
use helpers::{Backend, SECRET, Service, spawn_service_logging};
use serde_json::{Value, json};
use servers::{PgServer, RedisServer};
use tokio::{net::TcpStream, sync::watch};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{self, Message, protocol::CloseFrame},
};

/// Presence TTL given to the pods: a killed pod's users must be gone within
/// this plus a third of it (the sweep cadence), as the README states.
const PRESENCE_TTL: Duration = Duration::from_secs(3);
/// The longest a stalled client stops reading: the stall ends as soon as
/// the pods have closed as many slow consumers as there are stalled clients.
const STALL_MAX: Duration = Duration::from_secs(25);
/// The slow room's loud senders: how many, how often, how big. Enough
/// that a stalled reader is seconds, not minutes, from filling the buffers
/// (on loopback the kernel may buffer a megabyte or more per socket).
const LOUD_SENDERS: usize = 2;
const LOUD_INTERVAL: Duration = Duration::from_millis(50);
const LOUD_BODY_CHARS: usize = 6000;
/// How long a client waits before retrying a send refused as `unavailable`.
const RETRY_AFTER: Duration = Duration::from_millis(300);
/// How long PostgreSQL stays down.
const PG_OUTAGE: Duration = Duration::from_secs(3);
/// How long Redis stays down before it restarts (empty).
const REDIS_OUTAGE: Duration = Duration::from_secs(1);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Size {
    seconds: u64,
    clients: usize,
    rooms: usize,
    stalled: usize,
    send_interval: Duration,
    body_bytes: usize,
}

impl Size {
    fn from_env() -> Self {
        let clients = env_or("CHAOS_CLIENTS", 150usize).max(10);
        Self {
            seconds: env_or("CHAOS_SECONDS", 30u64).max(20),
            clients,
            rooms: env_or("CHAOS_ROOMS", 5usize).clamp(1, clients / 2),
            stalled: env_or("CHAOS_STALLED", 4usize),
            send_interval: Duration::from_millis(env_or("CHAOS_SEND_INTERVAL_MS", 2000u64)),
            body_bytes: env_or("CHAOS_BODY_BYTES", 1500usize),
        }
    }
}

// ---------------------------------------------------------------------------
// Pods

struct Pod {
    name: String,
    addr: String,
    service: Service,
    pid: u32,
    /// VmRSS in KiB once its share of the clients is connected.
    baseline_kib: Option<u64>,
    _dir: tempfile::TempDir,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// ERROR lines the pods logged: each is a broken invariant or an
/// unexpected failure (a gap skipped, an internal error, a cache anomaly).
type PodErrors = Arc<Mutex<Vec<String>>>;

async fn start_pod(name: &str, backend: &Backend, errors: &PodErrors) -> Pod {
    let dir = tempfile::tempdir().expect("temp dir");
    let redis_url = backend.redis_url.clone().expect("cluster backend");
    let ttl = format!("{}ms", PRESENCE_TTL.as_millis());
    let errors = Arc::clone(errors);
    let pod = name.to_owned();
    let on_line = move |line: String| {
        if let Ok(entry) = serde_json::from_str::<Value>(&line)
            && entry["level"] == "ERROR"
        {
            errors.lock().unwrap().push(format!("{pod}: {line}"));
        }
    };
    let (service, addr) = spawn_service_logging(
        dir.path(),
        &[
            ("DATABASE_URL", backend.database_url.as_str()),
            ("REDIS_URL", redis_url.as_str()),
            ("REDIS_KEY_PREFIX", backend.prefix.as_str()),
            ("PRESENCE_TTL", ttl.as_str()),
            ("RESYNC_INTERVAL", "1s"),
            ("SHUTDOWN_GRACE", "5s"),
            // Every client shares 127.0.0.1 and sends steadily: raise the
            // abuse limits out of the way (they are tested elsewhere).
            ("SEND_RATE_LIMIT", "100000"),
            ("CONNECT_RATE_LIMIT", "100000"),
            ("REST_RATE_LIMIT", "100000"),
            ("FRAME_FLOOD_LIMIT", "100000"),
            // Slow consumers are found within a couple of seconds.
            ("OUTBOUND_QUEUE", "64"),
            ("WRITE_TIMEOUT", "2s"),
            ("MAX_MESSAGE_CHARS", "8000"),
            // A stalled reader of the slow room may miss more than the
            // default 500 messages; past the limit a client would page the
            // rest over REST, which this suite does not exercise.
            ("REPLAY_LIMIT", "2000"),
            ("CACHE_RECENT_MESSAGES", "2000"),
            ("RUST_LOG", "warn,chat_service::app=info"),
        ],
        on_line,
    )
    .await;
    let pid = service.id();
    Pod {
        name: name.to_owned(),
        addr,
        service,
        pid,
        baseline_kib: None,
        _dir: dir,
    }
}

/// Sends a signal to a process by pid (SIGTERM for a graceful stop).
fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid}");
}

async fn slow_consumer_closes(http: &reqwest::Client, addr: &str) -> u64 {
    let Ok(response) = http.get(format!("http://{addr}/metrics")).send().await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("chat_slow_consumer_closes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

// ---------------------------------------------------------------------------
// Clients

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Send steadily.
    Run,
    /// Send nothing new; finish (retry) what is unacked.
    Quiet,
    /// Close and hand in the log.
    End,
}

/// What the orchestrator and the clients share.
struct Shared {
    start: Instant,
    /// Pods accepting new connections (the load balancer's view).
    live: Mutex<Vec<(String, String)>>,
    /// The pod killed with SIGKILL: its "leaver" clients do not come back.
    killed: Mutex<Option<String>>,
    keys: JwtKeys,
    rooms: Vec<String>,
    body_pad: String,
    /// The body of the slow room's loud senders.
    loud_pad: String,
    send_interval: Duration,
    /// When stalled clients stop reading, and when they start again (moved
    /// earlier once the pods have closed them).
    stall_window: Mutex<Option<(Duration, Duration)>>,
}

impl Shared {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

/// What the orchestrator can see of a client while it runs.
#[derive(Default)]
struct Progress {
    /// The highest seq received, in order (the `since` of the next resume).
    last_seq: AtomicU64,
    ready_once: AtomicBool,
    inflight: AtomicBool,
    departed: AtomicBool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    Code(u16),
    /// No close frame: the socket was reset or reached EOF.
    Dropped,
    /// We closed it at the end of the run.
    Finished,
    /// It left for good after its pod was killed.
    Departed,
}

struct SessionLog {
    pod: String,
    /// When its `ready` came (None: it never got that far).
    ready_at: Option<f64>,
    closed: f64,
    ending: Ending,
    stalled: bool,
}

struct AckLog {
    client_id: String,
    seq: u64,
    id: String,
    /// When this client_id was first sent, and when it was acked.
    sent_at: f64,
    at: f64,
}

struct ClientLog {
    user: String,
    room: usize,
    staller: bool,
    /// `last_seq` of the first `ready`: the client must receive every
    /// message after it.
    base: Option<u64>,
    /// Every message received, in arrival order, across every session.
    received: Vec<(u64, String)>,
    acks: Vec<AckLog>,
    /// Distinct client_ids used (one per message meant).
    sends: u64,
    /// Repeats of an unacked client_id (after a close, `unavailable`, …).
    retries: u64,
    refusals: BTreeMap<String, u64>,
    unavailable: u64,
    sessions: Vec<SessionLog>,
    departed_at: Option<f64>,
    /// Protocol breaches seen by the client itself.
    problems: Vec<String>,
}

type Ws = WebSocketStream<TcpStream>;

enum Connect {
    Open(Box<Ws>),
    Refused(String),
}

async fn connect(addr: &str, room: &str, token: &str, since: Option<u64>, small: bool) -> Connect {
    let Ok(sock_addr) = addr.parse() else {
        return Connect::Refused(format!("bad address {addr}"));
    };
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    if small {
        // A would-be slow reader gets a tiny receive window and a small
        // segment size. On loopback (64 KiB segments) the server's kernel
        // would otherwise buffer megabytes for it, and a stall of seconds
        // would go unnoticed, unlike on a real network.
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        socket.set_tcp_mss(1024).expect("mss");
    }
    socket.set_nonblocking(true).expect("nonblocking");
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    let stream = match tokio::time::timeout(Duration::from_secs(3), socket.connect(sock_addr)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Connect::Refused(err.to_string()),
        Err(_) => return Connect::Refused("connect timed out".into()),
    };
    let mut url = format!("ws://{addr}/ws/chat/{room}?token={token}");
    if let Some(since) = since {
        url.push_str(&format!("&since={since}"));
    }
    match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    {
        Ok(Ok((ws, _))) => Connect::Open(Box::new(ws)),
        Ok(Err(tungstenite::Error::Http(response))) => {
            Connect::Refused(format!("http {}", response.status()))
        }
        Ok(Err(err)) => Connect::Refused(err.to_string()),
        Err(_) => Connect::Refused("handshake timed out".into()),
    }
}

struct Client {
    shared: Arc<Shared>,
    progress: Arc<Progress>,
    phase: watch::Receiver<Phase>,
    index: usize,
    token: String,
    leaver: bool,
    /// While clients are stalled, sends big messages often, so that a
    /// stalled reader's backlog outgrows the kernel's socket buffers within
    /// seconds.
    loud: bool,
    log: ClientLog,
    /// The number of the next new message.
    next: u64,
    /// The unacked send, if any: its client_id and when it was first sent.
    inflight: Option<String>,
    inflight_since: f64,
    /// When the current session's `ready` came.
    ready_at: Option<f64>,
    stalled_once: bool,
}

impl Client {
    fn room_id(&self) -> &str {
        &self.shared.rooms[self.log.room]
    }

    fn body(&self, client_id: &str) -> String {
        let pad = if self.loud_now() {
            &self.shared.loud_pad
        } else {
            &self.shared.body_pad
        };
        format!("{client_id} {pad}")
    }

    fn stall_due(&self) -> Option<(Duration, Duration)> {
        if !self.log.staller || self.stalled_once {
            return None;
        }
        *self.shared.stall_window.lock().unwrap()
    }

    fn now(&self) -> f64 {
        self.shared.now()
    }

    /// A loud sender is loud only while the stall lasts.
    fn loud_now(&self) -> bool {
        self.loud
            && self
                .stall_due_any()
                .is_some_and(|(from, until)| (from..until).contains(&self.shared.start.elapsed()))
    }

    fn stall_due_any(&self) -> Option<(Duration, Duration)> {
        *self.shared.stall_window.lock().unwrap()
    }

    async fn run(mut self) -> ClientLog {
        let mut attempt = self.index;
        let mut avoid: Option<String> = None;
        loop {
            if *self.phase.borrow() == Phase::End {
                break;
            }
            let pods = self.shared.live.lock().unwrap().clone();
            attempt += 1;
            let mut choice = &pods[attempt % pods.len()];
            if pods.len() > 1 && avoid.as_deref() == Some(choice.0.as_str()) {
                attempt += 1;
                choice = &pods[attempt % pods.len()];
            }
            let (pod, addr) = choice.clone();
            let since = self
                .log
                .base
                .map(|_| self.progress.last_seq.load(Ordering::Acquire));
            let room = self.room_id().to_owned();
            // Only the connection that will stall gets the small buffers.
            let small = self.log.staller && !self.stalled_once;
            let ws = match connect(&addr, &room, &self.token, since, small).await {
                Connect::Open(ws) => ws,
                Connect::Refused(reason) => {
                    *self.log.refusals.entry(reason).or_default() += 1;
                    avoid = Some(pod);
                    tokio::time::sleep(Duration::from_millis(100 + (self.index % 7) as u64 * 30))
                        .await;
                    continue;
                }
            };
            let (ending, stalled) = self.session(*ws, since).await;
            let closed = self.shared.now();
            trace(|| {
                format!(
                    "{} on {pod}: {ending:?} at {closed:.2}s (stalled: {stalled}), last seq {}",
                    self.log.user,
                    self.progress.last_seq.load(Ordering::Acquire)
                )
            });
            let killed = self.shared.killed.lock().unwrap().clone();
            let depart =
                self.leaver && ending == Ending::Dropped && killed.as_deref() == Some(pod.as_str());
            self.log.sessions.push(SessionLog {
                pod: pod.clone(),
                ready_at: self.ready_at.take(),
                closed,
                ending: if depart {
                    Ending::Departed
                } else {
                    ending.clone()
                },
                stalled,
            });
            if depart {
                self.log.departed_at = Some(closed);
                self.progress.departed.store(true, Ordering::Release);
                break;
            }
            if ending == Ending::Finished {
                break;
            }
            avoid = Some(pod);
            tokio::time::sleep(Duration::from_millis(20 + (self.index % 5) as u64 * 20)).await;
        }
        self.log
    }

    /// One connection, from `ready` to its end.
    async fn session(&mut self, mut ws: Ws, since: Option<u64>) -> (Ending, bool) {
        let mut stalled = false;
        // `ready` first.
        let ready = match tokio::time::timeout(Duration::from_secs(10), next_frame(&mut ws)).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(ending)) => return (ending, stalled),
            Err(_) => return (Ending::Dropped, stalled),
        };
        if ready["type"] != "ready" {
            self.log
                .problems
                .push(format!("first frame not ready: {ready}"));
            return (Ending::Dropped, stalled);
        }
        self.ready_at = Some(self.shared.now());
        let last_seq = ready["last_seq"].as_u64().unwrap_or(0);
        match self.log.base {
            None => {
                self.log.base = Some(last_seq);
                self.progress.last_seq.store(last_seq, Ordering::Release);
                self.progress.ready_once.store(true, Ordering::Release);
            }
            Some(_) => {
                if ready["resumed"] != true {
                    self.log
                        .problems
                        .push(format!("resume since {since:?} not complete: {ready}"));
                }
            }
        }
        let mut next_send = tokio::time::Instant::now()
            + if self.inflight.is_some() {
                Duration::ZERO
            } else {
                self.jitter()
            };
        let mut answer_by: Option<tokio::time::Instant> = None;
        loop {
            let phase = *self.phase.borrow();
            if phase == Phase::End {
                let _ = ws.close(None).await;
                return (Ending::Finished, stalled);
            }
            let stall = self.stall_due();
            let stall_at = stall.map(|(at, _)| self.shared.start + at);
            let want_send = match (&self.inflight, answer_by) {
                (Some(_), None) => true,
                (None, _) => phase == Phase::Run,
                (Some(_), Some(_)) => false,
            };
            tokio::select! {
                biased;
                _ = self.phase.changed() => {}
                () = sleep_opt(stall_at) => {
                    self.stalled_once = true;
                    stalled = true;
                    // Read nothing (and send nothing) until the stall ends.
                    trace(|| format!("{} stops reading at {:.2}s", self.log.user, self.now()));
                    while let Some((_, until)) = self.stall_due_any() {
                        if self.shared.start.elapsed() >= until {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    trace(|| format!("{} reads again at {:.2}s", self.log.user, self.now()));
                }
                () = tokio::time::sleep_until(next_send), if want_send => {
                    let client_id = match &self.inflight {
                        Some(id) => {
                            self.log.retries += 1;
                            id.clone()
                        }
                        None => {
                            let id = format!("c{}-{}", self.index, self.next);
                            self.next += 1;
                            self.log.sends += 1;
                            self.inflight = Some(id.clone());
                            self.inflight_since = self.shared.now();
                            self.progress.inflight.store(true, Ordering::Release);
                            id
                        }
                    };
                    let body = self.body(&client_id);
                    let frame = json!({"type": "message", "body": body, "client_id": client_id});
                    if ws.send(Message::text(frame.to_string())).await.is_err() {
                        return (Ending::Dropped, stalled);
                    }
                    answer_by = Some(tokio::time::Instant::now() + Duration::from_secs(15));
                }
                () = sleep_opt(answer_by) => {
                    // No answer: send it again on this connection (idempotent).
                    answer_by = None;
                    next_send = tokio::time::Instant::now();
                }
                frame = next_frame(&mut ws) => {
                    let frame = match frame {
                        Ok(frame) => frame,
                        Err(ending) => return (ending, stalled),
                    };
                    match frame["type"].as_str() {
                        Some("message") => self.on_message(&frame),
                        Some("ack") => {
                            let client_id = frame["client_id"].as_str().unwrap_or_default();
                            if self.inflight.as_deref() != Some(client_id) {
                                self.log.problems.push(format!("unexpected ack {frame}"));
                                continue;
                            }
                            self.log.acks.push(AckLog {
                                client_id: client_id.to_owned(),
                                seq: frame["seq"].as_u64().unwrap_or(0),
                                id: frame["id"].as_str().unwrap_or_default().to_owned(),
                                sent_at: self.inflight_since,
                                at: self.shared.now(),
                            });
                            self.inflight = None;
                            self.progress.inflight.store(false, Ordering::Release);
                            answer_by = None;
                            next_send = tokio::time::Instant::now() + self.jitter();
                        }
                        Some("error") => {
                            let mine = frame["client_id"].as_str().is_some()
                                && frame["client_id"].as_str() == self.inflight.as_deref();
                            if mine && frame["code"] == "unavailable" {
                                self.log.unavailable += 1;
                            } else {
                                self.log.problems.push(format!("error frame {frame}"));
                            }
                            if mine {
                                answer_by = None;
                                next_send = tokio::time::Instant::now() + RETRY_AFTER;
                            }
                        }
                        _ => {} // join, leave, typing, pong
                    }
                }
            }
        }
    }

    fn on_message(&mut self, frame: &Value) {
        let seq = frame["seq"].as_u64().unwrap_or(0);
        let id = frame["id"].as_str().unwrap_or_default().to_owned();
        let last = self.progress.last_seq.load(Ordering::Acquire);
        if seq == last + 1 {
            self.progress.last_seq.store(seq, Ordering::Release);
        }
        // Everything is logged; the order is judged at the end.
        self.log.received.push((seq, id));
    }

    fn jitter(&self) -> Duration {
        let interval = if self.loud_now() {
            LOUD_INTERVAL
        } else {
            self.shared.send_interval
        };
        let interval = interval.as_millis() as u64;
        // Spread clients over the interval, deterministically.
        let spread = (self.index as u64 * 7919 + self.next * 104_729) % interval.max(1);
        Duration::from_millis(interval / 2 + spread)
    }
}

/// `CHAOS_DEBUG=1` prints every session's end and every stall.
fn trace(line: impl FnOnce() -> String) {
    if std::env::var_os("CHAOS_DEBUG").is_some() {
        eprintln!("chaos: {}", line());
    }
}

async fn sleep_opt(at: Option<impl Into<tokio::time::Instant>>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The next JSON frame, or how the connection ended.
async fn next_frame(ws: &mut Ws) -> Result<Value, Ending> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(text.as_str()).map_err(|_| Ending::Dropped);
            }
            Some(Ok(Message::Close(Some(CloseFrame { code, .. })))) => {
                return Err(Ending::Code(code.into()));
            }
            Some(Ok(Message::Close(None))) | Some(Err(_)) | None => return Err(Ending::Dropped),
            Some(Ok(_)) => {}
        }
    }
}

// ---------------------------------------------------------------------------
// The run

struct Fault {
    kind: &'static str,
    detail: String,
    at: f64,
    /// When the fault was over (the server back, the stall ended).
    cleared: f64,
}

struct Runner {
    shared: Arc<Shared>,
    backend: Arc<Backend>,
    pods: Vec<Pod>,
    /// Pods that were killed or stopped, kept for their exit status.
    gone: Vec<Pod>,
    faults: Vec<Fault>,
    slow_closes: u64,
    http: reqwest::Client,
    pod_count: usize,
    pod_errors: PodErrors,
}

impl Runner {
    fn publish_live(&self) {
        *self.shared.live.lock().unwrap() = self
            .pods
            .iter()
            .map(|p| (p.name.clone(), p.addr.clone()))
            .collect();
    }

    async fn add_pod(&mut self) {
        self.pod_count += 1;
        let pod = start_pod(
            &format!("pod{}", self.pod_count),
            &self.backend,
            &self.pod_errors,
        )
        .await;
        self.pods.push(pod);
        self.publish_live();
    }

    /// Slow-consumer closes so far on the live pods.
    async fn slow_consumer_closes_now(&self) -> u64 {
        let mut total = 0;
        for pod in &self.pods {
            total += slow_consumer_closes(&self.http, &pod.addr).await;
        }
        total
    }

    /// Takes the first pod out of the load balancer and returns it.
    async fn take_first_pod(&mut self) -> Pod {
        let pod = self.pods.remove(0);
        self.publish_live();
        self.slow_closes += slow_consumer_closes(&self.http, &pod.addr).await;
        pod
    }
}

async fn sleep_until_secs(shared: &Shared, at: f64) {
    let when = shared.start + Duration::from_secs_f64(at);
    tokio::time::sleep_until(when.into()).await;
}

async fn presence_of(
    http: &reqwest::Client,
    addr: &str,
    token: &str,
    room: &str,
) -> Option<HashSet<String>> {
    let response = http
        .get(format!("http://{addr}/api/v1/rooms/{room}/presence"))
        .bearer_auth(token)
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body: Value = response.json().await.ok()?;
    Some(
        body["users"]
            .as_array()?
            .iter()
            .filter_map(|u| u["id"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// Polls until every room's presence (read on `addr`) is the set of users
/// whose clients are still there; returns how long that took.
async fn presence_converges(
    http: &reqwest::Client,
    addr: &str,
    token: &str,
    rooms: &[String],
    members: &[(String, usize, Arc<Progress>)],
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let mut mismatch = None;
        for (r, room) in rooms.iter().enumerate() {
            let expected: HashSet<String> = members
                .iter()
                .filter(|(_, room, p)| *room == r && !p.departed.load(Ordering::Acquire))
                .map(|(user, _, _)| user.clone())
                .collect();
            match presence_of(http, addr, token, room).await {
                Some(users) if users == expected => {}
                Some(users) => {
                    let extra: Vec<_> = users.difference(&expected).cloned().collect();
                    let missing: Vec<_> = expected.difference(&users).cloned().collect();
                    mismatch = Some(format!("{room}: extra {extra:?}, missing {missing:?}"));
                    break;
                }
                None => {
                    mismatch = Some(format!("{room}: presence unreadable"));
                    break;
                }
            }
        }
        match mismatch {
            None => return Ok(started.elapsed()),
            Some(m) if started.elapsed() > limit => {
                return Err(format!("after {:?}: {m}", started.elapsed()));
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_faults_every_acked_message_reaches_everyone_once_in_order() {
    let size = Size::from_env();
    let wall = Instant::now();
    let mut redis = RedisServer::start();
    let mut pg = PgServer::start();
    let backend = Arc::new(Backend::cluster_on(&pg.url(), &redis.url()).await);
    let config = ServeConfig::for_tests("sqlite::memory:", SECRET);
    let keys = JwtKeys::new(&Secret::new(SECRET), &config);
    let http = reqwest::Client::new();

    let mut runner = Runner {
        shared: Arc::new(Shared {
            start: Instant::now(),
            live: Mutex::new(Vec::new()),
            killed: Mutex::new(None),
            keys,
            // The normal rooms, then the slow room.
            rooms: (0..size.rooms)
                .map(|r| format!("chaos-{r}"))
                .chain(["chaos-slow".to_owned()])
                .collect(),
            body_pad: "x".repeat(size.body_bytes),
            loud_pad: "y".repeat(LOUD_BODY_CHARS),
            send_interval: size.send_interval,
            stall_window: Mutex::new(None),
        }),
        backend: Arc::clone(&backend),
        pods: Vec::new(),
        gone: Vec::new(),
        faults: Vec::new(),
        slow_closes: 0,
        http: http.clone(),
        pod_count: 0,
        pod_errors: PodErrors::default(),
    };
    for _ in 0..3 {
        runner.add_pod().await;
    }
    let shared = Arc::clone(&runner.shared);
    let observer = shared
        .keys
        .mint(
            "observer",
            None,
            &["admin".to_owned()],
            Duration::from_secs(3600),
        )
        .unwrap();
    for room in &shared.rooms {
        let response = http
            .post(format!("http://{}/api/v1/rooms", runner.pods[0].addr))
            .bearer_auth(&observer)
            .json(&json!({"id": room, "name": room, "kind": "public"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 201, "room {room} created");
    }

    // The clients: round-robin over rooms and pods. A few are stalled once;
    // one in ten, if its pod is killed, does not come back (presence must
    // then drop it within its bound).
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    let mut tasks = Vec::new();
    let mut members = Vec::new();
    for index in 0..size.clients {
        let user = format!("u{index}");
        // The first clients are the slow room's: the stalled ones and two
        // loud senders. The others are spread over the normal rooms.
        let slow_room = index < size.stalled + LOUD_SENDERS;
        let room = if slow_room {
            size.rooms
        } else {
            index % size.rooms
        };
        let progress = Arc::new(Progress::default());
        members.push((user.clone(), room, Arc::clone(&progress)));
        let staller = index < size.stalled;
        let client = Client {
            shared: Arc::clone(&shared),
            progress,
            phase: phase_rx.clone(),
            index,
            token: shared
                .keys
                .mint(&user, None, &[], Duration::from_secs(3600))
                .unwrap(),
            leaver: !slow_room && index % 10 == 0,
            loud: slow_room && !staller,
            log: ClientLog {
                user,
                room,
                staller,
                base: None,
                received: Vec::new(),
                acks: Vec::new(),
                sends: 0,
                retries: 0,
                refusals: BTreeMap::new(),
                unavailable: 0,
                sessions: Vec::new(),
                departed_at: None,
                problems: Vec::new(),
            },
            next: 0,
            inflight: None,
            inflight_since: 0.0,
            ready_at: None,
            stalled_once: false,
        };
        tasks.push(tokio::spawn(client.run()));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while members
        .iter()
        .any(|(_, _, p)| !p.ready_once.load(Ordering::Acquire))
    {
        assert!(Instant::now() < deadline, "every client connects");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let setup_seconds = wall.elapsed().as_secs_f64();

    // The fault schedule, as fractions of the run.
    let t = size.seconds as f64;
    let run_start = shared.now();
    let at = |fraction: f64| run_start + t * fraction;

    // A control point with no fault: how long "every client acked again"
    // takes anyway, given the send interval.
    sleep_until_secs(&shared, at(0.05)).await;
    let control = shared.now();
    runner.faults.push(Fault {
        kind: "none",
        detail: "control: no fault".into(),
        at: control,
        cleared: control,
    });
    sleep_until_secs(&shared, at(0.08)).await;
    for pod in &mut runner.pods {
        pod.baseline_kib = rss_kib(pod.pid);
    }

    sleep_until_secs(&shared, at(0.1)).await;
    let began = shared.now();
    blocking(|| redis.kill());
    tokio::time::sleep(REDIS_OUTAGE).await;
    blocking(|| redis.restart());
    runner.faults.push(Fault {
        kind: "redis_restart",
        detail: format!("killed, restarted empty after {REDIS_OUTAGE:?}"),
        at: began,
        cleared: shared.now(),
    });

    sleep_until_secs(&shared, at(0.2)).await;
    let mut victim = runner.take_first_pod().await;
    *shared.killed.lock().unwrap() = Some(victim.name.clone());
    let began = shared.now();
    blocking(|| {
        victim.service.kill().unwrap();
        victim.service.wait().unwrap();
    });
    runner.faults.push(Fault {
        kind: "pod_sigkill",
        detail: victim.name.clone(),
        at: began,
        cleared: began,
    });
    let victim_name = victim.name.clone();
    runner.gone.push(victim);
    runner.add_pod().await;
    // Presence must drop the departed users within TTL + TTL/3 (+ slack for
    // the HTTP polling and a loaded 2-core machine).
    let presence_bound = PRESENCE_TTL + PRESENCE_TTL / 3 + Duration::from_secs(2);
    let survivor = runner.pods[0].addr.clone();
    let kill_presence = presence_converges(
        &http,
        &survivor,
        &observer,
        &shared.rooms,
        &members,
        Duration::from_secs(20),
    )
    .await;
    let kill_presence_seconds = shared.now() - began;

    sleep_until_secs(&shared, at(0.33)).await;
    let closed_before = runner.slow_consumer_closes_now().await;
    let stall_from = Duration::from_secs_f64(shared.now());
    *shared.stall_window.lock().unwrap() = Some((stall_from, stall_from + STALL_MAX));
    while runner.slow_consumer_closes_now().await < closed_before + size.stalled as u64
        && shared.start.elapsed() < stall_from + STALL_MAX
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stall_to = Duration::from_secs_f64(shared.now());
    *shared.stall_window.lock().unwrap() = Some((stall_from, stall_to));
    runner.faults.push(Fault {
        kind: "slow_consumers",
        detail: format!(
            "{} clients stopped reading for {:.1}s, until the pods closed them",
            size.stalled,
            (stall_to - stall_from).as_secs_f64()
        ),
        at: stall_from.as_secs_f64(),
        cleared: stall_to.as_secs_f64(),
    });

    sleep_until_secs(&shared, at(0.7)).await;
    let stopped = runner.take_first_pod().await;
    let began = shared.now();
    let sigterm_at = began;
    signal(stopped.pid, "TERM");
    let stopped_name = stopped.name.clone();
    let mut stopped_service = stopped.service;
    let stopped_pid = stopped.pid;
    let exit = tokio::task::spawn_blocking(move || {
        let status = stopped_service.wait();
        (status, stopped_service)
    });
    runner.add_pod().await;
    let (status, stopped_service) = tokio::time::timeout(Duration::from_secs(15), exit)
        .await
        .expect("the stopped pod exits within its grace")
        .unwrap();
    let drained = shared.now();
    assert!(status.unwrap().success(), "a SIGTERM stop exits cleanly");
    runner.faults.push(Fault {
        kind: "pod_sigterm",
        detail: format!("{stopped_name} (pid {stopped_pid}) drained"),
        at: began,
        cleared: drained,
    });
    drop(stopped_service);

    sleep_until_secs(&shared, at(0.82)).await;
    let began = shared.now();
    blocking(|| pg.stop());
    tokio::time::sleep(PG_OUTAGE).await;
    blocking(|| pg.restart());
    runner.faults.push(Fault {
        kind: "postgres_outage",
        detail: format!("stopped for {PG_OUTAGE:?}"),
        at: began,
        cleared: shared.now(),
    });

    sleep_until_secs(&shared, at(1.0)).await;
    let quiet_at = shared.now();
    phase_tx.send(Phase::Quiet).unwrap();

    // Settle: every send acked, then every client caught up with the room.
    let deadline = Instant::now() + Duration::from_secs(40);
    while members
        .iter()
        .any(|(_, _, p)| !p.departed.load(Ordering::Acquire) && p.inflight.load(Ordering::Acquire))
    {
        assert!(Instant::now() < deadline, "every send is acked in the end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let db = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&backend.database_url)
            .await
            .expect("the database is back")
    };
    let mut db = db;
    let last_seqs: HashMap<String, u64> =
        sqlx::query_as::<_, (String, i64)>("SELECT id, last_seq FROM rooms")
            .fetch_all(&mut db)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, seq)| (id, seq as u64))
            .collect();
    while members.iter().any(|(_, room, p)| {
        !p.departed.load(Ordering::Acquire)
            && p.last_seq.load(Ordering::Acquire) < last_seqs[&shared.rooms[*room]]
    }) {
        if Instant::now() > deadline {
            break; // judged below, with the details
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settled_at = shared.now();
    // Memory once the load is gone but the same clients are connected.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let memory: Vec<Value> = runner
        .pods
        .iter()
        .map(
            |p| json!({"pod": p.name, "baseline_kib": p.baseline_kib, "after_kib": rss_kib(p.pid)}),
        )
        .collect();
    let mut final_presence = Vec::new();
    for pod in &runner.pods {
        final_presence.push((
            pod.name.clone(),
            presence_converges(
                &http,
                &pod.addr,
                &observer,
                &shared.rooms,
                &members,
                presence_bound,
            )
            .await,
        ));
    }
    for pod in &runner.pods {
        runner.slow_closes += slow_consumer_closes(&http, &pod.addr).await;
    }
    phase_tx.send(Phase::End).unwrap();
    let mut logs = Vec::new();
    for task in tasks {
        logs.push(task.await.expect("client task"));
    }

    // -----------------------------------------------------------------
    // Judgement, from the clients' logs and the database.
    let rows: Vec<(String, i64, String, String, Option<String>)> = sqlx::query_as(
        "SELECT room_id, seq, id, user_id, client_id FROM messages ORDER BY room_id, seq",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let mut failures: Vec<String> = Vec::new();
    let mut by_room: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    let mut stored_ids: HashMap<(String, String), (u64, String)> = HashMap::new();
    for (room, seq, id, user, client_id) in &rows {
        by_room
            .entry(room.clone())
            .or_default()
            .push((*seq as u64, id.clone()));
        let Some(client_id) = client_id else {
            failures.push(format!("{room} seq {seq}: stored without client_id"));
            continue;
        };
        if stored_ids
            .insert((user.clone(), client_id.clone()), (*seq as u64, id.clone()))
            .is_some()
        {
            failures.push(format!("{user} {client_id} stored twice"));
        }
    }
    let mut gaps = 0u64;
    for room in &shared.rooms {
        let seqs = by_room.get(room).map(Vec::as_slice).unwrap_or_default();
        let last = last_seqs[room];
        let contiguous = seqs
            .iter()
            .enumerate()
            .all(|(i, (seq, _))| *seq == i as u64 + 1);
        if !contiguous || seqs.len() as u64 != last {
            gaps += 1;
            failures.push(format!("{room}: seqs not 1..={last} ({} rows)", seqs.len()));
        }
    }

    let mut acked = 0u64;
    let mut sends = 0u64;
    let mut retries = 0u64;
    let mut unavailable = 0u64;
    let mut refusals: BTreeMap<String, u64> = BTreeMap::new();
    let mut losses = 0u64;
    let mut duplicates = 0u64;
    let mut out_of_order = 0u64;
    let mut delivered = 0u64;
    let mut ack_mismatches = 0u64;
    let mut unacked = 0u64;
    let mut closes: BTreeMap<String, u64> = BTreeMap::new();
    let mut sigterm_codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut stalled_endings: BTreeMap<String, u64> = BTreeMap::new();
    let mut readers_closed_as_slow = 0u64;
    for log in &logs {
        sends += log.sends;
        retries += log.retries;
        unavailable += log.unavailable;
        for (reason, n) in &log.refusals {
            *refusals.entry(reason.clone()).or_default() += n;
        }
        acked += log.acks.len() as u64;
        for problem in &log.problems {
            failures.push(format!("{}: {problem}", log.user));
        }
        // Acks: one per send, each the stored row.
        let acked_ids: HashSet<&str> = log.acks.iter().map(|a| a.client_id.as_str()).collect();
        if acked_ids.len() != log.acks.len() {
            failures.push(format!("{}: a client_id acked twice", log.user));
        }
        if log.departed_at.is_none() && (log.acks.len() as u64) != log.sends {
            unacked += log.sends - log.acks.len() as u64;
            failures.push(format!(
                "{}: {} sends, {} acked",
                log.user,
                log.sends,
                log.acks.len()
            ));
        }
        for ack in &log.acks {
            match stored_ids.get(&(log.user.clone(), ack.client_id.clone())) {
                Some((seq, id)) if *seq == ack.seq && *id == ack.id => {}
                other => {
                    ack_mismatches += 1;
                    failures.push(format!(
                        "{} {}: acked seq {} id {}, stored {other:?}",
                        log.user, ack.client_id, ack.seq, ack.id
                    ));
                }
            }
        }
        // Deliveries: exactly base+1 ..= end, in order, each the stored id.
        let room = &shared.rooms[log.room];
        let stored = by_room.get(room).map(Vec::as_slice).unwrap_or_default();
        let base = log.base.unwrap_or(0);
        let end = if log.departed_at.is_some() {
            log.received.last().map_or(base, |(s, _)| *s).max(base)
        } else {
            last_seqs[room]
        };
        let mut expected = base + 1;
        for (seq, id) in &log.received {
            delivered += 1;
            if *seq < expected {
                duplicates += 1;
                continue;
            }
            if *seq > expected {
                out_of_order += 1;
                losses += seq - expected;
            }
            if stored
                .get((*seq as usize).wrapping_sub(1))
                .is_none_or(|(_, stored_id)| stored_id != id)
            {
                failures.push(format!(
                    "{}: seq {seq} has id {id}, not the stored one",
                    log.user
                ));
            }
            expected = *seq + 1;
        }
        if expected <= end {
            losses += end + 1 - expected;
        }
        for session in &log.sessions {
            let key = match &session.ending {
                Ending::Code(code) => code.to_string(),
                other => format!("{other:?}").to_lowercase(),
            };
            *closes.entry(key.clone()).or_default() += 1;
            if session.stalled {
                *stalled_endings.entry(key.clone()).or_default() += 1;
            } else if session.ending == Ending::Code(4008) {
                readers_closed_as_slow += 1;
            }
            if session.pod == stopped_name && session.closed >= sigterm_at && !session.stalled {
                *sigterm_codes.entry(key).or_default() += 1;
            }
        }
    }
    // Nothing was stored that its client was not acked for: every send is
    // retried until acked, so a stored row no ack claims is a stray write.
    let acked_keys: HashSet<(&str, &str)> = logs
        .iter()
        .flat_map(|log| {
            log.acks
                .iter()
                .map(|ack| (log.user.as_str(), ack.client_id.as_str()))
        })
        .collect();
    // (A leaver's last send may be stored without its ack reaching it: it
    // left with its pod.)
    let departed: HashSet<&str> = logs
        .iter()
        .filter(|log| log.departed_at.is_some())
        .map(|log| log.user.as_str())
        .collect();
    let unclaimed = stored_ids
        .keys()
        .filter(|(user, client_id)| {
            !departed.contains(user.as_str())
                && !acked_keys.contains(&(user.as_str(), client_id.as_str()))
        })
        .count();
    if unclaimed > 0 {
        failures.push(format!("{unclaimed} stored messages were never acked"));
    }
    if losses + duplicates + out_of_order > 0 {
        failures.push(format!(
            "deliveries: {losses} lost, {duplicates} duplicated, {out_of_order} out of order"
        ));
    }
    // Every connection the SIGTERM closed was told 1012 (a stalled client
    // was not reading and may have been dropped instead).
    let stopped_sessions: u64 = sigterm_codes.values().sum();
    if sigterm_codes.get("1012").copied().unwrap_or(0) != stopped_sessions {
        failures.push(format!(
            "connections of the SIGTERMed pod ended with {sigterm_codes:?}, not all 1012"
        ));
    }
    if stopped_sessions == 0 {
        failures.push("no connection was on the SIGTERMed pod".into());
    }
    let kill_presence = match kill_presence {
        Ok(_) if kill_presence_seconds <= presence_bound.as_secs_f64() => kill_presence_seconds,
        Ok(_) => {
            failures.push(format!(
                "presence after the kill took {kill_presence_seconds:.2}s, bound {presence_bound:?}"
            ));
            kill_presence_seconds
        }
        Err(err) => {
            failures.push(format!("presence after the kill: {err}"));
            f64::NAN
        }
    };
    for (pod, result) in &final_presence {
        if let Err(err) = result {
            failures.push(format!("final presence on {pod}: {err}"));
        }
    }
    // A client that stops reading is cut by the server (4008, or dropped
    // when even the close frame cannot get through; 1012 if its pod was
    // stopped meanwhile), never kept forever nor allowed to slow the room.
    if runner.slow_closes == 0 && size.stalled > 0 {
        failures.push("no stalled client was closed as a slow consumer".into());
    }
    if readers_closed_as_slow > 0 {
        failures.push(format!(
            "{readers_closed_as_slow} connections that kept reading were closed as too slow"
        ));
    }
    if stalled_endings.contains_key("finished") {
        failures.push(format!(
            "a stalled connection was never closed: {stalled_endings:?}"
        ));
    }
    // Memory: with the same clients connected and the faults over, each pod
    // that was there from the start is back within 50% + 32 MiB of its RSS
    // at the start of the run (room for allocator slack, not for a leak that
    // grows with messages or reconnections).
    for pod in &runner.pods {
        if let (Some(base), Some(after)) = (pod.baseline_kib, rss_kib(pod.pid)) {
            if after > base + base / 2 + 32 * 1024 {
                failures.push(format!(
                    "{}: RSS {after} KiB after the run, {base} KiB at the start",
                    pod.name
                ));
            }
        }
    }

    let pod_errors = runner.pod_errors.lock().unwrap().clone();
    for line in &pod_errors {
        failures.push(format!("a pod logged an error: {line}"));
    }

    let recovery = recovery_figures(&runner.faults, &logs, quiet_at);
    let messages: u64 = last_seqs
        .iter()
        .filter(|(room, _)| shared.rooms.contains(room))
        .map(|(_, s)| *s)
        .sum();
    let report = json!({
        "clients": size.clients,
        "rooms": size.rooms,
        "slow_room": {
            "stalled": size.stalled,
            "loud_senders": LOUD_SENDERS,
            "loud_interval_ms": LOUD_INTERVAL.as_millis() as u64,
            "loud_body_chars": LOUD_BODY_CHARS,
        },
        "pods": 3,
        "fault_seconds": size.seconds,
        "send_interval_ms": size.send_interval.as_millis() as u64,
        "body_bytes": size.body_bytes,
        "setup_s": round2(setup_seconds),
        "settle_s": round2(settled_at - quiet_at),
        "wall_s": round2(wall.elapsed().as_secs_f64()),
        "messages_stored": messages,
        "sends": sends,
        "acked": acked,
        "unacked": unacked,
        "retries_same_client_id": retries,
        "unavailable_errors": unavailable,
        "connection_refusals": refusals,
        "deliveries": delivered,
        "losses": losses,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "ack_mismatches": ack_mismatches,
        "db_seq_gaps": gaps,
        "closes": closes,
        "sigterm_pod_closes": sigterm_codes,
        "slow_consumer_closes": runner.slow_closes,
        "stalled_sessions": stalled_endings,
        "killed_pod": victim_name,
        "departed_clients": logs.iter().filter(|l| l.departed_at.is_some()).count(),
        "presence_after_kill_s": round2(kill_presence),
        "presence_bound_s": presence_bound.as_secs_f64(),
        "memory": memory,
        "faults": recovery,
        "pod_error_logs": pod_errors.len(),
        "failures": failures.len(),
    });
    println!("CHAOS {report}");
    println!(
        "chaos: {} clients, {} rooms, {} s of faults: {messages} messages stored, {acked} acked, \
         {delivered} deliveries; losses {losses}, duplicates {duplicates}, out of order \
         {out_of_order}, seq gaps {gaps}",
        size.clients, size.rooms, size.seconds
    );
    for fault in report["faults"].as_array().unwrap() {
        println!(
            "chaos: {} at {}s ({}): longest send-to-ack across it {}s; {} reconnections, \
             the longest {}s; every client acked again {} after it cleared",
            fault["fault"],
            fault["at_s"],
            fault["detail"].as_str().unwrap_or_default(),
            fault["longest_send_to_ack_s"],
            fault["reconnections"],
            fault["longest_reconnect_s"],
            match fault["every_client_acked_again_after_s"].as_f64() {
                Some(s) => format!("{s}s"),
                None => "not before the next fault".into(),
            }
        );
    }
    println!(
        "chaos: presence back to the true set {kill_presence:.2}s after the kill \
         (bound {presence_bound:?}); {} slow consumers closed; closes {closes:?}",
        runner.slow_closes
    );
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("chaos-report.json");
    let _ = std::fs::write(&target, format!("{report:#}\n"));
    drop(db);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Time to recover, for each fault: the longest send-to-ack of a send in
/// flight during it, the connections it ended and how long their clients
/// took to be back (next `ready`), and how long after it cleared every client
/// still there (stalled ones excepted) had an ack again.
fn recovery_figures(faults: &[Fault], logs: &[ClientLog], quiet_at: f64) -> Vec<Value> {
    faults
        .iter()
        .enumerate()
        .map(|(i, fault)| {
            // Judged up to the next fault (or the end of sending), so that
            // one fault's figure does not include the next one's.
            let horizon = faults.get(i + 1).map_or(quiet_at, |next| next.at);
            let mut worst: f64 = 0.0;
            let mut worst_client = "";
            let mut longest_send: f64 = 0.0;
            let mut reconnected = 0u64;
            let mut longest_reconnect: f64 = 0.0;
            let mut lagging = 0;
            for log in logs {
                if log.departed_at.is_some() {
                    continue;
                }
                if log.staller {
                    continue; // slow on purpose
                }
                match log
                    .acks
                    .iter()
                    .find(|a| a.at >= fault.cleared && a.at <= horizon)
                {
                    Some(ack) if ack.at - fault.cleared > worst => {
                        worst = ack.at - fault.cleared;
                        worst_client = &log.user;
                    }
                    Some(_) => {}
                    None => lagging += 1,
                }
                // Connections the fault ended: how long until the client
                // was back (its next `ready`), whatever pod it took.
                for pair in log.sessions.windows(2) {
                    let (ended, next) = (&pair[0], &pair[1]);
                    if ended.closed >= fault.at
                        && ended.closed <= (fault.cleared + 1.0).min(horizon)
                        && let Some(ready) = next.ready_at
                    {
                        reconnected += 1;
                        longest_reconnect = longest_reconnect.max(ready - ended.closed);
                    }
                }
                // Sends in flight at some point of the fault.
                for ack in &log.acks {
                    if ack.sent_at <= fault.cleared && ack.at >= fault.at {
                        longest_send = longest_send.max(ack.at - ack.sent_at);
                    }
                }
            }
            let acked_again = (lagging == 0).then(|| round2(worst));
            json!({
                "fault": fault.kind,
                "detail": fault.detail,
                "at_s": round2(fault.at),
                "cleared_s": round2(fault.cleared),
                "every_client_acked_again_after_s": acked_again,
                "slowest_client": worst_client,
                "longest_send_to_ack_s": round2(longest_send),
                "reconnections": reconnected,
                "longest_reconnect_s": round2(longest_reconnect),
                "clients_without_ack_before_next_fault": lagging,
            })
        })
        .collect()
}

/// Runs a blocking call (waiting for a process) without stalling the clients
/// that share this worker thread: with two workers, a stalled one would make
/// clients miss their reads and look like slow consumers.
fn blocking<T>(call: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(call)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
