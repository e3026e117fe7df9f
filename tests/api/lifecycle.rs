//! Probes, metrics, the OpenAPI document, shutdown, and the command line.

use std::process::Command;

use crate::helpers::{Closed, TestApp};

#[tokio::test]
async fn probes_answer_and_metrics_are_prometheus_text() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get_text("/healthz").await.0, 200);
    assert_eq!(app.get_text("/readyz").await.0, 200);
    let (_client, _) = app.join("global", &app.token("alice")).await;
    let (status, metrics) = app.get_text("/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("chat_connections"), "{metrics}");
}

#[tokio::test]
async fn the_served_openapi_document_is_the_committed_one() {
    let app = TestApp::spawn().await;
    let (_, served) = app.get_text("/openapi.yaml").await;
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("openapi.yaml is committed");
    assert!(
        served == committed,
        "openapi.yaml is stale: regenerate it with `cargo run -- openapi > openapi.yaml`"
    );
    let (status, viewer) = app.get_text("/docs").await;
    assert_eq!(status, 200);
    assert!(viewer.contains("openapi"), "the viewer loads the document");
}

#[tokio::test]
async fn the_asyncapi_document_is_served_as_committed() {
    let app = TestApp::spawn().await;
    let response = app
        .http
        .get(app.url("/asyncapi.yaml"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/yaml");
    let served = response.text().await.unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/asyncapi.yaml")).unwrap();
    assert!(served == committed);
    // The two documents describe one release.
    let version = format!("\n  version: {}\n", env!("CARGO_PKG_VERSION"));
    assert!(committed.starts_with("asyncapi: 3.0.0\n"));
    assert!(
        committed.contains(&version),
        "asyncapi.yaml names another version"
    );
}

#[tokio::test]
async fn shutdown_turns_readiness_off_and_closes_sockets_with_1012() {
    let mut app = TestApp::spawn().await;
    let (mut client, _) = app.join("global", &app.token("alice")).await;
    let state = app.state.clone();
    let url = app.url("/readyz");
    let http = app.http.clone();
    let stopping = tokio::spawn(async move { state.drain().await });
    let (closed, _) = client.closed().await;
    assert_eq!(closed, Closed::Code(1012));
    let ready = http.get(&url).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    stopping.await.unwrap();
    app.shutdown().await;
}

fn cli() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chat-service"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command.current_dir(std::env::temp_dir());
    command
}

#[test]
fn serve_without_a_secret_exits_with_a_message_naming_jwt_secret() {
    let dir = tempfile::tempdir().unwrap();
    let output = cli()
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("JWT_SECRET"), "{stderr}");
}

/// An idle timeout that a ping cannot beat would close every client that
/// only listens: the service refuses to start, naming both settings.
#[test]
fn serve_refuses_an_idle_timeout_shorter_than_the_ping_interval() {
    let dir = tempfile::tempdir().unwrap();
    for (ping, idle) in [
        ("25s", "20s"),
        ("25s", "25s"),
        ("10s", "11s"),
        ("0s", "60s"),
    ] {
        let output = cli()
            .current_dir(dir.path())
            .env("JWT_SECRET", crate::helpers::SECRET)
            .env("PING_INTERVAL", ping)
            .env("IDLE_TIMEOUT", idle)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{ping} / {idle} accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("PING_INTERVAL"), "{stderr}");
    }
}

#[test]
fn the_token_command_mints_tokens_the_service_accepts() {
    let output = cli()
        .env("JWT_SECRET", crate::helpers::SECRET)
        .args([
            "token",
            "--sub",
            "42",
            "--name",
            "alice",
            "--role",
            "moderator",
            "--ttl",
            "10m",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap();
    let config =
        chat_service::config::ServeConfig::for_tests("sqlite::memory:", crate::helpers::SECRET);
    let keys = chat_service::auth::JwtKeys::new(
        &chat_service::config::Secret::new(crate::helpers::SECRET),
        &config,
    );
    let caller = keys.verify(token.trim()).unwrap();
    assert_eq!(caller.id().as_str(), "42");
    assert_eq!(caller.user.name, "alice");
    assert!(caller.has(chat_service::domain::Role::Moderator));
    let left = caller.expires_at - time::OffsetDateTime::now_utc();
    assert!(left <= time::Duration::minutes(10) && left > time::Duration::minutes(9));
}

#[test]
fn the_openapi_command_prints_the_committed_document() {
    let output = cli().arg("openapi").output().unwrap();
    assert!(output.status.success());
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), committed);
}

