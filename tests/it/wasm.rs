//! `type = "wasm"` sinks with the plugins in `plugins/`, built from source
//! (once per test run, into the target directory): delivery over `wasi:http`
//! to a granted host, denied egress, containment of a plugin that panics,
//! loops or allocates without end, the retry policy for its errors, and
//! `expeditor check` refusing plugins it cannot use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_sink::FakeSink;
use crate::harness::{BIN, Daemon, base_config, http_client, output_text};
use crate::vendor::{self, crumb_order};

/// Builds `plugins/` (release, wasm32-wasip2) once per test binary and
/// returns the directory holding the `.wasm` files.
///
/// The nested cargo gets its own target directory next to ours, so it
/// neither waits on nor invalidates the outer build; CI builds the same
/// thing beforehand (`.ci/run`), which makes this a no-op there.
pub fn plugins() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = plugin_target_dir();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args([
                "build",
                "--release",
                "--locked",
                "--target",
                "wasm32-wasip2",
                "--manifest-path",
            ])
            .arg(root.join("plugins/Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target)
            // The outer build's flags are for the host, not for guests.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .output()
            .expect("run cargo to build the plugins");
        assert!(
            out.status.success(),
            "building plugins/ failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("wasm32-wasip2/release")
    })
}

/// `EXPEDITOR_PLUGIN_TARGET_DIR` when set (CI builds there first), else
/// `plugins` beside this test binary's temp dir in the target directory.
fn plugin_target_dir() -> PathBuf {
    match std::env::var_os("EXPEDITOR_PLUGIN_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_TARGET_TMPDIR")).join("../plugins"),
    }
}

fn plugin(name: &str) -> PathBuf {
    let path = plugins().join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// Copies a built plugin to `<dir>/plugins/<as_name>.wasm`, where `plugin =
/// "<as_name>"` finds it.
fn install(dir: &Path, name: &str, as_name: &str) {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(plugin(name), plugins.join(format!("{as_name}.wasm"))).unwrap();
}

/// `host:port` of a fake sink.
fn authority(sink: &FakeSink) -> String {
    sink.url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// A config with the usual sources, the given sinks, and a route sending
/// every event to each sink in `routed`.
fn config(sinks: &str, routed: &[&str]) -> String {
    let routes: Vec<String> = routed.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "{base}\n{sources}\n{sinks}\n[[routes]]\nname = \"everything\"\nsinks = [{routes}]\n",
        base = base_config(""),
        sources = vendor::SOURCES,
        routes = routes.join(", ")
    )
}

/// Starts the daemon with built plugins copied to a directory of their own,
/// which `{PLUGINS}` in the config names. The directory (which also holds
/// the store, its plugin cache already warm) lives as long as the returned
/// guard.
async fn start_with_plugins(config: &str, plugins: &[(&str, &str)]) -> (Daemon, tempfile::TempDir) {
    let staging = tempfile::tempdir().unwrap();
    for (name, as_name) in plugins {
        install(staging.path(), name, as_name);
    }
    // A debug build of the compiler takes seconds per plugin; the daemon
    // would do that at every start of every test. The cache is keyed by
    // content, so a copy of one filled by `check` serves every test.
    let store = staging.path().join("store");
    copy_dir(warm_cache(), &store.join("plugin-cache"));
    let config = config
        .replace("{DIR}/store", store.to_str().unwrap())
        .replace("{PLUGINS}", staging.path().join("plugins").to_str().unwrap());
    let d = Daemon::start(&config).await;
    (d, staging)
}

/// A plugin cache holding every plugin the daemon tests use, filled once by
/// `expeditor check` (which compiles and caches what it loads).
fn warm_cache() -> &'static Path {
    static CACHE: OnceLock<PathBuf> = OnceLock::new();
    CACHE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        install(&dir, "misbehave", "misbehave");
        install(&dir, "loyalty_tier", "loyalty_tier");
        install(&dir, "franchise_report", "franchise_report");
        let sinks = r#"
[sinks.a]
type = "wasm"
plugin = "misbehave"

[sinks.b]
type = "wasm"
plugin = "loyalty_tier"

[sinks.c]
type = "wasm"
plugin = "franchise_report"
allow_http = ["127.0.0.1:9"]
config = { endpoint = "http://127.0.0.1:9/", franchise_id = "warm" }
"#;
        let (ok, out) = check_config(&dir, sinks, "a");
        assert!(ok, "check with every test plugin: {out}");
        dir.join("data/plugin-cache")
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// The log without terminal colours.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn with_behaviour(mut event: Value, behave: &str) -> Value {
    event["behave"] = json!(behave);
    event
}

