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

#[tokio::test]
async fn a_direct_room_is_closed_to_outsiders_everywhere() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    let (_, room) = app.post(&alice, "/api/v1/dm/bob", json!({})).await;
    let room = room["id"].as_str().unwrap().to_owned();
    let (_, sent) = app
        .post(
            &alice,
            &format!("/api/v1/rooms/{room}/messages"),
            json!({"body": "just us"}),
        )
        .await;
    let message_path = format!(
        "/api/v1/rooms/{room}/messages/{}",
        sent["id"].as_str().unwrap()
    );

    let mallory = app.token("mallory");
    let refusal = app
        .connect_with(&room, Some(&mallory), None, &[])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (refusal.status, refusal.body["code"].as_str()),
        (403, Some("forbidden"))
    );
    for path in ["", "/messages", "/members", "/presence"] {
        let (status, body) = app
            .get(&mallory, &format!("/api/v1/rooms/{room}{path}"))
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("forbidden")),
            "{path}: {body}"
        );
    }
    let (status, _) = app
        .post(
            &mallory,
            &format!("/api/v1/rooms/{room}/messages"),
            json!({"body": "hi both"}),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(app.delete(&mallory, &message_path).await.0, 403);
    for (method, user) in [("PUT", "mallory"), ("DELETE", "bob")] {
        let path = format!("/api/v1/rooms/{room}/members/{user}");
        let status = if method == "PUT" {
            app.put(&mallory, &path).await.0
        } else {
            app.delete(&mallory, &path).await.0
        };
        assert_eq!(status, 403, "{method} {path}");
    }
    // Not even its own users can add a third (a direct room has no owner).
    let (status, body) = app
        .put(&alice, &format!("/api/v1/rooms/{room}/members/mallory"))
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        !app.get(&mallory, "/api/v1/rooms").await.1["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == room.as_str())
    );
    let (_, page) = app
        .get(&alice, &format!("/api/v1/rooms/{room}/messages"))
        .await;
    assert_eq!(
        page["messages"].as_array().unwrap().len(),
        1,
        "nothing got in"
    );
}

#[tokio::test]
async fn members_are_changed_by_the_owner_or_privileged_roles_only() {
    let app = TestApp::spawn().await;
    let owner = app.token("owner");
    let public = app.create_room(&owner, "plaza", "public", &[]).await;
    let private = app
        .create_room(&owner, "vault", "private", &["member"])
        .await;
    for (who, token) in [
        ("a stranger", app.token("mallory")),
        ("a member", app.token("member")),
    ] {
        for room in [&public, &private] {
            for user in ["mallory", "friend"] {
                let path = format!("/api/v1/rooms/{room}/members/{user}");
                assert_eq!(app.put(&token, &path).await.0, 403, "{who}: PUT {path}");
            }
            for user in ["owner", "member"] {
                let path = format!("/api/v1/rooms/{room}/members/{user}");
                assert_eq!(
                    app.delete(&token, &path).await.0,
                    403,
                    "{who}: DELETE {path}"
                );
            }
        }
    }
    // A moderator deletes messages, but does not manage members.
    let moderator = app.token_with("mod", &["moderator"], std::time::Duration::from_secs(60));
    assert_eq!(
        app.put(&moderator, &format!("/api/v1/rooms/{public}/members/mod"))
            .await
            .0,
        403
    );
    let (_, members) = app
        .get(&owner, &format!("/api/v1/rooms/{private}/members"))
        .await;
    let mut ids: Vec<&str> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["member", "owner"], "nothing changed");
    assert_eq!(
        app.connect_with(&private, Some(&app.token("mallory")), None, &[])
            .await
            .err()
            .unwrap()
            .status,
        403
    );
}

