//! Several pods on one PostgreSQL and one Redis: every guarantee must hold
//! across pods. These tests always run on the cluster backend.

use std::{sync::Arc, time::Duration};

use serde_json::json;

use crate::helpers::{Backend, Closed, TestApp, WsClient};

/// `n` pods sharing a fresh schema and key prefix.
pub async fn pods(
    n: usize,
    tweak: impl Fn(&mut chat_service::config::ServeConfig) + Copy,
) -> Vec<TestApp> {
    let backend = Arc::new(Backend::cluster().await);
    let mut pods = Vec::new();
    for _ in 0..n {
        pods.push(TestApp::spawn_on(Arc::clone(&backend), tweak).await);
    }
    pods
}

/// A public room, created on the first pod, with a watcher on every pod.
async fn room_watched_on_every_pod(pods: &[TestApp], name: &str) -> (String, Vec<WsClient>) {
    let room = pods[0]
        .create_room(&pods[0].token("owner"), name, "public", &[])
        .await;
    let mut watchers = Vec::new();
    for pod in pods {
        watchers.push(pod.join(&room, &pod.token("watcher")).await.0);
    }
    (room, watchers)
}

/// The client gets the messages after seq `after` up to `last`, each once
/// and in order, and nothing more.
async fn receive_exactly(client: &mut WsClient, after: u64, last: u64) {
    for expected in after + 1..=last {
        assert_eq!(client.next_of("message").await["seq"], expected);
    }
    client
        .expect_none_of("message", Duration::from_millis(300))
        .await;
}

/// Two senders on each pod, each sending `each` messages to the room, one
/// at a time (the next once the previous is acked).
async fn two_senders_per_pod(
    pods: &[TestApp],
    room: &str,
    each: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut senders = Vec::new();
    for (p, pod) in pods.iter().enumerate() {
        for s in 0..2 {
            let (mut client, _) = pod.join(room, &pod.token(&format!("s{p}{s}"))).await;
            senders.push(tokio::spawn(async move {
                for i in 0..each {
                    client.say(&format!("{p}.{s}.{i}"), None).await;
                    client.next_of("ack").await;
                }
            }));
        }
    }
    senders
}

#[tokio::test]
async fn a_message_sent_on_one_pod_reaches_connections_on_the_others() {
    let pods = pods(2, |_| {}).await;
    let (mut alice, _) = pods[0].join("global", &pods[0].token("alice")).await;
    let (mut bob, _) = pods[1].join("global", &pods[1].token("bob")).await;
    alice.say("across", Some("x1")).await;
    let ack = alice.next_of("ack").await;
    assert_eq!(alice.next_of("message").await["id"], ack["id"]);
    let seen = bob.next_of("message").await;
    assert_eq!(seen["body"], "across");
    assert_eq!(seen["id"], ack["id"]);
    assert_eq!(seen["seq"], 1);
    // And back, over REST on the other pod.
    let (status, _) = pods[1]
        .post(
            &pods[1].token("bot"),
            "/api/v1/rooms/global/messages",
            json!({"body": "back"}),
        )
        .await;
    assert_eq!(status, 201);
    let back = alice.next_of("message").await;
    assert_eq!(
        (back["body"].as_str(), back["seq"].as_u64()),
        (Some("back"), Some(2))
    );
}

#[tokio::test]
async fn concurrent_senders_on_different_pods_give_one_gap_free_order_everywhere() {
    let pods = pods(3, |c| c.send_rate_limit = 10_000).await;
    let (room, mut watchers) = room_watched_on_every_pod(&pods, "arena").await;
    const EACH: usize = 30;
    for sender in two_senders_per_pod(&pods, &room, EACH).await {
        sender.await.unwrap();
    }
    let total = (pods.len() * 2 * EACH) as u64;
    for watcher in &mut watchers {
        receive_exactly(watcher, 0, total).await;
    }
}

