//! Traces, metrics and the dashboard, observed the way an SRE would: from
//! a trace collector, a Prometheus scrape, and Grafana's PromQL.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use chat_service::telemetry::{METRICS, MetricKind};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value::Value as AnyValue,
    trace::v1::Span,
};
use poem::{
    EndpointExt, Route, handler,
    listener::{Acceptor, Listener},
    post,
    web::Data,
};
use prost::Message as _;

use crate::helpers::{Backend, connect_to, metrics_text, scrape, spawn_service};

/// The spans an in-process OTLP/HTTP receiver got.
type Received = Arc<Mutex<Vec<Span>>>;

#[handler]
fn collect(body: Vec<u8>, Data(received): Data<&Received>) -> &'static str {
    let request =
        ExportTraceServiceRequest::decode(body.as_slice()).expect("an OTLP protobuf body");
    let mut spans = received.lock().unwrap();
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            spans.extend(scope.spans);
        }
    }
    ""
}

async fn start_collector() -> (String, Received) {
    let received = Received::default();
    let acceptor = poem::listener::TcpListener::bind("127.0.0.1:0")
        .into_acceptor()
        .await
        .unwrap();
    let addr = acceptor.local_addr()[0].as_socket_addr().copied().unwrap();
    let app = Route::new()
        .at("/v1/traces", post(collect))
        .data(Arc::clone(&received));
    tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(app));
    (format!("http://{addr}"), received)
}

