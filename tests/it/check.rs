//! `expeditor check`: the shipped config passes; each broken config fails
//! with exit code 1 and a message naming the problem and its line.
//!
//! Each broken config below marks the line the error must point at with a
//! trailing `# <- here` comment.

use std::path::Path;
use std::process::{Command, Output};

use crate::harness::{BIN, output_text};

const UNSET_VAR: &str = "EXPEDITOR_IT_SURELY_UNSET_VAR";

/// A valid config; the cases below each break one line of it.
const VALID: &str = r#"[server]
listen = "127.0.0.1:18080"
max_body = "1MiB"

[admin]
listen = "127.0.0.1:19090"

[store]
path = "./data"

[sources.crumb]
kind = "crumbpos"
secrets = ["s3cret"]
tolerance = "5m"

[sinks.kds]
type = "http"
url = "http://127.0.0.1:9/tickets"
timeout = "2s"
retry = { max_attempts = 5, initial = "1s", max = "1m" }

[sinks.kds.body]
external_id = "{{ order.id }}"

[[routes]]
name = "kitchen"
events = ["order.created"]
when = "order.total_cents > 0"
sinks = ["kds"]
"#;

fn check(dir: &Path, config: &str) -> Output {
    with_config(dir, config, "check")
}

/// `expeditor --config DIR/config.toml COMMAND`, the file holding `config`.
fn with_config(dir: &Path, config: &str, command: &str) -> Output {
    let path = dir.join("config.toml");
    std::fs::write(&path, config).expect("write config");
    Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg(command)
        .current_dir(dir)
        .env_remove(UNSET_VAR)
        .output()
        .unwrap_or_else(|e| panic!("run expeditor {command}: {e}"))
}

/// Replaces the line starting with `prefix` by `replacement` (marked).
fn break_line(prefix: &str, replacement: &str) -> String {
    let mut found = false;
    let lines: Vec<String> = VALID
        .lines()
        .map(|line| {
            if !found && line.starts_with(prefix) {
                found = true;
                format!("{replacement} # <- here")
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert!(found, "no line starts with {prefix:?}");
    lines.join("\n") + "\n"
}

fn marked_line(config: &str) -> usize {
    config
        .lines()
        .position(|l| l.contains("# <- here"))
        .expect("a marked line")
        + 1
}

#[test]
fn the_valid_base_config_passes() {
    let dir = tempfile::tempdir().unwrap();
    let out = check(dir.path(), VALID);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check of a valid config: {}",
        output_text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok"),
        "stdout: {}",
        output_text(&out)
    );
}

/// A route's event pattern that no source of it sends is a warning (a typo
/// routes nothing, silently); `check` still passes. Known types, globs that
/// match one, and routes that take an `hmac` source (any type) say nothing.
#[test]
fn check_warns_of_route_events_no_source_sends() {
    let dir = tempfile::tempdir().unwrap();
    let typo = VALID.replace(
        "events = [\"order.created\"]",
        "events = [\"order.craeted\", \"ordr.*\", \"payment.*\"]",
    );
    let out = check(dir.path(), &typo);
    assert_eq!(out.status.code(), Some(0), "warnings only: {}", output_text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("warning: route \"kitchen\": events \"order.craeted\" matches no event type")
            && said.contains("order.created, order.updated"),
        "{said}"
    );
    assert!(said.contains("events \"ordr.*\""), "{said}");
    assert!(!said.contains("payment.*"), "payment.completed is CrumbPOS's: {said}");

    let hmac = typo.replace(
        "[sinks.kds]",
        "[sources.generic]\nkind = \"hmac\"\nsecrets = [\"x\"]\nheader = \"X-Sig\"\n\n[sinks.kds]",
    );
    let out = check(dir.path(), &hmac);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "an hmac source sends any type: {}",
        output_text(&out)
    );
    let only_crumb = hmac.replace("name = \"kitchen\"", "name = \"kitchen\"\nsources = [\"crumb\"]");
    let said = String::from_utf8_lossy(&check(dir.path(), &only_crumb).stderr).into_owned();
    assert!(said.contains("order.craeted"), "the route takes only crumb: {said}");
}

/// A store folder or file sink path that cannot be created or written is
/// warned about on stderr (check may run as another user than the daemon,
/// so it stays a pass); usable paths, existing or not, say nothing.
#[test]
fn check_warns_of_paths_the_daemon_could_not_create() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-file"), "x").unwrap();
    std::fs::create_dir(dir.path().join("a-folder")).unwrap();
    let file_sink = |path: &str| format!("\n[sinks.log]\ntype = \"file\"\npath = \"{path}\"\n");
    let config = |store: &str, sink_path: &str| {
        VALID.replace("path = \"./data\"", &format!("path = \"{store}\"")) + &file_sink(sink_path)
    };

    let fine = check(dir.path(), &config("./new/store", "logs/new/events.jsonl"));
    assert_eq!(fine.status.code(), Some(0), "{}", output_text(&fine));
    assert!(
        !String::from_utf8_lossy(&fine.stderr).contains("warning"),
        "{}",
        output_text(&fine)
    );

    let out = check(dir.path(), &config("./a-file/store", "a-folder"));
    assert_eq!(out.status.code(), Some(0), "warnings only: {}", output_text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("warning: [store] path") && said.contains("a-file is not a folder"),
        "{said}"
    );
    assert!(
        said.contains("warning: [sinks.log] path") && said.contains("is a folder, not a file"),
        "{said}"
    );

    let out = check(dir.path(), &config("./a-file", "a-file/events.jsonl"));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("exists and is not a folder"), "{said}");
    assert!(
        said.contains("[sinks.log]") && said.contains("a-file is not a folder"),
        "{said}"
    );
}

