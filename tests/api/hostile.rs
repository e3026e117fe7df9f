//! Hostile input: forged and malformed tokens, malformed and oversized
//! frames and bodies, floods, clients that never read, and secrets in
//! logs. Each is answered as the contract says, nothing crashes, and —
//! checked by two well-behaved users exchanging messages meanwhile — no
//! hostile client stalls anybody else.

use std::{
    io::{BufRead, BufReader},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chat_service::config::ServeConfig;
use futures_util::SinkExt;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{
    Message,
    client::IntoClientRequest,
    protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    },
};

use crate::helpers::{Closed, SECRET, Service, TestApp, WsClient, scrape};

/// How long a well-behaved client may wait for its own message while a
/// hostile one is busy. Far below every timeout a stall would hit (write
/// timeout, idle timeout, the harness's own wait).
const PROMPT: Duration = Duration::from_secs(2);

/// Limits that keep the bystanders themselves clear of the send limit.
fn generous(config: &mut ServeConfig) {
    config.send_rate_limit = 10_000;
}

/// Two well-behaved users in one room: one sends, the other watches.
struct Bystanders {
    sender: WsClient,
    watcher: WsClient,
    sent: usize,
}

impl Bystanders {
    async fn join(app: &TestApp, room: &str) -> Self {
        let (watcher, _) = app.join(room, &app.token("watcher")).await;
        let (sender, _) = app.join(room, &app.token("sender")).await;
        Self {
            sender,
            watcher,
            sent: 0,
        }
    }

    /// Sends `n` messages; each must be acked and seen by the watcher
    /// within [`PROMPT`].
    async fn exchange(&mut self, n: usize) {
        for _ in 0..n {
            self.sent += 1;
            let body = format!("still here {}", self.sent);
            let started = tokio::time::Instant::now();
            self.sender.say(&body, None).await;
            tokio::time::timeout(PROMPT, self.sender.next_of("ack"))
                .await
                .unwrap_or_else(|_| panic!("no ack for {body:?} within {PROMPT:?}"));
            let seen = tokio::time::timeout(PROMPT, self.watcher.next_of("message"))
                .await
                .unwrap_or_else(|_| panic!("{body:?} not delivered within {PROMPT:?}"));
            assert_eq!(seen["body"], body.as_str());
            assert!(started.elapsed() < PROMPT);
        }
    }
}

/// Sends a raw WebSocket frame (the client masks it).
async fn send_frame(client: &mut WsClient, payload: Vec<u8>, opcode: OpCode, fin: bool) {
    client
        .stream
        .send(Message::Frame(Frame::message(payload, opcode, fin)))
        .await
        .expect("send frame");
}

const TEXT: OpCode = OpCode::Data(Data::Text);
const CONTINUE: OpCode = OpCode::Data(Data::Continue);

// ---------------------------------------------------------------- tokens

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A token with any header, signed HS256 with `secret` whatever the header
/// claims (the shape of an algorithm-confusion forgery).
fn forge(header: Value, claims: Value, secret: &str) -> String {
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = jsonwebtoken::crypto::sign(
        signing_input.as_bytes(),
        &EncodingKey::from_secret(secret.as_bytes()),
        Algorithm::HS256,
    )
    .expect("sign");
    format!("{signing_input}.{signature}")
}

fn later() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp() + 3600
}