fn attribute_strings(span: &Span) -> Vec<String> {
    span.attributes
        .iter()
        .filter_map(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            AnyValue::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn a_send_is_traced_across_pods_without_tokens_or_bodies() {
    let (endpoint, received) = start_collector().await;
    let backend = Backend::cluster().await;
    let redis = backend.redis_url.clone().unwrap();
    let env = [
        ("DATABASE_URL", backend.database_url.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("REDIS_KEY_PREFIX", backend.prefix.as_str()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_SERVICE_NAME", "chat-test"),
    ];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (pod_a, addr_a) = spawn_service(dir_a.path(), &env).await;
    let (pod_b, addr_b) = spawn_service(dir_b.path(), &env).await;

    let mut receiver = connect_to(&addr_b, "global", "bob").await;
    assert_eq!(receiver.next_json().await["type"], "ready");
    let mut sender = connect_to(&addr_a, "global", "alice").await;
    assert_eq!(sender.next_json().await["type"], "ready");
    const BODY: &str = "a-secret-body-that-must-not-leak";
    sender.say(BODY, Some("traced")).await;
    sender.next_of("ack").await;
    assert_eq!(receiver.next_of("message").await["body"], BODY);
    // A connection's span ends (and is exported) when it closes.
    sender.stream.close(None).await.unwrap();

    // Wait for both pods' batches: the other pod's fan-out of this send
    // (not just any remote fan-out: alice's `join` has one too, exported
    // earlier) and the closed connection's span.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let spans = loop {
        let spans = received.lock().unwrap().clone();
        let send_fan_outs = spans
            .iter()
            .find(|s| s.name == "chat.send")
            .map_or(0, |send| {
                spans
                    .iter()
                    .filter(|s| s.name == "hub.fan_out" && s.trace_id == send.trace_id)
                    .count()
            });
        let connection = spans.iter().any(|s| s.name == "ws.connection");
        if (send_fan_outs >= 2 && connection) || tokio::time::Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop((pod_a, pod_b));

    let names: HashSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "ws.connection",
        "chat.send",
        "chat.validate",
        "chat.rate_limit",
        "chat.store",
        "chat.publish",
        "hub.fan_out",
        "http.request",
    ] {
        assert!(
            names.contains(expected),
            "no {expected} span among {names:?}"
        );
    }
    let send = spans.iter().find(|s| s.name == "chat.send").unwrap();
    let in_send_trace: Vec<&str> = spans
        .iter()
        .filter(|s| s.trace_id == send.trace_id)
        .map(|s| s.name.as_str())
        .collect();
    let fan_outs = in_send_trace
        .iter()
        .filter(|n| **n == "hub.fan_out")
        .count();
    assert_eq!(
        fan_outs, 2,
        "the local fan-out and the other pod's both belong to the send's trace: {in_send_trace:?}"
    );
    for step in [
        "chat.validate",
        "chat.rate_limit",
        "chat.store",
        "chat.publish",
    ] {
        assert!(
            in_send_trace.contains(&step),
            "{step} outside the send's trace"
        );
    }

    let token_fragment = {
        let config =
            chat_service::config::ServeConfig::for_tests("sqlite::memory:", crate::helpers::SECRET);
        let keys = chat_service::auth::JwtKeys::new(
            &chat_service::config::Secret::new(crate::helpers::SECRET),
            &config,
        );
        // A token's signature differs per token; its header is common to all.
        keys.mint("alice", None, &[], Duration::from_secs(60))
            .unwrap()
            .split('.')
            .next()
            .unwrap()
            .to_owned()
    };
    for span in &spans {
        for value in attribute_strings(span) {
            assert!(!value.contains(BODY), "span {} carries the body", span.name);
            assert!(
                !value.contains(&token_fragment),
                "span {} carries a token",
                span.name
            );
        }
    }
}

#[tokio::test]
async fn sends_written_together_share_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (_pod, addr) = spawn_service(dir.path(), &[("SEND_RATE_LIMIT", "1000")]).await;
    let mut alice = connect_to(&addr, "global", "alice").await;
    alice.next_json().await;
    const SENDS: usize = 20;
    let frames: Vec<String> = (0..SENDS)
        .map(|i| serde_json::json!({"type": "message", "body": format!("m{i}"), "client_id": format!("m{i}")}).to_string())
        .collect();
    alice.send_together(&frames).await;
    for i in 0..SENDS {
        let ack = alice.next_answer().await;
        assert_eq!(ack["client_id"], format!("m{i}"), "{ack}");
        assert_eq!(ack["seq"], i + 1);
    }
    let after = scrape(&addr).await;
    assert_eq!(
        after.get("chat_store_batch_size_count{}"),
        Some(&1.0),
        "one transaction"
    );
    assert_eq!(
        after.get("chat_store_batch_size_sum{}"),
        Some(&(SENDS as f64))
    );
    assert_eq!(
        after.get("chat_send_ack_seconds_count{transport=ws}"),
        Some(&(SENDS as f64)),
        "each send is still answered and timed on its own"
    );
}

#[tokio::test]
async fn metrics_move_with_real_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let (pod, addr) = spawn_service(dir.path(), &[("SEND_RATE_LIMIT", "5")]).await;
    let before = scrape(&addr).await;
    assert_eq!(before.get("chat_connections{}"), Some(&0.0));

    let mut alice = connect_to(&addr, "global", "alice").await;
    let mut bob = connect_to(&addr, "global", "bob").await;
    alice.next_json().await;
    bob.next_json().await;
    const SENDS: usize = 5;
    for i in 0..SENDS {
        alice.say(&format!("m{i}"), None).await;
        alice.next_of("ack").await;
    }
    alice.say("one too many", None).await;
    assert_eq!(alice.next_of("error").await["code"], "rate_limited");
    alice.say("", None).await;
    assert_eq!(alice.next_of("error").await["code"], "invalid_message");
    for _ in 0..SENDS {
        bob.next_of("message").await;
    }
    let (status, _) = (
        reqwest::Client::new()
            .get(format!("http://{addr}/api/v1/rooms"))
            .send()
            .await
            .unwrap()
            .status(),
        (),
    );
    assert_eq!(status, 401);

    let after = scrape(&addr).await;
    let get = |key: &str| {
        after
            .get(key)
            .copied()
            .unwrap_or_else(|| panic!("{key} missing from {after:?}"))
    };
    assert_eq!(get("chat_connections{}"), 2.0);
    assert_eq!(
        get("chat_messages_accepted_total{transport=ws}"),
        SENDS as f64
    );
    assert_eq!(
        get("chat_messages_refused_total{reason=rate_limited,transport=ws}"),
        1.0
    );
    assert_eq!(
        get("chat_messages_refused_total{reason=invalid_message,transport=ws}"),
        1.0
    );
    assert_eq!(get("chat_rate_limited_total{kind=send}"), 1.0);
    assert_eq!(
        get("chat_deliveries_total{}"),
        (2 * SENDS) as f64,
        "each message to both connections"
    );
    assert_eq!(
        get("chat_send_ack_seconds_count{transport=ws}"),
        (SENDS + 2) as f64
    );
    assert_eq!(get("chat_send_delivery_seconds_count{}"), SENDS as f64);
    // The delivery objectives' bounds are buckets of their own.
    let text = metrics_text(&addr).await;
    for bound in ["0.02", "0.05"] {
        let bucket = format!("chat_send_delivery_seconds_bucket{{le=\"{bound}\"}} ");
        assert!(text.contains(&bucket), "{bucket} missing");
    }
    // Batch sizes count messages (or checks): their buckets run from 1 to
    // 512, not over the latency buckets.
    assert!(
        text.contains("chat_store_batch_size_bucket{le=\"512\"} "),
        "the store's batch sizes lack their buckets"
    );
    for line in text.lines().filter(|l| l.contains("_batch_size_bucket{")) {
        assert!(!line.contains("le=\"0.00005\""), "latency bucket: {line}");
    }
    assert!(get("chat_db_query_seconds_count{op=append}") >= SENDS as f64);
    // Every send's check, the refused one included; the invalid one is
    // refused before its check.
    assert_eq!(
        get("chat_rate_limit_check_seconds_count{kind=send}"),
        (SENDS + 1) as f64
    );
    assert!(get("chat_rate_limit_check_seconds_count{kind=connect}") >= 2.0);
    // Every delivery left in a fan-out write, the hub's or a session's
    // (which one depends on what each session was doing), and a write
    // carries at least one frame. (Presence frames count as well.)
    let paths = ["direct", "session"];
    let frames: f64 = paths
        .iter()
        .map(|path| get(&format!("chat_fanout_written_frames_total{{path={path}}}")))
        .sum();
    let writes: f64 = paths
        .iter()
        .map(|path| get(&format!("chat_fanout_writes_total{{path={path}}}")))
        .sum();
    assert!(
        frames >= (2 * SENDS) as f64,
        "{frames} frames written for {} deliveries",
        2 * SENDS
    );
    assert!(
        (1.0..=frames).contains(&writes),
        "{writes} writes for {frames} frames"
    );
    assert_eq!(
        get("chat_http_request_duration_seconds_count{method=GET,route=listRooms,status=401}"),
        1.0
    );
    assert!(
        get(
            "chat_http_request_duration_seconds_count{method=GET,route=/ws/chat/:room_id,status=101}"
        ) >= 2.0
    );
    for key in after.keys() {
        assert!(
            !key.contains("alice") && !key.contains("global"),
            "a user or room id as a label: {key}"
        );
    }
    drop(pod);
}

/// The runtime lag's probes so far, and how many of them were over 250 ms
/// (a bucket bound), from a pod's exposition.
fn loop_lags(text: &str) -> (f64, f64) {
    let value = |series: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(series))
            .and_then(|rest| rest.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{series} missing"))
    };
    let all = value("chat_runtime_loop_lag_seconds_count ");
    (
        all,
        all - value("chat_runtime_loop_lag_seconds_bucket{le=\"0.25\"} "),
    )
}

