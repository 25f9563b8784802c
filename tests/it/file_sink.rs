//! The `file` sink: one JSON line per event, the whole event by default or a
//! structured body.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Daemon, base_config};
use crate::vendor::{SOURCES, crave_order, crumb_order};

/// Polls `path` until it holds `n` lines; returns them parsed.
async fn wait_lines(path: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let complete: Vec<&str> = text.split_inclusive('\n').filter(|l| l.ends_with('\n')).collect();
        if complete.len() >= n || Instant::now() > deadline {
            assert_eq!(complete.len(), n, "{}: {text}", path.display());
            return complete
                .iter()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn file_sink_appends_one_json_line_per_event() {
    let config = format!(
        r#"{base}
{SOURCES}
[sinks.archive]
type = "file"
path = "{{DIR}}/events.jsonl"

[sinks.summary]
type = "file"
path = "{{DIR}}/summary.jsonl"

[sinks.summary.body]
id = "{{{{ event.id }}}}"
total = "{{{{ order.total_cents }}}}"

[[routes]]
name = "all"
sinks = ["archive", "summary"]
"#,
        base = base_config(""),
    );
    let d = Daemon::start(&config).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_file_1", 4250)).await.status, 200);
    assert_eq!(d.post_crave(&crave_order("evt_file_2", "27.98")).await.status, 200);
    assert_eq!(
        d.post_crumb(&crumb_order("evt_file_1", 4250)).await.json()["status"],
        "duplicate"
    );

    d.wait_delivery("crumb", "evt_file_1", "archive", "delivered").await;
    d.wait_delivery("crave", "evt_file_2", "archive", "delivered").await;
    let lines = wait_lines(&d.dir.path().join("events.jsonl"), 2).await;
    let mut ids: Vec<&str> = lines
        .iter()
        .map(|l| l["event"]["id"].as_str().unwrap_or_default())
        .collect();
    ids.sort();
    assert_eq!(ids, ["evt_file_1", "evt_file_2"], "{lines:#?}");
    assert!(
        lines.iter().all(|l| l["payload"].is_object()),
        "whole events: {lines:#?}"
    );

    d.wait_delivery("crave", "evt_file_2", "summary", "delivered").await;
    d.wait_delivery("crumb", "evt_file_1", "summary", "delivered").await;
    let mut lines = wait_lines(&d.dir.path().join("summary.jsonl"), 2).await;
    lines.sort_by_key(|l| l["id"].as_str().unwrap_or_default().to_owned());
    // Each line also carries its delivery key, so a reader can drop a copy
    // written twice (connectors/file: "Line format").
    let keys: Vec<Value> = lines
        .iter_mut()
        .filter_map(|l| l.as_object_mut()?.remove("delivery_key"))
        .collect();
    assert_eq!(keys.len(), 2, "every line has a delivery_key");
    assert_ne!(keys[0], keys[1], "one key per (event, sink)");
    assert_eq!(
        lines,
        [
            json!({"id": "evt_file_1", "total": 4250}),
            json!({"id": "evt_file_2", "total": 2798})
        ]
    );
}

/// logrotate's `copytruncate` empties the file in place: the sink goes on
/// at its start, and says in the log that it found the file shorter than it
/// left it (lines written between the copy and the truncation are lost).
#[tokio::test(flavor = "multi_thread")]
async fn a_file_truncated_in_place_is_appended_to_from_its_start_and_warned_of() {
    let config = format!(
        "{}{SOURCES}\n[sinks.archive]\ntype = \"file\"\npath = \"{{DIR}}/events.jsonl\"\n\n[[routes]]\nname = \"all\"\nsinks = [\"archive\"]\n",
        base_config("")
    );
    let d = Daemon::start(&config).await;
    let path = d.dir.path().join("events.jsonl");
    assert_eq!(d.post_crumb(&crumb_order("evt_before_cut", 4250)).await.status, 200);
    wait_lines(&path, 1).await;
    assert!(!d.log().contains("truncated under the sink"), "{}", d.log());

    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_eq!(d.post_crumb(&crumb_order("evt_after_cut", 4250)).await.status, 200);
    let lines = wait_lines(&path, 1).await;
    assert_eq!(lines[0]["event"]["id"], "evt_after_cut");
    assert!(d.log().contains("truncated under the sink"), "{}", d.log());
}
