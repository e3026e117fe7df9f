//! The web client as HTTP sees it: the page and its files, their headers,
//! and the development token endpoint (off unless asked for). The page
//! itself is driven in a real browser by `tests/web`.

use serde_json::{Value, json};

use crate::helpers::TestApp;

async fn fetch(app: &TestApp, path: &str) -> reqwest::Response {
    app.http.get(app.url(path)).send().await.expect("request")
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header"))
}

#[tokio::test]
async fn the_page_is_served_at_the_root_with_a_strict_content_security_policy() {
    let app = TestApp::spawn().await;
    let response = fetch(&app, "/").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "content-type"),
        "text/html; charset=utf-8"
    );
    let csp = header(&response, "content-security-policy").to_owned();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        &format!("connect-src 'self' ws://{0} wss://{0}", app.addr),
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(header(&response, "x-content-type-options"), "nosniff");
    assert_eq!(header(&response, "cache-control"), "no-cache");
    let body = response.text().await.unwrap();
    assert!(body.contains(r#"<script type="module" src="/app.js">"#));
    // No inline script or style for the policy to allow.
    assert!(!body.contains("<script>") && !body.contains("style="));

    let (status, again) = app.get_text("/index.html").await;
    assert_eq!((status, again), (200, body));
}

#[tokio::test]
async fn the_page_files_have_their_content_types_and_revalidate_by_etag() {
    let app = TestApp::spawn().await;
    for (path, content_type) in [
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/favicon.svg", "image/svg+xml"),
    ] {
        let response = fetch(&app, path).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(header(&response, "content-type"), content_type, "{path}");
        let etag = header(&response, "etag").to_owned();
        assert!(!response.bytes().await.unwrap().is_empty(), "{path}");

        let revalidated = app
            .http
            .get(app.url(path))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(revalidated.status(), 304, "{path}");
        assert_eq!(header(&revalidated, "etag"), etag);
    }
}

#[tokio::test]
async fn the_other_routes_still_answer_beside_the_page() {
    let app = TestApp::spawn().await;
    for path in ["/healthz", "/openapi.yaml", "/asyncapi.yaml", "/docs"] {
        assert_eq!(app.get_text(path).await.0, 200, "{path}");
    }
    let (status, body) = app.get(&app.token("1"), "/api/v1/rooms").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.get_text("/no-such-file.js").await.0, 404);
}

#[tokio::test]
async fn development_tokens_are_off_by_default() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get_text("/dev/token").await;
    assert_eq!(status, 404, "{body}");
    let response = app
        .http
        .post(app.url("/dev/token"))
        .json(&json!({"sub": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "not_found", "{body}");
}

#[tokio::test]
async fn with_the_flag_a_minted_token_works_over_rest_and_the_websocket() {
    let app = TestApp::spawn_with(|config| config.dev_tokens = true).await;
    let (status, body) = app.get_text("/dev/token").await;
    assert_eq!(status, 200, "{body}");

    let response = app
        .http
        .post(app.url("/dev/token"))
        .json(&json!({"sub": "alice", "name": "Alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let minted: Value = response.json().await.unwrap();
    assert_eq!(minted["user"], json!({"id": "alice", "name": "Alice"}));
    let token = minted["token"].as_str().expect("a token");

    let caller = app.keys.verify(token).expect("signed with the secret");
    assert!(caller.roles.is_empty(), "no roles");
    let lifetime = caller.expires_at - time::OffsetDateTime::now_utc();
    assert!(lifetime <= time::Duration::hours(1) && lifetime > time::Duration::minutes(55));

    let (status, rooms) = app.get(token, "/api/v1/rooms").await;
    assert_eq!(status, 200, "{rooms}");
    // The browser's way: the token in the subprotocol list.
    let mut ws = app
        .connect_with(
            "global",
            None,
            None,
            &[(
                "sec-websocket-protocol",
                &format!("chat.v1, bearer.{token}"),
            )],
        )
        .await
        .expect("connects");
    assert_eq!(ws.protocol.as_deref(), Some("chat.v1"));
    let ready = ws.next_json().await;
    assert_eq!(
        ready["user"],
        json!({"id": "alice", "name": "Alice"}),
        "{ready}"
    );
}

#[tokio::test]
async fn minting_refuses_invalid_user_ids() {
    let app = TestApp::spawn_with(|config| config.dev_tokens = true).await;
    for body in [
        json!({"sub": "not valid!"}),
        json!({"name": "x"}),
        json!("alice"),
    ] {
        let response = app
            .http
            .post(app.url("/dev/token"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["code"], "bad_request", "{error}");
    }
}