/// A pod that cannot run, as one starved of CPU or throttled by its quota,
/// shows it in its runtime lag: the probe it was due to run while stopped
/// is recorded as late by about as long.
#[tokio::test]
async fn a_stalled_pod_shows_in_its_runtime_lag() {
    let dir = tempfile::tempdir().unwrap();
    let (pod, addr) = spawn_service(dir.path(), &[]).await;
    // Probed every 50 ms from start-up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (probes, slow) = loop_lags(&metrics_text(&addr).await);
    assert!(probes >= 3.0, "{probes} probes in 300 ms");

    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &pod.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {name}");
    };
    signal("-STOP");
    tokio::time::sleep(Duration::from_millis(600)).await;
    signal("-CONT");
    let (after, slow_after) = loop_lags(&metrics_text(&addr).await);
    assert!(after > probes, "the probe goes on after the stall");
    assert!(
        slow_after > slow,
        "a 600 ms stall is a probe over 250 ms late: {slow} before, {slow_after} after"
    );
}

/// Every metric a dashboard query names, with Prometheus' histogram suffixes.
fn exported_series() -> HashSet<String> {
    let mut names = HashSet::new();
    for (name, kind, _, _) in METRICS {
        names.insert((*name).to_owned());
        if *kind == MetricKind::Histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

#[test]
fn the_dashboard_only_queries_metrics_the_service_exports() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/chat-service.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(expr)) = map.get("expr") {
                    out.push(expr.clone());
                }
                map.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "the dashboard has panels");
    let exported = exported_series();
    let mut used = HashSet::new();
    for expr in &exprs {
        let mut chars = expr.char_indices().peekable();
        while let Some((start, c)) = chars.next() {
            if c.is_ascii_alphabetic() || c == '_' {
                let mut end = start + c.len_utf8();
                while let Some((i, c)) = chars.peek().copied() {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        end = i + c.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let word = &expr[start..end];
                if word.starts_with("chat_") {
                    assert!(
                        exported.contains(word),
                        "the dashboard queries {word}, which the service does not export ({expr})"
                    );
                    used.insert(word.to_owned());
                }
            }
        }
    }
    for must in [
        "chat_connections",
        "chat_send_delivery_seconds_bucket",
        "chat_messages_refused_total",
    ] {
        assert!(used.contains(must), "the dashboard should show {must}");
    }
    assert_eq!(dashboard["title"], "Chat service");
}

#[test]
fn every_metric_is_documented() {
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/observability.md"
    ))
    .unwrap();
    for (name, _, _, _) in METRICS {
        assert!(
            docs.contains(&format!("`{name}`")),
            "docs/observability.md does not describe {name}"
        );
    }
}
