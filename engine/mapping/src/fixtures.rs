//! Fixtures: an input message beside each message map and the Bundle it must produce.
//! `tributary mapping test` runs them all and prints a readable, path-by-path diff.

use crate::{MappingSet, RunOptions};
use serde_json::Value;
use std::path::PathBuf;
use tributary_terminology::Terminology;

/// What running one fixture gave.
#[derive(Debug, Clone)]
pub struct FixtureOutcome {
    pub input: PathBuf,
    pub expected: PathBuf,
    /// Empty when the output matches.
    pub differences: Vec<String>,
    /// Set when the fixture could not run at all (missing expected file, mapping error, …).
    pub error: Option<String>,
    /// The produced Bundle (to write with `--update`).
    pub actual: Option<Value>,
}

impl FixtureOutcome {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.differences.is_empty()
    }
}

/// Runs every fixture of the set (tenant `default`, as `tributary map` does; a fixture named
/// after a feed, `ORU_R01.<feed>.hl7`, as `tributary map --feed <feed>` does).
pub fn run_fixtures(set: &MappingSet, term: &Terminology) -> Vec<FixtureOutcome> {
    set.fixtures
        .iter()
        .map(|f| {
            let mut out = FixtureOutcome {
                input: f.input.clone(),
                expected: f.expected.clone(),
                differences: Vec::new(),
                error: None,
                actual: None,
            };
            let bytes = match std::fs::read(&f.input) {
                Ok(b) => b,
                Err(e) => {
                    out.error = Some(format!("cannot read input: {e}"));
                    return out;
                }
            };
            let mapped = match set.map_bytes(
                &bytes,
                term,
                &RunOptions {
                    tenant: "default",
                    lineage: false,
                    feed: f.feed.as_deref(),
                },
            ) {
                Ok(m) => m,
                Err(e) => {
                    out.error = Some(e.to_string());
                    return out;
                }
            };
            let actual = mapped.bundle();
            match std::fs::read_to_string(&f.expected) {
                Err(_) => {
                    out.error = Some(format!(
                        "missing expected output {} (run with --update to create it)",
                        f.expected.display()
                    ))
                }
                Ok(text) => match serde_json::from_str::<Value>(&text) {
                    Err(e) => out.error = Some(format!("{}: not JSON: {e}", f.expected.display())),
                    Ok(expected) => json_diff("", &expected, &actual, &mut out.differences),
                },
            }
            out.actual = Some(actual);
            out
        })
        .collect()
}

fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 120 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(117).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

/// Every difference between two JSON values, as `path: expected X, got Y` lines.
pub fn json_diff(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match a.get(k) {
                    Some(av) => json_diff(&p, ev, av, out),
                    None => out.push(format!("- {p}: expected {}, missing", show(ev))),
                }
            }
            for (k, av) in a {
                if !e.contains_key(k) {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    out.push(format!("+ {p}: unexpected {}", show(av)));
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            for i in 0..e.len().max(a.len()) {
                let p = format!("{path}[{i}]");
                match (e.get(i), a.get(i)) {
                    (Some(ev), Some(av)) => json_diff(&p, ev, av, out),
                    (Some(ev), None) => out.push(format!("- {p}: expected {}, missing", show(ev))),
                    (None, Some(av)) => out.push(format!("+ {p}: unexpected {}", show(av))),
                    (None, None) => {}
                }
            }
        }
        (e, a) if e != a => out.push(format!("~ {path}: expected {}, got {}", show(e), show(a))),
        _ => {}
    }
}
