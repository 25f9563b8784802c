//! Unit tests that need no plugin binary; the plugins themselves are tested
//! end to end in the daemon's integration tests (tests/it/wasm.rs).

use crate::parse_grant;

#[test]
fn grants_parse_or_explain() {
    assert_eq!(
        parse_grant("Reports.Example.com:443").unwrap().to_string(),
        "reports.example.com:443"
    );
    assert_eq!(parse_grant("127.0.0.1:8080").unwrap().to_string(), "127.0.0.1:8080");
    assert_eq!(parse_grant("[::1]:9000").unwrap().to_string(), "[::1]:9000");
    for bad in [
        "reports.example.com",
        "https://x.com:443",
        "x.com:0",
        "x.com:99999",
        "::1:80",
        ":80",
        "a b:80",
    ] {
        let e = parse_grant(bad).unwrap_err();
        assert!(
            e.contains("host:port") || e.contains("IPv6") || e.contains("port"),
            "{bad}: {e}"
        );
    }
}
