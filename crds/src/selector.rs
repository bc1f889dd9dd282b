//! Kubernetes' `LabelSelector`: `matchLabels` and `matchExpressions` (`In`, `NotIn`, `Exists`,
//! `DoesNotExist`), validated as the API server validates them, with the one rule that matches
//! labels ([`LabelSelector::matches`]) and the one that renders the selector as the API
//! server's `labelSelector` query ([`LabelSelector::to_query`]): local mode filters with the
//! first, a cluster's watches send the second, and a test holds them to the same answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;

/// The operators of a `matchExpressions` entry.
pub const OPERATORS: &[&str] = &["In", "NotIn", "Exists", "DoesNotExist"];

/// At most this many `matchLabels` plus `matchExpressions` entries, and values per entry: a
/// selector is rendered into every watch's URL.
pub const MAX_TERMS: usize = 32;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `matchExpressions` entry: `key` `operator` `values`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LabelSelectorRequirement {
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    /// Non-empty for `In` and `NotIn`, empty for `Exists` and `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

// === impl LabelSelector ===

impl LabelSelector {
    /// Whether it selects everything (`{}`).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Whether an object with `labels` is selected: every `matchLabels` pair and every
    /// expression holds (`NotIn` and `DoesNotExist` hold for an object without the key).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator.as_str() {
                    "In" => value.is_some_and(|v| e.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !e.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    // Refused by `validate`; an unknown operator selects nothing.
                    _ => false,
                }
            })
    }

    /// The API server's `labelSelector` query value: `k=v`, `k in (a,b)`, `k notin (a,b)`,
    /// `k`, `!k`, joined by `,` (values sorted, so equal selectors render equally). Empty for
    /// `{}`, which selects everything.
    pub fn to_query(&self) -> String {
        let mut terms: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for e in &self.match_expressions {
            let mut values = e.values.clone();
            values.sort();
            values.dedup();
            terms.push(match e.operator.as_str() {
                "In" => format!("{} in ({})", e.key, values.join(",")),
                "NotIn" => format!("{} notin ({})", e.key, values.join(",")),
                "Exists" => e.key.clone(),
                _ => format!("!{}", e.key),
            });
        }
        terms.join(",")
    }

    /// Checks keys, values and operators as the API server does; errors name `path`'s fields.
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.match_labels.len() + self.match_expressions.len() > MAX_TERMS {
            errors.push(FieldError::new(
                path,
                format!("at most {MAX_TERMS} matchLabels and matchExpressions together"),
            ));
        }
        for (key, value) in &self.match_labels {
            if let Err(why) = label_key(key) {
                errors.push(FieldError::new(format!("{path}.matchLabels.{key}"), why));
            }
            if let Err(why) = label_value(value) {
                errors.push(FieldError::new(format!("{path}.matchLabels.{key}"), why));
            }
        }
        for (i, e) in self.match_expressions.iter().enumerate() {
            let at = format!("{path}.matchExpressions[{i}]");
            if let Err(why) = label_key(&e.key) {
                errors.push(FieldError::new(format!("{at}.key"), why));
            }
            match e.operator.as_str() {
                "In" | "NotIn" if e.values.is_empty() => errors.push(FieldError::new(
                    format!("{at}.values"),
                    format!("{} needs at least one value", e.operator),
                )),
                "Exists" | "DoesNotExist" if !e.values.is_empty() => errors.push(FieldError::new(
                    format!("{at}.values"),
                    format!("{} takes no values", e.operator),
                )),
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                other => errors.push(FieldError::new(
                    format!("{at}.operator"),
                    format!("{other:?} is not one of {}", OPERATORS.join(", ")),
                )),
            }
            if e.values.len() > MAX_TERMS {
                errors.push(FieldError::new(
                    format!("{at}.values"),
                    format!("at most {MAX_TERMS} values"),
                ));
            }
            for (j, value) in e.values.iter().enumerate() {
                if let Err(why) = label_value(value) {
                    errors.push(FieldError::new(format!("{at}.values[{j}]"), why));
                }
            }
        }
    }
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(format!(
                "{key:?}: the prefix before '/' must be a DNS subdomain (lower-case letters, digits, '-' and '.')"
            ));
        }
    }
    if name.is_empty() {
        return Err(format!("{key:?}: a label key needs a name"));
    }
    label_value(name).map_err(|_| {
        format!(
            "{key:?}: a label key's name is at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        )
    })
}

/// A label value: empty, or at most 63 characters of `[A-Za-z0-9._-]`, starting and ending
/// alphanumeric.
fn label_value(value: &str) -> Result<(), String> {
    let bytes = value.as_bytes();
    let ok = value.is_empty()
        || (value.len() <= 63
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a valid label value: at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(json: serde_json::Value) -> LabelSelector {
        serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"))
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expressions_match_and_render_as_the_api_server_reads_them() {
        let s = selector(serde_json::json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["front", "back"]},
                {"key": "env", "operator": "NotIn", "values": ["dev"]},
                {"key": "team", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist"},
            ]
        }));
        let mut errors = Vec::new();
        s.validate("spec.selector", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            s.to_query(),
            "app=web,tier in (back,front),env notin (dev),team,!legacy"
        );
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("team", "a")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "mid"), ("team", "a")])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "front"),
            ("team", "a"),
            ("env", "dev")
        ])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "front")])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "front"),
            ("team", "a"),
            ("legacy", "")
        ])));
        assert!(LabelSelector::default().matches(&BTreeMap::new()));
        assert_eq!(LabelSelector::default().to_query(), "");
    }

    #[test]
    fn a_bad_selector_names_the_field() {
        let s = selector(serde_json::json!({
            "matchLabels": {"bad key!": "v"},
            "matchExpressions": [
                {"key": "a", "operator": "In"},
                {"key": "b", "operator": "Exists", "values": ["x"]},
                {"key": "c", "operator": "Gt", "values": ["1"]},
                {"key": "d", "operator": "In", "values": ["-no-"]},
            ]
        }));
        let mut errors = Vec::new();
        s.validate("spec.selector", &mut errors);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.selector.matchLabels.bad key!",
                "spec.selector.matchExpressions[0].values",
                "spec.selector.matchExpressions[1].values",
                "spec.selector.matchExpressions[2].operator",
                "spec.selector.matchExpressions[3].values[0]",
            ]
        );
        let mut errors = Vec::new();
        selector(serde_json::json!({"matchLabels": {"example.com/team": "a", "-x.com/y": "b"}}))
            .validate("s", &mut errors);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "s.matchLabels.-x.com/y");
    }
}
