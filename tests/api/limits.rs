//! Rate limits, slow consumers and floods.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{Closed, TestApp, bodies};

#[tokio::test]
async fn sends_over_the_limit_are_refused_with_retry_after_across_websocket_and_rest() {
    let app = TestApp::spawn_with(|c| {
        c.send_rate_limit = 3;
        c.send_rate_window = Duration::from_secs(2);
    })
    .await;
    let alice = app.token("alice");
    let (mut client, _) = app.join("global", &alice).await;
    for i in 0..2 {
        client.say(&format!("m{i}"), None).await;
        client.next_of("ack").await;
    }
    let (status, _) = app
        .post(
            &alice,
            "/api/v1/rooms/global/messages",
            json!({"body": "rest"}),
        )
        .await;
    assert_eq!(status, 201, "the third send of the window, over REST");

    client.say("too many", Some("late")).await;
    let refused = client.next_of("error").await;
    assert_eq!(refused["code"], "rate_limited");
    assert_eq!(refused["client_id"], "late");
    let wait = refused["retry_after_ms"].as_u64().unwrap();
    assert!(wait > 0 && wait <= 2000, "{refused}");

    let response = app
        .http
        .post(app.url("/api/v1/rooms/global/messages"))
        .bearer_auth(&alice)
        .json(&json!({"body": "rest too"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");

    // Other users are not affected; and after the wait, alice may send again.
    let (status, _) = app
        .post(
            &app.token("bob"),
            "/api/v1/rooms/global/messages",
            json!({"body": "hi"}),
        )
        .await;
    assert_eq!(status, 201);
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    client.say("again", Some("late")).await;
    assert_eq!(client.next_of("ack").await["client_id"], "late");
}

#[tokio::test]
async fn sends_written_together_are_limited_in_their_order() {
    let app = TestApp::spawn_with(|c| {
        c.send_rate_limit = 3;
        c.send_rate_window = Duration::from_secs(60);
    })
    .await;
    let (mut client, _) = app.join("global", &app.token("alice")).await;
    let ids = ["a", "b", "c", "d", "e"];
    let frames: Vec<String> = ids
        .iter()
        .map(|id| json!({"type": "message", "body": id, "client_id": id}).to_string())
        .collect();
    client.send_together(&frames).await;
    for (i, id) in ids.iter().enumerate() {
        let answer = client.next_answer().await;
        assert_eq!(answer["client_id"], *id, "answers in the sends' order");
        if i < 3 {
            assert_eq!(answer["type"], "ack", "{answer}");
            assert_eq!(answer["seq"], i + 1);
        } else {
            assert_eq!(answer["code"], "rate_limited", "{answer}");
            assert!(answer["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0));
        }
    }
    let (_, page) = app
        .get(&app.token("x"), "/api/v1/rooms/global/messages")
        .await;
    assert_eq!(
        bodies(&page),
        ["c", "b", "a"],
        "the first three, newest first"
    );
}

#[tokio::test]
async fn other_rest_requests_are_limited_per_user() {
    let app = TestApp::spawn_with(|c| c.rest_rate_limit = 3).await;
    let alice = app.token("alice");
    for _ in 0..3 {
        assert_eq!(app.get(&alice, "/api/v1/rooms").await.0, 200);
    }
    let response = app
        .http
        .get(app.url("/api/v1/rooms"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(app.get(&app.token("bob"), "/api/v1/rooms").await.0, 200);
}

#[tokio::test]
async fn connection_attempts_are_limited_per_ip() {
    let app = TestApp::spawn_with(|c| c.connect_rate_limit = 3).await;
    let token = app.token("alice");
    for _ in 0..3 {
        app.connect_with("global", Some(&token), None, &[])
            .await
            .unwrap();
    }
    let refusal = app
        .connect_with("global", Some(&token), None, &[])
        .await
        .err()
        .unwrap();
    assert_eq!(refusal.status, 429);
    assert_eq!(refusal.body["code"], "rate_limited");
    assert!(refusal.retry_after.is_some());
}

/// A client that stops reading fills its queue and is closed with 4008,
/// while the others keep receiving.
#[tokio::test]
async fn a_slow_consumer_is_closed_with_4008_and_does_not_hold_up_the_room() {
    let app = TestApp::spawn_with(|c| {
        c.outbound_queue = 8;
        c.write_timeout = Duration::from_millis(500);
        c.send_rate_limit = 100_000;
        c.frame_flood_limit = 100_000;
    })
    .await;
    let mut sloth = app.connect_slow_reader("global", &app.token("sloth")).await;

    let (mut fast, _) = app.join("global", &app.token("fast")).await;
    let (mut sender, _) = app.join("global", &app.token("sender")).await;
    // 8 KB per message (4-byte characters), until the server gives up on the
    // sloth (its `leave` shows it) — long before a thousand.
    let body = "😀".repeat(2000);
    let mut sent = 0;
    'sending: while sent < 1000 {
        sender.say(&body, None).await;
        sender.next_of("ack").await;
        sent += 1;
        loop {
            let frame = fast.next_json().await;
            if frame["type"] == "message" {
                assert_eq!(frame["seq"], sent, "the others keep receiving, in order");
                break;
            }
            if frame["type"] == "leave" && frame["user"]["id"] == "sloth" {
                break 'sending;
            }
        }
    }
    assert!(sent < 1000, "the sloth was never closed");
    let (closed, frames) = sloth.closed().await;
    assert_eq!(closed, Closed::Code(4008));
    assert!(frames.len() <= sent as usize, "got {} frames", frames.len());
}

#[tokio::test]
async fn a_flood_of_frames_closes_with_4029() {
    let app = TestApp::spawn().await;
    let (mut client, _) = app.join("global", &app.token("flooder")).await;
    for _ in 0..400 {
        client.send_text(r#"{"type":"ping"}"#).await;
    }
    let (closed, _) = client.closed().await;
    assert_eq!(closed, Closed::Code(4029));
}
