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
            assert!(!errors.0.is_empty(), "an Err names at least one problem");
            // A position points into the text: a line it has, a column within it.
            let lines: Vec<&str> = text.split('\n').collect();
            for e in &errors.0 {
                if let Some((line, col)) = e.position {
                    let Some(at) = line.checked_sub(1).and_then(|l| lines.get(l)) else {
                        panic!("{e}: line {line} of {}", lines.len())
                    };
                    assert!(col >= 1 && col <= at.chars().count() + 1, "{e}: column {col} of {at:?}");
                }
                let _ = e.to_string();
            }
        }
    }
});
