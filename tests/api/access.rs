//! Who may read and write where: private rooms, direct rooms, members,
//! roles, and revocation on open connections.

use serde_json::json;

use crate::helpers::{Closed, TestApp};

#[tokio::test]
async fn a_private_room_is_closed_to_non_members_everywhere() {
    let app = TestApp::spawn().await;
    let owner = app.token("owner");
    let room = app
        .create_room(&owner, "secret-lair", "private", &["friend"])
        .await;
    let stranger = app.token("stranger");

    let refusal = app
        .connect_with(&room, Some(&stranger), None, &[])
        .await
        .err()
        .unwrap();
    assert_eq!(refusal.status, 403);
    assert_eq!(refusal.body["code"], "forbidden");
    for path in ["", "/messages", "/members", "/presence"] {
        let (status, body) = app
            .get(&stranger, &format!("/api/v1/rooms/{room}{path}"))
            .await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body["code"], "forbidden");
    }
    let (status, _) = app
        .post(
            &stranger,
            &format!("/api/v1/rooms/{room}/messages"),
            json!({"body": "let me in"}),
        )
        .await;
    assert_eq!(status, 403);

    // Members, admins and services may.
    for token in [
        app.token("friend"),
        app.token_with("root", &["admin"], std::time::Duration::from_secs(60)),
        app.token_with("core", &["service"], std::time::Duration::from_secs(60)),
    ] {
        let (mut client, ready) = app.join(&room, &token).await;
        assert_eq!(ready["room"]["kind"], "private");
        client.say("hello", None).await;
        client.next_of("ack").await;
    }
    let (_, page) = app
        .get(&owner, &format!("/api/v1/rooms/{room}/messages"))
        .await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 3);

    // It is listed for its members only.
    let listed = |body: &serde_json::Value| {
        body["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == room.as_str())
    };
    assert!(listed(
        &app.get(&app.token("friend"), "/api/v1/rooms").await.1
    ));
    assert!(!listed(&app.get(&stranger, "/api/v1/rooms").await.1));
}

#[tokio::test]
async fn only_the_owner_or_privileged_roles_change_members_and_removal_closes_sockets_with_4003() {
    let app = TestApp::spawn().await;
    let owner = app.token("owner");
    let room = app.create_room(&owner, "team", "private", &[]).await;

    let (status, body) = app
        .put(
            &app.token("friend"),
            &format!("/api/v1/rooms/{room}/members/intruder"),
        )
        .await;
    assert_eq!(status, 403, "a non-member cannot add: {body}");
    let (status, _) = app
        .put(&owner, &format!("/api/v1/rooms/{room}/members/friend"))
        .await;
    assert_eq!(status, 204);
    let (status, _) = app
        .put(
            &app.token("friend"),
            &format!("/api/v1/rooms/{room}/members/other"),
        )
        .await;
    assert_eq!(status, 403, "a member who is not the owner cannot add");
    let (status, body) = app
        .put(&owner, &format!("/api/v1/rooms/{room}/members/bad%20id"))
        .await;
    assert_eq!(status, 400, "{body}");

    let (_, members) = app
        .get(&owner, &format!("/api/v1/rooms/{room}/members"))
        .await;
    assert_eq!(
        members["members"],
        json!([{"id": "owner", "name": "user owner"}, {"id": "friend"}]),
        "names are known only for users the service has seen"
    );

    let friend = app.token("friend");
    let (mut socket, _) = app.join(&room, &friend).await;
    let (mut other_tab, _) = app.join(&room, &friend).await;
    let (status, _) = app
        .delete(&owner, &format!("/api/v1/rooms/{room}/members/friend"))
        .await;
    assert_eq!(status, 204);
    assert_eq!(socket.closed().await.0, Closed::Code(4003));
    assert_eq!(other_tab.closed().await.0, Closed::Code(4003));
    assert_eq!(
        app.connect_with(&room, Some(&friend), None, &[])
            .await
            .err()
            .unwrap()
            .status,
        403
    );

    let admin = app.token_with("root", &["admin"], std::time::Duration::from_secs(60));
    let (status, _) = app
        .put(&admin, &format!("/api/v1/rooms/{room}/members/friend"))
        .await;
    assert_eq!(status, 204, "admins may change any room's members");
    let (status, _) = app.put(&owner, "/api/v1/rooms/global/members/friend").await;
    assert_eq!(status, 403, "the global room has no owner");
}

