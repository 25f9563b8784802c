use std::path::Path;

use expeditor_api::{Event, EventMeta, Order, TemplateSet, Views, delivery_key};
use serde_json::{Value as Json, json};

use super::*;

fn event(id: &str, total: Json) -> Event {
    Event {
        event: EventMeta {
            id: id.into(),
            source: "crumb".into(),
            kind: "crumbpos".into(),
            event_type: "order.created".into(),
            occurred_at: None,
            received_at: "2026-11-23T10:00:00Z".into(),
        },
        payload: json!({"total": total}),
        views: Views {
            order: Some(Order {
                id: Some(format!("ord_{id}")),
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

fn delivery(id: &str) -> Delivery {
    Delivery {
        key: delivery_key("crumb", id, "log"),
        attempt: 1,
        event: Arc::new(event(id, json!(1))),
    }
}

async fn sink(path: &Path, body: Option<Json>) -> FileSink {
    let mut set = TemplateSet::new();
    let body = body.map(|b| set.structured("sinks.log.body", &b).unwrap());
    let cfg = FileSinkConfig {
        name: "log".into(),
        path: path.to_owned(),
        body,
        templates: set.finish(),
        max_batch: FileSinkConfig::DEFAULT_MAX_BATCH,
        linger: Duration::ZERO,
    };
    FileSink::open(cfg).await.unwrap()
}

fn lines(path: &Path) -> Vec<Json> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'));
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test]
async fn appends_the_whole_event_with_its_delivery_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let sink = sink(&path, None).await;
    assert!(sink.deliver(&[delivery("e1")]).await[0].is_ok());
    assert!(sink.deliver(&[delivery("e2")]).await[0].is_ok());

    // Reopening appends rather than truncates.
    let sink = self::sink(&path, None).await;
    assert!(sink.deliver(&[delivery("e3")]).await[0].is_ok());

    let lines = lines(&path);
    assert_eq!(lines.len(), 3);
    let mut expected = serde_json::to_value(event("e1", json!(1))).unwrap();
    expected["delivery_key"] = json!(delivery("e1").key);
    assert_eq!(lines[0], expected);
    assert_eq!(lines[2]["event"]["id"], "e3");
}

#[tokio::test]
async fn a_batch_is_one_line_per_delivery_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let body = json!({"order": "{{ order.id }}", "total": "{{ payload.total }}", "kind": "ticket"});
    let sink = sink(&path, Some(body)).await;
    assert_eq!(sink.max_batch(), 100);
    let batch = [delivery("a"), delivery("b"), delivery("c")];
    let outcomes = sink.deliver(&batch).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let lines = lines(&path);
    assert_eq!(lines.len(), 3);
    for (line, d) in lines.iter().zip(&batch) {
        let id = &d.event.event.id;
        assert_eq!(
            line,
            &json!({"order": format!("ord_{id}"), "total": 1, "kind": "ticket", "delivery_key": d.key})
        );
    }
}

#[tokio::test]
async fn a_body_that_is_not_an_object_is_written_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let sink = sink(&path, Some(json!(["{{ event.id }}", "{{ payload.total }}"]))).await;
    assert!(sink.deliver(&[delivery("e1")]).await[0].is_ok());
    assert_eq!(lines(&path), [json!(["e1", 1])]);
}

#[tokio::test]
async fn concurrent_batches_do_not_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    // Big lines, so a batch takes more than one write(2) if anything splits it.
    let body = json!({"id": "{{ event.id }}", "pad": "x".repeat(64 * 1024)});
    let sink = Arc::new(sink(&path, Some(body)).await);
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let sink = Arc::clone(&sink);
            tokio::spawn(async move {
                let batch: Vec<_> = (0..10).map(|i| delivery(&format!("t{t}-{i}"))).collect();
                sink.deliver(&batch).await
            })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().iter().all(Result::is_ok));
    }
    let lines = lines(&path);
    assert_eq!(lines.len(), 160);
    let ids: std::collections::BTreeSet<_> = lines.iter().map(|l| l["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 160);
}

#[tokio::test]
async fn creates_missing_parent_directories() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/events.jsonl");
    let sink = sink(&path, None).await;
    assert!(sink.deliver(&[delivery("e1")]).await[0].is_ok());
    assert_eq!(lines(&path).len(), 1);
    // Customer data: not readable by every user, whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o007, 0, "{mode:o}");
    assert_eq!(mode & 0o600, 0o600, "{mode:o}");
}

#[tokio::test]
async fn a_render_error_fails_only_its_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let sink = sink(&path, Some(json!({"next": "{{ payload.total + 1 }}"}))).await;
    let mut bad = delivery("bad");
    bad.event = Arc::new(event("bad", json!("not a number")));
    let outcomes = sink.deliver(&[delivery("a"), bad, delivery("c")]).await;
    assert!(outcomes[0].is_ok() && outcomes[2].is_ok(), "{outcomes:?}");
    let err = outcomes[1].as_ref().unwrap_err();
    assert!(!err.retryable);
    assert!(err.message.starts_with("sinks.log.body.next: "), "{}", err.message);
    let lines = lines(&path);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["delivery_key"], json!(delivery("c").key));
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_failed_write_is_retryable() {
    // Every write to /dev/full fails with ENOSPC, like a full disk.
    let sink = sink(Path::new("/dev/full"), None).await;
    let outcomes = sink.deliver(&[delivery("e1"), delivery("e2")]).await;
    for outcome in outcomes {
        let err = outcome.unwrap_err();
        assert!(err.retryable);
        assert!(
            err.message.starts_with("cannot append to /dev/full: "),
            "{}",
            err.message
        );
    }
}

