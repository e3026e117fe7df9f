//! The benchmark tool works: each scenario once, at a tiny size, against
//! the real binary. No timing is asserted (speed is measured, not tested).

use std::time::Duration;

use crate::helpers::{SECRET, Service, spawn_service};

/// Limits raised as docs/benchmarks.md says to run the server for load.
const LOAD_LIMITS: [(&str, &str); 4] = [
    ("SEND_RATE_LIMIT", "100000000"),
    ("CONNECT_RATE_LIMIT", "100000000"),
    ("REST_RATE_LIMIT", "100000000"),
    ("FRAME_FLOOD_LIMIT", "100000000"),
];

/// `chat-bench`, pinned to one CPU as scripts/bench.sh pins it: the
/// generator then runs on one thread.
fn chat_bench() -> tokio::process::Command {
    let mut command = tokio::process::Command::new("taskset");
    command.args(["-c", "0", env!("CARGO_BIN_EXE_chat-bench")]);
    command
}

/// Runs `command` (pinned: see [`chat_bench`]) and returns its one JSON
/// line.
async fn report(mut command: tokio::process::Command) -> serde_json::Value {
    let report = parsed(command.output().await.expect("chat-bench runs"));
    assert_eq!(report["generator"]["runtime"], "current_thread");
    report
}

/// The one JSON line of a run that succeeded.
fn parsed(output: std::process::Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "chat-bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON line per run: {stdout}");
    serde_json::from_str(stdout.trim()).expect("a JSON report")
}

async fn bench(addr: &str, args: &[&str]) -> serde_json::Value {
    let mut command = chat_bench();
    command
        .env("JWT_SECRET", SECRET)
        .arg("--url")
        .arg(format!("http://{addr}"))
        .args(args);
    report(command).await
}

#[tokio::test]
async fn loopback_needs_no_server_and_prices_a_delivery() {
    let mut command = chat_bench();
    command.env_remove("JWT_SECRET").args([
        "loopback",
        "--connections",
        "4",
        "--rate",
        "4000",
        "--duration",
        "250ms",
        "--frame-bytes",
        "100",
        "--writer-cpu",
        "0",
        "--reader-cpu",
        "0",
    ]);
    let loopback = report(command).await;
    assert_eq!(loopback["scenario"], "loopback");
    // 4,000 frames a second for 250 ms, written to the 4 connections in turn,
    // and every one of them read (the run fails otherwise).
    assert_eq!(loopback["frames"], 1000, "{loopback}");
    for side in ["writer", "reader"] {
        let us = loopback[side]["cpu_us_per_frame"].as_f64().unwrap();
        assert!(us > 0.0, "{side}: {loopback}");
    }
    let reads = loopback["reader"]["reads_per_frame"].as_f64().unwrap();
    assert!(reads > 0.0, "{loopback}");
    assert!(loopback["null_syscall_ns"].as_f64().unwrap() > 0.0);
    // Writer and reader on one CPU: no other CPU to wake.
    assert!(loopback["wakeup"].is_null(), "{loopback}");
    if std::thread::available_parallelism().map_or(1, usize::from) >= 2 {
        // On two CPUs, what waking the reader costs the writer: its CPU per
        // write with the reader asleep, less that with the reader polling.
        let mut unpinned = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-bench"));
        unpinned.args(["loopback", "--connections", "2", "--rate", "1000"]);
        unpinned.args([
            "--duration",
            "100ms",
            "--writer-cpu",
            "0",
            "--reader-cpu",
            "1",
        ]);
        let loopback = parsed(unpinned.output().await.expect("chat-bench runs"));
        let wakeup = &loopback["wakeup"];
        let us = |key: &str| wakeup[key].as_f64().unwrap();
        let (blocked, polling) = (
            us("blocked_reader_us_per_write"),
            us("polling_reader_us_per_write"),
        );
        assert!(blocked > 0.0 && polling > 0.0, "{loopback}");
        assert!(
            (us("wakeup_us") - (blocked - polling).max(0.0)).abs() < 0.01,
            "{loopback}"
        );
        assert_eq!(wakeup["writes"], 2000, "{loopback}");
    }

    // Pinned to CPU 0, it may not put its reader on CPU 1.
    let mut command = chat_bench();
    command.args(["loopback", "--duration", "100ms", "--reader-cpu", "1"]);
    assert_fails_saying(command, "CPU 1 is not one this process may run on").await;

    // Every other scenario drives a server with tokens of its own making.
    let mut command = chat_bench();
    command.env_remove("JWT_SECRET").arg("idle");
    assert_fails_saying(command, "--jwt-secret").await;
}