/// `run` with a config that does not load exits 78 (`EX_CONFIG`), which
/// the unit does not restart; `check` says 1 as before.
#[test]
fn run_exits_78_on_a_config_that_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    let broken = break_line("kind", r#"kind = "squarepos""#);
    let out = with_config(dir.path(), &broken, "run");
    assert_eq!(out.status.code(), Some(78), "{}", output_text(&out));
    assert!(output_text(&out).contains("squarepos"), "{}", output_text(&out));
    assert_eq!(check(dir.path(), &broken).status.code(), Some(1));
}

/// `expeditor run` on `config`, stopped after 20 s if it has not exited (a
/// run that starts is then killed, and its exit code is not 78).
fn run_briefly(dir: &Path, config: &str) -> Output {
    let path = dir.join("config.toml");
    std::fs::write(&path, config).expect("write config");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("run")
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run expeditor");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().expect("wait for expeditor").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("expeditor's output")
}

/// A sink that cannot open what its config names, or a store folder that
/// cannot be made, is no more mended by a restart than a config that does
/// not load: `run` exits 78 for those too, naming the path.
#[test]
fn run_exits_78_when_a_sink_or_the_store_cannot_open_its_path() {
    let dir = tempfile::tempdir().unwrap();
    // A file where a folder must be: refused to root as well.
    std::fs::write(dir.path().join("blocker"), "a file").unwrap();
    let own_ports = VALID
        .replace("127.0.0.1:18080", "127.0.0.1:0")
        .replace("127.0.0.1:19090", "127.0.0.1:0");
    let sink = own_ports.replace(
        "[[routes]]",
        "[sinks.f]\ntype = \"file\"\npath = \"blocker/events.jsonl\"\n\n[[routes]]",
    );
    let out = run_briefly(dir.path(), &sink);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("cannot start sink f") && text.contains("blocker"),
        "{text}"
    );

    let store = own_ports.replace(r#"path = "./data""#, r#"path = "./blocker/data""#);
    let out = run_briefly(dir.path(), &store);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("cannot use the store's folder") && text.contains("blocker"),
        "{text}"
    );
}

