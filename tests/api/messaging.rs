//! Sending, broadcasting, acking, ordering and idempotency over WebSocket.

use std::{collections::HashSet, time::Duration};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{self, TestApp, WAIT};

#[tokio::test]
async fn ready_is_the_first_frame_and_describes_room_user_and_presence() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    let (_a, _) = app.join("global", &alice).await;
    let (_b, ready) = app.join("global", &app.token("bob")).await;
    assert_eq!(
        ready["room"],
        json!({"id": "global", "kind": "global", "name": "Global"})
    );
    assert_eq!(ready["user"], json!({"id": "bob", "name": "user bob"}));
    assert_eq!(ready["last_seq"], 0);
    assert!(
        ready.get("resumed").is_none(),
        "resumed only appears with since: {ready}"
    );
    let ids: HashSet<&str> = ready["presence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, HashSet::from(["alice", "bob"]));
}

#[tokio::test]
async fn a_message_reaches_everyone_and_only_the_sender_gets_the_ack() {
    let app = TestApp::spawn().await;
    let (mut alice, _) = app.join("global", &app.token("alice")).await;
    let (mut bob, _) = app.join("global", &app.token("bob")).await;
    alice.next_of("join").await; // bob arrived

    alice.say("  gl\r\nhf  ", Some("c-1")).await;
    let mut frames = [alice.next_json().await, alice.next_json().await];
    frames.sort_by_key(|f| f["type"].as_str().unwrap().to_owned());
    let (ack, own) = (&frames[0], &frames[1]);
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["client_id"], "c-1");
    assert_eq!(ack["seq"], 1);
    assert_eq!(own["type"], "message");

    let seen = bob.next_of("message").await;
    assert_eq!(
        seen["body"], "gl\nhf",
        "the stored and broadcast body is the trimmed one"
    );
    assert_eq!(seen["room_id"], "global");
    assert_eq!(seen["user"], json!({"id": "alice", "name": "user alice"}));
    assert_eq!(seen["client_id"], "c-1");
    assert_eq!(seen["seq"], 1);
    assert_eq!(seen["id"], ack["id"]);
    assert_eq!(seen["created_at"], ack["created_at"]);
    let created = seen["created_at"].as_str().unwrap();
    assert_eq!(
        created.len(),
        24,
        "RFC 3339 UTC with milliseconds: {created}"
    );
    assert!(created.ends_with('Z'));
    bob.expect_silence(Duration::from_millis(300)).await; // no ack for bob

    // Acked means stored: history has it.
    let (_, page) = app
        .get(&app.token("carol"), "/api/v1/rooms/global/messages")
        .await;
    assert_eq!(page["messages"][0]["id"], ack["id"]);
    assert_eq!(page["messages"][0]["body"], "gl\nhf");
}