/// Unpinned, `--generators` gives each process a CPU of its own when the
/// machine has one for each, and then each runs the one-thread runtime.
#[tokio::test]
async fn generators_spread_over_the_cpus_they_may_use() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = spawn_service(dir.path(), &LOAD_LIMITS).await;
    let report = parsed(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-bench"))
            .env("JWT_SECRET", SECRET)
            .args(["--url", &format!("http://{addr}")])
            .args(["ingest", "--generators", "2", "--connections", "2"])
            .args(["--rest-workers", "0", "--duration", "200ms"])
            .output()
            .await
            .expect("chat-bench runs"),
    );
    let generator = &report["generator"];
    assert_eq!(generator["processes"], 2, "{report}");
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus >= 2 {
        let pinned = generator["cpus"].as_array().expect("a CPU per process");
        assert_eq!(pinned.len(), 2, "{report}");
        assert_ne!(pinned[0], pinned[1], "{report}");
        assert_eq!(generator["runtime"], "current_thread", "{report}");
    } else {
        // One CPU for two processes: they share it.
        assert!(generator["cpus"].is_null(), "{report}");
    }
}

/// `--spin` runs a served scenario with the generator polling (and says so
/// in its report), and is refused where it cannot poll: on more than one
/// CPU, or in a scenario without a server.
#[tokio::test]
async fn a_spinning_generator_runs_on_one_cpu_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = spawn_service(dir.path(), &LOAD_LIMITS).await;
    let ingest = bench(
        &addr,
        &[
            "ingest",
            "--spin",
            "--connections",
            "2",
            "--rest-workers",
            "0",
            "--duration",
            "300ms",
        ],
    )
    .await;
    assert_eq!(ingest["generator"]["spin"], true, "{ingest}");
    // It polls instead of sleeping: nothing had to wake it.
    assert_eq!(ingest["cpu"]["generator_wakeups"], 0, "{ingest}");
    assert!(ingest["ws_acked"].as_u64().unwrap() > 0, "{ingest}");
    assert_eq!(ingest["ws_acked"], ingest["ws_sent"], "{ingest}");

    if std::thread::available_parallelism().map_or(1, usize::from) >= 2 {
        let mut unpinned = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-bench"));
        unpinned.env("JWT_SECRET", SECRET).args([
            "--url",
            &format!("http://{addr}"),
            "--spin",
            "idle",
        ]);
        assert_fails_saying(unpinned, "--spin needs the generator on one CPU").await;
    }
    let mut serverless = chat_bench();
    serverless.args(["--spin", "pauses", "--duration", "100ms"]);
    assert_fails_saying(serverless, "--spin applies to idle, fanout and ingest only").await;
}

/// A process that is not the run's and uses the CPU during its measured
/// phase is named in `cpu.others`; the run's own processes are not.
#[tokio::test]
async fn other_processes_busy_during_a_phase_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = spawn_service(dir.path(), &LOAD_LIMITS).await;
    // Killed when dropped, so a failing run does not leave it spinning.
    let busy = tokio::process::Command::new("yes")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("yes starts");
    let ingest = bench(
        &addr,
        &[
            "ingest",
            "--connections=2",
            "--rest-workers=0",
            "--duration=500ms",
            "--watch=chat-service",
        ],
    )
    .await;
    drop(busy);
    let others = ingest["cpu"]["others"].as_array().expect("a list");
    let yes = others.iter().find(|other| other["name"] == "yes");
    let percent = yes.and_then(|yes| yes["percent_of_one_core"].as_f64());
    assert!(percent.is_some_and(|p| p >= 10.0), "{ingest}");
    // The watched processes are the run's (this test's server among them).
    assert!(
        others.iter().all(|other| other["name"] != "chat-service"),
        "{ingest}"
    );
}