#[test]
fn a_mistyped_database_url_fails_loudly() {
    let output = cli()
        .env("JWT_SECRET", "x")
        .env("DATABASE_URL", "mysql://localhost/chat")
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("DATABASE_URL"));
}

#[tokio::test]
async fn heartbeats_keep_live_clients_and_close_silent_ones() {
    let app = TestApp::spawn_with(|c| {
        c.ping_interval = std::time::Duration::from_millis(200);
        c.idle_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    // A reading client answers the server's pings (tungstenite does it).
    let (mut live, _) = app.join("global", &app.token("alice")).await;
    let (mut silent, _) = app.join("global", &app.token("bob")).await;
    assert_eq!(live.next_json().await["type"], "join");
    // The silent one never reads, so it never answers a ping: after the idle
    // timeout it is gone for the room.
    let leave = live.next_json().await;
    assert_eq!(
        (leave["type"].as_str(), leave["user"]["id"].as_str()),
        (Some("leave"), Some("bob"))
    );
    // The live one outlives the idle timeout.
    live.expect_silence(std::time::Duration::from_millis(1500))
        .await;
    live.send_json(serde_json::json!({"type": "ping"})).await;
    assert_eq!(live.next_json().await["type"], "pong");
    silent.closed().await;
}

/// The first CPU this process may run on.
fn first_allowed_cpu() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list");
    list.trim()
        .split([',', '-'])
        .next()
        .expect("a CPU")
        .to_owned()
}

/// Pinned to one CPU (as a pod limited to one is), the real binary runs
/// tokio's single-threaded scheduler and serves as usual; with more CPUs,
/// the work-stealing one. `chat_runtime_info` says which.
#[tokio::test]
async fn the_scheduler_follows_the_cpus_and_one_cpu_serves() {
    let cpu = first_allowed_cpu();
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let unpinned = if cpus > 1 {
        "multi_thread"
    } else {
        "current_thread"
    };
    for (wrapper, flavor) in [
        (vec!["taskset", "-c", cpu.as_str()], "current_thread"),
        (vec![], unpinned),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (_child, addr) =
            crate::helpers::spawn_service_via(&wrapper, dir.path(), &[], drop).await;
        let mut alice = crate::helpers::connect_to(&addr, "global", "alice").await;
        let mut bob = crate::helpers::connect_to(&addr, "global", "bob").await;
        assert_eq!(alice.next_json().await["type"], "ready");
        assert_eq!(bob.next_json().await["type"], "ready");
        alice.say("one cpu or more", None).await;
        let ack = alice.next_answer().await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let message = bob.next_of("message").await;
        assert_eq!(message["body"], "one cpu or more", "{message}");

        let metrics = crate::helpers::metrics_text(&addr).await;
        let info: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("chat_runtime_info{"))
            .collect();
        assert_eq!(info.len(), 1, "{metrics}");
        assert!(
            info[0].contains(&format!("flavor=\"{flavor}\"")) && info[0].ends_with(" 1"),
            "{wrapper:?}: {}",
            info[0]
        );
        if flavor == "current_thread" {
            assert!(info[0].contains("workers=\"1\""), "{}", info[0]);
        }
    }
}

/// The real binary, stopped with SIGTERM: clients get 1012 and it exits 0.
#[tokio::test]
async fn sigterm_drains_connections_with_1012_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = crate::helpers::spawn_service(dir.path(), &[]).await;
    assert!(
        dir.path().join("chat.db").exists(),
        "embedded default: a SQLite file"
    );

    let mut client = crate::helpers::connect_to(&addr, "global", "alice").await;
    assert_eq!(client.next_json().await["type"], "ready");

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(client.closed().await.0, Closed::Code(1012));
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

/// The real binary turns transparent huge pages off for itself (main.rs:
/// otherwise its heap can be resident in 2 MiB pages however little of each
/// it uses), as the kernel reports in the process's status.
#[tokio::test]
async fn the_server_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (service, _addr) = crate::helpers::spawn_service(dir.path(), &[]).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", service.id())).unwrap();
    let thp = status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .expect("the kernel reports THP_enabled (Linux 5.0 and later)");
    assert_eq!(thp.trim(), "0", "{status}");
}