#[tokio::test]
async fn a_retried_client_id_gets_the_original_ack_and_is_not_stored_or_broadcast_again() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    let (mut sender, _) = app.join("global", &alice).await;
    let (mut watcher, _) = app.join("global", &app.token("bob")).await;

    sender.say("once", Some("same")).await;
    let first = sender.next_of("ack").await;
    assert_eq!(watcher.next_of("message").await["body"], "once");

    // The retry, from another connection of the same user, with another body.
    let (mut retry, _) = app.join("global", &alice).await;
    retry.say("twice?", Some("same")).await;
    let second = retry.next_of("ack").await;
    assert_eq!(second, first);
    watcher.expect_silence(Duration::from_millis(400)).await;

    // And over REST: 200 with the original.
    let (status, body) = app
        .post(
            &alice,
            "/api/v1/rooms/global/messages",
            json!({"body": "thrice?", "client_id": "same"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["id"], first["id"]);
    assert_eq!(body["body"], "once");

    let (_, page) = app.get(&alice, "/api/v1/rooms/global/messages").await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);

    // Another user may use the same client_id: keys are per user.
    let (status, body) = app
        .post(
            &app.token("bob"),
            "/api/v1/rooms/global/messages",
            json!({"body": "mine", "client_id": "same"}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(body["seq"], 2);
}

#[tokio::test]
async fn concurrent_senders_give_gap_free_seqs_seen_in_order_on_every_connection() {
    let app = TestApp::spawn_with(|c| c.send_rate_limit = 10_000).await;
    let mut watchers = Vec::new();
    for i in 0..3 {
        watchers.push(app.join("global", &app.token(&format!("w{i}"))).await.0);
    }
    const SENDERS: usize = 4;
    const EACH: usize = 25;
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let (mut client, _) = app.join("global", &app.token(&format!("s{s}"))).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                client
                    .say(&format!("{s}-{i}"), Some(&format!("{s}-{i}")))
                    .await;
            }
            let mut acked = 0;
            while acked < EACH {
                if client.next_json().await["type"] == "ack" {
                    acked += 1;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let total = (SENDERS * EACH) as u64;
    for watcher in &mut watchers {
        let mut expected = 1;
        while expected <= total {
            let frame = watcher.next_of("message").await;
            assert_eq!(
                frame["seq"], expected,
                "strictly increasing, no gap: {frame}"
            );
            expected += 1;
        }
    }
    let (_, page) = app
        .get(&app.token("x"), "/api/v1/rooms/global/messages?limit=200")
        .await;
    let seqs: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=total).rev().collect::<Vec<_>>());
}

#[tokio::test]
async fn frames_written_back_to_back_are_answered_and_stored_in_their_order() {
    let app = TestApp::spawn_with(|c| c.send_rate_limit = 10_000).await;
    let (mut bob, _) = app.join("global", &app.token("bob")).await;
    let (mut alice, _) = app.join("global", &app.token("alice")).await;
    // Sends with other frames among them, more than the server takes in
    // one turn: each frame's answer, in order (None: a new message's ack).
    let mut frames = Vec::new();
    let mut answers: Vec<Option<(&str, &str)>> = Vec::new();
    let mut bodies = Vec::new();
    for i in 0..45 {
        let (frame, answer) = match i {
            7 => (
                json!({"type": "message", "body": "  ", "client_id": "blank"}).to_string(),
                Some(("invalid_message", "blank")),
            ),
            12 => (json!({"type": "ping"}).to_string(), Some(("pong", ""))),
            15 => (
                json!({"type": "message", "body": "m3", "client_id": "m3"}).to_string(),
                Some(("ack", "m3")),
            ),
            21 => ("not json".to_string(), Some(("bad_request", ""))),
            22 => (json!({"type": "typing"}).to_string(), None),
            _ => {
                bodies.push(format!("m{i}"));
                (
                    json!({"type": "message", "body": format!("m{i}"), "client_id": format!("m{i}")})
                        .to_string(),
                    None,
                )
            }
        };
        frames.push(frame);
        if i != 22 {
            answers.push(answer);
        }
    }
    alice.send_together(&frames).await;

    let mut next_seq = 1;
    let mut bodies_left = bodies.iter();
    for answer in answers {
        let frame = alice.next_answer().await;
        match answer {
            None => {
                let body = bodies_left.next().unwrap();
                assert_eq!(frame["type"], "ack", "{frame}");
                assert_eq!(frame["client_id"], *body, "acks come in the sends' order");
                assert_eq!(frame["seq"], next_seq, "{frame}");
                next_seq += 1;
            }
            Some(("ack", id)) => {
                assert_eq!(frame["type"], "ack", "{frame}");
                assert_eq!(frame["client_id"], id);
                assert_eq!(frame["seq"], 4, "a retry is answered with the original");
            }
            Some(("pong", _)) => assert_eq!(frame["type"], "pong", "{frame}"),
            Some((code, id)) => {
                assert_eq!(frame["type"], "error", "{frame}");
                assert_eq!(frame["code"], code, "{frame}");
                if !id.is_empty() {
                    assert_eq!(frame["client_id"], id);
                }
            }
        }
    }
    let stored = bodies.len() as u64;
    assert_eq!(next_seq, stored + 1);
    for (seq, body) in (1..).zip(&bodies) {
        let frame = bob.next_of("message").await;
        assert_eq!(frame["seq"], seq, "{frame}");
        assert_eq!(frame["body"], *body, "stored in the order sent");
    }
    let (_, page) = app
        .get(
            &app.token("x"),
            "/api/v1/rooms/global/messages?after_seq=0&limit=200",
        )
        .await;
    assert_eq!(helpers::bodies(&page), bodies);
}

#[tokio::test]
async fn join_and_leave_follow_a_users_first_and_last_connection() {
    let app = TestApp::spawn().await;
    let (mut alice, _) = app.join("global", &app.token("alice")).await;
    let bob = app.token("bob");
    let (mut bob1, _) = app.join("global", &bob).await;
    let join = alice.next_json().await;
    assert_eq!(
        join,
        json!({"type": "join", "room_id": "global", "user": {"id": "bob", "name": "user bob"}})
    );

    let (bob2, _) = app.join("global", &bob).await; // second connection: no join
    drop(bob2);
    alice.expect_silence(Duration::from_millis(400)).await; // nor a leave: bob1 is still there

    bob1.stream.close(None).await.unwrap();
    let leave = alice.next_json().await;
    assert_eq!(
        leave,
        json!({"type": "leave", "room_id": "global", "user": {"id": "bob", "name": "user bob"}})
    );

    let (_, presence) = app.get(&bob, "/api/v1/rooms/global/presence").await;
    assert_eq!(
        presence["users"],
        json!([{"id": "alice", "name": "user alice"}])
    );
}

#[tokio::test]
async fn typing_reaches_others_only_and_is_throttled() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    let (mut typist, _) = app.join("global", &alice).await;
    let (mut own_other_tab, _) = app.join("global", &alice).await;
    let (mut bob, _) = app.join("global", &app.token("bob")).await;
    typist.next_of("join").await;

    typist.send_json(json!({"type": "typing"})).await;
    typist.send_json(json!({"type": "typing"})).await; // within 2 s: dropped
    let typing = bob.next_json().await;
    assert_eq!(
        typing,
        json!({"type": "typing", "room_id": "global", "user": {"id": "alice", "name": "user alice"}})
    );
    bob.expect_silence(Duration::from_millis(500)).await;
    own_other_tab.next_of("join").await; // bob's join, nothing else
    own_other_tab
        .expect_silence(Duration::from_millis(200))
        .await;
    typist.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn ping_gets_pong() {
    let app = TestApp::spawn().await;
    let (mut client, _) = app.join("global", &app.token("alice")).await;
    client.send_json(json!({"type": "ping"})).await;
    assert_eq!(client.next_json().await, json!({"type": "pong"}));
}

/// A WebSocket ping (the protocol's control frame, RFC 6455 §5.5.2) is
/// answered with a pong carrying its payload, while the room is busy too.
#[tokio::test]
async fn a_websocket_ping_is_answered_with_its_payload() {
    let app = TestApp::spawn().await;
    let (mut alice, _) = app.join("global", &app.token("alice")).await;
    let (mut bob, _) = app.join("global", &app.token("bob")).await;
    alice.next_of("join").await;
    for n in 0..3 {
        bob.say(&format!("busy {n}"), None).await;
        alice
            .stream
            .send(Message::Ping(format!("probe {n}").into()))
            .await
            .expect("ping");
        let mut messages = 0;
        let pong = tokio::time::timeout(WAIT, async {
            loop {
                match alice.stream.next().await {
                    Some(Ok(Message::Pong(payload))) => return payload,
                    Some(Ok(Message::Text(_))) => messages += 1,
                    Some(Ok(_)) => {}
                    other => panic!("connection ended: {other:?}"),
                }
            }
        })
        .await
        .expect("a pong within the wait");
        assert_eq!(&pong[..], format!("probe {n}").as_bytes());
        // The room's frames kept coming around it.
        if messages == 0 {
            assert_eq!(alice.next_of("message").await["body"], format!("busy {n}"));
        }
    }
}

#[tokio::test]
async fn bad_frames_get_errors_change_nothing_and_keep_the_connection_open() {
    let app = TestApp::spawn().await;
    let (mut client, _) = app.join("global", &app.token("alice")).await;
    let cases: Vec<(String, &str, Option<&str>)> = vec![
        ("not json".into(), "bad_request", None),
        (json!({"type": "shout"}).to_string(), "bad_request", None),
        (
            json!({"type": "message", "client_id": "k1"}).to_string(),
            "bad_request",
            Some("k1"),
        ),
        (
            json!({"type": "message", "body": 42, "client_id": "k2"}).to_string(),
            "bad_request",
            Some("k2"),
        ),
        (
            json!({"type": "message", "body": "x", "client_id": "y".repeat(65)}).to_string(),
            "bad_request",
            None,
        ),
        (
            json!({"type": "message", "body": "   ", "client_id": "k3"}).to_string(),
            "invalid_message",
            Some("k3"),
        ),
        (
            json!({"type": "message", "body": "a\u{7}b", "client_id": "k4"}).to_string(),
            "invalid_message",
            Some("k4"),
        ),
        (
            json!({"type": "message", "body": "a\rb"}).to_string(),
            "invalid_message",
            None,
        ),
        (
            json!({"type": "message", "body": "é".repeat(2001), "client_id": "k5"}).to_string(),
            "message_too_long",
            Some("k5"),
        ),
        (json!({"type": "refresh"}).to_string(), "bad_request", None),
    ];
    for (frame, code, client_id) in &cases {
        client.send_text(frame).await;
        let error = client.next_json().await;
        assert_eq!(error["type"], "error", "{frame}");
        assert_eq!(error["code"], *code, "{frame} → {error}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        match client_id {
            Some(id) => assert_eq!(error["client_id"], *id, "{frame}"),
            None if frame.len() < 100 => assert!(error.get("client_id").is_none(), "{frame}"),
            None => {}
        }
        assert!(error.get("ack").is_none());
    }
    client.send_binary(vec![1, 2, 3]).await;
    assert_eq!(client.next_json().await["code"], "bad_request");

    // Still open, and nothing was stored.
    client.say("fine", None).await;
    assert_eq!(client.next_of("ack").await["seq"], 1);
}

#[tokio::test]
async fn a_frame_over_the_size_limit_closes_with_1009() {
    let app = TestApp::spawn().await;
    let (mut client, _) = app.join("global", &app.token("alice")).await;
    client.say(&"x".repeat(17 * 1024), None).await;
    let (closed, _) = client.closed().await;
    assert_eq!(closed, crate::helpers::Closed::Code(1009));
}

#[tokio::test]
async fn rest_sends_are_broadcast_like_websocket_ones() {
    let app = TestApp::spawn().await;
    let (mut watcher, _) = app.join("global", &app.token("bob")).await;
    let (status, body) = app
        .post(
            &app.token("bot"),
            "/api/v1/rooms/global/messages",
            json!({"body": "from REST"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["seq"], 1);
    let frame = watcher.next_of("message").await;
    assert_eq!(frame["body"], "from REST");
    assert_eq!(frame["id"], body["id"]);
    assert!(frame.get("client_id").is_none());
}

#[tokio::test]
async fn simultaneous_sends_to_many_rooms_keep_each_rooms_seqs_and_store_a_retry_once() {
    // Sends that arrive together are committed together (group commit):
    // each room must still count 1, 2, 3… and a client_id sent several
    // times at once must be stored once, every copy answered with it.
    let app = std::sync::Arc::new(
        TestApp::spawn_with(|c| {
            c.send_rate_limit = 10_000;
            c.rest_rate_limit = 10_000;
        })
        .await,
    );
    let owner = app.token("owner");
    const ROOMS: usize = 4;
    const EACH: usize = 15;
    const RETRIES: usize = 8;
    let mut rooms = Vec::new();
    for r in 0..ROOMS {
        rooms.push(
            app.create_room(&owner, &format!("burst-{r}"), "public", &[])
                .await,
        );
    }
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..EACH {
        for room in &rooms {
            let (app, room) = (std::sync::Arc::clone(&app), room.clone());
            sends.spawn(async move {
                let token = app.token(&format!("u{i}"));
                let path = format!("/api/v1/rooms/{room}/messages");
                (
                    room,
                    app.post(&token, &path, json!({"body": format!("m{i}")}))
                        .await,
                )
            });
        }
    }
    for _ in 0..RETRIES {
        let app = std::sync::Arc::clone(&app);
        sends.spawn(async move {
            let token = app.token("retrier");
            let body = json!({"body": "once", "client_id": "same-key"});
            let answer = app
                .post(&token, "/api/v1/rooms/burst-0/messages", body)
                .await;
            ("retry".to_owned(), answer)
        });
    }
    let mut retries = Vec::new();
    while let Some(done) = sends.join_next().await {
        let (room, (status, body)) = done.unwrap();
        if room == "retry" {
            retries.push((status, body));
        } else {
            assert_eq!(status, 201, "{body}");
        }
    }
    let created = retries.iter().filter(|(status, _)| *status == 201).count();
    assert_eq!(created, 1, "exactly one copy is new: {retries:?}");
    assert!(retries.iter().all(|(status, body)| {
        (*status == 200 || *status == 201) && body["id"] == retries[0].1["id"]
    }));
    for room in &rooms {
        let path = format!("/api/v1/rooms/{room}/messages?limit=100");
        let (_, page) = app.get(&owner, &path).await;
        let mut seqs: Vec<u64> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        seqs.reverse();
        let expected = EACH + if room == "burst-0" { 1 } else { 0 };
        assert_eq!(seqs, (1..=expected as u64).collect::<Vec<_>>(), "{room}");
    }
}