/// `pauses` needs no server either. Its one watcher (chat-bench is pinned
/// to CPU 0 here) sees the whole process stopped for a while as a pause
/// of its CPU, as it would see the host not running the vCPU.
#[tokio::test]
async fn pauses_are_seen_on_each_cpu_the_process_may_use() {
    let mut command = chat_bench();
    command
        .env_remove("JWT_SECRET")
        .args(["pauses", "--duration", "1500ms", "--threshold", "50ms"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Not left stopped if a signal below fails.
        .kill_on_drop(true);
    let child = command.spawn().expect("chat-bench starts");
    let pid = child.id().expect("a running child").to_string();
    // Well after its start, well before its end.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {name}");
    };
    signal("-STOP");
    tokio::time::sleep(Duration::from_millis(150)).await;
    signal("-CONT");
    let pauses = parsed(child.wait_with_output().await.expect("chat-bench ends"));
    assert_eq!(pauses["scenario"], "pauses");
    let cpus = pauses["cpus"].as_array().expect("one entry per CPU");
    assert_eq!(cpus.len(), 1, "pinned to CPU 0: {pauses}");
    let cpu = &cpus[0];
    assert_eq!(cpu["cpu"], 0);
    // From its thread's start to the end of the run: most of the 1.5 s.
    let watched = cpu["watched_seconds"].as_f64().unwrap();
    assert!((1.0..2.0).contains(&watched), "{pauses}");
    // The stop is a pause of at least its length (other tests' turns on
    // the CPU may add shorter ones), less the millisecond the watcher
    // meant to sleep anyway: a pause is how late it woke, and a watcher
    // stopped just after it read the clock wakes 150 ms after that read,
    // 149 ms late.
    assert!(cpu["pauses"].as_u64().unwrap() >= 1, "{pauses}");
    assert!(cpu["longest_ms"].as_f64().unwrap() >= 149.0, "{pauses}");
    let listed = cpu["listed"].as_array().unwrap();
    assert_eq!(listed.len() as u64, cpu["pauses"].as_u64().unwrap());
}

/// `flushes` needs no server either: it times real flushes in the
/// directory it is given, leaves nothing there, and says so when it cannot
/// write there.
#[tokio::test]
async fn flushes_time_the_disk_and_leave_no_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = chat_bench();
    command
        .env_remove("JWT_SECRET")
        .args([
            "flushes",
            "--duration",
            "300ms",
            "--threshold",
            "1ms",
            "--dir",
        ])
        .arg(dir.path());
    let flushes = report(command).await;
    assert_eq!(flushes["scenario"], "flushes");
    assert!(flushes["flushes"].as_u64().unwrap() > 0, "{flushes}");
    let (p50, max) = (flushes["p50_ms"].as_f64(), flushes["max_ms"].as_f64());
    assert!(p50.unwrap() <= max.unwrap(), "{flushes}");
    let listed = flushes["listed"].as_array().unwrap().len() as u64;
    assert_eq!(listed, flushes["stalls"].as_u64().unwrap().min(100));
    let left = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(left, 0, "the flushed file is removed");

    let mut nowhere = chat_bench();
    nowhere
        .env_remove("JWT_SECRET")
        .args(["flushes", "--duration", "100ms", "--dir"])
        .arg(dir.path().join("missing"));
    assert_fails_saying(nowhere, "to flush").await;
}

