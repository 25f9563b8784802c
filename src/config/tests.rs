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
    assert_eq!(
        cfg.store.path,
        Path::new("/etc/expeditor/data"),
        "relative to the config file"
    );
    assert_eq!(cfg.store.dedupe_window, Duration::from_secs(7 * 86400));
    let crumb = &cfg.sources["crumb"];
    assert_eq!(crumb.kind(), "crumbpos");
    let Scheme::CrumbPos(v) = &crumb.scheme else { panic!() };
    assert_eq!(v.secrets[0].expose(), b"s3cr3t-crumb");
    assert_eq!(v.tolerance, Duration::from_secs(300));
    let kds = &cfg.sinks["kds"];
    assert_eq!(kds.common.concurrency, 8);
    assert_eq!(kds.common.retry, RetryPolicy::default());
    assert_eq!(cfg.router.routes().len(), 1);
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
    one_error(&format!("{BASE}\n[extra]\nx = 1\n"), &["extra"]);
}

#[test]
fn bad_values_are_explained() {
    one_error(
        &BASE.replace("[sources.crumb]", "[sources.crumb]\ntolerance = \"five minutes\""),
        &["sources.crumb.tolerance", "invalid duration", "\"5m\""],
    );
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
        &["sinks.kds.concurrency", "between 1"],
    );
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
    one_error(&two_files, &["sinks.b.path", "same file"]);
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
    let env = |k: &str| (k == "A").then(|| "1".to_string());
    assert_eq!(interpolate("x${A}y", &env).unwrap(), "x1y");
    assert_eq!(interpolate("$$A $5 ${A}", &env).unwrap(), "$A $5 1");
    assert!(interpolate("${B}", &env).unwrap_err().contains("B is not set"));
    assert!(interpolate("${A", &env).unwrap_err().contains("unterminated"));
    assert!(interpolate("${A-B}", &env).is_err());
}