#[tokio::test]
async fn direct_rooms_belong_to_their_two_users() {
    let app = TestApp::spawn().await;
    let nine = app.token("9");
    let ten = app.token("10");

    // Byte order: "10" < "9".
    let (status, room) = app.post(&nine, "/api/v1/dm/10", json!({})).await;
    assert_eq!(status, 201, "{room}");
    assert_eq!(room["id"], "dm:10:9");
    assert_eq!(room["kind"], "direct");
    let (status, again) = app.post(&ten, "/api/v1/dm/9", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(again["id"], "dm:10:9");

    let (mut a, _) = app.join("dm:10:9", &nine).await;
    let (mut b, _) = app.join("dm:10:9", &ten).await;
    a.say("psst", None).await;
    assert_eq!(b.next_of("message").await["body"], "psst");

    let outsider = app.token("11");
    assert_eq!(
        app.connect_with("dm:10:9", Some(&outsider), None, &[])
            .await
            .err()
            .unwrap()
            .status,
        403
    );
    assert_eq!(
        app.get(&outsider, "/api/v1/rooms/dm:10:9/messages").await.0,
        403
    );
    assert_eq!(
        app.connect_with("dm:9:10", Some(&nine), None, &[])
            .await
            .err()
            .unwrap()
            .status,
        400
    );
    let (status, _) = app.post(&nine, "/api/v1/dm/9", json!({})).await;
    assert_eq!(status, 400, "no direct room with oneself");
}

#[tokio::test]
async fn connecting_to_a_direct_room_one_is_part_of_creates_it() {
    let app = TestApp::spawn().await;
    let (_client, ready) = app.join("dm:alice:bob", &app.token("bob")).await;
    assert_eq!(ready["room"]["kind"], "direct");
    let (status, room) = app
        .get(&app.token("alice"), "/api/v1/rooms/dm:alice:bob")
        .await;
    assert_eq!(status, 200, "{room}");
}

#[tokio::test]
async fn messages_are_deleted_by_their_author_or_a_moderator_only() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    let (mut watcher, _) = app.join("global", &app.token("watcher")).await;
    let (_, m1) = app
        .post(
            &alice,
            "/api/v1/rooms/global/messages",
            json!({"body": "one"}),
        )
        .await;
    let (_, m2) = app
        .post(
            &alice,
            "/api/v1/rooms/global/messages",
            json!({"body": "two"}),
        )
        .await;
    let path = |m: &serde_json::Value| {
        format!(
            "/api/v1/rooms/global/messages/{}",
            m["id"].as_str().unwrap()
        )
    };

    let (status, body) = app.delete(&app.token("bob"), &path(&m1)).await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = app.delete(&alice, &path(&m1)).await;
    assert_eq!(status, 204);
    let moderator = app.token_with("mod", &["moderator"], std::time::Duration::from_secs(60));
    let (status, _) = app.delete(&moderator, &path(&m2)).await;
    assert_eq!(status, 204);
    let (status, _) = app
        .delete(&alice, "/api/v1/rooms/global/messages/nope")
        .await;
    assert_eq!(status, 404);

    watcher.next_of("message").await;
    watcher.next_of("message").await;
    let deleted = watcher.next_of("message_deleted").await;
    assert_eq!(
        deleted,
        json!({"type": "message_deleted", "room_id": "global", "id": m1["id"], "seq": 1})
    );
    assert_eq!(watcher.next_of("message_deleted").await["seq"], 2);

    let (_, page) = app.get(&alice, "/api/v1/rooms/global/messages").await;
    let tombstone = &page["messages"][1];
    assert_eq!(tombstone["deleted"], true);
    assert_eq!(tombstone["body"], "");
    assert_eq!(tombstone["seq"], 1);
}