async fn assert_fails_saying(mut command: tokio::process::Command, what: &str) {
    let output = command.output().await.expect("chat-bench runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(what), "{stderr}");
}

#[tokio::test]
async fn every_scenario_runs_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = spawn_service(dir.path(), &LOAD_LIMITS).await;
    let pid = server.id().to_string();

    let idle = bench(
        &addr,
        &[
            "idle",
            "--connections",
            "20",
            "--hold",
            "300ms",
            "--pid",
            &pid,
        ],
    )
    .await;
    assert_eq!(idle["open_after_hold"], 20);
    assert!(idle["servers"][0]["rss_after_kib"].as_u64().unwrap() > 0);

    let fanout = bench(
        &addr,
        &[
            "fanout",
            "--rooms",
            "2",
            "--members",
            "3",
            "--senders",
            "2",
            "--rate",
            "40",
            "--duration",
            "500ms",
            "--join-concurrency",
            "3",
            "--warmup",
            "300ms",
            "--arrival-stamps",
        ],
    )
    .await;
    // The senders join after the members: each member hears its sender's
    // arrival at least.
    assert!(
        fanout["setup"]["frames"].as_u64().unwrap() >= 2 * 3,
        "{fanout}"
    );
    assert!(fanout["setup"]["seconds"].as_f64().is_some(), "{fanout}");
    let result = &fanout["result"];
    assert!(result["acked"].as_u64().unwrap() > 0, "{fanout}");
    // What the senders sent in the warm-up before the measured 0.5 s is
    // not counted: 40/s for 0.5 s is 20 sends due (fewer if the machine
    // stalls past the end), and the warm-up's 12 would show.
    assert_eq!(fanout["warmup_seconds"], 0.3, "{fanout}");
    assert!(result["sent"].as_u64().unwrap() <= 20, "{fanout}");
    assert_eq!(result["loss"], 0, "{fanout}");
    assert_eq!(result["delivered"], result["expected"]);
    assert_eq!(result["unacked"], 0, "{fanout}");
    // The rate is the deliveries over their span, from the first delivery
    // to the last, which lies within the measured phase. How long the span
    // is depends on the machine's speed (a loaded CI machine delays the
    // first sends), so only its bounds are asserted here.
    let span = result["delivery_seconds"].as_f64().unwrap();
    assert!(
        span > 0.0 && span < result["elapsed_seconds"].as_f64().unwrap(),
        "{fanout}"
    );
    let rate = result["deliveries_per_second"].as_f64().unwrap();
    let delivered = result["delivered"].as_f64().unwrap();
    assert!((rate * span - delivered).abs() < 1.0, "{fanout}");
    assert!(result["send_to_delivery"]["p99_ms"].as_f64().is_some());
    // What a delivery cost the servers (none given here) and the generator.
    for who in ["servers", "generator"] {
        let cost = result["cpu_us_per_delivery"][who].as_f64();
        assert!(cost.is_some_and(|us| us >= 0.0), "{who}: {fanout}");
    }
    // How often the generator slept (at 40 sends a second it waits for
    // each), and the deliveries it read per wake-up.
    let wakeups = result["cpu"]["generator_wakeups"].as_u64().unwrap();
    assert!(wakeups > 0, "{fanout}");
    let per_wakeup = result["deliveries_per_generator_wakeup"].as_f64().unwrap();
    assert!(
        (per_wakeup - delivered / wakeups as f64).abs() <= 0.05,
        "{fanout}"
    );
    // The timeline holds the slowest latency of each 250 ms of sends: two
    // slices here, and the slowest of them is the run's slowest.
    let timeline = &result["slowest_by_send_time"];
    for (series, overall) in [
        ("delivery_ms", "send_to_delivery"),
        ("ack_ms", "send_to_ack"),
    ] {
        let slices: Vec<f64> = timeline[series]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(slices.len(), 2, "{fanout}");
        let slowest = slices.iter().copied().fold(0.0, f64::max);
        let max = result[overall]["max_ms"].as_f64().unwrap();
        // (The histogram keeps three significant digits.)
        assert!(
            slowest > 0.0 && (slowest - max).abs() <= max * 0.01,
            "{fanout}"
        );
    }
    // With `--arrival-stamps`, each latency again to the frame's arrival
    // in the generator's socket, which comes before its read: every
    // message counted, and no percentile later than the read's.
    for (read, arrival, count) in [
        ("send_to_delivery", "send_to_delivery_arrival", "delivered"),
        ("send_to_ack", "send_to_ack_arrival", "acked"),
    ] {
        assert_eq!(result[arrival]["count"], result[count], "{fanout}");
        for q in ["p50_ms", "p99_ms", "max_ms"] {
            let (early, late) = (
                result[arrival][q].as_f64().unwrap(),
                result[read][q].as_f64().unwrap(),
            );
            // (Three significant digits each.)
            assert!(
                early > 0.0 && early <= late * 1.01,
                "{arrival} {q}: {fanout}"
            );
        }
    }
    assert!(fanout["generator"]["cpu_seconds"].as_f64().is_some());
    // The generator's own event loop, probed every 10 ms over the phase.
    let lag = &result["generator_loop_lag"];
    assert!(lag["samples"].as_u64().unwrap() >= 10, "{fanout}");
    assert!(lag["max_ms"].as_f64().unwrap() >= lag["p50_ms"].as_f64().unwrap());
    // The server's own view of the phase: the sends it answered between
    // the phase's two readings of its /metrics, taken while the senders
    // send on, so a warm-up send may fall on either side of the first.
    let view = &result["server_view"];
    assert_eq!(view["pods_unread"], 0, "{fanout}");
    let answered = view["send_to_ack"]["count"].as_u64().unwrap();
    let acked = result["acked"].as_u64().unwrap();
    assert!(answered > 0 && answered <= acked + 12, "{fanout}");
    assert!(
        view["send_to_ack"]["p50_at_most_ms"].as_f64().unwrap()
            <= view["send_to_ack"]["p99_at_most_ms"].as_f64().unwrap(),
        "{fanout}"
    );

    // The same in two generator processes, merged into one report: each
    // process has two of the four rooms and their senders, and every
    // delivery of either is in the merged counts and histograms.
    let split = bench(
        &addr,
        &[
            "fanout",
            "--generators",
            "2",
            "--rooms",
            "4",
            "--members",
            "3",
            "--senders",
            "4",
            "--rate",
            "40",
            "--duration",
            "500ms",
        ],
    )
    .await;
    assert_eq!(split["generator"]["processes"], 2, "{split}");
    assert_eq!(split["setup"].as_array().unwrap().len(), 2, "{split}");
    let result = &split["result"];
    assert_eq!(result["target_rate"], 40.0, "{split}");
    let (sent, acked) = (
        result["sent"].as_u64().unwrap(),
        result["acked"].as_u64().unwrap(),
    );
    assert!(sent > 0 && sent <= 20 && acked == sent, "{split}");
    assert_eq!(result["expected"], acked * 3, "{split}");
    assert_eq!(result["delivered"], result["expected"], "{split}");
    assert_eq!(result["loss"], 0, "{split}");
    assert_eq!(
        result["send_to_delivery"]["count"], result["delivered"],
        "{split}"
    );
    assert_eq!(result["send_to_ack"]["count"], result["acked"], "{split}");
    assert!(result.get("shard").is_none(), "{split}");
    assert_eq!(
        result["generator_loop_lag_by_process"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // An ingest in two processes: each has one of the two connections.
    let split = bench(
        &addr,
        &[
            "ingest",
            "--generators",
            "2",
            "--connections",
            "2",
            "--rest-workers",
            "0",
            "--duration",
            "500ms",
        ],
    )
    .await;
    assert_eq!(split["generator"]["processes"], 2, "{split}");
    let acked = split["ws_acked"].as_f64().unwrap();
    let rate = split["acked_per_second"].as_f64().unwrap();
    // Over the phases' 0.5 s (or a little longer on a slow machine).
    assert!(acked > 0.0 && rate > 0.0 && rate <= acked / 0.5, "{split}");
    assert_eq!(split["refused"], 0, "{split}");
    // Every send the two processes made was answered.
    assert_eq!(split["ws_sent"].as_f64(), Some(acked), "{split}");
    assert_eq!(split["unanswered"], 0, "{split}");
    assert!(split.get("shard").is_none(), "{split}");
    // A split the merge cannot honour is refused before anything starts.
    for (args, says) in [
        (
            &["fanout", "--generators", "2", "--find-max"][..],
            "--find-max",
        ),
        (&["fanout", "--generators", "3", "--rooms", "2"], "--rooms"),
        (
            &[
                "ingest",
                "--generators",
                "3",
                "--connections",
                "2",
                "--rest-workers",
                "0",
            ],
            "--connections 2",
        ),
        (&["idle", "--generators", "2"], "fanout and ingest only"),
    ] {
        let mut command = chat_bench();
        command
            .env("JWT_SECRET", SECRET)
            .args(["--url", &format!("http://{addr}")]);
        command.args(args);
        assert_fails_saying(command, says).await;
    }

    let ingest = bench(
        &addr,
        &[
            "ingest",
            "--connections",
            "2",
            "--rest-workers",
            "1",
            "--duration",
            "500ms",
            "--watch",
            "chat-service",
        ],
    )
    .await;
    assert!(
        ingest["ws_acked"].as_u64().unwrap() > 0 && ingest["rest_acked"].as_u64().unwrap() > 0,
        "{ingest}"
    );
    assert_eq!(ingest["refused"], 0);
    assert!(ingest["setup_seconds"].as_f64().unwrap() > 0.0, "{ingest}");
    // Each send made was answered, so none is listed as unanswered.
    assert_eq!(ingest["ws_sent"], ingest["ws_acked"], "{ingest}");
    assert_eq!(ingest["unanswered"], 0, "{ingest}");
    assert_eq!(ingest["unpaired_answers"], 0, "{ingest}");
    assert_eq!(
        ingest["unanswered_sends"],
        serde_json::json!([]),
        "{ingest}"
    );
    assert_eq!(ingest["connections_stopped"], 0, "{ingest}");
    assert_eq!(
        ingest["stopped_connections"],
        serde_json::json!([]),
        "{ingest}"
    );
    // The watched processes (found by name: this test's server among
    // them) are reported with the servers, and what a message cost each.
    let watched = &ingest["cpu"]["watched"][0];
    assert_eq!(watched["name"], "chat-service", "{ingest}");
    assert!(watched["processes"].as_u64().unwrap() >= 1, "{ingest}");
    for who in ["servers", "generator", "chat-service"] {
        let cost = ingest["cpu_us_per_acked"][who].as_f64();
        assert!(cost.is_some_and(|us| us >= 0.0), "{who}: {ingest}");
    }
    // Every core of the machine, with its busy and stolen shares.
    let cores = ingest["cpu"]["cores"].as_array().unwrap();
    let online = std::thread::available_parallelism().unwrap().get();
    assert!(cores.len() >= online, "{ingest}");
    for core in cores {
        let busy = core["busy_percent"].as_f64().unwrap();
        let steal = core["steal_percent"].as_f64().unwrap();
        // Each is rounded to a tenth.
        assert!((0.0..=100.1).contains(&(busy + steal)), "{ingest}");
    }
    assert!(
        cores.iter().any(|c| c["busy_percent"].as_f64() > Some(0.0)),
        "the phase sent and stored messages, so some core worked: {ingest}"
    );
    // Ingest reads the server before its first send and after its last
    // answer: the server answered exactly what the tool counted, over both
    // transports, and stored each of them.
    let view = &ingest["server_view"];
    let acked = ingest["ws_acked"].as_f64().unwrap() + ingest["rest_acked"].as_f64().unwrap();
    assert_eq!(
        view["send_to_ack"]["count"].as_f64(),
        Some(acked),
        "{ingest}"
    );
    assert!(
        view["send_to_ack"]["mean_ms"].as_f64().unwrap() > 0.0,
        "{ingest}"
    );
    assert!(view["append"]["count"].as_u64().unwrap() >= 1, "{ingest}");
}

/// A service with the limits out of the load's way ([`LOAD_LIMITS`]) and
/// one more setting, which wins over theirs (the environment is applied in
/// order).
async fn spawn_loaded(dir: &std::path::Path, setting: (&str, &str)) -> (Service, String) {
    let mut env = LOAD_LIMITS.to_vec();
    env.push(setting);
    spawn_service(dir, &env).await
}

/// A one-second ingest run over WebSocket alone: `connections`, each with
/// `window` sends in flight.
async fn ws_ingest(addr: &str, connections: &str, window: &str) -> serde_json::Value {
    let args = ["--connections", connections, "--window", window];
    let rest = ["--rest-workers", "0", "--duration", "1s"];
    bench(addr, &[&["ingest"][..], &args, &rest].concat()).await
}

/// Sends in flight on a connection the server closes are reported as
/// unanswered, with the close frame's code, and the run still reports.
#[tokio::test]
async fn ingest_reports_the_sends_a_closed_connection_left_unanswered() {
    let dir = tempfile::tempdir().unwrap();
    // Sends are not limited, but more than 20 frames in ten seconds on one
    // connection is a flood: the second window of 16 sends crosses it.
    let (_server, addr) = spawn_loaded(dir.path(), ("FRAME_FLOOD_LIMIT", "20")).await;
    let ingest = ws_ingest(&addr, "2", "16").await;
    let count = |key: &str| ingest[key].as_u64().unwrap();
    assert_eq!(count("refused"), 0, "{ingest}");
    assert!(count("unanswered") > 0, "{ingest}");
    assert_eq!(
        count("ws_sent"),
        count("ws_acked") + count("unanswered"),
        "every send is either acked or unanswered: {ingest}"
    );
    let listed = ingest["unanswered_sends"].as_array().unwrap();
    assert_eq!(listed.len() as u64, count("unanswered").min(10), "{ingest}");
    for send in listed {
        assert_eq!(send["why"], "closed by the server (4029)", "{ingest}");
        assert!(
            send["room"].as_str().unwrap().starts_with("ingest-"),
            "{ingest}"
        );
    }
    // Both connections were closed, and each is listed with its room, why
    // and how many of its sends went unanswered.
    assert_eq!(count("connections_stopped"), 2, "{ingest}");
    let stopped = ingest["stopped_connections"].as_array().unwrap();
    assert_eq!(stopped.len(), 2, "{ingest}");
    let mut unanswered = 0;
    for connection in stopped {
        assert_eq!(connection["why"], "closed by the server (4029)", "{ingest}");
        unanswered += connection["unanswered"].as_u64().unwrap();
    }
    assert_eq!(unanswered, count("unanswered"), "{ingest}");
}

/// An ingest connection keeps sending when the server's pings come behind
/// its answers: pings every 20 ms land in the same read as an ack again
/// and again, and a sender that read on past one for a text would wait
/// for ever (until the tool's 60 s grace, which the timeout below is well
/// short of).
#[tokio::test]
async fn ingest_senders_are_not_stalled_by_the_servers_pings() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = spawn_loaded(dir.path(), ("PING_INTERVAL", "20ms")).await;
    let run = ws_ingest(&addr, "4", "1");
    let ingest = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run ends with its phase, not 60 s later");
    assert_eq!(ingest["ws_sent"], ingest["ws_acked"], "{ingest}");
    assert_eq!(ingest["unanswered"], 0, "{ingest}");
}