/// Tokens that must all be refused with 401: forgeries beyond those of
/// `auth.rs` (which covers `alg: none`, another secret, HS512, expired,
/// not yet valid, no `sub`, no `exp` and a 9000-byte token).
fn forged_tokens() -> Vec<(&'static str, String)> {
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let claims = json!({"sub": "42", "exp": later()});
    let unsigned = |alg: &str| {
        format!(
            "{}.{}.",
            b64(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        )
    };
    let valid = forge(hs256.clone(), claims.clone(), SECRET);
    let (head, rest) = valid.split_once('.').unwrap();
    let (body, _signature) = rest.split_once('.').unwrap();
    vec![
        ("alg None", unsigned("None")),
        ("alg NONE", unsigned("NONE")),
        ("alg nOnE", unsigned("nOnE")),
        ("HS256 without signature", format!("{head}.{body}.")),
        (
            "HS256 with another token's signature",
            format!(
                "{head}.{body}.{}",
                forge(hs256.clone(), json!({"sub": "7", "exp": later()}), SECRET)
                    .rsplit('.')
                    .next()
                    .unwrap()
            ),
        ),
        // Algorithm confusion: an asymmetric algorithm named in the header,
        // "signed" with the shared secret as if it were a public key.
        (
            "RS256 header, HMAC signature",
            forge(
                json!({"alg": "RS256", "typ": "JWT"}),
                claims.clone(),
                SECRET,
            ),
        ),
        (
            "ES256 header, HMAC signature",
            forge(json!({"alg": "ES256"}), claims.clone(), SECRET),
        ),
        (
            "EdDSA header, HMAC signature",
            forge(json!({"alg": "EdDSA"}), claims.clone(), SECRET),
        ),
        (
            "no alg",
            forge(json!({"typ": "JWT"}), claims.clone(), SECRET),
        ),
        (
            "embedded jwk and jku",
            forge(
                json!({"alg": "HS256", "jwk": {"kty": "oct", "k": b64(b"attacker")},
                       "jku": "http://attacker.invalid/keys", "kid": "../../etc/passwd"}),
                claims.clone(),
                "attacker",
            ),
        ),
        ("four segments", format!("{valid}.AAAA")),
        ("two segments", format!("{head}.{body}")),
        ("not base64", "###.$$$.%%%".to_owned()),
        (
            "header not JSON",
            format!("{}.{body}.AAAA", b64(b"not json")),
        ),
        (
            "exp a string",
            forge(
                hs256.clone(),
                json!({"sub": "42", "exp": "tomorrow"}),
                SECRET,
            ),
        ),
        (
            "exp a float",
            forge(hs256.clone(), json!({"sub": "42", "exp": 1e30}), SECRET),
        ),
        (
            "exp beyond any date",
            forge(hs256.clone(), json!({"sub": "42", "exp": i64::MAX}), SECRET),
        ),
        (
            "sub a boolean",
            forge(hs256.clone(), json!({"sub": true, "exp": later()}), SECRET),
        ),
        (
            "sub an object",
            forge(
                hs256.clone(),
                json!({"sub": {"id": "42"}, "exp": later()}),
                SECRET,
            ),
        ),
        (
            "sub empty",
            forge(hs256.clone(), json!({"sub": "", "exp": later()}), SECRET),
        ),
        (
            "sub with a space",
            forge(hs256.clone(), json!({"sub": "a b", "exp": later()}), SECRET),
        ),
        (
            "sub too long",
            forge(
                hs256.clone(),
                json!({"sub": "u".repeat(129), "exp": later()}),
                SECRET,
            ),
        ),
        (
            "roles not a list",
            forge(
                hs256.clone(),
                json!({"sub": "42", "exp": later(), "roles": "admin"}),
                SECRET,
            ),
        ),
        (
            "issued in the future",
            forge(
                hs256.clone(),
                json!({"sub": "42", "exp": later(), "iat": later()}),
                SECRET,
            ),
        ),
        (
            "expired beyond the leeway",
            forge(
                hs256,
                json!({"sub": "42", "exp": later() - 3600 - 30}),
                SECRET,
            ),
        ),
    ]
}

#[tokio::test]
async fn forged_and_malformed_tokens_are_refused_with_401_everywhere() {
    let app = TestApp::spawn().await;
    for (what, token) in forged_tokens() {
        let refusal = app
            .connect_with("global", Some(&token), None, &[])
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted over the WebSocket"));
        assert_eq!(
            (refusal.status, refusal.body["code"].as_str()),
            (401, Some("unauthorized")),
            "{what}: {refusal:?}"
        );
        let bearer = format!("Bearer {token}");
        let refusal = app
            .connect_with("global", None, None, &[("authorization", &bearer)])
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted in the header"));
        assert_eq!(refusal.status, 401, "{what}");
        let (status, body) = app.get(&token, "/api/v1/rooms").await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("unauthorized")),
            "{what}: {body}"
        );
        let message = body["message"].as_str().unwrap_or_default();
        assert!(!message.contains(&token), "{what}: the token is echoed");
    }
    // Forged refreshes leave the connection and its old token in force.
    let (mut client, _) = app.join("global", &app.token("42")).await;
    for (what, token) in forged_tokens() {
        client
            .send_json(json!({"type": "refresh", "token": token}))
            .await;
        let error = client.next_json().await;
        assert_eq!(error["code"], "unauthorized", "{what}: {error}");
    }
    client.send_json(json!({"type": "ping"})).await;
    assert_eq!(client.next_json().await["type"], "pong");
}

