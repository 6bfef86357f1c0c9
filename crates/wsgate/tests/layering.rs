//! The `wsgate` crate's modules depend on each other without cycles, and
//! the layers stay where they are: `config` is plain data, the root type
//! knows neither the request path nor the server, errors know nothing.
//!
//! The graph is read from the source: every `crate::NAME` (and `$crate::NAME`
//! in macros) outside comments, in a file under `src/NAME.rs` or
//! `src/NAME/`, is an edge from that top-level module to `NAME`. `lib.rs` and
//! `main.rs`, which put the modules together, are not nodes.
//!
//! Run it alone: `cargo test -p wsgate --test layering`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module names a line of code refers to as `crate::NAME`.
fn references(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = vec![];
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        // `crate::Server` and other root items are not modules.
        if !name.is_empty() {
            out.push(name);
        }
        rest = after;
    }
    out
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut g = Graph::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let edges = g.entry(module.clone()).or_default();
        for line in text.lines() {
            for to in references(line) {
                if to != module {
                    edges.insert(to);
                }
            }
        }
    }
    g
}

/// A cycle in `g`, if there is one.
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(
        g: &Graph,
        n: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for next in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|n| visit(g, n, &mut vec![], &mut done))
}

#[test]
fn the_modules_import_each_other_without_cycles() {
    let g = graph();
    assert!(g.len() >= 10, "too few modules found: {g:?}");
    if let Some(cycle) = find_cycle(&g) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_layers_stay_in_their_place() {
    let g = graph();
    let deps = |m: &str| g.get(m).cloned().unwrap_or_default();
    let only = |m: &str, allowed: &[&str]| {
        let extra: Vec<_> = deps(m)
            .into_iter()
            .filter(|d| !allowed.contains(&d.as_str()))
            .collect();
        assert!(extra.is_empty(), "`{m}` must not import {extra:?}");
    };
    // Plain data: it reads the files it names through the TLS loader only.
    only("config", &["tls"]);
    only("error", &[]);
    only("tls", &[]);
    only("io", &[]);
    // The root type is built from the config; the request path and the
    // server add `impl Gateway` blocks, never the other way round.
    for m in ["gateway", "open"] {
        assert!(
            !deps(m).contains("server"),
            "`{m}` must not import `server`"
        );
    }
    assert!(
        !deps("gateway").contains("open"),
        "`gateway` must not import `open`"
    );
    // The parts the path uses know nothing of the path or the server.
    for m in [
        "bridge", "proxy", "route", "limits", "auth", "http", "metrics",
    ] {
        for upper in ["gateway", "open", "server", "cli"] {
            assert!(!deps(m).contains(upper), "`{m}` must not import `{upper}`");
        }
    }
}

#[test]
fn the_checks_catch_what_they_look_for() {
    // A cycle is found, and named.
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
    g.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&g), None);
    // References in code count; in comments they do not.
    assert_eq!(
        references("use crate::config::{Route}; let x = $crate::io::y;"),
        ["config", "io"]
    );
    assert!(references("// see crate::server").is_empty());
    assert!(references("/// [`crate::open`]").is_empty());
}