#[tokio::test]
async fn open_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let path = blocker.join("events.jsonl");
    let cfg = FileSinkConfig {
        name: "log".into(),
        path: path.clone(),
        body: None,
        templates: TemplateSet::new().finish(),
        max_batch: FileSinkConfig::DEFAULT_MAX_BATCH,
        linger: Duration::ZERO,
    };
    let err = FileSink::open(cfg).await.unwrap_err();
    assert!(err.to_string().contains(&blocker.display().to_string()), "{err}");
}

/// A body template decides what the sink reads; without one the whole event
/// is the line.
#[tokio::test]
async fn reads_what_its_body_reads() {
    use expeditor_api::{Reads, Sink};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    assert_eq!(
        sink(&path, Some(json!({ "id": "{{ event.id }}" }))).await.reads(),
        Reads::Meta
    );
    assert_eq!(
        sink(&path, Some(json!({ "t": "{{ payload.total }}" }))).await.reads(),
        Reads::MetaAndPayload
    );
    assert_eq!(
        sink(&path, Some(json!({ "t": "{{ order.total_cents }}" })))
            .await
            .reads(),
        Reads::MetaAndViews
    );
    assert_eq!(
        sink(
            &path,
            Some(json!({ "t": "{{ order.total_cents }}", "p": "{{ payload.total }}" }))
        )
        .await
        .reads(),
        Reads::All
    );
    assert_eq!(sink(&path, None).await.reads(), Reads::All);
}

/// The engine batches by what the sink says: the configured `batch`.
#[tokio::test]
async fn the_sink_batches_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = FileSinkConfig {
        name: "log".into(),
        path: dir.path().join("events.jsonl"),
        body: None,
        templates: TemplateSet::new().finish(),
        max_batch: 7,
        linger: Duration::from_millis(20),
    };
    let sink = FileSink::open(cfg).await.unwrap();
    assert_eq!((sink.max_batch(), sink.linger()), (7, Duration::from_millis(20)));
}

/// logrotate moves the file away (and later compresses and deletes it):
/// lines after that go to a new file at the path, not the moved one.
#[tokio::test]
async fn follows_the_path_when_the_file_is_moved_or_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let rotated = dir.path().join("events.jsonl.1");
    let sink = sink(&path, None).await;
    assert!(sink.deliver(&[delivery("e1")]).await[0].is_ok());

    std::fs::rename(&path, &rotated).unwrap();
    assert!(sink.deliver(&[delivery("e2")]).await[0].is_ok());
    let ids = |p: &Path| -> Vec<Json> { lines(p).iter().map(|l| l["event"]["id"].clone()).collect() };
    assert_eq!(ids(&rotated), [json!("e1")]);
    assert_eq!(ids(&path), [json!("e2")]);

    std::fs::remove_file(&path).unwrap();
    assert!(sink.deliver(&[delivery("e3")]).await[0].is_ok());
    assert_eq!(ids(&path), [json!("e3")]);

    // logrotate's default, `create`: moved away, and a new empty file made.
    std::fs::rename(&path, &rotated).unwrap();
    std::fs::File::create(&path).unwrap();
    assert!(sink.deliver(&[delivery("e5")]).await[0].is_ok());
    assert_eq!(ids(&rotated), [json!("e3")]);
    assert_eq!(ids(&path), [json!("e5")]);

    // copytruncate empties the same file: appending goes on at its start.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert!(sink.deliver(&[delivery("e4")]).await[0].is_ok());
    assert_eq!(ids(&path), [json!("e4")]);
}

/// A crash in the middle of a batch's write leaves the start of a line; the
/// batch is written again after the restart, and must not be glued to it.
#[tokio::test]
async fn a_torn_last_line_is_cut_off_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let whole = format!("{}\n", json!({"event": {"id": "e0"}}));
    // Longer than one 64 KiB read back from the end.
    let torn = format!("{{\"event\":{{\"id\":\"e1\",\"pad\":\"{}", "x".repeat(100_000));
    std::fs::write(&path, format!("{whole}{torn}")).unwrap();
    let sink = sink(&path, None).await;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), whole);
    assert!(sink.deliver(&[delivery("e1")]).await[0].is_ok());
    let ids: Vec<Json> = lines(&path).iter().map(|l| l["event"]["id"].clone()).collect();
    assert_eq!(ids, [json!("e0"), json!("e1")]);
    drop(sink);

    // Only a fragment: nothing of it is kept. A whole file is left alone.
    std::fs::write(&path, "{\"event\":").unwrap();
    drop(self::sink(&path, None).await);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    std::fs::write(&path, &whole).unwrap();
    drop(self::sink(&path, None).await);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), whole);
}

/// A reload opens the file sink again while the old one may be mid-write:
/// the new one shares the open file (and its lock) and cuts nothing; a
/// later open, with no sink left on the path, repairs a torn line.
#[tokio::test]
async fn a_second_sink_on_an_open_path_shares_it_and_cuts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let old = sink(&path, None).await;
    assert!(old.deliver(&[delivery("e1")]).await[0].is_ok());
    // The old sink's next batch, half written when the new one opens.
    let half = "{\"event\":{\"id\":\"e2\"";
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(half.as_bytes())
        .unwrap();
    let new = sink(&path, None).await;
    assert!(Arc::ptr_eq(&old.file, &new.file), "one open file for the path");
    assert!(std::fs::read_to_string(&path).unwrap().ends_with(half), "nothing cut");

    drop(old);
    drop(new);
    drop(sink(&path, None).await);
    assert!(
        std::fs::read_to_string(&path).unwrap().ends_with("\n"),
        "cut once no sink has it open"
    );
}