async fn healthz(d: &Daemon) -> u16 {
    http_client()
        .get(format!("http://{}/healthz", d.admin))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn franchise_plugin_posts_the_report_to_its_granted_endpoint() {
    let api = FakeSink::start().await;
    let sinks = format!(
        r#"[sinks.franchise]
type = "wasm"
plugin = "{{PLUGINS}}/franchise.wasm"
allow_http = ["{auth}"]
timeout = "5s"
retry = {{ max_attempts = 3, initial = "50ms", max = "200ms" }}

[sinks.franchise.config]
endpoint = "{url}"
franchise_id = "FR-0042"
api_key = "k-123"
"#,
        auth = authority(&api),
        url = api.url("/v1/sales"),
    );
    let (d, _plugins) = start_with_plugins(&config(&sinks, &["franchise"]), &[("franchise_report", "franchise")]).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_fr_1", 4250)).await.status, 200);

    let delivery = d.wait_delivery("crumb", "evt_fr_1", "franchise", "delivered").await;
    let got = api.settle().await;
    assert_eq!(got.len(), 1, "one report: {got:#?}");
    let report = &got[0];
    assert_eq!(report.method, "POST");
    assert_eq!(report.path, "/v1/sales");
    assert_eq!(report.header("authorization"), Some("Bearer k-123"));
    assert_eq!(
        report.idempotency_key(),
        delivery["key"].as_str().unwrap(),
        "the delivery key is the report's dedupe handle"
    );
    let body = report.json();
    assert_eq!(body["franchise_id"], "FR-0042");
    assert_eq!(body["order_id"], "ord_xyz789");
    assert_eq!(body["store"], "loc_main");
    assert_eq!(body["sales_cents"], 4250);
    assert_eq!(body["item_count"], 2);
    assert_eq!(body["event"], "order.created");
    assert_eq!(body["report_id"], delivery["key"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_to_a_host_not_granted_is_denied_logged_and_retried() {
    let api = FakeSink::start().await;
    // Granted: some other port on the same host. The endpoint is not.
    let other = crate::harness::free_addr();
    let sinks = format!(
        r#"[sinks.franchise]
type = "wasm"
plugin = "{{PLUGINS}}/franchise.wasm"
allow_http = ["{other}"]
retry = {{ max_attempts = 2, initial = "50ms", max = "100ms" }}

[sinks.franchise.config]
endpoint = "{url}"
franchise_id = "FR-0042"
"#,
        url = api.url("/v1/sales"),
    );
    let (d, _plugins) = start_with_plugins(&config(&sinks, &["franchise"]), &[("franchise_report", "franchise")]).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_fr_denied", 4250)).await.status, 200);

    let dead = d.wait_delivery("crumb", "evt_fr_denied", "franchise", "dead").await;
    assert_eq!(dead["attempts"], 2, "retried by the policy, then dead-lettered: {dead}");
    assert!(
        dead["last_error"].as_str().unwrap_or_default().contains("denied"),
        "the error says why: {dead}"
    );
    assert!(
        api.requests().is_empty(),
        "nothing may reach a host that is not granted"
    );
    let log = plain(&d.log());
    assert!(
        log.contains("plugin HTTP request denied") && log.contains(&authority(&api)),
        "the denial is logged with the host:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn panic_infinite_loop_and_memory_bomb_are_contained() {
    let sinks = r#"[sinks.wild]
type = "wasm"
plugin = "{PLUGINS}/misbehave.wasm"
cpu = "200ms"
memory = "32MiB"
concurrency = 2
retry = { max_attempts = 2, initial = "50ms", max = "100ms" }
"#;
    let (d, _plugins) = start_with_plugins(&config(sinks, &["wild"]), &[("misbehave", "misbehave")]).await;
    for (id, behave) in [("evt_panic", "panic"), ("evt_loop", "loop"), ("evt_oom", "oom")] {
        assert_eq!(
            d.post_crumb(&with_behaviour(crumb_order(id, 100), behave)).await.status,
            200
        );
    }
    assert_eq!(d.post_crumb(&crumb_order("evt_fine_1", 100)).await.status, 200);

    let expect = [
        ("evt_panic", "trapped"),
        ("evt_loop", "CPU limit of 200ms"),
        ("evt_oom", "memory limit of 32MiB"),
    ];
    for (id, why) in expect {
        let dead = d.wait_delivery("crumb", id, "wild", "dead").await;
        assert_eq!(dead["attempts"], 2, "a trap is retryable: {dead}");
        let text = dead.to_string();
        assert!(text.contains(why), "{id}: expected {why:?} in {dead}");
    }
    d.wait_delivery("crumb", "evt_fine_1", "wild", "delivered").await;
    assert_eq!(healthz(&d).await, 200, "the daemon answers after every trap");

    // The next delivery gets a fresh instance.
    assert_eq!(d.post_crumb(&crumb_order("evt_fine_2", 100)).await.status, 200);
    d.wait_delivery("crumb", "evt_fine_2", "wild", "delivered").await;
    let log = plain(&d.log());
    assert!(log.contains("misbehave delivered evt_fine_2"), "{log}");
    assert!(log.contains("the next delivery gets a fresh one"), "{log}");
}

/// What a plugin hands back is copied out of its memory by the host, so the
/// host bounds it: a plugin answering a hundred results that all point at
/// one 2 MiB string (a few MiB of its own memory, 200 MiB if copied out
/// each time) is stopped once it passed 8 MiB, and the daemon's memory
/// shows no such copy. A plugin leaking host resources (timers here; HTTP
/// requests and bodies alike) is stopped at a thousand, and the instance
/// goes with them. Both are retryable; the next delivery is fine.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_cannot_make_the_host_hold_more_than_its_limits() {
    let sinks = r#"[sinks.greedy]
type = "wasm"
plugin = "{PLUGINS}/misbehave.wasm"
retry = { max_attempts = 2, initial = "50ms", max = "100ms" }
"#;
    let (d, _plugins) = start_with_plugins(&config(sinks, &["greedy"]), &[("misbehave", "misbehave")]).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_warm", 100)).await.status, 200);
    d.wait_delivery("crumb", "evt_warm", "greedy", "delivered").await;
    let before = peak_rss_kib(d.pid());

    assert_eq!(
        d.post_crumb(&with_behaviour(crumb_order("evt_alias", 100), "alias"))
            .await
            .status,
        200
    );
    let dead = d.wait_delivery("crumb", "evt_alias", "greedy", "dead").await;
    assert_eq!(dead["attempts"], 2, "stopped, so retryable: {dead}");
    assert!(
        dead.to_string()
            .contains("passed more than 8MiB to the host in one call"),
        "{dead}"
    );
    let grown_mib = (peak_rss_kib(d.pid()) - before) / 1024;
    assert!(
        grown_mib < 48,
        "the daemon's peak memory grew by {grown_mib} MiB: the aliased results were copied out"
    );

    assert_eq!(
        d.post_crumb(&with_behaviour(crumb_order("evt_hoard", 100), "hoard"))
            .await
            .status,
        200
    );
    let dead = d.wait_delivery("crumb", "evt_hoard", "greedy", "dead").await;
    assert!(
        dead.to_string().contains("held more than 1000 host resources"),
        "{dead}"
    );
    // A plugin keeping a few is fine.
    let mut few = with_behaviour(crumb_order("evt_few", 100), "hoard");
    few["count"] = json!(100);
    assert_eq!(d.post_crumb(&few).await.status, 200);
    d.wait_delivery("crumb", "evt_few", "greedy", "delivered").await;
    assert_eq!(healthz(&d).await, 200);
}

/// The daemon's peak resident memory so far (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A plugin that logs in a loop cannot flood the journal: each call may
/// write a hundred lines, then one warning says the rest are dropped, and
/// the next call starts afresh.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_logging_in_a_loop_is_cut_off_per_call() {
    let sinks = r#"[sinks.chatty]
type = "wasm"
plugin = "{PLUGINS}/misbehave.wasm"
concurrency = 1
"#;
    let (d, _plugins) = start_with_plugins(&config(sinks, &["chatty"]), &[("misbehave", "misbehave")]).await;
    let mut flood = with_behaviour(crumb_order("evt_flood", 100), "chatter");
    flood["lines"] = json!(20_000);
    assert_eq!(d.post_crumb(&flood).await.status, 200);
    d.wait_delivery("crumb", "evt_flood", "chatty", "delivered").await;
    let mut few = with_behaviour(crumb_order("evt_few", 100), "chatter");
    few["lines"] = json!(3);
    assert_eq!(d.post_crumb(&few).await.status, 200);
    d.wait_delivery("crumb", "evt_few", "chatty", "delivered").await;

    let log = plain(&d.log());
    let flooded = log
        .lines()
        .filter(|l| l.contains("misbehave chatter") && l.contains("evt_flood"))
        .count();
    assert_eq!(flooded, 100, "a call's hundred lines, then the warning");
    assert!(log.contains("misbehave chatter 100 for evt_flood"), "{log}");
    assert!(
        !log.contains("misbehave chatter 101 for evt_flood"),
        "a line past the limit was written"
    );
    assert!(
        !log.contains("misbehave chattered for evt_flood"),
        "a line past the limit was written"
    );
    assert_eq!(
        log.matches("the plugin reached its limit of 100 log lines in one call")
            .count(),
        1,
        "the cut is said once"
    );
    for line in ["misbehave chatter 3 for evt_few", "misbehave chattered for evt_few"] {
        assert!(log.contains(line), "the next call logs afresh: {line:?} missing");
    }
}

/// A plugin that waits in a host call uses no CPU, so epoch interruption
/// never sees it: the sink timeout must still stop the call itself, not
/// just stop waiting for it while it goes on beside the retry.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_waiting_in_a_host_call_is_stopped_at_the_sink_timeout() {
    let sinks = r#"[sinks.sleepy]
type = "wasm"
plugin = "{PLUGINS}/misbehave.wasm"
timeout = "1s"
concurrency = 1
retry = { max_attempts = 2, initial = "50ms", max = "100ms" }
"#;
    let (d, _plugins) = start_with_plugins(&config(sinks, &["sleepy"]), &[("misbehave", "misbehave")]).await;
    let mut event = with_behaviour(crumb_order("evt_sleep", 100), "sleep");
    event["sleep_ms"] = json!(2500);
    let posted = Instant::now();
    assert_eq!(d.post_crumb(&event).await.status, 200);

    let dead = d.wait_delivery("crumb", "evt_sleep", "sleepy", "dead").await;
    assert_eq!(dead["attempts"], 2, "a stopped call is retryable: {dead}");
    let text = dead.to_string();
    assert!(
        text.contains("plugin deliver ran past the sink timeout of 1s and was stopped"),
        "{dead}"
    );

    // Had a call gone on sleeping, it would wake after 2.5 s and say so.
    let woken = posted + Duration::from_millis(3500);
    tokio::time::sleep_until(woken.into()).await;
    let log = plain(&d.log());
    assert!(!log.contains("misbehave slept"), "a stopped call ran on: {log}");
    assert!(log.contains("the next delivery gets a fresh one"), "{log}");

    // The sink goes on with a fresh instance.
    assert_eq!(d.post_crumb(&crumb_order("evt_awake", 100)).await.status, 200);
    d.wait_delivery("crumb", "evt_awake", "sleepy", "delivered").await;
    assert_eq!(healthz(&d).await, 200);
}

/// A fresh instance's `init` and the `deliver` after it share the sink
/// timeout: together they are one attempt, which must end within it.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_init_and_the_deliver_after_it_share_the_sink_timeout() {
    let sinks = r#"[sinks.slow_start]
type = "wasm"
plugin = "{PLUGINS}/misbehave.wasm"
config = { init_sleep_ms = 700 }
timeout = "1s"
concurrency = 1
retry = { max_attempts = 1 }
"#;
    let (d, _plugins) = start_with_plugins(&config(sinks, &["slow_start"]), &[("misbehave", "misbehave")]).await;
    // 0.7 s of init and 0.6 s of deliver: each within 1 s, both not.
    let mut event = with_behaviour(crumb_order("evt_late", 100), "sleep");
    event["sleep_ms"] = json!(600);
    let posted = Instant::now();
    assert_eq!(d.post_crumb(&event).await.status, 200);
    let dead = d.wait_delivery("crumb", "evt_late", "slow_start", "dead").await;
    assert!(
        dead.to_string()
            .contains("plugin deliver ran past the sink timeout of 1s"),
        "{dead}"
    );
    tokio::time::sleep_until((posted + Duration::from_millis(2000)).into()).await;
    let log = plain(&d.log());
    assert!(
        !log.contains("misbehave slept"),
        "the attempt ran past its timeout: {log}"
    );
}

/// A stop closes every idle instance of a wasm sink within one sink
/// timeout, however many there are, so the stop keeps its bound.
#[tokio::test(flavor = "multi_thread")]
async fn closing_many_instances_keeps_the_stop_bound() {
    let sinks = r#"[sinks.flusher]
type = "wasm"
plugin = "{PLUGINS}/misbehave.wasm"
config = { shutdown_sleep_ms = 10000 }
timeout = "1s"
concurrency = 4
"#;
    let config = config(sinks, &["flusher"]).replace("[server]", "[server]\nshutdown_timeout = \"3s\"");
    let (mut d, _plugins) = start_with_plugins(&config, &[("misbehave", "misbehave")]).await;
    // Four at once, each 300 ms in `deliver`: four instances, then idle.
    let mut posts = Vec::new();
    for i in 0..4 {
        let mut event = with_behaviour(crumb_order(&format!("evt_flush_{i}"), 100), "sleep");
        event["sleep_ms"] = json!(300);
        posts.push(event);
    }
    let replies = tokio::join!(
        d.post_crumb(&posts[0]),
        d.post_crumb(&posts[1]),
        d.post_crumb(&posts[2]),
        d.post_crumb(&posts[3])
    );
    assert!(
        [replies.0, replies.1, replies.2, replies.3]
            .iter()
            .all(|r| r.status == 200)
    );
    for i in 0..4 {
        d.wait_delivery("crumb", &format!("evt_flush_{i}"), "flusher", "delivered")
            .await;
    }
    let log = plain(&d.log());
    assert!(log.matches("misbehave slept 300ms").count() == 4, "{log}");

    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}\n{}", d.log());
    let log = plain(&d.log());
    assert!(
        log.matches("plugin shutdown failed").count() >= 2,
        "several instances were closed: {log}"
    );
    assert!(!log.contains("stop bound reached"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_errors_follow_the_retry_policy() {
    let sinks = r#"[sinks.wild]
type = "wasm"
plugin = "{PLUGINS}/misbehave.wasm"
retry = { max_attempts = 3, initial = "50ms", max = "100ms" }
"#;
    let (d, _plugins) = start_with_plugins(&config(sinks, &["wild"]), &[("misbehave", "misbehave")]).await;
    let started = Instant::now();
    assert_eq!(
        d.post_crumb(&with_behaviour(crumb_order("evt_perm", 100), "permanent"))
            .await
            .status,
        200
    );
    assert_eq!(
        d.post_crumb(&with_behaviour(crumb_order("evt_retry", 100), "retry"))
            .await
            .status,
        200
    );

    let perm = d.wait_delivery("crumb", "evt_perm", "wild", "dead").await;
    assert_eq!(
        perm["attempts"], 1,
        "a permanent error is dead-lettered at once: {perm}"
    );
    assert!(perm.to_string().contains("asked to fail by event evt_perm"), "{perm}");

    let retried = d.wait_delivery("crumb", "evt_retry", "wild", "dead").await;
    assert_eq!(retried["attempts"], 3, "retried up to max_attempts: {retried}");
    assert!(
        retried.to_string().contains("asked to retry by event evt_retry"),
        "{retried}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "retries wait for the backoff"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn loyalty_plugin_computes_the_tier_and_logs_through_the_host() {
    let sinks = r#"[sinks.loyalty]
type = "wasm"
plugin = "{PLUGINS}/loyalty.wasm"

[sinks.loyalty.config]
points_per_dollar = 2
tiers = [
  { name = "gold", min_cents = 10000 },
  { name = "silver", min_cents = 4000 },
  { name = "bronze", min_cents = 0 },
]
"#;
    let (d, _plugins) = start_with_plugins(&config(sinks, &["loyalty"]), &[("loyalty_tier", "loyalty")]).await;
    let mut order = crumb_order("evt_loyal", 4250);
    order["data"]["attributes"]["customer_id"] = json!("cus_9");
    assert_eq!(d.post_crumb(&order).await.status, 200);
    d.wait_delivery("crumb", "evt_loyal", "loyalty", "delivered").await;
    let log = plain(&d.log());
    let line = log
        .lines()
        .find(|l| l.contains("loyalty: customer cus_9 earns 84 points, tier silver"))
        .unwrap_or_else(|| panic!("the plugin's log line, through the host:\n{log}"));
    assert!(line.contains("sink=loyalty"), "plugin logs carry the sink name: {line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_picks_up_a_replaced_plugin_and_retires_the_old_one() {
    let sinks = r#"[sinks.p]
type = "wasm"
plugin = "{PLUGINS}/p.wasm"
"#;
    let (d, plugins) = start_with_plugins(&config(sinks, &["p"]), &[("misbehave", "p")]).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_before", 4250)).await.status, 200);
    d.wait_delivery("crumb", "evt_before", "p", "delivered").await;

    // A new build of the plugin is dropped in place (here: another plugin).
    std::fs::copy(plugin("loyalty_tier"), plugins.path().join("plugins/p.wasm")).unwrap();
    d.signal("HUP");
    wait_log(&d, "configuration reloaded").await;
    // The shutdown contract: the retired sink's instances had `shutdown`.
    wait_log(&d, "misbehave shutting down after 1 deliveries").await;

    let mut order = crumb_order("evt_after", 4250);
    order["data"]["attributes"]["customer_id"] = json!("cus_7");
    assert_eq!(d.post_crumb(&order).await.status, 200);
    d.wait_delivery("crumb", "evt_after", "p", "delivered").await;
    wait_log(&d, "loyalty: customer cus_7 earns 42 points").await;
}

async fn wait_log(d: &Daemon, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !plain(&d.log()).contains(needle) {
        assert!(Instant::now() < deadline, "never logged {needle:?}:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `expeditor check` on a config with one wasm sink `p`, from `dir`.
fn check(dir: &Path, sink: &str) -> (bool, String) {
    check_config(dir, sink, "p")
}

fn check_config(dir: &Path, sinks: &str, routed: &str) -> (bool, String) {
    let config = format!(
        "[store]\npath = \"./data\"\n{sources}\n{sinks}\n[[routes]]\nname = \"all\"\nsinks = [\"{routed}\"]\n",
        sources = vendor::SOURCES
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("check")
        .current_dir(dir)
        .env("EXPEDITOR_TEST_PLUGIN_KEY", "sk_live_TOPSECRET")
        .output()
        .expect("run expeditor check");
    (out.status.success(), output_text(&out))
}

#[test]
fn check_loads_every_plugin_and_refuses_those_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    install(d, "misbehave", "misbehave");
    install(d, "wrong_version", "future");
    install(d, "franchise_report", "franchise");
    std::fs::write(d.join("plugins/core.wasm"), b"\0asm\x01\0\0\0").unwrap();
    std::fs::write(d.join("plugins/text.wasm"), b"not wasm at all").unwrap();

    let (ok, out) = check(d, "[sinks.p]\ntype = \"wasm\"\nplugin = \"misbehave\"\n");
    assert!(ok, "a good plugin passes: {out}");
    assert!(
        d.join("data/plugin-cache").is_dir(),
        "check leaves the compiled plugin in the cache"
    );

    let cases = [
        ("plugin = \"future\"", "built against expeditor:sink@0.2.0"),
        ("plugin = \"missing\"", "does not exist"),
        ("plugin = \"core\"", "core WebAssembly module, not a component"),
        ("plugin = \"text\"", "is not a WebAssembly file"),
        ("plugin = \"franchise\"", "grants no hosts"),
        (
            "plugin = \"misbehave\"\n[sinks.p.config]\nreject = \"no api key configured\"",
            "init rejected the config: no api key configured",
        ),
        ("plugin = \"misbehave\"\nmemory = \"8GiB\"", "between 1MiB and 4GiB"),
        ("plugin = \"misbehave\"\nallow_http = [\"example.com\"]", "has no port"),
    ];
    for (lines, expected) in cases {
        let (ok, out) = check(d, &format!("[sinks.p]\ntype = \"wasm\"\n{lines}\n"));
        assert!(!ok, "{lines}: check must fail");
        assert!(out.contains(expected), "{lines}: expected {expected:?} in:\n{out}");
        assert!(out.contains("sinks.p."), "{lines}: the error names the sink:\n{out}");
    }
    let (_, out) = check(d, "[sinks.p]\ntype = \"wasm\"\nplugin = \"future\"\n");
    assert!(out.contains("future.wasm"), "the error names the file:\n{out}");
    // A plugin that echoes its config in its refusal shows no secret of it.
    let (ok, out) = check(
        d,
        "[sinks.p]\ntype = \"wasm\"\nplugin = \"misbehave\"\n[sinks.p.config]\nreject = \"bad key ${EXPEDITOR_TEST_PLUGIN_KEY}\"\n",
    );
    assert!(!ok);
    assert!(
        out.contains("init rejected the config: bad key [redacted]") && !out.contains("TOPSECRET"),
        "{out}"
    );

    // The process's pool of instances is shared, and a reload needs room
    // for old and new sinks side by side.
    let wide = |n: usize| format!("[sinks.p]\ntype = \"wasm\"\nplugin = \"misbehave\"\nconcurrency = {n}\n");
    let (ok, out) = check(
        d,
        &format!("{}[sinks.q]\ntype = \"wasm\"\nplugin = \"misbehave\"\n", wide(400)),
    );
    assert!(ok, "400 + 32 (adaptive) instances fit: {out}");
    let (ok, out) = check(
        d,
        &format!("{}[sinks.q]\ntype = \"wasm\"\nplugin = \"misbehave\"\n", wide(419)),
    );
    assert!(!ok, "419 + 32 do not");
    assert!(
        out.contains("the wasm sinks together may keep at most 450 plugin instances") && out.contains("these take 451"),
        "{out}"
    );
}

/// A reload whose plugins are slow to load (each `init` may take up to its
/// sink's timeout) does not keep a stop signal waiting: the reload is
/// abandoned and the daemon stops within its bound.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_during_a_slow_reload_is_heard_at_once() {
    let sinks = |config: &str| {
        format!("[sinks.p]\ntype = \"wasm\"\nplugin = \"{{PLUGINS}}/p.wasm\"\ntimeout = \"30s\"\nconfig = {config}\n")
    };
    let (mut d, plugins) = start_with_plugins(&config(&sinks("{}"), &["p"]), &[("misbehave", "p")]).await;
    let slow = config(&sinks("{ init_sleep_ms = 20000 }"), &["p"])
        .replace("{DIR}/store", plugins.path().join("store").to_str().unwrap())
        .replace("{PLUGINS}", plugins.path().join("plugins").to_str().unwrap());
    d.rewrite_config(&slow);
    d.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = Instant::now();
    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}\n{}", d.log());
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "the stop waited for the reload's plugin init: {:?}",
        stopping.elapsed()
    );
    let log = plain(&d.log());
    assert!(log.contains("reload abandoned: stopping"), "{log}");
    assert!(!log.contains("configuration reloaded"), "{log}");
}
