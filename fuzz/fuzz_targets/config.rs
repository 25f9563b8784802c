//! `config.toml` as an operator may write it, mistakes and all: `check` and
//! `run` must answer with errors that point at the line, never panic (an
//! error's span is cut from the text, in bytes, on any UTF-8).

#![no_main]

use std::path::Path;

use expeditor::config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Every `${VAR}` resolves, to a value with template syntax and non-ASCII
    // in it, except the ones named MISSING*.
    let env = |name: &str| (!name.starts_with("MISSING")).then(|| "x{{ y }}é".to_string());
    match config::parse(Path::new("config.toml"), text, &env) {
        Ok(_) => {}
        Err(errors) => {
            let shown = errors.to_string();
            assert!(!shown.is_empty());
        }
    }
});
