//! The subset of Kubernetes `ObjectMeta` that users write.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;

pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

// === impl ObjectMeta ===

impl ObjectMeta {
    /// The namespace, defaulted as Kubernetes does.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }

    /// Checks name and namespace; `max_name` leaves room for names derived from this one.
    pub fn validate(&self, max_name: usize, errors: &mut Vec<FieldError>) {
        if self.name.is_empty() {
            errors.push(FieldError::new("metadata.name", "required"));
        } else if let Err(why) = dns_label(&self.name, true) {
            errors.push(FieldError::new("metadata.name", why));
        } else if self.name.len() > max_name {
            errors.push(FieldError::new(
                "metadata.name",
                format!(
                    "must be at most {max_name} characters so that the names derived from it fit in 63"
                ),
            ));
        }
        if let Some(namespace) = &self.namespace
            && let Err(why) = dns_label(namespace, false)
        {
            errors.push(FieldError::new("metadata.namespace", why));
        }
    }
}

/// An RFC 1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters); RFC 1035 when
/// `letter_first` also demands a leading letter, as Knative does for Service names.
pub fn dns_label(value: &str, letter_first: bool) -> Result<(), String> {
    let valid_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let starts_ok = value
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || (!letter_first && b.is_ascii_digit()));
    let ends_ok = value
        .bytes()
        .last()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if value.is_empty() || value.len() > 63 || !valid_chars || !starts_ok || !ends_ok {
        let first = if letter_first {
            "a letter"
        } else {
            "a letter or digit"
        };
        return Err(format!(
            "{value:?} is not a valid DNS label: use at most 63 lower-case letters, digits and '-', starting with {first} and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// An RFC 1123 subdomain (dot-separated labels, at most 253 characters): an API group, a
/// service account's name.
pub fn dns_subdomain(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .split('.')
            .all(|label| dns_label(label, false).is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a valid DNS subdomain: lower-case letters, digits, '-' and '.', at most 253 characters"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(dns_label("hello-world", true).is_ok());
        assert!(dns_label("1abc", true).is_err());
        assert!(dns_label("1abc", false).is_ok());
        assert!(dns_label("Hello", true).is_err());
        assert!(dns_label("abc-", true).is_err());
        assert!(dns_label(&"a".repeat(64), true).is_err());
    }
}
