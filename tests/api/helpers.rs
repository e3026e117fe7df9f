//! Test harness: a real server on an ephemeral port, a real HTTP client and
//! a real WebSocket client, and a fresh database per test.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use chat_service::{
    app::{AppState, Application},
    auth::JwtKeys,
    config::{Secret, ServeConfig},
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::oneshot, task::JoinHandle};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest, http::HeaderValue},
};

pub const SECRET: &str = "test-secret-of-reasonable-length";

/// How long a test waits for something it expects before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// Where a test's data lives: a SQLite file (embedded), or its own
/// PostgreSQL schema and Redis key prefix (cluster). Several pods of one
/// test share one backend.
pub struct Backend {
    pub database_url: String,
    pub redis_url: Option<String>,
    pub prefix: String,
    cleanup: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

/// The PostgreSQL the cluster tests use; `scripts/test.sh` provides one.
pub fn test_database_url() -> String {
    std::env::var("CHAT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn test_redis_url() -> String {
    std::env::var("CHAT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

impl Backend {
    /// The backend the suite runs on: `CHAT_TEST_BACKEND=cluster` for
    /// PostgreSQL + Redis, embedded otherwise.
    pub async fn for_suite() -> Self {
        match std::env::var("CHAT_TEST_BACKEND").as_deref() {
            Ok("cluster") => Self::cluster().await,
            Ok("embedded") | Err(_) => Self::embedded(),
            Ok(other) => panic!("CHAT_TEST_BACKEND must be embedded or cluster, not {other}"),
        }
    }

    pub fn embedded() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self {
            database_url: format!("sqlite://{}", dir.path().join("chat.db").display()),
            redis_url: None,
            prefix: String::new(),
            cleanup: None,
            _dir: Some(dir),
        }
    }

    /// A fresh schema in the test PostgreSQL and a fresh Redis key prefix.
    /// Fails (never skips) when either service is unreachable.
    pub async fn cluster() -> Self {
        Self::cluster_on(&test_database_url(), &test_redis_url()).await
    }

    pub async fn cluster_on(database_url: &str, redis_url: &str) -> Self {
        use sqlx::Connection;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let schema = format!("t_{id}");
        let mut conn = sqlx::PgConnection::connect(database_url)
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "cluster tests need PostgreSQL at {database_url} (run scripts/test.sh): {err}"
                )
            });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await
            .expect("create schema");
        let client = redis::Client::open(redis_url).expect("redis url");
        let mut redis = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|err| {
                panic!("cluster tests need Redis at {redis_url} (run scripts/test.sh): {err}")
            });
        let _: String = redis::cmd("PING")
            .query_async(&mut redis)
            .await
            .expect("redis answers");
        let separator = if database_url.contains('?') { '&' } else { '?' };
        Self {
            database_url: format!("{database_url}{separator}options=-c%20search_path%3D{schema}"),
            redis_url: Some(redis_url.to_owned()),
            prefix: format!("t{id}:"),
            cleanup: Some((database_url.to_owned(), schema)),
            _dir: None,
        }
    }

    fn apply(&self, config: &mut ServeConfig) {
        config.database_url = Secret::new(&self.database_url);
        config.redis_url = self.redis_url.as_deref().map(Secret::new);
        config.redis_key_prefix = self.prefix.clone();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Best effort, off the test's runtime: drop the test's schema.
        if let Some((url, schema)) = self.cleanup.take() {
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    use sqlx::Connection;
                    let mut conn = sqlx::PgConnection::connect(&url)
                        .await
                        .map_err(std::io::Error::other)?;
                    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                        .execute(&mut conn)
                        .await
                        .map_err(std::io::Error::other)?;
                    Ok::<_, std::io::Error>(())
                })
            })
            .join();
        }
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub keys: JwtKeys,
    pub state: AppState,
    /// Keeps the test's schema (or file) alive as long as any pod uses it.
    _backend: Arc<Backend>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Starts a server on the suite's backend with the default
    /// configuration changed by `tweak`.
    pub async fn spawn_with(tweak: impl FnOnce(&mut ServeConfig)) -> Self {
        Self::spawn_on(Arc::new(Backend::for_suite().await), tweak).await
    }

    /// Starts a server (a pod) on a given backend.
    pub async fn spawn_on(backend: Arc<Backend>, tweak: impl FnOnce(&mut ServeConfig)) -> Self {
        let mut config = ServeConfig::for_tests("sqlite::memory:", SECRET);
        backend.apply(&mut config);
        tweak(&mut config);
        let keys = JwtKeys::new(&Secret::new(SECRET), &config);
        let app = Application::build(config).await.expect("app builds");
        let addr = app.local_addr();
        let state = app.state();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            http: reqwest::Client::new(),
            keys,
            state,
            _backend: backend,
            stop: Some(stop),
            server: Some(server),
        }
    }

    pub fn token(&self, sub: &str) -> String {
        self.token_with(sub, &[], Duration::from_secs(3600))
    }

    pub fn token_with(&self, sub: &str, roles: &[&str], ttl: Duration) -> String {
        let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
        self.keys
            .mint(sub, Some(&format!("user {sub}")), &roles, ttl)
            .expect("token")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, room: &str) -> String {
        format!("ws://{}/ws/chat/{room}", self.addr)
    }

    /// An unauthenticated GET of a text resource (probes, metrics, docs).
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let response = self.http.get(self.url(path)).send().await.expect("request");
        (
            response.status().as_u16(),
            response.text().await.expect("body"),
        )
    }

    pub async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        status_and_json(response).await
    }

    pub async fn post(&self, token: &str, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("request");
        status_and_json(response).await
    }

    pub async fn put(&self, token: &str, path: &str) -> (u16, Value) {
        let response = self
            .http
            .put(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        status_and_json(response).await
    }

    pub async fn delete(&self, token: &str, path: &str) -> (u16, Value) {
        let response = self
            .http
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        status_and_json(response).await
    }

    /// Creates a room through REST and returns its id.
    pub async fn create_room(&self, token: &str, id: &str, kind: &str, members: &[&str]) -> String {
        let (status, body) = self
            .post(
                token,
                "/api/v1/rooms",
                json!({"id": id, "name": id, "kind": kind, "members": members}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().expect("room id").to_owned()
    }

    /// Connects as the token's user, with the token in the query.
    pub async fn connect(&self, room: &str, token: &str) -> WsClient {
        self.connect_with(room, Some(token), None, &[])
            .await
            .expect("connects")
    }

    /// Connects and reads the `ready` frame.
    pub async fn join(&self, room: &str, token: &str) -> (WsClient, Value) {
        let mut client = self.connect(room, token).await;
        let ready = client.next_json().await;
        assert_eq!(ready["type"], "ready", "{ready}");
        (client, ready)
    }

    /// Connects with any combination of token transports and query; a
    /// refusal comes back as `(status, body, headers)`.
    pub async fn connect_with(
        &self,
        room: &str,
        query_token: Option<&str>,
        since: Option<u64>,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, Refusal> {
        let mut url = self.ws_url(room);
        let mut params = Vec::new();
        if let Some(token) = query_token {
            params.push(format!("token={token}"));
        }
        if let Some(since) = since {
            params.push(format!("since={since}"));
        }
        if !params.is_empty() {
            url = format!("{url}?{}", params.join("&"));
        }
        let mut request = url.into_client_request().expect("request");
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((stream, response)) => Ok(WsClient {
                stream,
                protocol: response
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            }),
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = response
                    .body()
                    .as_ref()
                    .map(|b| serde_json::from_slice(b).unwrap_or(Value::Null))
                    .unwrap_or(Value::Null);
                Err(Refusal {
                    status,
                    body,
                    retry_after,
                })
            }
            Err(other) => panic!("connection failed: {other}"),
        }
    }

    /// Stops the server the way SIGTERM does and waits for it to exit.
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(30), server)
                .await
                .expect("server stops")
                .expect("server task")
                .expect("server result");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A service process that is killed when the test ends, even by a panic.
pub struct Service(pub std::process::Child);

impl std::ops::Deref for Service {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Service {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs the real binary (`serve`, JSON logs) in `dir` with extra
/// environment, and returns it with the address it listens on.
pub async fn spawn_service(dir: &std::path::Path, env: &[(&str, &str)]) -> (Service, String) {
    spawn_service_logging(dir, env, drop).await
}

/// [`spawn_service`], handing every log line after start-up to `on_line`
/// (on a thread of its own).
pub async fn spawn_service_logging(
    dir: &std::path::Path,
    env: &[(&str, &str)],
    on_line: impl FnMut(String) + Send + 'static,
) -> (Service, String) {
    spawn_service_via(&[], dir, env, on_line).await
}

/// [`spawn_service_logging`], the binary started through `wrapper` (a
/// program and its arguments, e.g. `taskset -c 0`) when it is not empty.
pub async fn spawn_service_via(
    wrapper: &[&str],
    dir: &std::path::Path,
    env: &[(&str, &str)],
    on_line: impl FnMut(String) + Send + 'static,
) -> (Service, String) {
    use std::io::{BufRead, BufReader};
    let binary = env!("CARGO_BIN_EXE_chat-service");
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = std::process::Command::new(program);
            command.args(args).arg(binary);
            command
        }
        None => std::process::Command::new(binary),
    };
    let mut child = command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("JWT_SECRET", SECRET)
        .env("LOG_FORMAT", "json")
        .envs(env.iter().copied())
        .current_dir(dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the service starts");
    let stdout = child.stdout.take().expect("stdout");
    let child = Service(child);
    let addr = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let line = line.expect("log line");
            let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if entry["fields"]["message"] == "chat service listening" {
                let addr = entry["fields"]["addr"].as_str().expect("addr").to_owned();
                // Keep draining the logs so the service never blocks on them.
                std::thread::spawn(move || lines.map_while(Result::ok).for_each(on_line));
                return addr;
            }
        }
        panic!("the service exited before listening");
    })
    .await
    .expect("log reader");
    (child, addr)
}

