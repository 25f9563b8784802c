use std::collections::HashMap;

use super::*;

const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"

[store]
path = "data"

[sources.crumb]
kind = "crumbpos"
secrets = ["${CRUMB_SECRET}"]

[sinks.kds]
type = "http"
url = "https://kds.example.com/api/tickets"
headers = { Authorization = "Bearer ${KDS_TOKEN}" }

[sinks.kds.body]
external_id = "{{ order.id }}"

[[routes]]
name = "kitchen"
events = ["order.*"]
sinks = ["kds"]
"#;

fn env() -> HashMap<&'static str, &'static str> {
    HashMap::from([("CRUMB_SECRET", "s3cr3t-crumb"), ("KDS_TOKEN", "tok-kds-123")])
}

fn parse_with(text: &str, env: &HashMap<&str, &str>) -> Result<Config, ConfigErrors> {
    parse(Path::new("/etc/expeditor/config.toml"), text, &|k| {
        env.get(k).map(|v| v.to_string())
    })
}

fn errors(text: &str) -> Vec<String> {
    match parse_with(text, &env()) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

/// The single error, which must contain every `needle`.
fn one_error(text: &str, needles: &[&str]) -> String {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    for n in needles {
        assert!(errs[0].contains(n), "{:?} does not contain {n:?}", errs[0]);
    }
    errs.into_iter().next().unwrap()
}

#[test]
fn valid_config_loads_with_defaults_and_resolved_env() {
    let cfg = parse_with(BASE, &env()).unwrap();
    assert_eq!(cfg.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(cfg.server.max_body, 1 << 20);
    assert_eq!(cfg.admin.listen.to_string(), "127.0.0.1:9090");
    let StoreBackend::Sqlite { path } = &cfg.store.backend else {
        panic!("SQLite by default: {:?}", cfg.store.backend)
    };
    assert_eq!(path, Path::new("/etc/expeditor/data"), "relative to the config file");
    assert_eq!(cfg.store.dedupe_window, Duration::from_secs(7 * 86400));
    let crumb = &cfg.sources["crumb"];
    assert_eq!(crumb.kind(), "crumbpos");
    let Scheme::CrumbPos(v) = &crumb.scheme else { panic!() };
    assert_eq!(v.secrets[0].expose(), b"s3cr3t-crumb");
    assert_eq!(v.tolerance, Duration::from_secs(300));
    let kds = &cfg.sinks["kds"];
    assert_eq!(kds.common.concurrency, Concurrency::Adaptive);
    assert_eq!(kds.common.rate_limit, None);
    assert_eq!(kds.common.retry, RetryPolicy::default());
    assert_eq!(cfg.router.routes().len(), 1);
}

#[test]
fn sink_concurrency_is_a_number_or_adaptive_and_rate_limit_a_count_per_period() {
    let sink = |extra: &str| {
        let cfg = parse_with(
            &BASE.replace("type = \"http\"", &format!("type = \"http\"\n{extra}")),
            &env(),
        )
        .unwrap_or_else(|e| panic!("{extra}: {e:?}"));
        cfg.sinks["kds"].common
    };
    assert_eq!(sink("concurrency = 3").concurrency, Concurrency::Fixed(3));
    assert_eq!(sink("concurrency = 1024").concurrency, Concurrency::Fixed(1024));
    assert_eq!(sink("concurrency = \"adaptive\"").concurrency, Concurrency::Adaptive);
    for (text, count, per) in [
        ("50/s", 50, 1),
        ("1/second", 1, 1),
        ("1000/min", 1000, 60),
        ("1000 / minute", 1000, 60),
        ("3600/h", 3600, 3600),
        ("5/10s", 5, 10),
        ("1/1m", 1, 60),
    ] {
        let r = sink(&format!("rate_limit = \"{text}\"")).rate_limit;
        assert_eq!(
            r,
            Some(RateLimit {
                count,
                per: Duration::from_secs(per)
            }),
            "{text}"
        );
    }
    let spaced = RateLimit {
        count: 50,
        per: Duration::from_secs(1),
    };
    assert_eq!(spaced.spacing(), Duration::from_millis(20));
    let third = RateLimit {
        count: 3,
        per: Duration::from_secs(1),
    };
    assert_eq!(
        third.spacing(),
        Duration::from_nanos(333_333_334),
        "rounded up: 3 starts never fit 4"
    );
    assert_eq!(
        sink("rate_limit = \"1000/s\"").rate_limit.map(|r| r.spacing()),
        Some(Duration::from_millis(1))
    );
}

#[test]
fn debug_output_hides_secrets() {
    let cfg = parse_with(BASE, &env()).unwrap();
    let debug = format!("{cfg:?}");
    assert!(!debug.contains("s3cr3t-crumb"), "{debug}");
    assert!(!debug.contains("tok-kds-123"), "{debug}");
}

#[test]
fn shipped_config_is_valid() {
    let text = include_str!("../../config.toml");
    let cfg = parse(Path::new("config.toml"), text, &|_| None).unwrap();
    assert!(cfg.sinks.contains_key("events"));
}

#[test]
fn route_naming_a_missing_sink_names_it_and_its_line() {
    let text = BASE.replace(r#"sinks = ["kds"]"#, r#"sinks = ["kds", "slack"]"#);
    let line = text.lines().position(|l| l.contains("\"slack\"")).unwrap() + 1;
    one_error(
        &text,
        &[
            "config.toml:",
            &format!(":{line}:"),
            "routes[0].sinks[1]",
            "\"slack\"",
            "configured: kds",
        ],
    );
}

/// The column an error names is counted in characters, as an editor shows
/// it, not in bytes: an em dash earlier on the line is one column.
#[test]
fn error_columns_count_characters() {
    let text = BASE.replace(r#"sinks = ["kds"]"#, r#"sinks = ["—", "slack"]"#);
    let errs = parse_with(&text, &env()).unwrap_err().0;
    let line = text.lines().position(|l| l.contains("\"slack\"")).unwrap() + 1;
    let slack = errs
        .iter()
        .find(|e| e.message.contains("\"slack\""))
        .expect("an error names the sink");
    // `sinks = ["—", ` is 14 characters (16 bytes): the name starts at 15.
    assert_eq!(slack.position, Some((line, 15)), "{errs:?}");
}

#[test]
fn unset_variable_is_an_error_naming_it() {
    let mut env = env();
    env.remove("KDS_TOKEN");
    let errs = parse_with(BASE, &env).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    let e = errs[0].to_string();
    assert!(
        e.contains("KDS_TOKEN is not set") && e.contains("sinks.kds.headers.Authorization"),
        "{e}"
    );
    assert_eq!(errs[0].position.map(|p| p.0), Some(15));
}

#[test]
fn errors_never_contain_resolved_secrets() {
    // Broken in several places at once, with secrets resolved around them.
    let text = BASE
        .replace("url = \"https", "url = \"ftp")
        .replace("[[routes]]", "[[routes]]\nwhen = \"1 +\"");
    for e in errors(&text) {
        assert!(!e.contains("s3cr3t-crumb") && !e.contains("tok-kds-123"), "{e}");
    }
}

#[test]
fn a_secret_written_where_a_list_belongs_is_not_echoed() {
    let e = one_error(
        &BASE.replace("secrets = [\"${CRUMB_SECRET}\"]", "secrets = \"whsec_live_4f9a\\\"x\""),
        &["config.toml:10:", "invalid type: string, expected a sequence"],
    );
    assert!(!e.contains("whsec_live_4f9a") && !e.contains("\\\"x"), "{e}");
    // A bare header value where a table belongs.
    let e = one_error(
        &BASE.replace(
            "headers = { Authorization = \"Bearer ${KDS_TOKEN}\" }",
            "headers = \"Bearer tok-literal-9\"",
        ),
        &["sinks.kds"],
    );
    assert!(!e.contains("tok-literal-9"), "{e}");
    assert_eq!(
        without_literals(r#"invalid type: string "a\"b", expected a sequence"#),
        "invalid type: string, expected a sequence"
    );
    assert_eq!(
        without_literals("invalid type: integer `83920174`, expected a string"),
        "invalid type: integer, expected a string"
    );
    assert_eq!(
        without_literals("invalid type: floating point `1.5`, expected a sequence"),
        "invalid type: floating point, expected a sequence"
    );
}

#[test]
fn unknown_keys_are_rejected_with_their_line() {
    let e = one_error(&BASE.replace("[store]", "[store]\npaht = \"x\""), &["paht"]);
    assert!(e.contains(":6:"), "{e}");
    one_error(
        &BASE.replace("kind = \"crumbpos\"", "kind = \"crumbpos\"\nsecret = \"x\""),
        &["secret"],
    );
    one_error(
        &BASE.replace("type = \"http\"", "type = \"http\"\nuri = \"x\""),
        &["sinks.kds", "uri"],
    );
    one_error(&format!("{BASE}\n[extra]\nx = 1\n"), &["extra", "not a section"]);
}

/// A section that cannot be read is reported under its key path, and every
/// other section is still read and checked: one run of `check` names them all.
#[test]
fn a_mistake_in_one_section_does_not_hide_the_others() {
    let broken = BASE
        .replace("[server]", "[server]\nmax_connections = \"10\"")
        .replace("[store]", "[store]\npaht = \"x\"")
        .replace("kind = \"crumbpos\"", "kind = \"crumbpos\"\ntolerance = 5")
        .replace("sinks = [\"kds\"]", "sinks = [\"kds\"]\nwhen = \"order.total_cents >\"")
        + "\n[[tests]]\nname = \"t\"\nsource = \"crumb\"\nevent = \"order.created\"\nsinks = \"kds\"\n";
    let errs = errors(&broken);
    let keys: Vec<&str> = errs.iter().map(|e| e.split(": ").nth(1).unwrap_or("")).collect();
    for key in ["server", "store", "sources.crumb", "routes[0].when", "tests[0]"] {
        assert!(keys.contains(&key), "{key} not in {errs:#?}");
    }
    // A route whose source failed to read still names a declared source.
    assert!(!errs.iter().any(|e| e.contains("no source named")), "{errs:#?}");
}

#[test]
fn bad_values_are_explained() {
    one_error(
        &BASE.replace("[sources.crumb]", "[sources.crumb]\ntolerance = \"five minutes\""),
        &["sources.crumb.tolerance", "invalid duration", "\"5m\""],
    );
    one_error(
        &BASE.replace("[server]", "[server]\nmax_body = \"20GiB\""),
        &["server.max_body", "at most 64MiB"],
    );
    assert!(parse_with(&BASE.replace("[server]", "[server]\nmax_body = \"64MiB\""), &env()).is_ok());
    one_error(
        &BASE.replace("[server]", "[server]\nmax_body = \"huge\""),
        &["server.max_body", "1MiB"],
    );
    one_error(
        &BASE.replace("127.0.0.1:8080", "localhost"),
        &["server.listen", "IP:PORT"],
    );
    one_error(
        &BASE.replace("kind = \"crumbpos\"", "kind = \"square\""),
        &["sources.crumb.kind", "\"square\"", "crumbpos, crave, hmac"],
    );
    one_error(
        &BASE.replace("type = \"http\"", "type = \"kafka\""),
        &["sinks.kds.type", "\"kafka\""],
    );
    one_error(&BASE.replace("https://kds", "ftp://kds"), &["sinks.kds.url", "http://"]);
    let e = one_error(
        &BASE.replace("https://kds", "https://kds-user:kds-pa55@kds"),
        &["sinks.kds.url", "credentials", "headers"],
    );
    assert!(!e.contains("kds-pa55"), "the password is not repeated: {e}");
    // An @ in the path or query is no credential.
    let at_in_path = BASE.replace("/api/tickets", "/api/tickets/@kitchen?by=a@b");
    assert!(parse_with(&at_in_path, &env()).is_ok());
    one_error(
        &BASE.replace("[store]", "[store]\ndedupe_window = \"1h\""),
        &["store.dedupe_window", "5.3 hours"],
    );
    one_error(
        &BASE.replace(
            "type = \"http\"",
            "type = \"http\"\nretry = { initial = \"1m\", max = \"1s\" }",
        ),
        &["sinks.kds.retry", "initial"],
    );
    one_error(
        &BASE.replace("type = \"http\"", "type = \"http\"\nconcurrency = 0"),
        &["sinks.kds.concurrency", "between 1", "adaptive"],
    );
    for bad in ["\"fast\"", "1025"] {
        one_error(
            &BASE.replace("type = \"http\"", &format!("type = \"http\"\nconcurrency = {bad}")),
            &["sinks.kds.concurrency", "between 1 and 1024", "adaptive"],
        );
    }
    for bad in ["2.5", "[8]"] {
        one_error(
            &BASE.replace("type = \"http\"", &format!("type = \"http\"\nconcurrency = {bad}")),
            &["sinks.kds", "`concurrency` must be a whole number", "adaptive"],
        );
    }
    for bad in [
        "50",
        "0/s",
        "-1/s",
        "50/fortnight",
        "50/0s",
        "x/s",
        "50/2d",
        "2000/s",
        "50/100ns",
    ] {
        let err = one_error(
            &BASE.replace("type = \"http\"", &format!("type = \"http\"\nrate_limit = \"{bad}\"")),
            &["sinks.kds.rate_limit", "e.g. \"50/s\""],
        );
        assert!(err.contains(bad), "{err}");
    }
    one_error(
        &BASE.replace("secrets = [\"${CRUMB_SECRET}\"]", "secrets = []"),
        &["sources.crumb.secrets", "at least one"],
    );
}

#[test]
fn templates_and_expressions_are_compiled_at_load() {
    one_error(
        &BASE.replace(
            "events = [\"order.*\"]",
            "events = [\"order.*\"]\nwhen = \"order.total_cents >\"",
        ),
        &["routes[0].when", "invalid expression", "syntax error"],
    );
    let e = one_error(
        &BASE.replace("external_id = \"{{ order.id }}\"", "external_id = \"{{ order.id \""),
        &["sinks.kds.body.external_id", "invalid template"],
    );
    assert!(e.contains(":18:15:"), "points at the leaf: {e}");
    // Each leaf that does not compile, at its own line.
    let errs = errors(&BASE.replace(
        "external_id = \"{{ order.id }}\"",
        "external_id = \"{{ ordr.id \"\nnote = \"{{ order.id }}\"\nstation = \"{% if %}\"",
    ));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].contains(":18:") && errs[0].contains("sinks.kds.body.external_id"),
        "{errs:#?}"
    );
    assert!(
        errs[1].contains(":20:") && errs[1].contains("sinks.kds.body.station"),
        "{errs:#?}"
    );
    one_error(
        &BASE.replace("Bearer ${KDS_TOKEN}", "Bearer {{ "),
        &["sinks.kds.headers.Authorization", "invalid template"],
    );
}

#[test]
fn routes_and_sinks_are_cross_checked() {
    one_error(
        &BASE.replace("events = [\"order.*\"]", "sources = [\"crave\"]"),
        &["routes[0].sources[0]", "\"crave\""],
    );
    one_error(
        &BASE.replace("sinks = [\"kds\"]", "sinks = []"),
        &["routes[0].sinks", "names no sink"],
    );
    one_error(
        &format!("{BASE}\n[[routes]]\nname = \"kitchen\"\nsinks = [\"kds\"]\n"),
        &["used twice"],
    );
    one_error(
        &BASE.replace("headers = {", "headers = { Idempotency-Key = \"x\", "),
        &["Idempotency-Key", "cannot be configured"],
    );
    let two_files = format!(
        "{BASE}\n[sinks.a]\ntype = \"file\"\npath = \"out.jsonl\"\n[sinks.b]\ntype = \"file\"\npath = \"out.jsonl\"\n"
    );
    let at = format!("config.toml:{}:", line_of(&two_files, "path = \"out.jsonl\"", 1));
    one_error(&two_files, &["sinks.b.path", "same file", &at]);
    one_error(
        &format!("{BASE}\n[sinks.a]\ntype = \"file\"\npath = \"\"\n"),
        &["sinks.a.path", "is empty"],
    );
    one_error(
        &BASE.replace("[sinks.kds.body]", "retry = { initial = \"2h\" }\n[sinks.kds.body]"),
        &["sinks.kds.retry", "initial (2h)", "max (by default 1h)"],
    );
    // The same file, spelled otherwise.
    for other in ["./out.jsonl", "sub/../out.jsonl"] {
        let spelled = two_files.replacen(
            "path = \"out.jsonl\"\n[sinks.b]",
            &format!("path = \"{other}\"\n[sinks.b]"),
            1,
        );
        assert!(spelled.contains(other));
        one_error(&spelled, &["sinks.b.path", "same file"]);
    }
    let zero = BASE.replace("[sinks.kds.body]", "timeout = \"0s\"\n[sinks.kds.body]");
    let at = format!("config.toml:{}:", line_of(&zero, "timeout = \"0s\"", 0));
    one_error(&zero, &["sinks.kds.timeout", "longer than 0s", &at]);
}

#[test]
fn a_file_sink_batches_as_configured() {
    let file = |batch: &str| format!("{BASE}\n[sinks.log]\ntype = \"file\"\npath = \"out.jsonl\"\n{batch}\n");
    let cfg = parse_with(&file("batch = { max_rows = 10, linger = \"250ms\" }"), &env()).unwrap();
    let SinkKind::File(f) = &cfg.sinks["log"].kind else {
        panic!()
    };
    assert_eq!((f.max_batch, f.linger), (10, Duration::from_millis(250)));
    let cfg = parse_with(&file(""), &env()).unwrap();
    let SinkKind::File(f) = &cfg.sinks["log"].kind else {
        panic!()
    };
    assert_eq!(
        (f.max_batch, f.linger),
        (FileSinkConfig::DEFAULT_MAX_BATCH, Duration::ZERO)
    );
    one_error(&file("batch = { max_rows = 0 }"), &["sinks.log.batch.max_rows"]);
    one_error(
        &file("batch = { linger = \"11s\" }"),
        &["sinks.log.batch.linger", "at most 10s"],
    );
    one_error(&file("batch = { max_bytes = \"1MiB\" }"), &["max_bytes"]);
}

/// A file sink may not write the SQLite store's own files (its lines, and
/// the torn line cut at start, would corrupt the database) nor its folder;
/// a file beside them is fine (the shipped config's `data/events.jsonl`).
#[test]
fn a_file_sink_keeps_out_of_the_stores_files() {
    let file = |path: &str| format!("{BASE}\n[sinks.log]\ntype = \"file\"\npath = \"{path}\"\n");
    for path in [
        "data/expeditor.db",
        "data/expeditor.db-wal",
        "./data/../data/expeditor.db-shm",
        "data/expeditor.lock",
    ] {
        one_error(
            &file(path),
            &["sinks.log.path", "store's own file", "/etc/expeditor/data"],
        );
    }
    for path in ["data", "data/"] {
        one_error(&file(path), &["sinks.log.path", "is the store's own folder"]);
    }
    one_error(&file("."), &["sinks.log.path", "holds the store's"]);
    for path in ["data/events.jsonl", "data/expeditor.jsonl", "expeditor.db"] {
        parse_with(&file(path), &env()).unwrap_or_else(|e| panic!("{path}: {e:?}"));
    }
    // A PostgreSQL store keeps no files here.
    let pg = file("data/expeditor.db").replace("path = \"data\"", "url = \"postgres://db/expeditor\"");
    parse_with(&pg, &env()).unwrap();
}

/// The 1-based line of the `nth` (from 0) occurrence of `needle`.
fn line_of(text: &str, needle: &str, nth: usize) -> usize {
    let at = text.match_indices(needle).nth(nth).expect("needle in text").0;
    text[..at].lines().count() + 1
}

#[test]
fn kind_specific_keys() {
    one_error(
        &BASE.replace("kind = \"crumbpos\"", "kind = \"crumbpos\"\nheader = \"X-Sig\""),
        &["sources.crumb.header", "only valid for kind = \"hmac\""],
    );
    let hmac = BASE.replace("kind = \"crumbpos\"", "kind = \"hmac\"");
    one_error(&hmac, &["sources.crumb.header", "required"]);
    let hmac = BASE.replace(
        "kind = \"crumbpos\"",
        "kind = \"hmac\"\nheader = \"X-Acme-Signature\"\nprefix = \"sha256=\"\nencoding = \"base64\"\ntimestamp_header = \"X-Acme-Timestamp\"\nid_field = \"event.id\"",
    );
    let cfg = parse_with(&hmac, &env()).unwrap();
    let Scheme::Hmac(v) = &cfg.sources["crumb"].scheme else {
        panic!()
    };
    assert_eq!(v.header, "x-acme-signature");
    assert_eq!(v.prefix.as_deref(), Some("sha256="));
    assert!(
        v.signed.uses_timestamp(),
        "timestamp_header defaults signed to {{timestamp}}.{{body}}"
    );
    let no_ts = BASE.replace(
        "kind = \"crumbpos\"",
        "kind = \"hmac\"\nheader = \"X-Sig\"\nsigned = \"{timestamp}:{body}\"",
    );
    one_error(&no_ts, &["sources.crumb.signed", "timestamp_header"]);
    let tolerance_alone = BASE.replace(
        "kind = \"crumbpos\"",
        "kind = \"hmac\"\nheader = \"X-Sig\"\ntolerance = \"1m\"",
    );
    one_error(&tolerance_alone, &["sources.crumb.tolerance", "timestamp_header"]);
    let with_ts = tolerance_alone.replace("tolerance = \"1m\"", "tolerance = \"1m\"\ntimestamp_header = \"X-Ts\"");
    assert!(parse_with(&with_ts, &env()).is_ok());
    // A replay window past the dedupe window would let a captured request
    // in again, as new, once its event id is forgotten.
    let past_dedupe = with_ts.replace("tolerance = \"1m\"", "tolerance = \"8d\"");
    one_error(
        &past_dedupe,
        &["sources.crumb.tolerance", "store.dedupe_window (7days)"],
    );
    let crumb_past = BASE.replace(
        "kind = \"crumbpos\"",
        "kind = \"crumbpos\"\ntolerance = \"99999999999999d\"",
    );
    one_error(&crumb_past, &["sources.crumb.tolerance", "store.dedupe_window"]);
    let longer_window = past_dedupe.replace("path = \"data\"", "path = \"data\"\ndedupe_window = \"30d\"");
    assert!(parse_with(&longer_window, &env()).is_ok());
    // Configs that could never take a webhook.
    let hmac_with = |keys: &str| BASE.replace("kind = \"crumbpos\"", &format!("kind = \"hmac\"\n{keys}"));
    one_error(
        &hmac_with("header = \"X-Sig\"\ntimestamp_header = \"x-sig\""),
        &["sources.crumb.timestamp_header", "signature's header too"],
    );
    for own in ["Content-Type", "content-length", "Host"] {
        one_error(
            &hmac_with(&format!("header = \"{own}\"")),
            &["sources.crumb.header", "of HTTP itself"],
        );
    }
    one_error(
        &hmac_with("header = \"X-Sig\"\ntimestamp_header = \"Content-Length\""),
        &["sources.crumb.timestamp_header", "of HTTP itself"],
    );
    one_error(
        &hmac_with("header = \"X-Sig\"\nid_field = \"meta\"\ntype_field = \"meta.kind\""),
        &["sources.crumb.type_field", "meta.kind lies inside id_field (meta)"],
    );
    one_error(
        &hmac_with("header = \"X-Sig\"\ntime_field = \"type.at\""),
        &["sources.crumb.time_field", "inside type_field (type)"],
    );
    // Beside each other, or the same value twice, is fine.
    for ok in [
        "header = \"X-Sig\"\nid_field = \"meta.id\"\ntype_field = \"meta.kind\"\ntime_field = \"meta.at\"",
        "header = \"X-Sig\"\nid_field = \"meta.id\"\ntype_field = \"meta.id\"",
        "header = \"X-Sig\"\nid_field = \"ids\"\ntype_field = \"idsx.y\"",
    ] {
        parse_with(&hmac_with(ok), &env()).unwrap_or_else(|e| panic!("{ok}: {e:?}"));
    }
    let unsigned_ts = with_ts.replace("header = \"X-Sig\"", "header = \"X-Sig\"\nsigned = \"{body}\"");
    one_error(
        &unsigned_ts,
        &["sources.crumb.signed", "not signed", "timestamp_header"],
    );
}

#[test]
fn test_cases_name_what_the_config_has() {
    let case = |body: &str| format!("{BASE}\n[[tests]]\nname = \"t\"\n{body}\n");
    let cfg = parse_with(
        &case("source = \"crumb\"\nevent = \"order.created\"\nsinks = [\"kds\"]"),
        &env(),
    )
    .unwrap();
    assert_eq!(cfg.tests.len(), 1);
    assert_eq!(cfg.tests[0].sinks.iter().collect::<Vec<_>>(), ["kds"]);
    one_error(
        &case("source = \"nope\"\nevent = \"order.created\"\nsinks = []"),
        &["tests[0].source", "no source named \"nope\""],
    );
    one_error(
        &case("source = \"crumb\"\nevent = \"order.ready\"\nsinks = []"),
        &["tests[0].event", "order.ready", "order.created"],
    );
    // A source that is there but broken is reported once, as itself.
    let broken = case("source = \"crumb\"\nevent = \"order.created\"\nsinks = [\"kds\"]")
        .replace("kind = \"crumbpos\"", "kind = \"crumbpos\"\ntolerance = \"5\"");
    one_error(&broken, &["sources.crumb.tolerance"]);
    // A body file is read by `expeditor test`, not required to start.
    assert!(
        parse_with(
            &case("source = \"crumb\"\nbody = \"no-such-file.json\"\nsinks = []"),
            &env()
        )
        .is_ok()
    );
    one_error(&case("source = \"crumb\"\nsinks = []"), &["tests[0]", "either event"]);
    one_error(
        &case("source = \"crumb\"\nevent = \"order.created\"\nbody = \"x.json\"\nsinks = []"),
        &["tests[0]", "not both"],
    );
}

#[test]
fn the_two_listeners_need_their_own_ports() {
    let same = format!("{BASE}\n[admin]\nlisten = \"127.0.0.1:8080\"\n");
    assert!(same.contains("listen = \"127.0.0.1:8080\""), "{same}");
    let at = format!("config.toml:{}:", line_of(&same, "listen = \"127.0.0.1:8080\"", 1));
    one_error(&same, &["admin.listen", "server.listen", "own port", &at]);
    // admin.listen left at its default: the clash is at server.listen.
    let onto_admin = BASE.replace("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:9090\"");
    let at = format!(
        "config.toml:{}:",
        line_of(&onto_admin, "listen = \"127.0.0.1:9090\"", 0)
    );
    one_error(&onto_admin, &["admin.listen", "own port", &at]);
    // A wildcard address takes the port on every address: `run` could not
    // bind the second listener, so `check` says so.
    let listeners = |server: &str, admin: &str| {
        BASE.replace("listen = \"127.0.0.1:8080\"", &format!("listen = \"{server}\""))
            + &format!("\n[admin]\nlisten = \"{admin}\"\ntoken = \"t\"\n")
    };
    for (server, admin) in [
        ("127.0.0.1:8084", "0.0.0.0:8084"),
        ("0.0.0.0:8084", "127.0.0.1:8084"),
        ("[::]:8084", "127.0.0.1:8084"),
        ("0.0.0.0:8084", "[::]:8084"),
        ("[::1]:8084", "[::]:8084"),
    ] {
        one_error(&listeners(server, admin), &["admin.listen", "own port", server]);
    }
    // Other ports, or addresses that do not overlap, are fine; port 0 is
    // a port of its own each time.
    for (server, admin) in [
        ("127.0.0.1:8084", "127.0.0.2:8084"),
        ("0.0.0.0:8084", "[::1]:8084"),
        ("0.0.0.0:8084", "0.0.0.0:8085"),
        ("127.0.0.1:0", "127.0.0.1:0"),
    ] {
        let text = listeners(server, admin);
        assert!(
            parse_with(&text, &env()).is_ok(),
            "{server} and {admin}: {:?}",
            parse_with(&text, &env()).err()
        );
    }
}

#[test]
fn admin_off_loopback_requires_a_token() {
    one_error(
        &format!("{BASE}\n[admin]\nlisten = \"0.0.0.0:9090\"\n"),
        &["admin.token", "required"],
    );
    let with_token = format!("{BASE}\n[admin]\nlisten = \"0.0.0.0:9090\"\ntoken = \"${{KDS_TOKEN}}\"\n");
    assert!(parse_with(&with_token, &env()).is_ok());
}

/// A token the Bearer header cannot carry as written never matches: refused.
#[test]
fn the_admin_token_is_what_a_header_carries() {
    for bad in ["p\u{e4}sswort", " padded", "padded ", "tab\there"] {
        let text = format!("{BASE}\n[admin]\ntoken = \"{bad}\"\n");
        let e = one_error(&text, &["admin.token", "printable ASCII"]);
        assert!(!e.contains(bad.trim()), "the token is not quoted: {e}");
    }
    assert!(parse_with(&format!("{BASE}\n[admin]\ntoken = \"a b~c!\"\n"), &env()).is_ok());
}

/// `sources = []` or `events = []` would never match: said at the line.
#[test]
fn an_empty_route_list_is_refused() {
    for field in ["sources", "events"] {
        let text = BASE.replace("events = [\"order.*\"]", &format!("{field} = []"));
        one_error(&text, &[&format!("routes[0].{field}"), "never matches", "leave"]);
    }
}

/// A sink timeout past an hour is refused (its lease is twice as long).
#[test]
fn a_sink_timeout_is_at_most_an_hour() {
    let text = BASE.replace("[sinks.kds.body]", "timeout = \"2h\"\n\n[sinks.kds.body]");
    one_error(&text, &["sinks.kds.timeout", "at most 1h"]);
    let text = BASE.replace("[sinks.kds.body]", "timeout = \"1h\"\n\n[sinks.kds.body]");
    assert!(parse_with(&text, &env()).is_ok());
}

#[test]
fn shutdown_timeout_is_at_most_an_hour() {
    let with = |t: &str| BASE.replace("[server]\n", &format!("[server]\nshutdown_timeout = \"{t}\"\n"));
    one_error(&with("100d"), &["server.shutdown_timeout", "at most 1h"]);
    for ok in ["0s", "25s", "1h"] {
        assert!(parse_with(&with(ok), &env()).is_ok(), "{ok}");
    }
}

#[test]
fn every_error_is_reported_at_once() {
    let text = BASE
        .replace("kind = \"crumbpos\"", "kind = \"nope\"")
        .replace("https://kds", "kds")
        .replace("sinks = [\"kds\"]", "sinks = [\"kds\", \"missing\"]");
    assert!(errors(&text).len() >= 3, "{:#?}", errors(&text));
}

#[test]
fn toml_syntax_errors_point_at_the_line() {
    let e = one_error("[server]\nlisten = \"x\n", &["config.toml:2:"]);
    assert!(!e.is_empty());
}

#[test]
fn interpolation() {
    let env = |k: &str| match k {
        "A" => Some("1".to_string()),
        "EMPTY" => Some(String::new()),
        _ => None,
    };
    assert_eq!(interpolate("x${A}y", &env).unwrap(), "x1y");
    assert_eq!(interpolate("$$A $5 ${A}", &env).unwrap(), "$A $5 1");
    assert!(interpolate("${B}", &env).unwrap_err().contains("B is not set"));
    assert!(
        interpolate("Bearer ${EMPTY}", &env)
            .unwrap_err()
            .contains("EMPTY is set but empty")
    );
    assert!(interpolate("${A", &env).unwrap_err().contains("unterminated"));
    // Into a template's source, a value with template syntax is quoted.
    let env_t = |k: &str| match k {
        "T" => Some("a{{b}}".to_string()),
        "E" => Some("{% endraw %}".to_string()),
        "L" => Some("s3cr3t{".to_string()),
        _ => Some("1".to_string()),
    };
    assert_eq!(
        interpolate_with("Bearer ${T} {{ x }}", &env_t, true).unwrap(),
        "Bearer {% raw %}a{{b}}{% endraw %} {{ x }}"
    );
    assert_eq!(interpolate_with("${A}", &env_t, true).unwrap(), "1");
    assert!(interpolate_with("${E}", &env_t, true).unwrap_err().contains("endraw"));
    // Inside an expression (a string literal there) the value goes in as it
    // is: a raw block cannot go there. A quote would end the literal.
    let env_x = |k: &str| match k {
        "BIG" => Some("#big-orders".to_string()),
        "Q" => Some("it's".to_string()),
        _ => None,
    };
    assert_eq!(
        interpolate_with(
            "{{ '${BIG}' if order.total_cents > 100 else '#general' }}",
            &env_x,
            true
        )
        .unwrap(),
        "{{ '#big-orders' if order.total_cents > 100 else '#general' }}"
    );
    assert_eq!(
        interpolate_with("{% if x %}${BIG}{% endif %} {# c #}${BIG}", &env_x, true).unwrap(),
        "{% if x %}{% raw %}#big-orders{% endraw %}{% endif %} {# c #}{% raw %}#big-orders{% endraw %}"
    );
    let err = interpolate_with("{{ '${Q}' }}", &env_x, true).unwrap_err();
    assert!(err.contains("Q is used inside") && !err.contains("it's"), "{err}");
    // A lone `{` would make `{{` with the template text after it.
    let quoted = interpolate_with("${L}{{ event.id }}", &env_t, true).unwrap();
    assert_eq!(quoted, "{% raw %}s3cr3t{{% endraw %}{{ event.id }}");
    let mut set = TemplateSet::new();
    let id = set.text("sinks.k.headers.X-Sig", &quoted).unwrap();
    let templates = set.finish();
    let ctx = minijinja::context! { event => minijinja::context! { id => "evt_1" } };
    assert_eq!(templates.render(&id, &ctx).unwrap(), "s3cr3t{evt_1");
    assert_eq!(interpolate("${T}", &env_t).unwrap(), "a{{b}}", "elsewhere, as it is");
    assert!(interpolate("${A-B}", &env).is_err());
}

/// A header value no request can carry is a `check` error, whether written
/// so or read from an env file with its newline, and the error does not
/// quote it; a templated one is left to its rendering.
#[test]
fn http_method_and_header_names_are_checked() {
    let twice = BASE.replace(
        "headers = { Authorization = \"Bearer ${KDS_TOKEN}\" }",
        "headers = { Authorization = \"Bearer ${KDS_TOKEN}\", authorization = \"Basic zzz\" }",
    );
    assert_ne!(twice, BASE);
    let err = parse_with(&twice, &env()).unwrap_err().to_string();
    assert!(
        err.contains("authorization: names the same header as \"Authorization\"") && !err.contains("tok-"),
        "{err}"
    );
    let kds = "[sinks.kds]\ntype = \"http\"\n";
    assert!(BASE.contains(kds));
    for (method, ok) in [
        ("put", true),
        ("PATCH", true),
        ("DELETE", true),
        ("PSOT", false),
        ("CONNECT", false),
    ] {
        let text = BASE.replace(kds, &format!("{kds}method = \"{method}\"\n"));
        let parsed = parse_with(&text, &env());
        assert_eq!(
            parsed.is_ok(),
            ok,
            "{method}: {:?}",
            parsed.err().map(|e| e.to_string())
        );
    }
}

#[test]
fn a_header_value_no_request_can_carry_is_refused() {
    let mut newline = env();
    newline.insert("KDS_TOKEN", "tok-kds-123\n");
    let err = match parse_with(BASE, &newline) {
        Ok(_) => panic!("a header value with a newline is refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("sinks.kds.headers.Authorization") || err.contains("sinks.kds.headers.authorization"),
        "{err}"
    );
    assert!(err.contains("not a valid header value"), "{err}");
    assert!(!err.contains("tok-kds-123"), "{err}");
    let text = BASE.replace("\"Bearer ${KDS_TOKEN}\"", "\"Bearer a\\u0000b\"");
    assert!(parse_with(&text, &env()).is_err(), "a NUL is refused too");
    let text = BASE.replace("\"Bearer ${KDS_TOKEN}\"", "\"Bearer {{ order.id }}\"");
    assert!(parse_with(&text, &env()).is_ok(), "a template is rendered per delivery");
    // An env value lands in the header as it is, templated or not.
    let text = BASE.replace("\"Bearer ${KDS_TOKEN}\"", "\"Bearer ${KDS_TOKEN} {{ order.id }}\"");
    let err = match parse_with(&text, &newline) {
        Ok(_) => panic!("an env value with a newline in a templated header is refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("not a valid header value") && !err.contains("tok-kds-123"),
        "{err}"
    );
    newline.insert("KDS_TOKEN", "tok-kds-123\t\u{e9}");
    assert!(
        parse_with(&text, &newline).is_ok(),
        "a tab and non-ASCII text are sendable"
    );
}

/// An http sink's `url` is a template: a `${VAR}` in it is text, even one
/// holding `{{` (a token in a query string), never template code whose error
/// would quote the secret; its start is still checked.
#[test]
fn an_env_value_in_a_url_is_text_not_template_code() {
    let with_url = |url: &str| {
        BASE.replace(
            "url = \"https://kds.example.com/api/tickets\"",
            &format!("url = \"{url}\""),
        )
    };
    let mut env = env();
    env.insert("KDS_URL", "https://kds.example.com/t?token={{TOPSECRETQ}}");
    env.insert("KDS_TOKEN_Q", "{{TOPSECRETQ}");
    env.insert("KDS_BARE", "kds.example.com/{{TOPSECRETQ}}");
    for url in [
        "${KDS_URL}",
        "https://kds.example.com/t?token=${KDS_TOKEN_Q}&id={{ order.id }}",
    ] {
        let parsed = parse_with(&with_url(url), &env);
        assert!(parsed.is_ok(), "{url}: {:?}", parsed.err());
    }
    let err = match parse_with(&with_url("${KDS_BARE}"), &env) {
        Ok(_) => panic!("a URL without http:// is refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("must start with http://"), "{err}");
    assert!(!err.contains("TOPSECRETQ"), "{err}");
}

// ---------------------------------------------------------------------------
// [store] url: the shared PostgreSQL store

fn with_store(store: &str) -> String {
    BASE.replace("[store]\npath = \"data\"", &format!("[store]\n{store}"))
}

#[test]
fn store_url_selects_postgres_and_hides_the_password() {
    let mut env = env();
    env.insert("PG_PASSWORD", "pg-pa55word");
    let text = with_store(r#"url = "postgres://expeditor:${PG_PASSWORD}@db.internal:6432/orders""#);
    let cfg = parse_with(&text, &env).unwrap();
    let StoreBackend::Postgres { url } = &cfg.store.backend else {
        panic!("expected PostgreSQL: {:?}", cfg.store.backend)
    };
    assert_eq!(
        url.expose(),
        b"postgres://expeditor:pg-pa55word@db.internal:6432/orders"
    );
    let debug = format!("{cfg:?}");
    assert!(!debug.contains("pg-pa55word"), "{debug}");
    assert_eq!(cfg.store.backend.to_string(), "postgres://db.internal:6432/orders");
    assert_eq!(
        cfg.store.dedupe_window,
        Duration::from_secs(7 * 86400),
        "retention still applies"
    );

    // postgresql:// too, and a Unix socket directory as the host.
    let socket = with_store(r#"url = "postgresql://expeditor@/orders?host=/run/postgresql""#);
    let cfg = parse_with(&socket, &env).unwrap();
    assert_eq!(cfg.store.backend.to_string(), "postgres:///run/postgresql:5432/orders");
}

#[test]
fn store_url_and_path_are_mutually_exclusive() {
    let text = BASE.replace(
        "path = \"data\"",
        "path = \"data\"\nurl = \"postgres://expeditor@db/expeditor\"",
    );
    let e = one_error(&text, &["store.url", "store.path", "together"]);
    assert!(e.contains(":7:"), "points at the url line: {e}");
}

#[test]
fn store_url_form_is_checked_without_printing_the_password() {
    let mut env = env();
    env.insert("PG_PASSWORD", "pg-pa55word");
    for (url, needles) in [
        (
            "mysql://expeditor:${PG_PASSWORD}@db/x",
            &["store.url", "postgres://"][..],
        ),
        ("db.internal:5432", &["store.url", "postgres://"][..]),
        (
            "postgres://expeditor:${PG_PASSWORD}@db:notaport/x",
            &["store.url", "invalid PostgreSQL URL"][..],
        ),
        (
            "postgres://expeditor:${PG_PASSWORD}@db/x?sslmode=sometimes",
            &["store.url", "sslmode"][..],
        ),
        (
            "postgres://expeditor:${PG_PASSWORD}@db/x?colour=blue",
            &["store.url", "colour"][..],
        ),
        (
            "postgres://expeditor:${PG_PASSWORD}@db/x?sslmode=require",
            &["store.url", "sslmode=require", "not supported"][..],
        ),
    ] {
        let text = with_store(&format!("url = \"{url}\""));
        let errs = match parse_with(&text, &env) {
            Ok(_) => panic!("{url} should be refused"),
            Err(e) => e.0,
        };
        assert_eq!(errs.len(), 1, "{url}: {errs:#?}");
        let e = errs[0].to_string();
        for n in needles {
            assert!(e.contains(n), "{url}: {e:?} does not contain {n:?}");
        }
        assert!(!e.contains("pg-pa55word"), "{url}: the password leaked: {e}");
        assert!(e.contains(":6:"), "{url}: points at the line: {e}");
    }
}

#[test]
fn store_url_with_an_unset_variable_names_it() {
    let text = with_store(r#"url = "postgres://expeditor:${PG_PASSWORD}@db/x""#);
    one_error(&text, &["store.url", "PG_PASSWORD is not set"]);
}

// ---------------------------------------------------------------------------
// type = "slack" and type = "email"

fn sink_env() -> HashMap<&'static str, &'static str> {
    let mut env = env();
    env.insert("SLACK_BOT_TOKEN", "xoxb-1-2-slack-secret");
    env.insert(
        "SLACK_WEBHOOK_URL",
        "https://hooks.slack.com/services/T0/B0/webhook-secret",
    );
    env.insert("SMTP_PASSWORD", "smtp-pa55word");
    env
}

fn with_sink(sink: &str) -> String {
    format!("{BASE}\n{sink}\n")
}

fn sink_errors(sink: &str) -> Vec<String> {
    match parse_with(&with_sink(sink), &sink_env()) {
        Ok(_) => panic!("expected errors for:\n{sink}"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

/// The single error of a config with `sink` added, which must contain every
/// `needle` and no secret.
fn one_sink_error(sink: &str, needles: &[&str]) -> String {
    let errs = sink_errors(sink);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    for n in needles {
        assert!(errs[0].contains(n), "{:?} does not contain {n:?}", errs[0]);
    }
    for secret in ["slack-secret", "webhook-secret", "smtp-pa55word"] {
        assert!(!errs[0].contains(secret), "a secret leaked: {}", errs[0]);
    }
    errs.into_iter().next().unwrap()
}

const SLACK: &str = r##"[sinks.alerts]
type = "slack"
token = "${SLACK_BOT_TOKEN}"
channel = "#inventory-alerts"
text = "Low stock: {{ stock.name }}"

[[sinks.alerts.blocks]]
type = "section"
text = { type = "mrkdwn", text = "*{{ stock.name }}*: {{ stock.quantity }} left" }
"##;

#[test]
fn slack_sink_loads_in_both_modes_and_hides_credentials() {
    let cfg = parse_with(&with_sink(SLACK), &sink_env()).unwrap();
    let SinkKind::Slack(s) = &cfg.sinks["alerts"].kind else {
        panic!("{:?}", cfg.sinks["alerts"].kind)
    };
    let expeditor_slack::SlackTarget::Api { token, api_url, .. } = &s.target else {
        panic!("{:?}", s.target)
    };
    assert_eq!(token, "xoxb-1-2-slack-secret");
    assert_eq!(api_url.as_str(), "https://slack.com/api");
    assert!(s.text.is_some() && s.blocks.is_some());
    assert_eq!(cfg.sinks["alerts"].kind.type_name(), "slack");

    let webhook = "[sinks.alerts]\ntype = \"slack\"\nwebhook_url = \"${SLACK_WEBHOOK_URL}\"\ntext = \"hi\"\n";
    let cfg2 = parse_with(&with_sink(webhook), &sink_env()).unwrap();
    let SinkKind::Slack(s) = &cfg2.sinks["alerts"].kind else {
        panic!()
    };
    assert!(
        matches!(&s.target, expeditor_slack::SlackTarget::Webhook { url } if url.as_str().ends_with("webhook-secret"))
    );
    for debug in [format!("{cfg:?}"), format!("{cfg2:?}")] {
        assert!(
            !debug.contains("slack-secret") && !debug.contains("webhook-secret"),
            "{debug}"
        );
    }
}

#[test]
fn broken_slack_sinks_are_check_errors() {
    one_sink_error(
        &SLACK.replace("channel = \"#inventory-alerts\"\n", ""),
        &["sinks.alerts.channel", "required"],
    );
    one_sink_error(
        &SLACK.replace("token = \"${SLACK_BOT_TOKEN}\"\n", ""),
        &["sinks.alerts.token", "required", "webhook_url"],
    );
    one_sink_error(
        &SLACK.replace("${SLACK_BOT_TOKEN}", "${SLACK_SIGNING_SECRET}"),
        &["sinks.alerts.token", "SLACK_SIGNING_SECRET is not set"],
    );
    one_sink_error(
        &SLACK.replace("${SLACK_BOT_TOKEN}", "8f14e45fceea167a5a36"),
        &["sinks.alerts.token", "xoxb-"],
    );
    one_sink_error(
        &SLACK.replace(
            "type = \"slack\"",
            "type = \"slack\"\nwebhook_url = \"${SLACK_WEBHOOK_URL}\"",
        ),
        &["sinks.alerts.webhook_url", "not both"],
    );
    one_sink_error(
        &SLACK.replace(
            "type = \"slack\"",
            "type = \"slack\"\napi_url = \"http://slack.internal/api\"",
        ),
        &["sinks.alerts.api_url", "https://"],
    );
    one_sink_error(
        &SLACK.replace("Low stock: {{ stock.name }}", "Low stock: {{ stock.name "),
        &["sinks.alerts.text", "invalid template"],
    );
    let broken = SLACK.replace("{{ stock.quantity }} left", "{{ stock.quantity left");
    let e = one_sink_error(&broken, &["sinks.alerts.blocks[0].text.text", "invalid template"]);
    let line = with_sink(&broken)
        .lines()
        .position(|l| l.contains("quantity left"))
        .unwrap()
        + 1;
    assert!(
        e.contains(&format!(":{line}:")),
        "points at the block's line {line}: {e}"
    );
    one_sink_error(
        "[sinks.alerts]\ntype = \"slack\"\nwebhook_url = \"${SLACK_WEBHOOK_URL}\"\nchannel = \"#x\"\ntext = \"hi\"\n",
        &["sinks.alerts.channel", "incoming webhook"],
    );
    one_sink_error(
        "[sinks.alerts]\ntype = \"slack\"\nwebhook_url = \"${SLACK_WEBHOOK_URL}\"\n",
        &["sinks.alerts.text", "required"],
    );
    one_sink_error(
        "[sinks.alerts]\ntype = \"slack\"\nwebhook_url = \"${SLACK_WEBHOOK_URL}\"\ntext = \"x\"\nblocks = { type = \"divider\" }\n",
        &["sinks.alerts.blocks", "array"],
    );
    one_sink_error(
        &SLACK.replace("type = \"slack\"", "type = \"slack\"\nchanel = \"#x\""),
        &["sinks.alerts", "chanel"],
    );
}

const EMAIL: &str = r#"[sinks.confirm]
type = "email"
smtp = { host = "smtp.example.com", username = "orders@example.com", password = "${SMTP_PASSWORD}" }
from = "Crêperie Zoë <orders@example.com>"
to = "{{ order.customer.email }}"
to_name = "{{ order.customer.name }}"
subject = "Order {{ order.id }} confirmed"
text = "Thanks, {{ order.customer.name }}!"
html = "<p>Thanks, {{ order.customer.name }}!</p>"
"#;

#[test]
fn email_sink_loads_with_defaults_and_hides_the_password() {
    let cfg = parse_with(&with_sink(EMAIL), &sink_env()).unwrap();
    let SinkKind::Email(e) = &cfg.sinks["confirm"].kind else {
        panic!("{:?}", cfg.sinks["confirm"].kind)
    };
    assert_eq!(e.smtp.host, "smtp.example.com");
    assert_eq!(e.smtp.tls, expeditor_email::TlsMode::StartTls, "STARTTLS by default");
    assert_eq!(e.smtp.port, 587, "the submission port for STARTTLS");
    assert_eq!(
        e.smtp.credentials,
        Some(("orders@example.com".to_string(), "smtp-pa55word".to_string()))
    );
    assert_eq!(e.from.email.to_string(), "orders@example.com");
    assert_eq!(e.from.name.as_deref(), Some("Crêperie Zoë"));
    assert!(e.html.is_some() && e.to_name.is_some());
    assert_eq!(cfg.sinks["confirm"].kind.type_name(), "email");
    let debug = format!("{cfg:?}");
    assert!(!debug.contains("smtp-pa55word"), "{debug}");

    let tls = EMAIL.replace(
        "host = \"smtp.example.com\"",
        "host = \"smtp.example.com\", tls = \"tls\"",
    );
    let cfg = parse_with(&with_sink(&tls), &sink_env()).unwrap();
    let SinkKind::Email(e) = &cfg.sinks["confirm"].kind else {
        panic!()
    };
    assert_eq!((e.smtp.tls, e.smtp.port), (expeditor_email::TlsMode::Tls, 465));
}

#[test]
fn broken_email_sinks_are_check_errors() {
    let smtp = |s: &str| EMAIL.replace("host = \"smtp.example.com\"", s);
    one_sink_error(
        &smtp("host = \"smtp.example.com\", tls = \"ssl\""),
        &["sinks.confirm.smtp.tls", "\"ssl\"", "starttls"],
    );
    one_sink_error(
        &smtp("host = \"smtp.example.com\", tls = \"none\""),
        &["sinks.confirm.smtp.tls", "clear text"],
    );
    one_sink_error(
        &smtp("host = \"smtp.example.com\", port = 70000"),
        &["sinks.confirm.smtp.port", "between 1"],
    );
    one_sink_error(
        &smtp("host = \"smtp://smtp.example.com:587\""),
        &["sinks.confirm.smtp.host", "host name"],
    );
    one_sink_error(
        &smtp("host = \"smtp.example.com\", ca_file = \"no-such-ca.pem\""),
        &["sinks.confirm.smtp.ca_file", "cannot read", "no-such-ca.pem"],
    );
    one_sink_error(
        &smtp("host = \"smtp.example.com\", user = \"x\""),
        &["sinks.confirm", "user"],
    );
    one_sink_error(
        &EMAIL.replace(", password = \"${SMTP_PASSWORD}\"", ""),
        &["sinks.confirm.smtp.password", "required with username"],
    );
    one_sink_error(
        &EMAIL.replace("from = \"Crêperie Zoë <orders@example.com>\"\n", ""),
        &["sinks.confirm", "from"],
    );
    one_sink_error(
        &EMAIL.replace("<orders@example.com>", "orders"),
        &["sinks.confirm.from", "not an email address"],
    );
    one_sink_error(
        &EMAIL.replace("Order {{ order.id }} confirmed", "Order {{ order.id confirmed"),
        &["sinks.confirm.subject", "invalid template"],
    );
    one_sink_error(
        &EMAIL.replace("<p>Thanks", "<p>{% if %}Thanks"),
        &["sinks.confirm.html", "invalid template"],
    );
    one_sink_error(
        &EMAIL.replace("to = \"{{ order.customer.email }}\"", "to = \"\""),
        &["sinks.confirm.to", "empty"],
    );
    // A fixed recipient is an address now, as `from` is; a template is
    // judged at delivery.
    one_sink_error(
        &EMAIL.replace("to = \"{{ order.customer.email }}\"", "to = \"not an address\""),
        &["sinks.confirm.to", "not a list of email addresses"],
    );
    let fixed = EMAIL.replace(
        "to = \"{{ order.customer.email }}\"",
        "to = \"kitchen@example.com, Manager <boss@example.com>\"",
    );
    assert!(parse_with(&with_sink(&fixed), &sink_env()).is_ok());
    one_sink_error(
        &smtp("host = \"smtp.example.com:587\""),
        &["sinks.confirm.smtp.host", "the port goes in port"],
    );
    assert!(parse_with(&with_sink(&smtp("host = \"::1\", tls = \"tls\"")), &sink_env()).is_ok());
    one_sink_error(
        &EMAIL.replace("username = \"orders@example.com\"", "username = \"\""),
        &["sinks.confirm.smtp.username", "is empty"],
    );
    one_sink_error(
        &EMAIL.replace("${SMTP_PASSWORD}", "${SMTP_PASWORD}"),
        &["sinks.confirm.smtp.password", "SMTP_PASWORD is not set"],
    );
}

// ---------------------------------------------------------------------------
// type = "bigquery"

const BIGQUERY: &str = r#"[sinks.warehouse]
type = "bigquery"
project = "crumb-analytics"
dataset = "restaurant"
table = "orders"
credentials = "${BQ_KEY}"
timeout = "20s"
batch = { max_rows = 200, max_bytes = "2MiB", linger = "500ms" }

[sinks.warehouse.row]
order_id = "{{ order.id }}"
total_cents = "{{ order.total_cents }}"
received_at = "{{ event.received_at }}"
"#;

/// A temp dir with a service-account key file in it.
fn bigquery_key() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bq-writer.json");
    std::fs::write(
        &path,
        expeditor_bigquery_fake::service_account_key(
            "writer@crumb-analytics.iam.gserviceaccount.com",
            expeditor_bigquery_fake::TEST_PRIVATE_KEY,
        ),
    )
    .unwrap();
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}

/// `env()` plus these; `HOME` points where no gcloud credentials are.
fn bigquery_env<'a>(extra: &[(&'a str, &'a str)]) -> HashMap<&'a str, &'a str> {
    let mut env = env();
    env.insert("HOME", "/nonexistent-home");
    env.extend(extra.iter().copied());
    env
}

fn bigquery_errors(sink: &str, env: &HashMap<&str, &str>) -> Vec<String> {
    match parse_with(&with_sink(sink), env) {
        Ok(_) => panic!("expected errors for:\n{sink}"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

fn one_bigquery_error(sink: &str, env: &HashMap<&str, &str>, needles: &[&str]) -> String {
    let errs = bigquery_errors(sink, env);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    for n in needles {
        assert!(errs[0].contains(n), "{:?} does not contain {n:?}", errs[0]);
    }
    errs.into_iter().next().unwrap()
}

/// Compute Engine (and GKE) count as a way to authenticate (the metadata
/// server): there, "no credentials" is not an error.
fn on_compute_engine() -> bool {
    std::fs::read(expeditor_bigquery::DMI_PRODUCT_NAME).is_ok_and(|n| n.starts_with(b"Google"))
}

#[test]
fn bigquery_sink_loads() {
    let (_dir, key) = bigquery_key();
    let cfg = parse_with(&with_sink(BIGQUERY), &bigquery_env(&[("BQ_KEY", &key)])).unwrap();
    let spec = &cfg.sinks["warehouse"];
    assert_eq!(spec.kind.type_name(), "bigquery");
    let SinkKind::BigQuery(b) = &spec.kind else {
        panic!("{:?}", spec.kind)
    };
    assert_eq!(
        (b.project.as_str(), b.dataset.as_str(), b.table.as_str()),
        ("crumb-analytics", "restaurant", "orders")
    );
    assert_eq!(b.auth, expeditor_bigquery::Auth::File(key.into()));
    assert_eq!(b.max_rows, 200);
    assert_eq!(b.max_bytes, 2 * 1024 * 1024);
    assert_eq!(b.linger, Duration::from_millis(500));
    assert_eq!(b.timeout, Duration::from_secs(20));
    assert_eq!(b.endpoint, None);
    assert!(b.skip_invalid_rows);

    // Defaults, and application-default credentials from the environment.
    let minimal = BIGQUERY
        .replace("credentials = \"${BQ_KEY}\"\n", "")
        .replace("timeout = \"20s\"\n", "")
        .replace(
            "batch = { max_rows = 200, max_bytes = \"2MiB\", linger = \"500ms\" }\n",
            "",
        );
    let (_dir, key) = bigquery_key();
    let cfg = parse_with(
        &with_sink(&minimal),
        &bigquery_env(&[("GOOGLE_APPLICATION_CREDENTIALS", &key)]),
    )
    .unwrap();
    let SinkKind::BigQuery(b) = &cfg.sinks["warehouse"].kind else {
        panic!()
    };
    assert_eq!(b.auth, expeditor_bigquery::Auth::ApplicationDefault);
    assert_eq!(
        (b.max_rows, b.max_bytes, b.linger),
        (500, 5 * 1024 * 1024, Duration::ZERO)
    );

    // An emulator.
    let emulator = minimal.replace(
        "table = \"orders\"\n",
        "table = \"orders\"\nendpoint = \"http://127.0.0.1:9050/\"\nauth = \"none\"\n",
    );
    let cfg = parse_with(&with_sink(&emulator), &bigquery_env(&[])).unwrap();
    let SinkKind::BigQuery(b) = &cfg.sinks["warehouse"].kind else {
        panic!()
    };
    assert_eq!(b.auth, expeditor_bigquery::Auth::None);
    assert_eq!(b.endpoint.as_deref(), Some("http://127.0.0.1:9050"));
}

#[test]
fn a_bigquery_sink_with_no_way_to_authenticate_is_a_check_error() {
    let minimal = BIGQUERY.replace("credentials = \"${BQ_KEY}\"\n", "");
    if !on_compute_engine() {
        let err = one_bigquery_error(
            &minimal,
            &bigquery_env(&[]),
            &[
                "sinks.warehouse: no way to authenticate to BigQuery",
                "GOOGLE_APPLICATION_CREDENTIALS",
            ],
        );
        // It points at the sink's table.
        let line = with_sink(&minimal)
            .lines()
            .position(|l| l == "[sinks.warehouse]")
            .unwrap()
            + 1;
        assert!(err.contains(&format!("config.toml:{line}:")), "{err}");
    }
    // Set, but to nothing usable.
    one_bigquery_error(
        &minimal,
        &bigquery_env(&[("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")]),
        &["GOOGLE_APPLICATION_CREDENTIALS names /nonexistent/key.json, which cannot be read"],
    );
    one_bigquery_error(
        BIGQUERY,
        &bigquery_env(&[("BQ_KEY", "/nonexistent/key.json")]),
        &["sinks.warehouse.credentials", "cannot read /nonexistent/key.json"],
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"type": "service_account", "client_email": "w@x"}"#).unwrap();
    one_bigquery_error(
        BIGQUERY,
        &bigquery_env(&[("BQ_KEY", bad.to_str().unwrap())]),
        &[
            "sinks.warehouse.credentials",
            "a service-account key without private_key",
        ],
    );
    // The metadata server, where the platform says so.
    let cfg = parse_with(&with_sink(&minimal), &bigquery_env(&[("K_SERVICE", "expeditor")]));
    assert!(cfg.is_ok(), "{:?}", cfg.err());
    // No credentials for an emulator, and only there.
    let none = minimal.replace("table = \"orders\"\n", "table = \"orders\"\nauth = \"none\"\n");
    one_bigquery_error(
        &none,
        &bigquery_env(&[]),
        &["sinks.warehouse.auth", "only an emulator accepts: set endpoint"],
    );
}

#[test]
fn broken_bigquery_sinks_are_check_errors() {
    let (_dir, key) = bigquery_key();
    let env = bigquery_env(&[("BQ_KEY", &key)]);
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "project = \"crumb-analytics\"",
            "project = \"Crumb_Analytics\"",
            &["sinks.warehouse.project", "not a Google Cloud project id"],
        ),
        (
            "dataset = \"restaurant\"",
            "dataset = \"rest-aurant\"",
            &["sinks.warehouse.dataset", "not a BigQuery dataset id"],
        ),
        (
            "table = \"orders\"",
            "table = \"orders/2026\"",
            &["sinks.warehouse.table", "not a table id"],
        ),
        (
            "max_rows = 200",
            "max_rows = 0",
            &["sinks.warehouse.batch.max_rows", "between 1 and 50000"],
        ),
        (
            "max_rows = 200",
            "max_rows = 50001",
            &["sinks.warehouse.batch.max_rows", "between 1 and 50000"],
        ),
        (
            "max_bytes = \"2MiB\"",
            "max_bytes = \"20MiB\"",
            &["sinks.warehouse.batch.max_bytes", "10MiB"],
        ),
        (
            "max_bytes = \"2MiB\"",
            "max_bytes = \"lots\"",
            &["sinks.warehouse.batch.max_bytes", "invalid size"],
        ),
        (
            "linger = \"500ms\"",
            "linger = \"1m\"",
            &["sinks.warehouse.batch.linger", "at most 10s"],
        ),
        ("linger = \"500ms\"", "lingr = \"500ms\"", &["unknown field `lingr`"]),
        (
            "timeout = \"20s\"",
            "skip_invalid_rows = false",
            &["unknown field `skip_invalid_rows`"],
        ),
        (
            "timeout = \"20s\"",
            "auth = \"oauth\"",
            &["sinks.warehouse.auth", "unknown auth \"oauth\""],
        ),
        (
            "timeout = \"20s\"",
            "auth = \"none\"\nendpoint = \"http://127.0.0.1:9050\"",
            &["sinks.warehouse.credentials", "not used with auth = \"none\""],
        ),
        (
            "timeout = \"20s\"",
            "endpoint = \"127.0.0.1:9050\"",
            &["sinks.warehouse.endpoint", "must start with http:// or https://"],
        ),
        (
            "timeout = \"20s\"",
            "endpoint = \"http://127.0.0.1:9050/bigquery/v2\"",
            &["sinks.warehouse.endpoint", "scheme and host only"],
        ),
        (
            "order_id = \"{{ order.id }}\"",
            "order_id = \"{{ order.id \"",
            &["sinks.warehouse.row.order_id", "invalid template"],
        ),
        (
            "project = \"crumb-analytics\"",
            "project = \"${BQ_PROJECT}\"",
            &["sinks.warehouse.project", "BQ_PROJECT is not set"],
        ),
    ];
    for (from, to, needles) in cases {
        assert!(BIGQUERY.contains(from), "{from}");
        one_bigquery_error(&BIGQUERY.replacen(from, to, 1), &env, needles);
    }
    let no_row = &BIGQUERY[..BIGQUERY.find("[sinks.warehouse.row]").unwrap()];
    one_bigquery_error(no_row, &env, &["sinks.warehouse.row", "is required"]);
    let flat_row = format!("{no_row}row = \"{{{{ order }}}}\"\n");
    one_bigquery_error(&flat_row, &env, &["sinks.warehouse.row", "must be a table"]);
    let missing = BIGQUERY.replace("dataset = \"restaurant\"\n", "");
    one_bigquery_error(&missing, &env, &["missing field `dataset`"]);
}