/// Output into a pipe whose reader has gone (`expeditor events | head -1`)
/// ends the command quietly, as it would any Unix tool: no panic, exit 0.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, VALID).unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("check")
        .current_dir(dir.path())
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // The command's own exit code still tells: a failing test case fails.
    let failing =
        format!("{VALID}\n[[tests]]\nname = \"wrong\"\nsource = \"crumb\"\nevent = \"order.created\"\nsinks = []\n");
    std::fs::write(&path, failing).unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("test")
        .current_dir(dir.path())
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn the_shipped_config_passes() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let text = std::fs::read_to_string(&shipped).expect("the repository ships config.toml");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(&shipped).arg("check").current_dir(dir.path());
    // Give every `${VAR}` it uses a value.
    for var in env_vars(&text) {
        cmd.env(var, "it-test-value");
    }
    let out = cmd.output().expect("run expeditor check");
    assert_eq!(out.status.code(), Some(0), "check config.toml: {}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{}",
        output_text(&out)
    );
}

/// The shipped config as its comments say to run it in production: the
/// first source secret read from the environment.
#[test]
fn the_shipped_config_with_secrets_from_the_environment() {
    const VAR: &str = "EXPEDITOR_IT_CRUMB_SECRET";
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let text = std::fs::read_to_string(&shipped).expect("the repository ships config.toml");
    let mut replaced = false;
    let production: String = text
        .lines()
        .map(|line| {
            if !replaced && line.starts_with("secrets = [") {
                replaced = true;
                format!("secrets = [\"${{{VAR}}}\"] # <- here\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    assert!(replaced, "the shipped config has no `secrets = [` line");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &production).unwrap();
    let run = |set: bool| {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(&path).arg("check").current_dir(dir.path());
        for var in env_vars(&production) {
            cmd.env(var, "it-test-value");
        }
        if !set {
            cmd.env_remove(VAR);
        }
        cmd.output().expect("run expeditor check")
    };
    let out = run(true);
    assert_eq!(out.status.code(), Some(0), "{VAR} set: {}", output_text(&out));
    let out = run(false);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{VAR} unset: {text}");
    assert!(text.contains(VAR), "must name {VAR}: {text}");
    let line = marked_line(&production);
    assert!(
        text.contains(&format!("config.toml:{line}:")),
        "must point at line {line}: {text}"
    );
}

/// The names in `${NAME}` occurrences outside comments.
fn env_vars(toml: &str) -> Vec<String> {
    let mut vars = Vec::new();
    for line in toml.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else { break };
            let name = after[..end].to_owned();
            if !vars.contains(&name) {
                vars.push(name);
            }
            rest = &after[end..];
        }
    }
    vars
}

#[test]
fn broken_configs_fail_naming_the_problem_and_line() {
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "unknown key",
            break_line("max_body", r#"max_bodee = "1MiB""#),
            &["max_bodee"],
        ),
        (
            "unknown key in a sink",
            break_line("timeout", r#"timeuot = "2s""#),
            &["timeuot"],
        ),
        (
            "route naming a missing sink",
            break_line("sinks = ", r#"sinks = ["kds", "nowhere"]"#),
            &["nowhere"],
        ),
        (
            "unset ${VAR}",
            break_line("secrets", &format!(r#"secrets = ["${{{UNSET_VAR}}}"]"#)),
            &[UNSET_VAR],
        ),
        (
            "bad duration",
            break_line("tolerance", r#"tolerance = "5 parsecs""#),
            &["tolerance"],
        ),
        (
            "a tolerance of zero",
            break_line("tolerance", r#"tolerance = "0s""#),
            &["tolerance", "at least 1s"],
        ),
        (
            "a header timeout of zero",
            break_line("max_body", r#"header_timeout = "0s""#),
            &["header_timeout", "at least 1s"],
        ),
        (
            "a body timeout under a second",
            break_line("max_body", r#"body_timeout = "200ms""#),
            &["body_timeout", "at least 1s"],
        ),
        (
            "bad duration in retry",
            break_line("retry", r#"retry = { max_attempts = 5, initial = "soon", max = "1m" }"#),
            &["initial"],
        ),
        (
            "bad size",
            break_line("max_body", r#"max_body = "lots""#),
            &["max_body"],
        ),
        (
            "invalid when",
            break_line("when", r#"when = "order.total_cents >""#),
            &["when"],
        ),
        (
            "template that does not compile",
            break_line("external_id", r#"external_id = "{{ order.id ""#),
            &["external_id"],
        ),
        (
            "a misspelled name in a template",
            break_line("external_id", r#"external_id = "{{ ordr.id }}""#),
            &["external_id", "unknown name `ordr`"],
        ),
        (
            "a misspelled filter in a template",
            break_line("external_id", r#"external_id = "{{ order.id | uper }}""#),
            &["external_id", "uper"],
        ),
        (
            "a misspelled name in a when",
            break_line("when", r#"when = "order.total_cents > 0 and evnt.type""#),
            &["when", "`evnt`"],
        ),
        (
            "unknown source kind",
            break_line("kind", r#"kind = "squarepos""#),
            &["squarepos"],
        ),
        (
            "unknown sink type",
            break_line("type", r#"type = "carrier-pigeon""#),
            &["carrier-pigeon"],
        ),
        ("TOML syntax error", break_line("path", "path = "), &[]),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (case, config, needles) in &cases {
        let out = check(dir.path(), config);
        let text = output_text(&out);
        let line = marked_line(config);
        let mut problems = Vec::new();
        if out.status.code() != Some(1) {
            problems.push(format!("exit {:?}, expected 1", out.status.code()));
        }
        if !text.contains(&format!("config.toml:{line}:")) {
            problems.push(format!("no `config.toml:{line}:` location"));
        }
        for needle in *needles {
            if !text.contains(needle) {
                problems.push(format!("does not name {needle:?}"));
            }
        }
        // One mistake, one message: a sink with a bad field is still defined.
        if text.contains(r#"no sink named "kds""#) {
            problems.push("claims the defined sink `kds` does not exist".to_owned());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{case}: {}\n    output: {}",
                problems.join("; "),
                text.trim_end()
            ));
        }
    }
    assert!(failures.is_empty(), "check got these wrong:\n{}", failures.join("\n"));
}

#[test]
fn every_error_is_reported_not_only_the_first() {
    let config = VALID.replace(r#"sinks = ["kds"]"#, r#"sinks = ["nowhere"]"#)
        + "\n[[routes]]\nname = \"second\"\nwhen = \"order.total_cents >\"\nsinks = [\"kds\"]\n";
    let dir = tempfile::tempdir().unwrap();
    let out = check(dir.path(), &config);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let sinks_line = config.lines().position(|l| l.contains("nowhere")).unwrap() + 1;
    let when_line = config.lines().position(|l| l.contains("total_cents >\"")).unwrap() + 1;
    assert!(
        text.contains(&format!("config.toml:{sinks_line}:")),
        "missing sink error: {text}"
    );
    assert!(
        text.contains(&format!("config.toml:{when_line}:")),
        "invalid when error: {text}"
    );
}

#[test]
fn a_missing_config_file_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-config.toml");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&missing)
        .arg("check")
        .current_dir(dir.path())
        .output()
        .expect("run expeditor check");
    assert!(
        !out.status.success(),
        "check of a missing file succeeded: {}",
        output_text(&out)
    );
    assert!(
        output_text(&out).contains("no-such-config.toml"),
        "must name the file: {}",
        output_text(&out)
    );
}

fn run_tests(dir: &Path, config: &str) -> Output {
    with_config(dir, config, "test")
}

/// `expeditor test` runs the config's own `[[tests]]`: each event is read
/// and routed as a webhook would be, and must reach exactly the sinks the
/// case names; a failing case says what the routes chose, and the exit code
/// is 1.
#[test]
fn config_test_cases_pass_and_fail_on_what_the_routes_choose() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("paid.json"),
        r#"{"id": "evt_file", "type": "payment.completed", "created_at": "2026-11-23T10:00:00Z",
            "data": {"id": "pay_1", "type": "payment", "attributes": {"order_id": "ord_1", "amount": 1250}}}"#,
    )
    .unwrap();
    let passing = format!(
        r#"{VALID}
[[tests]]
name = "an order goes to the kitchen"
source = "crumb"
event = "order.created"
sinks = ["kds"]

[[tests]]
name = "a payment, from a file, goes nowhere"
source = "crumb"
body = "paid.json"
sinks = []
"#
    );
    let out = run_tests(dir.path(), &passing);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok    an order goes to the kitchen"), "{text}");
    assert!(text.contains("ok    a payment, from a file, goes nowhere"), "{text}");
    assert!(text.contains("2 passed, 0 failed"), "{text}");

    let failing = passing.replace(
        "event = \"order.created\"\nsinks = [\"kds\"]",
        "event = \"order.updated\"\nsinks = [\"kds\"]",
    );
    let out = run_tests(dir.path(), &failing);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL  an order goes to the kitchen")
            && text.contains("expected sinks [kds], the routes chose []"),
        "{text}"
    );
    assert!(text.contains("1 passed, 1 failed"), "{text}");

    // A case that names what the config does not have fails `check` too,
    // at its line.
    let broken = passing.replace("sinks = [\"kds\"]\n\n[[tests]]", "sinks = [\"kitchen\"]\n\n[[tests]]");
    let out = check(dir.path(), &broken);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("tests[0].sinks") && text.contains("no sink named \"kitchen\""),
        "{text}"
    );

    // A body file that is not there fails its case when the tests run, and
    // does not keep the config from loading.
    let missing = passing.replace("body = \"paid.json\"", "body = \"missing.json\"");
    assert!(check(dir.path(), &missing).status.success());
    let out = run_tests(dir.path(), &missing);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL  a payment, from a file, goes nowhere: cannot read"),
        "{text}"
    );

    // A chosen sink whose template fails for the case's event (text plus a
    // number) fails the case, naming the template: a delivery of it would
    // be a dead letter.
    let unrenderable = passing.replace(
        "external_id = \"{{ order.id }}\"",
        "external_id = \"{{ order.id }}\"\npoints = \"{{ order.id + 1 }}\"",
    );
    assert!(unrenderable.contains("points ="), "{unrenderable}");
    assert!(check(dir.path(), &unrenderable).status.success());
    let out = run_tests(dir.path(), &unrenderable);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL  an order goes to the kitchen")
            && text.contains("sink \"kds\" cannot render this event")
            && text.contains("points"),
        "{text}"
    );

    // No cases: nothing to run, and that is no failure.
    let out = run_tests(dir.path(), VALID);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(output_text(&out).contains("no [[tests]]"), "{}", output_text(&out));
}

/// The commands that talk to a running daemon read only `[admin]`: a secret
/// of a source or sink that the shell does not have (under systemd it is in
/// the service's environment file) does not stop them; a broken `[admin]`
/// does.
#[test]
fn admin_commands_need_only_the_admin_section() {
    let dir = tempfile::tempdir().unwrap();
    // Port 9 (discard): nothing answers, so the command fails reaching it.
    let config = VALID
        .replace("listen = \"127.0.0.1:19090\"", "listen = \"127.0.0.1:9\"")
        .replace("secrets = [\"s3cret\"]", &format!("secrets = [\"${{{UNSET_VAR}}}\"]"));
    assert!(config.contains(UNSET_VAR), "{config}");
    let out = with_config(dir.path(), &config, "dead-letters");
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("cannot reach the admin API"), "{text}");
    assert!(!text.contains(UNSET_VAR), "{text}");

    let config = config.replace(
        "listen = \"127.0.0.1:9\"",
        "listen = \"127.0.0.1:9\"\ntoken = \"${EXPEDITOR_IT_SURELY_UNSET_VAR}\"",
    );
    let out = with_config(dir.path(), &config, "dead-letters");
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("admin.token") && text.contains(UNSET_VAR), "{text}");
}