/// Connects to a service started by [`spawn_service`] as `user`.
pub async fn connect_to(addr: &str, room: &str, user: &str) -> WsClient {
    let config = ServeConfig::for_tests("sqlite::memory:", SECRET);
    let token = JwtKeys::new(&Secret::new(SECRET), &config)
        .mint(user, None, &[], Duration::from_secs(600))
        .expect("token");
    let (stream, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/chat/{room}?token={token}"))
            .await
            .expect("connects");
    WsClient {
        stream,
        protocol: None,
    }
}

#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<String>,
}

/// The bodies of a history page's messages, in the page's order.
pub fn bodies(page: &Value) -> Vec<&str> {
    page["messages"]
        .as_array()
        .expect("a page of messages")
        .iter()
        .map(|m| m["body"].as_str().expect("a body"))
        .collect()
}

pub async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, body)
}

pub struct WsClient {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The subprotocol the server chose.
    pub protocol: Option<String>,
}

/// What a client saw when the connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    Code(u16),
    /// The connection ended without a close frame.
    Dropped,
}

impl WsClient {
    pub async fn send_json(&mut self, value: Value) {
        self.stream
            .send(Message::text(value.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.stream.send(Message::binary(data)).await.expect("send");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::text(text)).await.expect("send");
    }

    /// Writes text frames back to back, with one flush: they reach the
    /// server together, as from a client that does not wait for answers.
    pub async fn send_together(&mut self, frames: &[String]) {
        for frame in frames {
            self.stream
                .feed(Message::text(frame.as_str()))
                .await
                .expect("send");
        }
        self.stream.flush().await.expect("flush");
    }

    /// The next JSON frame that is not a broadcast (`message`, `join`,
    /// `leave`, `typing`): an answer to this client.
    pub async fn next_answer(&mut self) -> Value {
        loop {
            let frame = self.next_json().await;
            if !["message", "join", "leave", "typing"]
                .contains(&frame["type"].as_str().unwrap_or(""))
            {
                return frame;
            }
        }
    }

    /// Sends a message frame.
    pub async fn say(&mut self, body: &str, client_id: Option<&str>) {
        let mut frame = json!({"type": "message", "body": body});
        if let Some(id) = client_id {
            frame["client_id"] = json!(id);
        }
        self.send_json(frame).await;
    }

    /// The next JSON frame (control frames skipped); fails after [`WAIT`].
    pub async fn next_json(&mut self) -> Value {
        tokio::time::timeout(WAIT, self.read_json())
            .await
            .expect("a frame within the wait")
            .expect("a JSON frame, not a close")
    }

    async fn read_json(&mut self) -> Option<Value> {
        loop {
            match self.stream.next().await? {
                Ok(Message::Text(text)) => {
                    return Some(
                        serde_json::from_str(text.as_str()).expect("server frames are JSON"),
                    );
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// The next frame of the given type, skipping others (join, typing, …).
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.next_json().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Asserts that no JSON frame arrives for `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        if let Ok(Some(frame)) = tokio::time::timeout(quiet, self.read_json()).await {
            panic!("expected no frame, got {frame}");
        }
    }

    /// Asserts that no frame of the given type arrives for `quiet` (others
    /// may).
    pub async fn expect_none_of(&mut self, kind: &str, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, self.read_json()).await {
            assert_ne!(frame["type"], kind, "unexpected {frame}");
        }
    }

    /// Reads until the connection ends and returns how it ended; JSON
    /// frames on the way are returned too.
    pub async fn closed(&mut self) -> (Closed, Vec<Value>) {
        let mut frames = Vec::new();
        let ending = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match self.stream.next().await {
                    Some(Ok(Message::Text(text))) => {
                        frames.push(serde_json::from_str(text.as_str()).expect("JSON"));
                    }
                    Some(Ok(Message::Close(Some(frame)))) => {
                        return Closed::Code(frame.code.into());
                    }
                    Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return Closed::Dropped,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await
        .expect("the connection ends");
        (ending, frames)
    }
}

impl TestApp {
    /// Connects with a tiny receive buffer, so that a client that stops
    /// reading is soon stuck for the server too (the kernel cannot hide
    /// the slowness). The `ready` frame is left unread.
    pub async fn connect_slow_reader(&self, room: &str, token: &str) -> WsClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(2048).expect("buffer size");
        let stream = socket.connect(self.addr).await.expect("connects");
        let request = format!("{}?token={token}", self.ws_url(room))
            .into_client_request()
            .expect("request");
        let (stream, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
            .await
            .expect("handshake");
        WsClient {
            stream,
            protocol: None,
        }
    }
}

/// A pod's `/metrics` page.
pub async fn metrics_text(addr: &str) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Scrapes a real pod's `/metrics` with a Prometheus text parser: each
/// sample by `name{label=value,...}` (labels sorted; `name{}` without).
pub async fn scrape(addr: &str) -> HashMap<String, f64> {
    let text = metrics_text(addr).await;
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    let mut values = HashMap::new();
    for sample in scrape.samples {
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        let key = format!("{}{{{}}}", sample.metric, labels.join(","));
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.last().map(|b| b.count).unwrap_or(0.0)
            }
            prometheus_parse::Value::Summary(_) => continue,
        };
        values.insert(key, value);
    }
    values
}