#[tokio::test]
async fn huge_tokens_are_refused_in_every_position_and_the_service_goes_on() {
    let app = TestApp::spawn().await;
    let huge = "a".repeat(64 * 1024);
    // Header and subprotocol: read, found too large, refused with 401.
    let bearer = format!("Bearer {huge}");
    let refusal = app
        .connect_with("global", None, None, &[("authorization", &bearer)])
        .await
        .err()
        .unwrap();
    assert_eq!(refusal.status, 401, "{refusal:?}");
    let offer = format!("chat.v1, bearer.{huge}");
    let refusal = app
        .connect_with("global", None, None, &[("sec-websocket-protocol", &offer)])
        .await
        .err()
        .unwrap();
    assert_eq!(refusal.status, 401, "{refusal:?}");
    let (status, body) = app.get(&huge, "/api/v1/rooms").await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    // A megabyte in the query or a header is past what the HTTP layer reads
    // at all: refused (any 4xx) or cut off, never accepted, never a crash.
    let enormous = "a".repeat(1024 * 1024);
    let url = format!("{}?token={enormous}", app.url("/ws/chat/global"));
    if let Ok(response) = app.http.get(&url).send().await {
        assert!(response.status().is_client_error(), "{}", response.status());
    }
    if let Ok(response) = app
        .http
        .get(app.url("/api/v1/rooms"))
        .bearer_auth(&enormous)
        .send()
        .await
    {
        assert!(response.status().is_client_error(), "{}", response.status());
    }
    // Still serving.
    let (mut client, _) = app.join("global", &app.token("alice")).await;
    client.say("fine", None).await;
    client.next_of("ack").await;
}

// ---------------------------------------------------------------- frames

