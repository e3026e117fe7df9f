//! The REST API: rooms, history paging, validation and error shapes.

use serde_json::{Value, json};

use crate::helpers::TestApp;

#[tokio::test]
async fn rooms_are_created_listed_and_read() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    let (status, room) = app
        .post(
            &alice,
            "/api/v1/rooms",
            json!({"id": "lobby-1", "name": "  Lobby One ", "kind": "public"}),
        )
        .await;
    assert_eq!(status, 201, "{room}");
    assert_eq!(room["id"], "lobby-1");
    assert_eq!(room["kind"], "public");
    assert_eq!(room["name"], "Lobby One");
    assert_eq!(room["owner_id"], "alice");
    assert!(room["created_at"].as_str().unwrap().ends_with('Z'));

    let (status, generated) = app
        .post(
            &alice,
            "/api/v1/rooms",
            json!({"name": "No id", "kind": "private"}),
        )
        .await;
    assert_eq!(status, 201);
    assert!(generated["id"].as_str().unwrap().len() > 3);

    let (status, got) = app.get(&app.token("bob"), "/api/v1/rooms/lobby-1").await;
    assert_eq!(status, 200);
    assert_eq!(got, room);

    let (_, list) = app.get(&alice, "/api/v1/rooms").await;
    let ids: Vec<&str> = list["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids[0], "global");
    assert!(ids.contains(&"lobby-1"));
    assert!(ids.contains(&generated["id"].as_str().unwrap()));
}

#[tokio::test]
async fn bad_room_requests_get_the_contract_errors() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    app.create_room(&alice, "taken", "public", &[]).await;
    let cases: Vec<(Value, u16)> = vec![
        (json!({"id": "taken", "name": "x", "kind": "public"}), 409),
        (json!({"id": "global", "name": "x", "kind": "public"}), 409),
        (json!({"id": "dm:a:b", "name": "x", "kind": "public"}), 400),
        (json!({"id": "bad id", "name": "x", "kind": "public"}), 400),
        (json!({"name": "x", "kind": "direct"}), 400),
        (json!({"name": "", "kind": "public"}), 400),
        (json!({"name": "y".repeat(101), "kind": "public"}), 400),
        (json!({"kind": "public"}), 400),
        (
            json!({"name": "x", "kind": "public", "members": ["ok", "not ok"]}),
            400,
        ),
    ];
    for (body, expected) in cases {
        let (status, error) = app.post(&alice, "/api/v1/rooms", body.clone()).await;
        assert_eq!(status, expected, "{body} → {error}");
        let code = error["code"].as_str().unwrap();
        assert_eq!(
            code,
            if expected == 409 {
                "conflict"
            } else {
                "bad_request"
            }
        );
        assert!(!error["message"].as_str().unwrap().is_empty());
    }
    let (status, error) = app.get(&alice, "/api/v1/rooms/nowhere").await;
    assert_eq!(
        (status, error["code"].as_str().unwrap()),
        (404, "not_found")
    );
    assert_eq!(app.get(&alice, "/api/v1/rooms/bad%20id").await.0, 400);
    let refusal = app
        .connect_with("nowhere", Some(&alice), None, &[])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (refusal.status, refusal.body["code"].as_str().unwrap()),
        (404, "not_found")
    );
    let refusal = app
        .connect_with("bad%20id", Some(&alice), None, &[])
        .await
        .err()
        .unwrap();
    assert_eq!(refusal.status, 400);
    assert_eq!(app.get(&alice, "/api/v1/nothing-here").await.0, 404);

    let response = app
        .http
        .post(app.url("/api/v1/rooms"))
        .bearer_auth(&alice)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "bad_request"
    );
}

#[tokio::test]
async fn history_pages_by_seq_cursor_in_both_directions() {
    let app = TestApp::spawn_with(|c| c.send_rate_limit = 1000).await;
    let alice = app.token("alice");
    for i in 1..=7 {
        app.post(
            &alice,
            "/api/v1/rooms/global/messages",
            json!({"body": format!("m{i}")}),
        )
        .await;
    }
    let seqs = |page: &Value| -> Vec<u64> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect()
    };
    let base = "/api/v1/rooms/global/messages";
    let (_, newest) = app.get(&alice, &format!("{base}?limit=3")).await;
    assert_eq!(
        (seqs(&newest), newest["has_more"].as_bool().unwrap()),
        (vec![7, 6, 5], true)
    );
    let (_, older) = app
        .get(&alice, &format!("{base}?limit=3&before_seq=5"))
        .await;
    assert_eq!(
        (seqs(&older), older["has_more"].as_bool().unwrap()),
        (vec![4, 3, 2], true)
    );
    let (_, oldest) = app
        .get(&alice, &format!("{base}?limit=3&before_seq=2"))
        .await;
    assert_eq!(
        (seqs(&oldest), oldest["has_more"].as_bool().unwrap()),
        (vec![1], false)
    );
    let (_, forward) = app
        .get(&alice, &format!("{base}?limit=4&after_seq=2"))
        .await;
    assert_eq!(
        (seqs(&forward), forward["has_more"].as_bool().unwrap()),
        (vec![3, 4, 5, 6], true)
    );
    let (_, window) = app
        .get(&alice, &format!("{base}?after_seq=2&before_seq=5"))
        .await;
    assert_eq!(
        (seqs(&window), window["has_more"].as_bool().unwrap()),
        (vec![3, 4], false)
    );
    let (_, all) = app.get(&alice, base).await;
    assert_eq!(seqs(&all).len(), 7);

    for bad in [
        "limit=0",
        "limit=201",
        "limit=x",
        "before_seq=-1",
        "after_seq=abc",
    ] {
        let (status, body) = app.get(&alice, &format!("{base}?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["code"], "bad_request");
    }
}

#[tokio::test]
async fn rest_sends_are_validated_like_websocket_ones() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    let path = "/api/v1/rooms/global/messages";
    for (body, code) in [
        (json!({"body": " "}), "invalid_message"),
        (json!({"body": "a\u{1}b"}), "invalid_message"),
        (json!({"body": "x".repeat(2001)}), "message_too_long"),
        (json!({"body": "x", "client_id": ""}), "bad_request"),
        (
            json!({"body": "x", "client_id": "c".repeat(65)}),
            "bad_request",
        ),
        (json!({"text": "x"}), "bad_request"),
    ] {
        let (status, error) = app.post(&alice, path, body.clone()).await;
        assert_eq!(
            (status, error["code"].as_str().unwrap_or("")),
            (400, code),
            "{body}: {error}"
        );
    }
    let (_, page) = app.get(&alice, path).await;
    assert_eq!(page["messages"], json!([]), "nothing was stored");
}

