//! Several instances on one PostgreSQL store (`[store] url`).
//!
//! Needs a server: `EXPEDITOR_TEST_POSTGRES_URL` (a URL whose user may create
//! databases; `.ci/run` sets it). Each test makes its own database and drops
//! it after. Without the variable those tests pass without running and say so
//! on stderr; the ones that need no server (an unreachable store, `check`)
//! always run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake_sink::{Answer, FakeSink, Recorded};
use crate::harness::{Daemon, base_config, free_addr, output_text, run_cli};
use crate::vendor::{SOURCES, crave_order, crumb_order, crumb_payment};

const POSTGRES_URL_VAR: &str = "EXPEDITOR_TEST_POSTGRES_URL";

/// A fresh database on the test server, dropped (whoever is still connected)
/// when the guard goes, also when the test panics.
struct TestDb {
    /// The server URL from the environment.
    server: String,
    name: String,
    /// The test database's URL, for `[store] url`.
    url: String,
}

impl TestDb {
    /// `None` (after saying so on stderr) when the variable is unset.
    async fn create(test: &str) -> Option<TestDb> {
        let server = match std::env::var(POSTGRES_URL_VAR) {
            Ok(url) if !url.trim().is_empty() => url,
            _ => {
                // Straight to the stream: libtest captures eprintln!.
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "skipping PostgreSQL store tests ({test}): {POSTGRES_URL_VAR} not set"
                );
                return None;
            }
        };
        let name = format!("expeditor_it_{:016x}", fastrand::u64(..));
        let url = with_database(&server, &name);
        let db = TestDb { server, name, url };
        db.admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {}", db.name))
            .await
            .unwrap_or_else(|e| panic!("cannot create the test database {}: {e:?}", db.name));
        Some(db)
    }

    /// A connection to the server's own database, to cut the test's off.
    async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.server, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {POSTGRES_URL_VAR}: {e:?}"));
        tokio::spawn(connection);
        client
    }

    /// "The database goes away": new connections are refused and running
    /// ones terminated, for this database only (others' tests share the
    /// server). Two statements: the refusal must be committed before the
    /// terminations, or the pool reconnects in between.
    async fn go_away(&self) {
        let admin = self.admin().await;
        admin
            .batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", self.name))
            .await
            .expect("refuse connections");
        admin
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = '{}'",
                self.name
            ))
            .await
            .expect("terminate connections");
    }

    async fn come_back(&self) {
        self.admin()
            .await
            .batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", self.name))
            .await
            .expect("let the database back");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
            .map_err(std::io::Error::other)
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}: {dropped:?}", self.name);
        }
    }
}

/// `url` with its database (the path) replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .unwrap_or_else(|| panic!("{POSTGRES_URL_VAR} must be a postgres:// URL"));
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority = before_query.split('/').next().unwrap_or_default();
    match query {
        Some(q) => format!("{scheme}://{authority}/{db}?{q}"),
        None => format!("{scheme}://{authority}/{db}"),
    }
}

/// [`base_config`] with `[store] url` instead of a path.
fn shared_store_config(url: &str) -> String {
    let base = base_config("");
    assert!(base.contains("path = \"{DIR}/store\""), "base_config changed: {base}");
    base.replace("path = \"{DIR}/store\"", &format!("url = \"{url}\""))
}

/// One instance's config: sinks `kds` (order events) and `audit` (every
/// event) posting to `sink` under `/{instance}/...`, so the sink can tell
/// which instance sent a request; the delivery key is the same either way.
fn instance_config(url: &str, instance: &str, sink: &FakeSink, timeout: &str) -> String {
    format!(
        r#"{base}
{SOURCES}
[sinks.kds]
type = "http"
url = "{kds}"
timeout = "{timeout}"
concurrency = 4
retry = {{ max_attempts = 1000, initial = "50ms", max = "500ms" }}

[sinks.audit]
type = "http"
url = "{audit}"
timeout = "{timeout}"
concurrency = 4
retry = {{ max_attempts = 1000, initial = "50ms", max = "500ms" }}

[[routes]]
name = "kitchen"
events = ["order.*"]
sinks = ["kds"]

[[routes]]
name = "everything"
sinks = ["audit"]
"#,
        base = shared_store_config(url),
        kds = sink.url(&format!("/{instance}/kds")),
        audit = sink.url(&format!("/{instance}/audit")),
    )
}