#[tokio::test]
async fn in_a_private_room_only_authors_and_moderators_delete_messages() {
    let app = TestApp::spawn().await;
    let owner = app.token("owner");
    let room = app
        .create_room(&owner, "den", "private", &["author", "member"])
        .await;
    let author = app.token("author");
    let (_, sent) = app
        .post(
            &author,
            &format!("/api/v1/rooms/{room}/messages"),
            json!({"body": "mine"}),
        )
        .await;
    let path = format!(
        "/api/v1/rooms/{room}/messages/{}",
        sent["id"].as_str().unwrap()
    );
    for (who, token) in [
        ("another member", app.token("member")),
        ("the room's owner", owner.clone()),
        ("a stranger", app.token("mallory")),
    ] {
        let (status, body) = app.delete(&token, &path).await;
        assert_eq!(status, 403, "{who}: {body}");
    }
    // The same message through another room's path is not found there.
    let (status, _) = app
        .delete(
            &app.token("member"),
            &format!(
                "/api/v1/rooms/global/messages/{}",
                sent["id"].as_str().unwrap()
            ),
        )
        .await;
    assert_eq!(status, 404);
    let (_, page) = app
        .get(&owner, &format!("/api/v1/rooms/{room}/messages"))
        .await;
    assert!(page["messages"][0].get("deleted").is_none(), "still there");

    let moderator = app.token_with("mod", &["moderator"], std::time::Duration::from_secs(60));
    assert_eq!(app.delete(&moderator, &path).await.0, 204);
}

/// The contract answers 403 for a private room one is not in and 404 for an
/// id that names no room, so a guessed id's existence shows (SECURITY.md).
/// Nothing else does: the refusal is the same for every private room and
/// names nothing of it, and the room is never listed.
#[tokio::test]
async fn a_private_room_shows_only_that_it_exists_and_nothing_of_it() {
    let app = TestApp::spawn().await;
    let owner = app.token("owner");
    app.create_room(&owner, "first-secret", "private", &[])
        .await;
    app.create_room(&owner, "second-secret", "private", &[])
        .await;
    let mallory = app.token("mallory");
    let mut bodies = Vec::new();
    for room in ["first-secret", "second-secret"] {
        for path in ["", "/messages", "/members", "/presence"] {
            let (status, body) = app
                .get(&mallory, &format!("/api/v1/rooms/{room}{path}"))
                .await;
            assert_eq!(status, 403);
            let text = body.to_string();
            assert!(
                !text.contains("secret") && !text.contains("owner"),
                "{text}"
            );
            bodies.push(body);
        }
        let refusal = app
            .connect_with(room, Some(&mallory), None, &[])
            .await
            .err()
            .unwrap();
        assert_eq!(refusal.status, 403);
        bodies.push(refusal.body);
    }
    assert!(
        bodies.windows(2).all(|pair| pair[0] == pair[1]),
        "every refusal is the same: {bodies:?}"
    );
    let (status, body) = app.get(&mallory, "/api/v1/rooms/no-such-room").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (_, rooms) = app.get(&mallory, "/api/v1/rooms").await;
    assert!(!rooms.to_string().contains("secret"), "{rooms}");
}

#[tokio::test]
async fn removal_from_a_private_room_takes_effect_on_rest_and_open_sockets() {
    let app = TestApp::spawn().await;
    let owner = app.token("owner");
    let room = app.create_room(&owner, "club", "private", &["ex"]).await;
    let ex = app.token("ex");
    let (mut socket, _) = app.join(&room, &ex).await;
    let (status, _) = app
        .delete(&owner, &format!("/api/v1/rooms/{room}/members/ex"))
        .await;
    assert_eq!(status, 204);
    let (closed, _) = socket.closed().await;
    assert_eq!(closed, Closed::Code(4003));
    for path in ["", "/messages", "/members", "/presence"] {
        let (status, _) = app.get(&ex, &format!("/api/v1/rooms/{room}{path}")).await;
        assert_eq!(status, 403, "{path}");
    }
    let (status, _) = app
        .post(
            &ex,
            &format!("/api/v1/rooms/{room}/messages"),
            json!({"body": "still here?"}),
        )
        .await;
    assert_eq!(status, 403);
}

/// A connection that got in through a role keeps it only as long as its
/// token has it: a refresh with a token without the role is refused, and
/// the connection closes when the old token expires.
#[tokio::test]
async fn a_refresh_that_no_longer_opens_the_room_is_refused_and_the_connection_expires() {
    let app = TestApp::spawn_with(|c| c.jwt_leeway = std::time::Duration::from_secs(1)).await;
    let owner = app.token("owner");
    let room = app.create_room(&owner, "ops", "private", &[]).await;
    let admin = app.token_with("root", &["admin"], std::time::Duration::from_secs(3));
    let (mut socket, _) = app.join(&room, &admin).await;
    socket
        .send_json(json!({"type": "refresh", "token": app.token("root")}))
        .await;
    let refused = socket.next_json().await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{refused}"
    );
    assert_eq!(socket.closed().await.0, Closed::Code(4001));
}
