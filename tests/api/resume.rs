//! Resuming with `since`: every missed message exactly once, in order,
//! before live ones; the replay limit; the edges of `since`.

use serde_json::{Value, json};

use crate::helpers::TestApp;

async fn send_rest(app: &TestApp, token: &str, room: &str, n: usize) {
    for i in 1..=n {
        let (status, body) = app
            .post(
                token,
                &format!("/api/v1/rooms/{room}/messages"),
                json!({"body": format!("m{i}")}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn resume_replays_each_missed_message_once_in_order_before_live_ones() {
    let app = TestApp::spawn_with(|c| c.send_rate_limit = 1000).await;
    let alice = app.token("alice");
    send_rest(&app, &alice, "global", 5).await;

    // The client saw up to seq 2, then went away; 3..=5 happened meanwhile.
    let mut client = app
        .connect_with("global", Some(&alice), Some(2), &[])
        .await
        .unwrap();
    let ready = client.next_json().await;
    assert_eq!(ready["type"], "ready");
    assert_eq!(ready["last_seq"], 5);
    assert_eq!(ready["resumed"], true);
    let replay = vec![
        client.next_json().await,
        client.next_json().await,
        client.next_json().await,
    ];
    assert_eq!(seqs(&replay), vec![3, 4, 5]);
    assert_eq!(replay[0]["type"], "message");
    assert_eq!(replay[0]["body"], "m3");

    send_rest(&app, &alice, "global", 1).await;
    let live = client.next_of("message").await;
    assert_eq!(live["seq"], 6, "live after replay, nothing twice");
}

#[tokio::test]
async fn messages_sent_while_replaying_are_neither_lost_nor_repeated() {
    let app = TestApp::spawn_with(|c| c.send_rate_limit = 10_000).await;
    let alice = app.token("alice");
    send_rest(&app, &alice, "global", 50).await;
    let writer = {
        let app_url = app.url("/api/v1/rooms/global/messages");
        let http = app.http.clone();
        let token = alice.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                let r = http
                    .post(&app_url)
                    .bearer_auth(&token)
                    .json(&json!({"body": format!("live{i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        })
    };
    let mut client = app
        .connect_with("global", Some(&alice), Some(0), &[])
        .await
        .unwrap();
    assert_eq!(client.next_json().await["type"], "ready");
    writer.await.unwrap();
    let mut expected = 1;
    while expected <= 100 {
        let frame = client.next_of("message").await;
        assert_eq!(frame["seq"], expected);
        expected += 1;
    }
}

#[tokio::test]
async fn more_missing_than_the_replay_limit_replays_the_newest_and_says_not_resumed() {
    let app = TestApp::spawn_with(|c| {
        c.replay_limit = 3;
        c.send_rate_limit = 1000;
    })
    .await;
    let alice = app.token("alice");
    send_rest(&app, &alice, "global", 8).await;
    let mut client = app
        .connect_with("global", Some(&alice), Some(1), &[])
        .await
        .unwrap();
    let ready = client.next_json().await;
    assert_eq!(ready["resumed"], false);
    let replay = vec![
        client.next_json().await,
        client.next_json().await,
        client.next_json().await,
    ];
    assert_eq!(seqs(&replay), vec![6, 7, 8]);
}

#[tokio::test]
async fn since_zero_is_from_the_start_and_since_past_the_end_replays_nothing() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    send_rest(&app, &alice, "global", 2).await;

    let mut from_start = app
        .connect_with("global", Some(&alice), Some(0), &[])
        .await
        .unwrap();
    assert_eq!(from_start.next_json().await["resumed"], true);
    assert_eq!(
        seqs(&[from_start.next_json().await, from_start.next_json().await]),
        vec![1, 2]
    );

    let mut ahead = app
        .connect_with("global", Some(&alice), Some(99), &[])
        .await
        .unwrap();
    let ready = ahead.next_json().await;
    assert_eq!(ready["resumed"], true);
    assert_eq!(ready["last_seq"], 2);
    ahead
        .expect_silence(std::time::Duration::from_millis(300))
        .await;
}

#[tokio::test]
async fn deleted_messages_replay_as_message_deleted() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    send_rest(&app, &alice, "global", 2).await;
    let (_, page) = app.get(&alice, "/api/v1/rooms/global/messages").await;
    let first_id = page["messages"][1]["id"].as_str().unwrap().to_owned();
    let (status, _) = app
        .delete(&alice, &format!("/api/v1/rooms/global/messages/{first_id}"))
        .await;
    assert_eq!(status, 204);

    let mut client = app
        .connect_with("global", Some(&alice), Some(0), &[])
        .await
        .unwrap();
    client.next_json().await;
    assert_eq!(
        client.next_json().await,
        json!({"type": "message_deleted", "room_id": "global", "id": first_id, "seq": 1})
    );
    assert_eq!(client.next_json().await["seq"], 2);
}

#[tokio::test]
async fn a_bad_since_is_refused_before_the_upgrade() {
    let app = TestApp::spawn().await;
    let token = app.token("alice");
    let url_token = format!("{token}&since=-1");
    let refusal = app
        .connect_with("global", Some(&url_token), None, &[])
        .await
        .err()
        .unwrap();
    assert_eq!(refusal.status, 400);
    assert_eq!(refusal.body["code"], "bad_request");
}