/// `/{instance}/{sink}` of a request.
fn route_of(r: &Recorded) -> (String, String) {
    let mut parts = r.path.trim_start_matches('/').splitn(2, '/');
    let instance = parts.next().unwrap_or_default().to_owned();
    let sink = parts.next().unwrap_or_default().to_owned();
    (instance, sink)
}

/// Waits until `sink` has received every key in `want` (per sink name);
/// returns everything received.
async fn wait_for_keys(sink: &FakeSink, want: &BTreeMap<String, BTreeSet<String>>, timeout: Duration) -> Vec<Recorded> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = sink.requests();
        let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for r in &got {
            seen.entry(route_of(r).1).or_default().insert(r.idempotency_key());
        }
        let mut missing: Vec<(&str, &str)> = Vec::new();
        for (sink_name, keys) in want {
            let seen = seen.get(sink_name);
            for key in keys {
                if !seen.is_some_and(|s| s.contains(key)) {
                    missing.push((sink_name, key));
                }
            }
        }
        if missing.is_empty() {
            return got;
        }
        if Instant::now() > deadline {
            panic!("never delivered within {timeout:?}: {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Event `i` of a mixed load: CrumbPOS orders and payments, Crave orders.
fn event(i: usize) -> (&'static str, String, Value) {
    match i % 3 {
        0 => (
            "crumb",
            format!("evt_order_{i:04}"),
            crumb_order(&format!("evt_order_{i:04}"), 1000 + i as i64),
        ),
        1 => (
            "crumb",
            format!("evt_pay_{i:04}"),
            crumb_payment(&format!("evt_pay_{i:04}")),
        ),
        _ => (
            "crave",
            format!("crv_{i:04}"),
            crave_order(&format!("crv_{i:04}"), "27.98"),
        ),
    }
}

async fn post(d: &Daemon, source: &str, body: &Value) -> crate::harness::Reply {
    match source {
        "crumb" => d.post_crumb(body).await,
        _ => d.post_crave(body).await,
    }
}

/// The delivery keys each sink must receive for events `0..n`, from the
/// daemon's own listing (one key per event and routed sink).
async fn expected_keys(d: &Daemon, n: usize) -> BTreeMap<String, BTreeSet<String>> {
    let deliveries = d.api("/api/deliveries?limit=100000").await["deliveries"]
        .as_array()
        .expect("deliveries")
        .clone();
    let ids: BTreeSet<String> = (0..n).map(|i| event(i).1).collect();
    let mut want: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for x in deliveries
        .iter()
        .filter(|x| ids.contains(x["event_id"].as_str().unwrap()))
    {
        want.entry(x["sink"].as_str().unwrap().to_owned())
            .or_default()
            .insert(x["key"].as_str().unwrap().to_owned());
    }
    // Orders go to both sinks, payments to audit only.
    let orders = (0..n).filter(|i| i % 3 != 1).count();
    assert_eq!(
        want.get("kds").map_or(0, BTreeSet::len),
        orders,
        "one kds delivery per order event"
    );
    assert_eq!(
        want.get("audit").map_or(0, BTreeSet::len),
        n,
        "one audit delivery per event"
    );
    want
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_share_dedupe_and_the_delivery_queue() {
    let Some(db) = TestDb::create("two_instances_share_dedupe_and_the_delivery_queue").await else {
        return;
    };
    let sink = FakeSink::start().await;
    let a = Arc::new(Daemon::start(&instance_config(&db.url, "a", &sink, "5s")).await);
    let b = Arc::new(Daemon::start(&instance_config(&db.url, "b", &sink, "5s")).await);
    // Each warns at start if the server never vacuums (this machine's does not).
    let autovacuum: String = db.admin().await.query_one("SHOW autovacuum", &[]).await.unwrap().get(0);
    for d in [&a, &b] {
        assert_eq!(
            d.log().contains("autovacuum is off on this server"),
            autovacuum == "off",
            "autovacuum = {autovacuum}: {}",
            d.log()
        );
    }

    // Every event twice, to different instances, from concurrent senders: the
    // vendor's retry lands on the other instance, sometimes at the same time.
    const EVENTS: usize = 150;
    const SENDERS: usize = 10;
    let mut senders = Vec::new();
    for task in 0..SENDERS {
        let (a, b) = (a.clone(), b.clone());
        senders.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in (task..EVENTS).step_by(SENDERS) {
                let (source, id, body) = event(i);
                let (first, second) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
                let (r1, r2) = if i % 5 == 0 {
                    tokio::join!(post(first, source, &body), post(second, source, &body))
                } else {
                    (post(first, source, &body).await, post(second, source, &body).await)
                };
                for r in [&r1, &r2] {
                    assert_eq!(r.status, 200, "{id}: {}", r.body);
                }
                let mut s = [r1.json()["status"].clone(), r2.json()["status"].clone()];
                s.sort_by_key(|v| v.to_string());
                statuses.push((id, s));
            }
            statuses
        }));
    }
    for sender in senders {
        for (id, statuses) in sender.await.expect("sender") {
            assert_eq!(
                statuses,
                ["accepted", "duplicate"],
                "{id}: new exactly once across instances"
            );
        }
    }

    let want = expected_keys(&a, EVENTS).await;
    wait_for_keys(&sink, &want, Duration::from_secs(60)).await;
    let got = sink.settle().await;
    let mut per_key: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut per_instance: BTreeMap<String, usize> = BTreeMap::new();
    for r in &got {
        let (instance, sink_name) = route_of(r);
        *per_key.entry((sink_name, r.idempotency_key())).or_default() += 1;
        *per_instance.entry(instance).or_default() += 1;
    }
    let twice: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(per_key.len(), want.values().map(BTreeSet::len).sum::<usize>());
    assert_eq!(per_instance.len(), 2, "both instances delivered: {per_instance:?}");

    // Both instances see one store.
    for d in [&a, &b] {
        let deliveries = d.deliveries().await;
        assert!(deliveries.iter().all(|x| x["status"] == "delivered"), "{deliveries:#?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_one_instance_the_other_finishes_its_leased_deliveries() {
    let Some(db) = TestDb::create("kill_9_of_one_instance_the_other_finishes_its_leased_deliveries").await else {
        return;
    };
    let sink = FakeSink::start().await;
    // Slow answers keep attempts in flight; timeout 1s makes the lease
    // 2 x 1s + 30s (src/deliver.rs).
    sink.script_answers(&[], Answer::status(200).after(Duration::from_millis(600)));
    let mut a = Daemon::start(&instance_config(&db.url, "a", &sink, "1s")).await;
    let b = Daemon::start(&instance_config(&db.url, "b", &sink, "1s")).await;

    const EVENTS: usize = 30;
    for i in 0..EVENTS {
        let (source, id, body) = event(i);
        let d = if i % 2 == 0 { &a } else { &b };
        let r = post(d, source, &body).await;
        assert_eq!(
            (r.status, r.json()["status"].as_str()),
            (200, Some("accepted")),
            "{id}: {}",
            r.body
        );
    }
    let want = expected_keys(&b, EVENTS).await;

    // Kill A while it has attempts in flight (the sink has their requests
    // but has not answered).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sink.requests().iter().any(|r| route_of(r).0 == "a") {
        assert!(Instant::now() < deadline, "instance a never delivered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.kill9();
    let killed_at = Instant::now();
    let from_a: BTreeSet<String> = sink
        .requests()
        .iter()
        .filter(|r| route_of(r).0 == "a")
        .map(|r| r.idempotency_key())
        .collect();

    // B delivers everything, A's leased deliveries once their leases run out.
    wait_for_keys(&sink, &want, Duration::from_secs(90)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let deliveries = b.deliveries().await;
        if deliveries.iter().all(|x| x["status"] == "delivered") {
            // Attempts A started and never finished ran again on B as the
            // same attempt: how A's went was never recorded, so it is not
            // counted twice.
            let retaken: Vec<_> = deliveries
                .iter()
                .filter(|x| x["key"].as_str().is_some_and(|k| from_a.contains(k)))
                .collect();
            assert!(
                !retaken.is_empty(),
                "no delivery was taken over from the killed instance"
            );
            assert!(retaken.iter().all(|x| x["attempts"] == 1), "{retaken:#?}");
            break;
        }
        assert!(Instant::now() < deadline, "not all delivered: {deliveries:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A's unfinished attempts were redone by B, and not before their leases ran out.
    let got = sink.requests();
    let by_b_late: Vec<&Recorded> = got
        .iter()
        .filter(|r| route_of(r).0 == "b" && from_a.contains(&r.idempotency_key()))
        .collect();
    assert!(!by_b_late.is_empty(), "b never redid a's in-flight attempts");
    for r in by_b_late {
        assert_eq!(r.header("x-expeditor-attempt"), Some("1"), "{r:?}");
        assert!(
            r.at.duration_since(killed_at) >= Duration::from_secs(25),
            "taken over {:?} after the kill, before the lease ran out",
            r.at.duration_since(killed_at)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn database_going_away_mid_load_loses_nothing_acknowledged() {
    let Some(db) = TestDb::create("database_going_away_mid_load_loses_nothing_acknowledged").await else {
        return;
    };
    let sink = FakeSink::start().await;
    let d = Arc::new(Daemon::start(&instance_config(&db.url, "a", &sink, "5s")).await);

    // Senders act like vendors: an event not acknowledged is sent again.
    // Enough events that the senders are still sending when the database
    // goes away (240 could all be acknowledged before it was gone).
    const EVENTS: usize = 960;
    const SENDERS: usize = 8;
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for task in 0..SENDERS {
        let (d, acked, refused) = (d.clone(), acked.clone(), refused.clone());
        senders.push(tokio::spawn(async move {
            for i in (task..EVENTS).step_by(SENDERS) {
                let (source, id, body) = event(i);
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let r = post(&d, source, &body).await;
                    match r.status {
                        200 => break,
                        503 => {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            assert!(Instant::now() < deadline, "{id}: still refused");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        s => panic!("{id}: unexpected {s}: {}", r.body),
                    }
                }
                acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    // Mid-load, the database goes away for a while.
    while acked.load(std::sync::atomic::Ordering::Relaxed) < EVENTS / 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    db.go_away().await;
    let (_, _, probe) = event(EVENTS + 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // In-flight inserts may still finish; after that, nothing is acked.
        let r = d.post_crumb(&probe).await;
        if r.status == 503 {
            assert_eq!(r.json()["error"].as_str().map(str::is_empty), Some(false), "{}", r.body);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still acknowledging with the database gone: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acked_when_gone = acked.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        acked.load(std::sync::atomic::Ordering::Relaxed) <= acked_when_gone + SENDERS,
        "acknowledged while the database was gone"
    );
    assert!(
        refused.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no sender saw a 503"
    );
    db.come_back().await;

    for sender in senders {
        sender.await.expect("sender");
    }
    let want = expected_keys(&d, EVENTS).await;
    wait_for_keys(&sink, &want, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let deliveries = d.deliveries().await;
        if deliveries.iter().all(|x| x["status"] == "delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "not all delivered: {deliveries:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Ingest is back too (the probe may have been stored before the cut).
    let r = d.post_crumb(&probe).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// While the PostgreSQL server is away the daemon keeps pinging systemd's
/// watchdog (a restart would not bring the server back, and a start
/// without it fails): it answers not ready and 503 meanwhile, and is ready
/// again when the server is back, with no restart.
#[tokio::test(flavor = "multi_thread")]
async fn the_watchdog_keeps_pinging_while_the_database_is_away() {
    let Some(db) = TestDb::create("the_watchdog_keeps_pinging_while_the_database_is_away").await else {
        return;
    };
    let sink = FakeSink::start().await;
    let sock_dir = tempfile::tempdir().unwrap();
    let sock_path = sock_dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    let d = Daemon::start_with_env(
        &instance_config(&db.url, "a", &sink, "5s"),
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    )
    .await;
    let wait = crate::ops::wait_for_notification;
    wait(&sock, "READY=1", Duration::from_secs(5));
    let readyz = || async {
        crate::harness::http_client()
            .get(format!("http://{}/readyz", d.admin))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(readyz().await, 200);

    db.go_away().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while readyz().await != 503 {
        assert!(Instant::now() < deadline, "still ready with the database away");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Pings at half the interval go on: several over a few intervals,
    // counting none sent before the database went.
    sock.set_nonblocking(true).unwrap();
    while sock.recv(&mut [0u8; 4096]).is_ok() {}
    sock.set_nonblocking(false).unwrap();
    for _ in 0..5 {
        wait(&sock, "WATCHDOG=1", Duration::from_secs(1));
    }
    assert_eq!(d.post_crumb(&crumb_order("evt_while_away", 1200)).await.status, 503);

    db.come_back().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while readyz().await != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready again after the database came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(d.post_crumb(&crumb_order("evt_after_away", 1200)).await.status, 200);
    assert!(!d.log().contains("not pinging the systemd watchdog"), "{}", d.log());
}

/// A server that hangs (here: locks no query of the store gets past) does
/// not hang the admin API with it: `/metrics` is served without its queue
/// gauges within a scrape's time, the listings answer 503 before the CLI
/// stops waiting, and all is back once the server answers again.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_hangs_does_not_hang_the_admin_api() {
    let Some(db) = TestDb::create("a_store_that_hangs_does_not_hang_the_admin_api").await else {
        return;
    };
    let sink = FakeSink::start().await;
    let d = Daemon::start(&instance_config(&db.url, "a", &sink, "5s")).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_before_hang", 1200)).await.status, 200);
    // Longer than the API's own limit on the store, which is what is judged.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()
        .unwrap();
    let get = |path: &str| {
        let req = http.get(format!("http://{}{path}", d.admin));
        async move {
            let started = Instant::now();
            let resp = req.send().await.expect("the admin API answers");
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap_or_default(), started.elapsed())
        }
    };
    let (status, metrics, _) = get("/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("expeditor_deliveries_pending{"), "{metrics}");

    let (locker, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    locker
        .batch_execute("BEGIN; LOCK TABLE deliveries, events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let (status, metrics, took) = get("/metrics").await;
    assert_eq!(status, 200, "{metrics}");
    assert!(took < Duration::from_secs(10), "/metrics took {took:?}");
    assert!(metrics.contains("expeditor_webhook_requests_total"), "{metrics}");
    assert!(!metrics.contains("expeditor_deliveries_pending{"), "{metrics}");
    // A replay that outlasts the API's wait runs on, and says so.
    let replay = async {
        let resp = http
            .post(format!("http://{}/api/replay", d.admin))
            .json(&serde_json::json!({ "event": { "source": "crumb", "id": "evt_before_hang" } }))
            .send()
            .await
            .expect("the admin API answers");
        (resp.status().as_u16(), resp.text().await.unwrap_or_default())
    };
    let paths = ["/api/events", "/api/deliveries", "/api/events/crumb/evt_before_hang"];
    let (a, b, c, (replay_status, replay_body)) = tokio::join!(get(paths[0]), get(paths[1]), get(paths[2]), replay);
    assert_eq!(replay_status, 202, "{replay_body}");
    assert!(replay_body.contains("\"running\":true"), "{replay_body}");
    for (path, (status, body, took)) in paths.iter().zip([a, b, c]) {
        assert_eq!(status, 503, "{path}: {body}");
        assert!(body.contains("did not answer within 10 s"), "{path}: {body}");
        assert!(took < Duration::from_secs(20), "{path} took {took:?}");
    }

    locker.batch_execute("ROLLBACK").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body, _) = get("/api/events").await;
        if status == 200 {
            assert!(body.contains("evt_before_hang"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the listing did not come back: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, metrics, _) = get("/metrics").await;
    assert!(metrics.contains("expeditor_deliveries_pending{"), "{metrics}");
    // The replay that was still running finished once the store answered.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log().contains("replay done") {
        assert!(Instant::now() < deadline, "the replay did not finish: {}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A stop that cuts attempts off gives their leases back: on a shared
/// store, the deliveries run again as soon as an instance is there to take
/// them (here the same one, restarted), not when the lease ends (2 x 10 s
/// + 30 s = 50 s).
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_gives_back_the_leases_of_attempts_it_cuts_off() {
    let Some(db) = TestDb::create("a_stop_gives_back_the_leases_of_attempts_it_cuts_off").await else {
        return;
    };
    let sink = FakeSink::start().await;
    sink.script_answers(&[], Answer::status(200).after(Duration::from_secs(40)));
    let config =
        instance_config(&db.url, "a", &sink, "10s").replacen("[server]\n", "[server]\nshutdown_timeout = \"1s\"\n", 1);
    assert!(config.contains("shutdown_timeout = \"1s\""), "{config}");
    let mut d = Daemon::start(&config).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_cut_off", 1200)).await.status, 200);
    // Both deliveries (kds, audit) are in flight: the sink holds them.
    sink.wait_for(2, Duration::from_secs(10)).await;
    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}\n{}", d.log());
    assert!(d.log().contains("gave back the leases"), "{}", d.log());

    sink.script_answers(&[], Answer::status(200));
    let restarted = Instant::now();
    d.start_again().await;
    for sink_name in ["kds", "audit"] {
        d.wait_delivery("crumb", "evt_cut_off", sink_name, "delivered").await;
    }
    assert!(
        restarted.elapsed() < Duration::from_secs(20),
        "ran again only after {:?}, as the lease ran out",
        restarted.elapsed()
    );
}

/// Needs no server: `expeditor run` with an unreachable store exits at once,
/// naming the database, never the password.
#[tokio::test(flavor = "multi_thread")]
async fn run_fails_fast_when_the_store_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_addr().port();
    let url = format!("postgres://expeditor:hunter2-pw@127.0.0.1:{port}/orders");
    let config = shared_store_config(&url)
        .replace("{INGEST}", &free_addr().to_string())
        .replace("{ADMIN}", &free_addr().to_string())
        .replace("{DIR}", dir.path().to_str().unwrap());
    let path = dir.path().join("config.toml");
    std::fs::write(&path, format!("{config}\n{SOURCES}")).unwrap();

    let started = Instant::now();
    let out = run_cli(&path, dir.path(), &["run"]).await;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        text.contains(&format!(
            "cannot connect to the PostgreSQL store at 127.0.0.1:{port}/orders"
        )),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "the password leaked: {text}");

    // `check` validates the URL's form only, so it passes.
    let out = run_cli(&path, dir.path(), &["check"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let broken = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&format!("127.0.0.1:{port}/orders"), "127.0.0.1:port/orders");
    std::fs::write(&path, broken).unwrap();
    let out = run_cli(&path, dir.path(), &["check"]).await;
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("store.url") && text.contains("invalid PostgreSQL URL"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "the password leaked: {text}");
}

/// A stop signal while the store opens is heard at once: here another
/// instance holds the migration lock, and `run` waits for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_signal_while_the_store_opens_stops_at_once() {
    let Some(db) = TestDb::create("a_stop_signal_while_the_store_opens").await else {
        return;
    };
    let (holder, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    // expeditor's migration lock (src/store/postgres.rs), held in a transaction.
    holder
        .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(7311717575814640751)")
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = shared_store_config(&db.url)
        .replace("{INGEST}", &free_addr().to_string())
        .replace("{ADMIN}", &free_addr().to_string())
        .replace("{DIR}", dir.path().to_str().unwrap());
    let path = dir.path().join("config.toml");
    std::fs::write(&path, format!("{config}\n{SOURCES}")).unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = std::process::Command::new(crate::harness::BIN)
        .arg("--config")
        .arg(&path)
        .arg("run")
        .current_dir(dir.path())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(child.try_wait().unwrap().is_none(), "run waits for the lock");

    let stopped = Instant::now();
    let killed = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if stopped.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!(
                "still waiting for the store 5 s after SIGTERM: {}",
                std::fs::read_to_string(dir.path().join("log")).unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let text = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(status.success(), "{status}: {text}");
    assert!(text.contains("stop signal while the store was opening"), "{text}");
}
