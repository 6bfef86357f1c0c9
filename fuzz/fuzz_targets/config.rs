//! Arbitrary text as a configuration file: it parses or yields errors, never
//! panics, and every error points inside the text (line 1 to the last line,
//! column at least 1) and renders as `FILE:LINE:COL: ...`. The small parsers
//! of values (durations, sizes, rates) get the same text: a value or an
//! error, never a panic. Seed the corpus with `examples/*.toml`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use wsgate::config;
use wsgate::config::RateSpec;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = config::parse_duration(&text);
    let _ = config::parse_size(&text);
    if let Ok(r) = text.parse::<RateSpec>() {
        // What a rate prints parses back to the same rate.
        assert_eq!(r.to_string().parse::<RateSpec>().ok(), Some(r));
    }
    // A base that does not exist: relative paths in the text (certificates,
    // discovery files) resolve to nothing.
    let lines = text.lines().count().max(1);
    if let Err(errors) = config::parse("fuzz.toml", &text, Path::new("/nonexistent-wsgate-fuzz")) {
        assert!(!errors.0.is_empty());
        for e in &errors.0 {
            assert!(
                (1..=lines + 1).contains(&e.line) && e.column >= 1,
                "error at {}:{} of a {lines}-line text: {e}",
                e.line,
                e.column
            );
            assert!(e.to_string().starts_with(&format!("fuzz.toml:{}:{}: ", e.line, e.column)));
        }
    }
});
