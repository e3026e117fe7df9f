//! Tokens: where they are read from, what is refused, expiry and refresh.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::helpers::{Closed, SECRET, TestApp};

fn sign(claims: serde_json::Value, alg: Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn in_an_hour() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp() + 3600
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_before_the_upgrade_and_on_rest() {
    let app = TestApp::spawn().await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(json!({"sub": "42", "exp": in_an_hour()}).to_string())
    );
    let cases = [
        ("garbage", "not.a.jwt".to_owned()),
        ("alg none", unsigned),
        (
            "other secret",
            sign(
                json!({"sub": "42", "exp": in_an_hour()}),
                Algorithm::HS256,
                "another-secret",
            ),
        ),
        (
            "other algorithm",
            sign(
                json!({"sub": "42", "exp": in_an_hour()}),
                Algorithm::HS512,
                SECRET,
            ),
        ),
        (
            "expired",
            sign(
                json!({"sub": "42", "exp": now - 60}),
                Algorithm::HS256,
                SECRET,
            ),
        ),
        (
            "not yet valid",
            sign(
                json!({"sub": "42", "exp": in_an_hour(), "nbf": now + 600}),
                Algorithm::HS256,
                SECRET,
            ),
        ),
        (
            "no sub",
            sign(json!({"exp": in_an_hour()}), Algorithm::HS256, SECRET),
        ),
        (
            "no exp",
            sign(json!({"sub": "42"}), Algorithm::HS256, SECRET),
        ),
        ("huge", "a".repeat(9000)),
    ];
    for (what, token) in &cases {
        let refusal = app
            .connect_with("global", Some(token), None, &[])
            .await
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"));
        assert_eq!(refusal.status, 401, "{what}");
        assert_eq!(refusal.body["code"], "unauthorized", "{what}");
        let message = refusal.body["message"].as_str().unwrap();
        assert!(
            !message.contains(token.as_str()),
            "{what}: the message repeats the token"
        );
        let (status, body) = app.get(token, "/api/v1/rooms").await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["code"], "unauthorized");
    }
    let no_token = app
        .connect_with("global", None, None, &[])
        .await
        .err()
        .unwrap();
    assert_eq!(no_token.status, 401);
    let response = app.http.get(app.url("/api/v1/rooms")).send().await.unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn numeric_subjects_and_missing_names_are_accepted() {
    let app = TestApp::spawn().await;
    let token = sign(
        json!({"sub": 42, "exp": in_an_hour()}),
        Algorithm::HS256,
        SECRET,
    );
    let (_client, ready) = app.join("global", &token).await;
    assert_eq!(ready["user"], json!({"id": "42", "name": "42"}));
}

#[tokio::test]
async fn the_first_token_source_present_wins() {
    let app = TestApp::spawn().await;
    let good = app.token("alice");

    // Header: used, even when the query has another (valid) token.
    let bearer = format!("Bearer {good}");
    let (mut client, _) = (
        app.connect_with("global", None, None, &[("authorization", &bearer)])
            .await
            .unwrap(),
        (),
    );
    assert_eq!(client.next_json().await["user"]["id"], "alice");
    let refusal = app
        .connect_with(
            "global",
            Some(&good),
            None,
            &[("authorization", "Bearer invalid")],
        )
        .await
        .err()
        .unwrap();
    assert_eq!(
        refusal.status, 401,
        "an invalid header token is refused even with a valid query token"
    );

    // Subprotocol, for browsers; the server answers chat.v1.
    let offer = format!("chat.v1, bearer.{good}");
    let mut browser = app
        .connect_with("global", None, None, &[("sec-websocket-protocol", &offer)])
        .await
        .unwrap();
    assert_eq!(browser.protocol.as_deref(), Some("chat.v1"));
    assert_eq!(browser.next_json().await["user"]["id"], "alice");
    let refusal = app
        .connect_with(
            "global",
            Some(&good),
            None,
            &[("sec-websocket-protocol", "chat.v1, bearer.invalid")],
        )
        .await
        .err()
        .unwrap();
    assert_eq!(refusal.status, 401);
}

#[tokio::test]
async fn a_connection_closes_with_4001_when_its_token_expires() {
    let app = TestApp::spawn_with(|c| c.jwt_leeway = Duration::from_secs(1)).await;
    let token = app.token_with("alice", &[], Duration::from_secs(2));
    let (mut client, _) = app.join("global", &token).await;
    let started = std::time::Instant::now();
    assert_eq!(client.closed().await.0, Closed::Code(4001));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before exp + leeway"
    );
}

#[tokio::test]
async fn refresh_extends_the_connection_and_refuses_bad_or_foreign_tokens() {
    let app = TestApp::spawn_with(|c| c.jwt_leeway = Duration::from_secs(1)).await;
    let (mut client, _) = app
        .join(
            "global",
            &app.token_with("alice", &[], Duration::from_secs(2)),
        )
        .await;

    client
        .send_json(json!({"type": "refresh", "token": "nonsense"}))
        .await;
    assert_eq!(client.next_json().await["code"], "unauthorized");
    client
        .send_json(json!({"type": "refresh", "token": app.token("mallory")}))
        .await;
    assert_eq!(client.next_json().await["code"], "forbidden");

    client
        .send_json(json!({"type": "refresh", "token": app.token("alice")}))
        .await;
    let refreshed = client.next_json().await;
    assert_eq!(refreshed["type"], "refreshed");
    assert!(refreshed["expires_at"].as_str().unwrap().ends_with('Z'));

    // Past the old token's exp + leeway, still open.
    tokio::time::sleep(Duration::from_secs(4)).await;
    client.send_json(json!({"type": "ping"})).await;
    assert_eq!(client.next_json().await["type"], "pong");
}
