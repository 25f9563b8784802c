//! What anyone who reaches the port controls before a signature is checked:
//! the signature (and timestamp) headers and the body, against every source
//! kind. Verification must answer with an error, never panic, and never
//! accept a forged signature.

#![no_main]

mod common;

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let cfg = &*common::FUZZ_CONFIG;
    let name = common::SOURCES[usize::from(which) % common::SOURCES.len()];
    let source = &cfg.sources[name];
    // Header values, then the body, split at 0xFF bytes.
    let mut parts = rest.splitn(4, |&b| b == 0xFF);
    let (signature, timestamp, extra) = (parts.next(), parts.next(), parts.next());
    let body = parts.next().unwrap_or_default();
    let mut headers = HeaderMap::new();
    let set = |headers: &mut HeaderMap, name: &'static str, value: Option<&[u8]>| {
        if let Some(value) = value.and_then(|v| HeaderValue::from_bytes(v).ok()) {
            headers.append(HeaderName::from_static(name), value);
        }
    };
    let header = match name {
        "crumb" => "crumb-signature",
        "crave" => "x-crave-signature",
        "hook" => "x-signature",
        _ => "x-hub-signature",
    };
    set(&mut headers, header, signature);
    set(&mut headers, "x-timestamp", timestamp);
    // A second signature header: repeated headers are refused, not merged.
    if which & 0x80 != 0 {
        set(&mut headers, header, extra);
    }
    let now = 1_780_000_000;
    // An HMAC-SHA256 tag cannot be guessed (and the comparison is constant
    // time, so the fuzzer's compare tracing learns nothing from it): any
    // success here would be a forgery getting through.
    if source.verifier().verify(&headers, body, now).is_ok() {
        panic!("a fuzzed signature verified for {name}: {headers:?}");
    }
});
