//! Failures pods actually see: Redis restarting under traffic, PostgreSQL
//! going away. Each test owns the server it breaks.

use std::{sync::Arc, time::Duration};

use serde_json::json;

use crate::{
    helpers::{Backend, TestApp, WsClient, bodies, test_database_url, test_redis_url},
    servers::{PgServer, RedisServer},
};

/// Reads a watcher's messages until it has seen seq `last`, asserting they
/// come exactly once each, in order.
async fn receive_all(watcher: &mut WsClient, last: u64) {
    let mut expected = 1;
    while expected <= last {
        let frame = tokio::time::timeout(Duration::from_secs(30), watcher.next_of("message"))
            .await
            .unwrap_or_else(|_| panic!("stalled waiting for seq {expected}"));
        assert_eq!(frame["seq"], expected, "exactly once, in order: {frame}");
        expected += 1;
    }
}

#[tokio::test]
async fn a_redis_restart_under_traffic_loses_nothing_acked_and_keeps_order() {
    let mut redis = RedisServer::start();
    let backend = Arc::new(Backend::cluster_on(&test_database_url(), &redis.url()).await);
    let tweak = |c: &mut chat_service::config::ServeConfig| {
        c.send_rate_limit = 10_000;
        c.resync_interval = Duration::from_secs(2);
    };
    let pods = [
        TestApp::spawn_on(Arc::clone(&backend), tweak).await,
        TestApp::spawn_on(Arc::clone(&backend), tweak).await,
    ];
    let mut watchers = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        watchers.push(
            pod.join("global", &pod.token(&format!("watcher{i}")))
                .await
                .0,
        );
    }
    let mut senders = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let (mut client, _) = pod.join("global", &pod.token(&format!("sender{i}"))).await;
        senders.push(tokio::spawn(async move {
            let mut acked = 0;
            for n in 0..60 {
                client
                    .say(&format!("{i}:{n}"), Some(&format!("{i}:{n}")))
                    .await;
                let answer = loop {
                    let frame = client.next_json().await;
                    if frame["type"] == "ack" || frame["type"] == "error" {
                        break frame;
                    }
                };
                assert_eq!(
                    answer["type"], "ack",
                    "sends commit and ack while Redis is down: {answer}"
                );
                acked += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    let mut total = 0;
    for sender in senders {
        total += sender.await.unwrap();
    }
    assert_eq!(total, 120);
    for watcher in &mut watchers {
        receive_all(watcher, total).await;
        watcher
            .expect_none_of("message", Duration::from_millis(300))
            .await;
    }
    let (_, page) = pods[0]
        .get(
            &pods[0].token("x"),
            "/api/v1/rooms/global/messages?limit=200",
        )
        .await;
    assert_eq!(
        page["messages"].as_array().unwrap().len(),
        120,
        "nothing stored twice"
    );
}

#[tokio::test]
async fn readiness_follows_redis() {
    let mut redis = RedisServer::start();
    let backend = Arc::new(Backend::cluster_on(&test_database_url(), &redis.url()).await);
    let pod = TestApp::spawn_on(backend, |_| {}).await;
    let ready = |pod: &TestApp| {
        let url = pod.url("/readyz");
        let http = pod.http.clone();
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    wait_for(|| ready(&pod), 200).await;
    redis.kill();
    wait_for(|| ready(&pod), 503).await;
    redis.restart();
    wait_for(|| ready(&pod), 200).await;
}

async fn wait_for<F, Fut>(mut probe: F, expected: u16)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = probe().await;
        if got == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {got}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_database_outage_refuses_sends_as_unavailable_and_recovers_by_itself() {
    let mut pg = PgServer::start();
    let backend = Arc::new(Backend::cluster_on(&pg.url(), &test_redis_url()).await);
    let pod = TestApp::spawn_on(backend, |_| {}).await;
    let alice = pod.token("alice");
    let (mut client, _) = pod.join("global", &alice).await;
    client.say("before", Some("c1")).await;
    assert_eq!(client.next_of("ack").await["seq"], 1);

    pg.stop();
    client.say("during", Some("c2")).await;
    let refused = loop {
        let frame = client.next_json().await;
        if frame["type"] == "ack" || frame["type"] == "error" {
            break frame;
        }
    };
    assert_eq!(
        refused["type"], "error",
        "no ack while the database is down: {refused}"
    );
    assert_eq!(refused["code"], "unavailable");
    assert_eq!(refused["client_id"], "c2");
    let (status, body) = pod
        .post(
            &alice,
            "/api/v1/rooms/global/messages",
            json!({"body": "rest"}),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")));
    assert_eq!(pod.get_text("/readyz").await.0, 503);

    pg.restart();
    wait_for(|| async { pod.get_text("/readyz").await.0 }, 200).await;
    client.say("during", Some("c2")).await;
    let ack = client.next_of("ack").await;
    assert_eq!(
        (ack["client_id"].as_str(), ack["seq"].as_u64()),
        (Some("c2"), Some(2))
    );
    let (_, page) = pod.get(&alice, "/api/v1/rooms/global/messages").await;
    assert_eq!(bodies(&page), ["during", "before"], "nothing half-stored");
}

/// When the database comes back, every sender of a room commits at once and
/// each connection's queue fills with the others' messages while its own
/// send is still being stored. Clients that read well must not be closed as
/// too slow for that (found by the chaos suite, tests/chaos.rs).
#[tokio::test]
async fn a_burst_of_commits_after_an_outage_does_not_close_readers_as_too_slow() {
    const SENDERS: usize = 8;
    let mut pg = PgServer::start();
    let backend = Arc::new(Backend::cluster_on(&pg.url(), &test_redis_url()).await);
    // Group commit stores the held sends in one transaction, so their
    // fan-out reaches every queue in one burst: the queue must hold one
    // batch (a session cannot drain while it is not being polled). A queue
    // of exactly one batch passes with or without the draining during a
    // send; `a_slow_send_does_not_close_its_sender_as_too_slow` is the test
    // that needs it.
    let pod = TestApp::spawn_on(backend, |c| {
        c.outbound_queue = SENDERS;
        c.send_rate_limit = 10_000;
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..SENDERS {
        clients.push(pod.join("global", &pod.token(&format!("s{i}"))).await.0);
    }
    pg.stop();
    for (i, client) in clients.iter_mut().enumerate() {
        client.say(&format!("m{i}"), Some(&format!("c{i}"))).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.restart();
    for (i, client) in clients.iter_mut().enumerate() {
        let mut seqs = Vec::new();
        let mut acked = false;
        while !acked || seqs.len() < SENDERS {
            let frame = client.next_json().await; // panics on a close (4008)
            match frame["type"].as_str() {
                Some("ack") => acked = true,
                Some("message") => seqs.push(frame["seq"].as_u64().unwrap()),
                Some("error") => {
                    assert_eq!(frame["code"], "unavailable", "{frame}");
                    client.say(&format!("m{i}"), Some(&format!("c{i}"))).await;
                }
                _ => {}
            }
        }
        assert_eq!(seqs, (1..=SENDERS as u64).collect::<Vec<_>>());
    }
}

/// While the database works on a client's send, whatever else reaches the
/// room is taken off the client's queue, up to another queue's worth, and
/// sent after the ack: a reader is not closed as too slow (4008) because
/// its own send was slow. Here the send waits on the room's row lock (held
/// by another transaction, as another pod's long append would) while more
/// typing notices than the queue holds arrive one by one.
#[tokio::test]
async fn a_slow_send_does_not_close_its_sender_as_too_slow() {
    use sqlx::Connection;
    const QUEUE: usize = 4;
    const TYPISTS: usize = 6;
    let backend = Arc::new(Backend::cluster().await);
    let pod = TestApp::spawn_on(Arc::clone(&backend), |c| c.outbound_queue = QUEUE).await;
    let (mut reader, _) = pod.join("global", &pod.token("reader")).await;
    let mut typists = Vec::new();
    for i in 0..TYPISTS {
        typists.push(
            pod.join("global", &pod.token(&format!("typist{i}")))
                .await
                .0,
        );
        reader.next_of("join").await;
    }
    let mut lock = sqlx::PgConnection::connect(&backend.database_url)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut lock).await.unwrap();
    sqlx::query("SELECT 1 FROM rooms WHERE id = 'global' FOR UPDATE")
        .execute(&mut lock)
        .await
        .unwrap();

    reader.say("held back", Some("r1")).await;
    for typist in &mut typists {
        typist.send_json(json!({"type": "typing"})).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();

    let mut typing = 0;
    let mut acked = false;
    while !acked || typing < TYPISTS {
        let frame = reader.next_json().await; // panics on a close (4008)
        match frame["type"].as_str() {
            Some("ack") => {
                assert_eq!(
                    (frame["client_id"].as_str(), frame["seq"].as_u64()),
                    (Some("r1"), Some(1))
                );
                acked = true;
            }
            Some("typing") => typing += 1,
            _ => {}
        }
    }
}