#[tokio::test]
async fn a_frame_flood_is_closed_with_4029_without_stalling_the_room() {
    let app = TestApp::spawn_with(generous).await;
    let mut room = Bystanders::join(&app, "global").await;
    let (mut flooder, _) = app.join("global", &app.token("flooder")).await;
    let flood = tokio::spawn(async move {
        for _ in 0..2000 {
            let frame = Message::text(r#"{"type":"ping"}"#);
            if flooder.stream.send(frame).await.is_err() {
                break;
            }
        }
        flooder.closed().await.0
    });
    room.exchange(5).await;
    assert_eq!(flood.await.unwrap(), Closed::Code(4029));
    room.exchange(2).await;
}

#[tokio::test]
async fn oversize_frames_and_messages_close_with_1009_without_stalling_the_room() {
    let app = TestApp::spawn_with(generous).await;
    let mut room = Bystanders::join(&app, "global").await;

    // One frame over the limit.
    let (mut big, _) = app.join("global", &app.token("big")).await;
    big.send_text(&"x".repeat(17 * 1024)).await;
    room.exchange(2).await;
    assert_eq!(big.closed().await.0, Closed::Code(1009));

    // Small frames that add up to a message over the limit.
    let (mut fragmented, _) = app.join("global", &app.token("fragmented")).await;
    send_frame(
        &mut fragmented,
        b"{\"type\":\"ping\",\"x\":\"".to_vec(),
        TEXT,
        false,
    )
    .await;
    for _ in 0..20 {
        let chunk = vec![b'y'; 1024];
        if fragmented
            .stream
            .send(Message::Frame(Frame::message(chunk, CONTINUE, false)))
            .await
            .is_err()
        {
            break;
        }
    }
    room.exchange(2).await;
    assert_eq!(fragmented.closed().await.0, Closed::Code(1009));
    room.exchange(1).await;
}

#[tokio::test]
async fn malformed_and_unexpected_frames_get_errors_and_the_connection_stays_usable() {
    let app = TestApp::spawn_with(generous).await;
    let mut room = Bystanders::join(&app, "global").await;
    let (mut client, _) = app.join("global", &app.token("mallory")).await;

    let deep_array = format!("{}{}", "[".repeat(8000), "]".repeat(8000));
    let deep_object = format!(
        r#"{{"type":"ping","a":{}1{}}}"#,
        r#"{"a":"#.repeat(1500),
        "}".repeat(1500)
    );
    let many_numbers = format!("[{}0]", "0,".repeat(6000));
    let cases: Vec<(&str, String, &str)> = vec![
        ("deeply nested array", deep_array, "bad_request"),
        ("deeply nested object", deep_object, "bad_request"),
        ("a huge array", many_numbers, "bad_request"),
        ("a string", json!("message").to_string(), "bad_request"),
        ("null", "null".into(), "bad_request"),
        (
            "type not a string",
            json!({"type": 1}).to_string(),
            "bad_request",
        ),
        (
            "a lone surrogate",
            r#"{"type":"message","body":"\ud800"}"#.into(),
            "bad_request",
        ),
        (
            "a NUL in the body",
            json!({"type": "message", "body": "a\u{0}b"}).to_string(),
            "invalid_message",
        ),
        (
            "a C1 control in the body",
            json!({"type": "message", "body": "a\u{85}b"}).to_string(),
            "invalid_message",
        ),
        (
            "a body just under the frame limit",
            json!({"type": "message", "body": "x".repeat(15 * 1024)}).to_string(),
            "message_too_long",
        ),
        (
            "a refresh without a token",
            json!({"type": "refresh", "token": null}).to_string(),
            "bad_request",
        ),
    ];
    for (what, frame, code) in &cases {
        assert!(frame.len() < 16 * 1024, "{what} must fit in a frame");
        client.send_text(frame).await;
        let error = client.next_of("error").await;
        assert_eq!(error["code"], *code, "{what}: {error}");
    }
    client.send_binary(vec![0xff; 1024]).await;
    assert_eq!(client.next_of("error").await["code"], "bad_request");
    room.exchange(2).await;

    // Unknown fields are ignored, including ones that try to choose the
    // author, the room, the sequence number or a role.
    client
        .send_json(json!({
            "type": "message", "body": "who am i", "client_id": "spoof",
            "user": {"id": "root", "name": "root"}, "room_id": "elsewhere",
            "seq": 1, "roles": ["admin"], "id": "forged"
        }))
        .await;
    let ack = client.next_of("ack").await;
    assert_eq!(ack["client_id"], "spoof");
    assert_ne!(ack["id"], "forged");
    let seen = room.watcher.next_of("message").await;
    assert_eq!(seen["user"]["id"], "mallory");
    assert_eq!(seen["room_id"], "global");
    assert_eq!(seen["id"], ack["id"]);

    // Still the same connection, still answering.
    client.send_json(json!({"type": "ping"})).await;
    client.next_of("pong").await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_fails_that_connection_only() {
    let app = TestApp::spawn_with(generous).await;
    let mut room = Bystanders::join(&app, "global").await;
    let (mut client, _) = app.join("global", &app.token("mallory")).await;
    let mut payload = br#"{"type":"message","body":""#.to_vec();
    payload.extend_from_slice(&[0xc3, 0x28, 0xff, 0xfe]);
    payload.extend_from_slice(br#""}"#);
    send_frame(&mut client, payload, TEXT, true).await;
    // RFC 6455 §8.1: the endpoint must fail the connection; 1007 says why.
    assert_eq!(client.closed().await.0, Closed::Code(1007));
    room.exchange(2).await;

    // Split inside a character across fragments: valid once joined.
    let (mut client, _) = app.join("global", &app.token("fragmenter")).await;
    let text = r#"{"type":"message","body":"é","client_id":"split"}"#.as_bytes();
    let cut = text.iter().position(|b| *b == 0xc3).unwrap() + 1;
    send_frame(&mut client, text[..cut].to_vec(), TEXT, false).await;
    send_frame(&mut client, text[cut..].to_vec(), CONTINUE, true).await;
    assert_eq!(client.next_of("ack").await["client_id"], "split");
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_without_delaying_the_room() {
    let app = TestApp::spawn_with(|c| {
        generous(c);
        // The sender sends as fast as the sloth's buffers fill: no flood.
        c.frame_flood_limit = 100_000;
        c.outbound_queue = 8;
        c.write_timeout = Duration::from_millis(500);
    })
    .await;
    let mut room = Bystanders::join(&app, "global").await;
    // It never reads, not even `ready`.
    let mut sloth = app.connect_slow_reader("global", &app.token("sloth")).await;
    // Large messages fill the sloth's socket and queue quickly; each must
    // still reach the watcher promptly, until the sloth is gone.
    let body = "😀".repeat(2000);
    let mut gone = false;
    // Until the sloth is gone: at least the write timeout, however fast
    // each round is.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < give_up {
        let started = tokio::time::Instant::now();
        room.sender.say(&body, None).await;
        tokio::time::timeout(PROMPT, room.sender.next_of("ack"))
            .await
            .expect("acked promptly");
        loop {
            let frame = tokio::time::timeout(PROMPT, room.watcher.next_json())
                .await
                .expect("delivered promptly while the sloth is stuck");
            if frame["type"] == "leave" && frame["user"]["id"] == "sloth" {
                gone = true;
            }
            if frame["type"] == "message" {
                break;
            }
        }
        assert!(started.elapsed() < PROMPT);
        if gone {
            break;
        }
    }
    assert!(gone, "the sloth was never closed");
    assert_eq!(sloth.closed().await.0, Closed::Code(4008));
    room.exchange(2).await;
}

// ------------------------------------------------------- connection floods

#[tokio::test]
async fn a_flood_of_connection_attempts_from_one_ip_is_refused_with_429_and_others_go_on() {
    let app = TestApp::spawn_with(|c| {
        generous(c);
        c.connect_rate_limit = 30;
        c.connect_rate_window = Duration::from_secs(60);
    })
    .await;
    let mut room = Bystanders::join(&app, "global").await;

    // Sockets that connect and never finish (or never start) a request.
    let mut idle = Vec::new();
    for i in 0..50 {
        let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        if i % 2 == 0 {
            socket
                .write_all(b"GET /ws/chat/global HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        idle.push(socket);
    }
    // Many attempts at once, valid and invalid tokens alike.
    let mut attempts = tokio::task::JoinSet::new();
    for i in 0..150 {
        let token = if i % 3 == 0 {
            "garbage".to_owned()
        } else {
            app.token(&format!("crowd{i}"))
        };
        let url = format!("{}?token={token}", app.ws_url("global"));
        attempts.spawn(async move {
            match tokio_tungstenite::connect_async(url).await {
                Ok((stream, _)) => (101, None, Some(stream)),
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => (
                    response.status().as_u16(),
                    response
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_owned()),
                    None,
                ),
                Err(other) => panic!("attempt failed outright: {other}"),
            }
        });
    }
    room.exchange(3).await;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut open = Vec::new();
    while let Some(result) = attempts.join_next().await {
        let (status, retry_after, stream) = result.unwrap();
        *statuses.entry(status).or_default() += 1;
        if status == 429 {
            assert!(retry_after.is_some(), "429 without Retry-After");
        }
        open.extend(stream);
    }
    // The bystanders' two attempts count too: 28 left for the crowd. In
    // cluster mode a Redis call slower than 250 ms (a loaded machine) fails
    // open to the pod's own window for a second, which may admit up to one
    // more window's worth: the flood is still refused, almost all of it.
    let admitted =
        statuses.get(&101).copied().unwrap_or(0) + statuses.get(&401).copied().unwrap_or(0);
    let bound = if app.state.config.redis_url.is_some() {
        28 + 30
    } else {
        28
    };
    assert!(admitted <= bound, "{statuses:?}");
    assert_eq!(
        statuses.get(&429).copied().unwrap_or(0) + admitted,
        150,
        "only 101, 401 and 429: {statuses:?}"
    );
    room.exchange(3).await;
    // REST is not counted per IP: other users' requests still pass.
    assert_eq!(app.get(&app.token("bob"), "/api/v1/rooms").await.0, 200);
    drop((idle, open));
}

/// Reads until the server closes the socket (end of stream or reset),
/// which must not answer first.
async fn closed_by_server(socket: &mut tokio::net::tcp::OwnedReadHalf) {
    let mut buf = [0u8; 256];
    if let Ok(n @ 1..) = socket.read(&mut buf).await {
        panic!(
            "the server answered: {}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
}

/// Sockets that never finish their first request's line and headers, one
/// silent and one sending a header line every 100 ms, are closed once
/// `REQUEST_HEADER_TIMEOUT` has passed, and counted; so is a keep-alive
/// connection left idle after its answer, once `KEEP_ALIVE_TIMEOUT` has
/// passed. WebSockets opened before then go on, and requests that come
/// whole are answered.
#[tokio::test]
async fn connections_that_never_finish_their_request_head_are_closed_in_time() {
    const LIMIT: Duration = Duration::from_millis(600);
    let app = TestApp::spawn_with(|c| {
        generous(c);
        c.request_header_timeout = LIMIT;
        c.keep_alive_timeout = LIMIT;
    })
    .await;
    let mut room = Bystanders::join(&app, "global").await;
    let addr = app.addr.to_string();
    let timeouts = || async { scrape(&addr).await["chat_http_header_timeouts_total{}"] };
    let before = timeouts().await;

    let started = tokio::time::Instant::now();
    let (mut silent, _silent_writes) = tokio::net::TcpStream::connect(app.addr)
        .await
        .unwrap()
        .into_split();
    let (mut slow, mut slow_writes) = tokio::net::TcpStream::connect(app.addr)
        .await
        .unwrap()
        .into_split();
    let trickle = tokio::spawn(async move {
        slow_writes
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow_writes.write_all(b"X-Slow: yes\r\n").await.is_err() {
                return;
            }
        }
    });
    let mut kept = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    // Before the request, so before the answer that starts the deadline.
    let answered = tokio::time::Instant::now();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    for socket in [&mut silent, &mut slow] {
        tokio::time::timeout(crate::helpers::WAIT, closed_by_server(socket))
            .await
            .expect("closed within the harness's wait");
    }
    assert!(
        started.elapsed() >= LIMIT,
        "closed early: {:?}",
        started.elapsed()
    );
    trickle.abort();
    let mut answer = Vec::new();
    tokio::time::timeout(crate::helpers::WAIT, kept.read_to_end(&mut answer))
        .await
        .expect("the idle keep-alive connection closed within the harness's wait")
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        answered.elapsed() >= LIMIT,
        "closed early: {:?}",
        answered.elapsed()
    );

    room.exchange(3).await;
    assert_eq!(app.get_text("/healthz").await.0, 200);
    assert!(timeouts().await - before >= 2.0, "both slow heads counted");
}

// ------------------------------------------------------------------ REST

#[tokio::test]
async fn hostile_rest_bodies_get_contract_errors() {
    let app = TestApp::spawn_with(|c| c.max_body_bytes = 32 * 1024).await;
    let alice = app.token("alice");
    let url = app.url("/api/v1/rooms/global/messages");
    let raw = |body: Vec<u8>, content_type: &'static str| {
        app.http
            .post(&url)
            .bearer_auth(&alice)
            .header("content-type", content_type)
            .body(body)
    };
    let deep = format!(
        "{}{}",
        r#"{"body":"x","extra":"#.to_owned() + &"[".repeat(10_000),
        "]".repeat(10_000) + "}"
    );
    let mut invalid_utf8 = br#"{"body":""#.to_vec();
    invalid_utf8.extend_from_slice(&[0xc3, 0x28, 0xff]);
    invalid_utf8.extend_from_slice(br#""}"#);
    let cases: Vec<(&str, Vec<u8>, &'static str, u16)> = vec![
        ("deeply nested", deep.into_bytes(), "application/json", 400),
        ("invalid UTF-8", invalid_utf8, "application/json", 400),
        ("not JSON", b"body=hi".to_vec(), "application/json", 400),
        ("empty", Vec::new(), "application/json", 400),
        ("a JSON array", b"[1,2,3]".to_vec(), "application/json", 400),
        (
            "a lone surrogate",
            br#"{"body":"\ud800"}"#.to_vec(),
            "application/json",
            400,
        ),
        (
            "a huge number",
            br#"{"body":1e999999}"#.to_vec(),
            "application/json",
            400,
        ),
        (
            "over the body limit",
            format!(r#"{{"body":"{}"}}"#, "x".repeat(40 * 1024)).into_bytes(),
            "application/json",
            413,
        ),
    ];
    for (what, body, content_type, expected) in cases {
        let response = raw(body, content_type).send().await.unwrap();
        let (status, error) = crate::helpers::status_and_json(response).await;
        assert_eq!(status, expected, "{what}: {error}");
        assert!(
            error["code"].is_string(),
            "{what}: not the error shape: {error}"
        );
    }
    // A body over the limit without a declared length (chunked) is cut off too.
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/rooms/global/messages HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {alice}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..64 {
        let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
        if socket.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let mut answer = vec![0; 64];
    let read = tokio::time::timeout(crate::helpers::WAIT, socket.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Unknown fields are ignored, including ones that try to choose the
    // author or the room.
    let (status, message) = app
        .post(
            &alice,
            "/api/v1/rooms/global/messages",
            json!({"body": "hi", "user": {"id": "root"}, "room_id": "other", "seq": 9, "deleted": true}),
        )
        .await;
    assert_eq!(status, 201, "{message}");
    assert_eq!(message["user"]["id"], "alice");
    assert_eq!(message["room_id"], "global");
    assert_eq!(message["seq"], 1);
    assert!(message.get("deleted").is_none());
    let (status, room) = app
        .post(
            &alice,
            "/api/v1/rooms",
            json!({"name": "x", "kind": "private", "owner_id": "root", "created_at": "1970-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(status, 201, "{room}");
    assert_eq!(room["owner_id"], "alice");
    let (status, error) = app
        .post(
            &alice,
            "/api/v1/rooms",
            json!({"name": "x", "kind": "global"}),
        )
        .await;
    assert_eq!((status, error["code"].as_str()), (400, Some("bad_request")));
}

#[tokio::test]
async fn hostile_query_parameters_get_400() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    for query in [
        "limit=abc",
        "limit=0",
        "limit=201",
        "limit=-1",
        "limit=99999999999999999999",
        "before_seq=-1",
        "before_seq=18446744073709551616",
        "after_seq=1e3",
        "after_seq=%FF%FE",
        "after_seq=",
    ] {
        let (status, error) = app
            .get(&alice, &format!("/api/v1/rooms/global/messages?{query}"))
            .await;
        assert_eq!(
            (status, error["code"].as_str()),
            (400, Some("bad_request")),
            "{query}: {error}"
        );
    }
    // Repeated and unknown parameters do not confuse the cursor.
    let (status, page) = app
        .get(
            &alice,
            "/api/v1/rooms/global/messages?limit=5&limit=6&x=%00&cursor=1",
        )
        .await;
    assert!(status == 200 || status == 400, "{status}: {page}");

    let token = app.token("alice");
    for query in [
        "since=-1".to_owned(),
        "since=abc".to_owned(),
        "since=18446744073709551616".to_owned(),
        "since=%FF".to_owned(),
        "since=1%00".to_owned(),
    ] {
        let url = format!("{}?token={token}&{query}", app.ws_url("global"));
        let refusal = match tokio_tungstenite::connect_async(url).await {
            Ok(_) => panic!("{query} accepted"),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response,
            Err(other) => panic!("{query}: {other}"),
        };
        assert_eq!(refusal.status().as_u16(), 400, "{query}");
    }
    // A token that is not UTF-8 once decoded: refused, not a crash.
    let url = format!("{}?token=%FF%FE%00", app.ws_url("global"));
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => panic!("accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert!([400, 401].contains(&response.status().as_u16()))
        }
        Err(other) => panic!("{other}"),
    }
    for room in ["%FF", "a%00b", "%2e%2e%2fetc", "dm:a:b:c", "dm::x"] {
        let (status, _) = app
            .get(&alice, &format!("/api/v1/rooms/{room}/messages"))
            .await;
        assert!([400, 403, 404].contains(&status), "{room}: {status}");
    }
}

// ---------------------------------------------------------------- secrets

/// The real binary with its logs (stdout and stderr) captured whole.
async fn spawn_logged(
    dir: &std::path::Path,
    rust_log: &str,
) -> (
    Service,
    String,
    Arc<Mutex<String>>,
    Vec<std::thread::JoinHandle<()>>,
) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chat-service"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("JWT_SECRET", SECRET)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", rust_log)
        .current_dir(dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the service starts");
    let logs = Arc::new(Mutex::new(String::new()));
    let (found, listening) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut readers = Vec::new();
    let sink = Arc::clone(&logs);
    readers.push(std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut logs = sink.lock().unwrap();
            logs.push_str(&line);
            logs.push('\n');
        }
    }));
    let sink = Arc::clone(&logs);
    readers.push(std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str::<Value>(&line)
                && entry["fields"]["message"] == "chat service listening"
            {
                let _ = found.send(entry["fields"]["addr"].as_str().unwrap().to_owned());
            }
            let mut logs = sink.lock().unwrap();
            logs.push_str(&line);
            logs.push('\n');
        }
    }));
    let service = Service(child);
    let addr = tokio::task::spawn_blocking(move || listening.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the service listens");
    (service, addr, logs, readers)
}

#[tokio::test]
async fn tokens_never_appear_in_debug_logs_metrics_or_error_bodies() {
    tokens_stay_out_of_logs_metrics_and_responses("debug").await;
}

/// Even when asked for everything: the WebSocket library's trace logs print
/// whole frames, and the service caps them (`telemetry::payload_cap`).
#[tokio::test]
async fn tokens_never_appear_in_trace_logs_even_when_asked_for() {
    tokens_stay_out_of_logs_metrics_and_responses(
        "trace,tungstenite=trace,tokio_tungstenite=trace",
    )
    .await;
}

/// Runs the binary at `rust_log`, uses tokens good and bad in every place a
/// token can go, and looks for them in everything it wrote and answered.
async fn tokens_stay_out_of_logs_metrics_and_responses(rust_log: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (mut service, addr, logs, readers) = spawn_logged(dir.path(), rust_log).await;
    let config = ServeConfig::for_tests("sqlite::memory:", SECRET);
    let keys =
        chat_service::auth::JwtKeys::new(&chat_service::config::Secret::new(SECRET), &config);
    let mint = |sub: &str, ttl: u64| {
        keys.mint(sub, Some("n"), &[], Duration::from_secs(ttl))
            .unwrap()
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let alice = mint("alice", 600);
    let alice_again = mint("alice", 1200);
    let bob = mint("bob", 600);
    let expired = forge(
        json!({"alg": "HS256", "typ": "JWT"}),
        json!({"sub": "alice", "exp": now - 600}),
        SECRET,
    );
    let other_secret = forge(
        json!({"alg": "HS256", "typ": "JWT"}),
        json!({"sub": "alice", "exp": now + 600}),
        "another-secret-entirely",
    );
    let garbage = "garbage-token-HUNTER2-never-log-me".to_owned();
    let tokens = [
        &alice,
        &alice_again,
        &bob,
        &expired,
        &other_secret,
        &garbage,
    ];

    let http = reqwest::Client::new();
    let base = format!("http://{addr}");
    let mut seen = String::new(); // every body and frame a client received

    // WebSocket: a valid session with refreshes good and bad.
    let url = |room: &str, token: &str| format!("ws://{addr}/ws/chat/{room}?token={token}");
    let (stream, _) = tokio_tungstenite::connect_async(url("global", &alice))
        .await
        .unwrap();
    let mut client = WsClient {
        stream,
        protocol: None,
    };
    seen.push_str(&client.next_json().await.to_string());
    client.say("hello", Some("c1")).await;
    seen.push_str(&client.next_of("ack").await.to_string());
    for token in [&alice_again, &garbage, &bob, &expired, &other_secret] {
        client
            .send_json(json!({"type": "refresh", "token": token}))
            .await;
        seen.push_str(&client.next_json().await.to_string());
    }
    // Refusals before the upgrade, the token in each position.
    for token in [&expired, &other_secret, &garbage] {
        let bearer = format!("Bearer {token}");
        let offer = format!("chat.v1, bearer.{token}");
        for request in [
            url("global", token).into_client_request().unwrap(),
            {
                let mut r = format!("ws://{addr}/ws/chat/global")
                    .into_client_request()
                    .unwrap();
                r.headers_mut()
                    .insert("authorization", bearer.parse().unwrap());
                r
            },
            {
                let mut r = format!("ws://{addr}/ws/chat/global")
                    .into_client_request()
                    .unwrap();
                r.headers_mut()
                    .insert("sec-websocket-protocol", offer.parse().unwrap());
                r
            },
        ] {
            match tokio_tungstenite::connect_async(request).await {
                Ok(_) => panic!("a bad token was accepted"),
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status().as_u16(), 401);
                    seen.push_str(&String::from_utf8_lossy(
                        response.body().as_deref().unwrap_or_default(),
                    ));
                }
                Err(other) => panic!("{other}"),
            }
        }
    }
    // A valid token refused for other reasons (no such room, bad since).
    for target in [
        url("no-such-room", &alice),
        format!("{}&since=x", url("global", &alice)),
    ] {
        if let Err(tokio_tungstenite::tungstenite::Error::Http(response)) =
            tokio_tungstenite::connect_async(target).await
        {
            seen.push_str(&String::from_utf8_lossy(
                response.body().as_deref().unwrap_or_default(),
            ));
        }
    }
    // REST with good and bad tokens.
    for token in tokens {
        for path in [
            "/api/v1/rooms",
            "/api/v1/rooms/nowhere/messages",
            "/api/v1/rooms/global/messages?limit=0",
        ] {
            let response = http
                .get(format!("{base}{path}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            seen.push_str(&response.text().await.unwrap());
        }
        let response = http
            .post(format!("{base}/api/v1/rooms/global/messages"))
            .bearer_auth(token)
            .json(&json!({"body": "via rest"}))
            .send()
            .await
            .unwrap();
        seen.push_str(&response.text().await.unwrap());
    }
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    drop(client);

    // Stop the service and collect everything it wrote.
    let pid = service.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    tokio::task::spawn_blocking(move || {
        let _ = service.wait();
        for reader in readers {
            let _ = reader.join();
        }
    })
    .await
    .unwrap();
    let logs = logs.lock().unwrap().clone();
    assert!(
        logs.contains("\"level\":\"DEBUG\""),
        "debug logs were not captured: {}",
        &logs[..logs.len().min(2000)]
    );
    assert!(
        metrics.contains("chat_connections_refused_total"),
        "{metrics}"
    );

    for token in tokens {
        // Every token shares its header segment; the payload and signature
        // segments are its own.
        let mut fragments: Vec<&str> = token.split('.').skip(1).filter(|s| s.len() >= 16).collect();
        fragments.push(token.as_str());
        for fragment in fragments {
            for (place, text) in [("logs", &logs), ("metrics", &metrics), ("responses", &seen)] {
                if let Some(at) = text.find(fragment) {
                    let start = at.saturating_sub(300);
                    panic!(
                        "a token is in the {place}: …{}…",
                        &text[start..(at + fragment.len() + 100).min(text.len())]
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn handshakes_from_origins_outside_allowed_origins_are_refused_with_403() {
    let app =
        TestApp::spawn_with(|c| c.allowed_origins = vec!["https://play.example".into()]).await;
    let token = app.token("alice");
    for origin in [
        "https://evil.example",
        "https://play.example.evil.example",
        "null",
    ] {
        let refusal = app
            .connect_with("global", Some(&token), None, &[("origin", origin)])
            .await
            .err()
            .unwrap_or_else(|| panic!("{origin} accepted"));
        assert_eq!(
            (refusal.status, refusal.body["code"].as_str()),
            (403, Some("forbidden")),
            "{origin}"
        );
    }
    let mut browser = app
        .connect_with(
            "global",
            Some(&token),
            None,
            &[("origin", "https://play.example")],
        )
        .await
        .unwrap();
    assert_eq!(browser.next_json().await["type"], "ready");
    // Clients that are not browsers send no Origin.
    app.join("global", &token).await;
}