/// With every room's fan-out batched (each event after another within the
/// linger is held for the flush, late or not), every connection on every
/// pod still gets each message once, in seq order, and so does one that
/// joins while messages are being held: its history ends where its live
/// messages start.
#[tokio::test]
async fn batched_fan_out_keeps_one_gap_free_order_on_every_pod_and_for_late_joiners() {
    let pods = pods(2, |c| {
        c.send_rate_limit = 10_000;
        c.big_room_connections = 1;
        c.big_room_linger = Duration::from_millis(20);
        c.big_room_lag = Duration::ZERO; // batch whether or not the pod keeps up
    })
    .await;
    let (room, mut watchers) = room_watched_on_every_pod(&pods, "stadium").await;
    const EACH: usize = 40;
    let senders = two_senders_per_pod(&pods, &room, EACH).await;
    // Joins mid-stream, on both pods.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut late = Vec::new();
    for pod in &pods {
        let (client, ready) = pod.join(&room, &pod.token("late")).await;
        late.push((client, ready["last_seq"].as_u64().unwrap()));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    let total = (pods.len() * 2 * EACH) as u64;
    assert!(
        late.iter().any(|(_, last)| *last > 0 && *last < total),
        "the late joiners should arrive mid-stream: {:?}",
        late.iter().map(|(_, last)| last).collect::<Vec<_>>()
    );
    let everyone = watchers
        .iter_mut()
        .map(|w| (w, 0))
        .chain(late.iter_mut().map(|(c, last)| (c, *last)));
    for (client, after) in everyone {
        receive_exactly(client, after, total).await;
    }
}

#[tokio::test]
async fn a_retry_on_another_pod_returns_the_original_ack() {
    let pods = pods(2, |_| {}).await;
    let alice = pods[0].token("alice");
    let (mut first, _) = pods[0].join("global", &alice).await;
    let (mut watcher, _) = pods[1].join("global", &pods[1].token("bob")).await;
    first.say("once", Some("retry-me")).await;
    let original = first.next_of("ack").await;
    watcher.next_of("message").await;

    let (mut second, _) = pods[1].join("global", &alice).await;
    second.say("once", Some("retry-me")).await;
    assert_eq!(second.next_of("ack").await, original);
    watcher
        .expect_none_of("message", Duration::from_millis(500))
        .await;
    let (_, page) = pods[1].get(&alice, "/api/v1/rooms/global/messages").await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn resuming_on_another_pod_replays_what_was_sent_on_a_third() {
    let pods = pods(3, |c| c.send_rate_limit = 1000).await;
    let alice = pods[0].token("alice");
    let (mut client, _) = pods[0].join("global", &alice).await;
    pods[1]
        .post(
            &alice,
            "/api/v1/rooms/global/messages",
            json!({"body": "m1"}),
        )
        .await;
    assert_eq!(client.next_of("message").await["seq"], 1);
    drop(client);
    for i in 2..=4 {
        pods[1]
            .post(
                &alice,
                "/api/v1/rooms/global/messages",
                json!({"body": format!("m{i}")}),
            )
            .await;
    }
    let mut resumed = pods[2]
        .connect_with("global", Some(&alice), Some(1), &[])
        .await
        .unwrap();
    let ready = resumed.next_json().await;
    assert_eq!(
        (ready["last_seq"].as_u64(), ready["resumed"].as_bool()),
        (Some(4), Some(true))
    );
    for seq in 2..=4 {
        assert_eq!(resumed.next_json().await["seq"], seq);
    }
    pods[0]
        .post(
            &alice,
            "/api/v1/rooms/global/messages",
            json!({"body": "live"}),
        )
        .await;
    assert_eq!(resumed.next_of("message").await["seq"], 5);
}

#[tokio::test]
async fn removal_from_a_private_room_closes_sockets_on_every_pod() {
    let pods = pods(2, |_| {}).await;
    let owner = pods[0].token("owner");
    let room = pods[0]
        .create_room(&owner, "vault", "private", &["friend"])
        .await;
    let (mut socket, _) = pods[1].join(&room, &pods[1].token("friend")).await;
    let (status, _) = pods[0]
        .delete(&owner, &format!("/api/v1/rooms/{room}/members/friend"))
        .await;
    assert_eq!(status, 204);
    assert_eq!(socket.closed().await.0, Closed::Code(4003));
}

#[tokio::test]
async fn the_send_limit_holds_across_pods() {
    let pods = pods(2, |c| {
        c.send_rate_limit = 4;
        c.send_rate_window = Duration::from_secs(5);
    })
    .await;
    let alice = pods[0].token("alice");
    let (mut a, _) = pods[0].join("global", &alice).await;
    let (mut b, _) = pods[1].join("global", &alice).await;
    for i in 0..2 {
        a.say(&format!("a{i}"), None).await;
        assert_eq!(a.next_of("ack").await["type"], "ack");
        b.say(&format!("b{i}"), None).await;
        assert_eq!(b.next_of("ack").await["type"], "ack");
    }
    b.say("fifth", None).await;
    let refused = b.next_of("error").await;
    assert_eq!(refused["code"], "rate_limited");
    let (status, _) = pods[0]
        .post(
            &alice,
            "/api/v1/rooms/global/messages",
            json!({"body": "sixth"}),
        )
        .await;
    assert_eq!(status, 429);
}

#[tokio::test]
async fn presence_join_and_leave_count_connections_on_every_pod() {
    let pods = pods(2, |_| {}).await;
    let (mut watcher, _) = pods[0].join("global", &pods[0].token("watcher")).await;
    let bob = pods[1].token("bob");
    let (b1, ready) = pods[1].join("global", &bob).await;
    let ids: Vec<&str> = ready["presence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec!["bob", "watcher"],
        "presence lists users on every pod"
    );
    assert_eq!(watcher.next_json().await["type"], "join");
    let (b2, _) = pods[0].join("global", &bob).await; // bob again, on the other pod: no join
    drop(b1);
    watcher.expect_silence(Duration::from_millis(500)).await; // b2 still holds bob
    let (_, presence) = pods[1].get(&bob, "/api/v1/rooms/global/presence").await;
    assert_eq!(presence["users"].as_array().unwrap().len(), 2);
    drop(b2);
    let leave = watcher.next_json().await;
    assert_eq!(
        (leave["type"].as_str(), leave["user"]["id"].as_str()),
        (Some("leave"), Some("bob"))
    );
}

/// A pod killed with SIGKILL cannot say goodbye: its users stop counting
/// within the presence TTL (plus one sweep), and the others see `leave`.
#[tokio::test]
async fn a_killed_pods_users_leave_within_the_presence_ttl() {
    let backend = Arc::new(Backend::cluster().await);
    let survivor = TestApp::spawn_on(Arc::clone(&backend), |c| {
        c.presence_ttl = Duration::from_secs(2)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let redis_url = backend.redis_url.clone().unwrap();
    let (mut doomed, addr) = crate::helpers::spawn_service(
        dir.path(),
        &[
            ("DATABASE_URL", backend.database_url.as_str()),
            ("REDIS_URL", redis_url.as_str()),
            ("REDIS_KEY_PREFIX", backend.prefix.as_str()),
            ("PRESENCE_TTL", "2s"),
        ],
    )
    .await;
    let (mut watcher, _) = survivor.join("global", &survivor.token("watcher")).await;
    let mut victim = crate::helpers::connect_to(&addr, "global", "victim").await;
    assert_eq!(victim.next_json().await["type"], "ready");
    assert_eq!(watcher.next_json().await["type"], "join");

    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let started = std::time::Instant::now();
    let leave = tokio::time::timeout(Duration::from_secs(10), watcher.next_of("leave"))
        .await
        .expect("a leave");
    assert_eq!(leave["user"]["id"], "victim");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let (_, presence) = survivor
        .get(&survivor.token("x"), "/api/v1/rooms/global/presence")
        .await;
    assert_eq!(
        presence["users"],
        json!([{"id": "watcher", "name": "user watcher"}])
    );
}
