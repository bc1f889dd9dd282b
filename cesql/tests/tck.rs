//! Runs the CESQL conformance kit (`tests/tck/*.yaml`) against the crate.

use std::collections::BTreeMap;

use cesql::{Attributes, ErrorKind, Expression, Value};
use serde::Deserialize;

#[derive(Deserialize)]
struct Suite {
    name: String,
    tests: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Case {
    name: String,
    expression: String,
    #[serde(default)]
    result: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    event: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    event_overrides: BTreeMap<String, serde_json::Value>,
}

struct Event(BTreeMap<String, Value>);

impl Attributes for Event {
    fn attribute(&self, name: &str) -> Option<Value> {
        self.0.get(name).cloned()
    }
}

fn typed(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => Value::Integer(
            n.as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .expect("TCK integers fit in 32 bits"),
        ),
        serde_json::Value::String(s) => Value::String(s.clone()),
        other => panic!("unexpected TCK value {other}"),
    }
}

fn event(case: &Case) -> Event {
    let mut attributes: BTreeMap<String, Value> = match &case.event {
        Some(event) => event.iter().map(|(k, v)| (k.clone(), typed(v))).collect(),
        None => [
            ("specversion", "1.0"),
            ("id", "tck-id"),
            ("source", "/tck"),
            ("type", "dev.mecha.tck"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect(),
    };
    for (k, v) in &case.event_overrides {
        attributes.insert(k.clone(), typed(v));
    }
    Event(attributes)
}

fn kind(name: &str) -> ErrorKind {
    match name {
        "parse" => ErrorKind::Parse,
        "math" => ErrorKind::Math,
        "cast" => ErrorKind::Cast,
        "missingAttribute" => ErrorKind::MissingAttribute,
        "missingFunction" => ErrorKind::MissingFunction,
        "functionEvaluation" => ErrorKind::FunctionEvaluation,
        other => panic!("unknown TCK error kind {other}"),
    }
}

#[test]
fn conformance_kit() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tck");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tck directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 14, "the kit's files are all here");
    let mut failures = Vec::new();
    let mut cases = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let suite: Suite = serde_saphyr::from_str(&text).expect("TCK YAML");
        for case in &suite.tests {
            cases += 1;
            let label = format!("{} / {} ({})", suite.name, case.name, case.expression);
            let parsed = Expression::parse(&case.expression);
            if case.error.as_deref() == Some("parse") {
                if parsed.is_ok() {
                    failures.push(format!("{label}: expected a parse error"));
                }
                continue;
            }
            let expression = match parsed {
                Ok(e) => e,
                Err(e) => {
                    failures.push(format!("{label}: parse error {e}"));
                    continue;
                }
            };
            let evaluation = expression.evaluate(&event(case));
            if let Some(expected) = &case.result
                && evaluation.value != typed(expected)
            {
                failures.push(format!(
                    "{label}: got {:?}, want {expected}",
                    evaluation.value
                ));
            }
            let want_error = case.error.as_deref().map(kind);
            let got = |k: ErrorKind| evaluation.errors.iter().any(|e| e.kind == k);
            match want_error {
                Some(k) if !got(k) => failures.push(format!(
                    "{label}: want a {k:?} error, got {:?}",
                    evaluation.errors
                )),
                // The kit leaves the error unstated for some missing-attribute cases that
                // evaluate to false; everywhere else no error is expected.
                None if evaluation.value != Value::Boolean(false)
                    && !evaluation.errors.is_empty() =>
                {
                    failures.push(format!(
                        "{label}: want no error, got {:?}",
                        evaluation.errors
                    ));
                }
                _ => {}
            }
        }
    }
    assert!(cases > 200, "ran {cases} cases");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