#[tokio::test]
async fn request_bodies_over_the_limit_get_413() {
    let app = TestApp::spawn_with(|c| c.max_body_bytes = 1024).await;
    let (status, body) = app
        .post(
            &app.token("alice"),
            "/api/v1/rooms/global/messages",
            json!({"body": "x".repeat(2000)}),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "payload_too_large");
}

#[tokio::test]
async fn presence_lists_connected_users_once_each() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    let (_a1, _) = app.join("global", &alice).await;
    let (_a2, _) = app.join("global", &alice).await;
    let (_b, _) = app.join("global", &app.token("bob")).await;
    let (status, body) = app.get(&alice, "/api/v1/rooms/global/presence").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"users": [{"id": "alice", "name": "user alice"}, {"id": "bob", "name": "user bob"}]})
    );
}

#[tokio::test]
async fn request_fields_must_have_their_json_types() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    // poem-openapi alone would read `5` as "5" and `false` as "false".
    for (path, body) in [
        ("/api/v1/rooms/global/messages", json!({"body": 5})),
        (
            "/api/v1/rooms/global/messages",
            json!({"body": "x", "client_id": 7}),
        ),
        ("/api/v1/rooms", json!({"name": true, "kind": "public"})),
        (
            "/api/v1/rooms",
            json!({"id": 12, "name": "x", "kind": "public"}),
        ),
        (
            "/api/v1/rooms",
            json!({"name": "x", "kind": "public", "members": [false]}),
        ),
    ] {
        let (status, error) = app.post(&alice, path, body.clone()).await;
        assert_eq!(
            (status, error["code"].as_str().unwrap_or("")),
            (400, "bad_request"),
            "{body}: {error}"
        );
    }
    let (_, page) = app.get(&alice, "/api/v1/rooms/global/messages").await;
    assert_eq!(page["messages"], json!([]), "nothing was stored");
}

#[tokio::test]
async fn optional_request_fields_may_be_null() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    let (status, room) = app
        .post(
            &alice,
            "/api/v1/rooms",
            json!({"id": null, "name": "x", "kind": "private", "members": null}),
        )
        .await;
    assert_eq!(status, 201, "{room}");
    let (status, message) = app
        .post(
            &alice,
            "/api/v1/rooms/global/messages",
            json!({"body": "hi", "client_id": null}),
        )
        .await;
    assert_eq!(status, 201, "{message}");
    assert!(message.get("client_id").is_none(), "{message}");
}

#[tokio::test]
async fn cursors_beyond_any_seq_are_bounds_not_errors() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    let base = "/api/v1/rooms/global/messages";
    app.post(&alice, base, json!({"body": "one"})).await;
    let huge = u64::MAX;
    let (status, page) = app.get(&alice, &format!("{base}?before_seq={huge}")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"].as_array().unwrap().len(), 1, "{page}");
    let (status, page) = app.get(&alice, &format!("{base}?after_seq={huge}")).await;
    assert_eq!(
        (status, page["messages"].clone()),
        (200, json!([])),
        "{page}"
    );
    let (status, page) = app
        .get(&alice, &format!("{base}?after_seq=0&before_seq={huge}"))
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"].as_array().unwrap().len(), 1, "{page}");
}

#[tokio::test]
async fn malformed_path_ids_are_bad_requests_and_odd_message_ids_not_found() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    let long_room = "r".repeat(129);
    for path in [
        format!("/api/v1/rooms/{long_room}"),
        "/api/v1/rooms/%C3%A9t%C3%A9/presence".to_owned(),
        "/api/v1/rooms/global/members/not%20a%20user".to_owned(),
    ] {
        let (status, error) = if path.contains("/members/") {
            app.put(&alice, &path).await
        } else {
            app.get(&alice, &path).await
        };
        assert_eq!(
            (status, error["code"].as_str().unwrap_or("")),
            (400, "bad_request"),
            "{path}: {error}"
        );
    }
    let (status, error) = app.post(&alice, "/api/v1/dm/a%20b", json!({})).await;
    assert_eq!(
        (status, error["code"].as_str().unwrap_or("")),
        (400, "bad_request")
    );
    // Such ids cannot exist; PostgreSQL would refuse the NUL byte outright.
    let long_id = "m".repeat(200);
    for id in ["a%00b", "%0A", long_id.as_str()] {
        let (status, error) = app
            .delete(&alice, &format!("/api/v1/rooms/global/messages/{id}"))
            .await;
        assert_eq!(
            (status, error["code"].as_str().unwrap_or("")),
            (404, "not_found"),
            "{id}: {error}"
        );
    }
}
