//! Trigger filters, compiled once per trigger: `filter.attributes` and the Subscriptions API
//! dialects of `filters` (`exact`, `prefix`, `suffix`, `all`, `any`, `not`, `cesql`).

use cesql::{Attributes, Expression, Value};
use crds::Trigger;
use crds::eventing::SubscriptionsApiFilter;

use crate::event::Event;

#[derive(Debug, Clone)]
pub enum Filter {
    /// Everything matches.
    All,
    /// `filter.attributes`: every key must match exactly; an empty value only asks that the
    /// attribute be present.
    Attributes(Vec<(String, String)>),
    /// `filters`: every entry must match.
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
    Exact(Vec<(String, String)>),
    Prefix(Vec<(String, String)>),
    Suffix(Vec<(String, String)>),
    Cesql(Box<Expression>),
}

// === impl Filter ===

impl Filter {
    /// The trigger's filter; `filters` wins over `filter` when both are set, as in Knative.
    /// Expressions were checked when the trigger was loaded, so compiling cannot fail here; an
    /// expression that somehow does is treated as matching nothing.
    pub fn for_trigger(trigger: &Trigger) -> Self {
        if !trigger.spec.filters.is_empty() {
            return Filter::And(trigger.spec.filters.iter().map(Self::dialect).collect());
        }
        match &trigger.spec.filter {
            Some(filter) if !filter.attributes.is_empty() => Filter::Attributes(
                filter
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            _ => Filter::All,
        }
    }

    fn dialect(filter: &SubscriptionsApiFilter) -> Self {
        let pairs = |map: &std::collections::BTreeMap<String, String>| {
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        if !filter.exact.is_empty() {
            Filter::Exact(pairs(&filter.exact))
        } else if !filter.prefix.is_empty() {
            Filter::Prefix(pairs(&filter.prefix))
        } else if !filter.suffix.is_empty() {
            Filter::Suffix(pairs(&filter.suffix))
        } else if !filter.all.is_empty() {
            Filter::And(filter.all.iter().map(Self::dialect).collect())
        } else if !filter.any.is_empty() {
            Filter::Or(filter.any.iter().map(Self::dialect).collect())
        } else if let Some(inner) = &filter.not {
            Filter::Not(Box::new(Self::dialect(inner)))
        } else if let Some(expression) = &filter.cesql {
            match Expression::compile(expression) {
                Ok(e) => Filter::Cesql(Box::new(e)),
                Err(_) => Filter::Or(Vec::new()),
            }
        } else {
            Filter::All
        }
    }

    pub fn matches(&self, event: &Event) -> bool {
        let each = |pairs: &[(String, String)], test: fn(&str, &str) -> bool| {
            pairs
                .iter()
                .all(|(k, v)| event.string(k).is_some_and(|actual| test(&actual, v)))
        };
        match self {
            Filter::All => true,
            Filter::Attributes(pairs) => pairs.iter().all(|(k, v)| match event.string(k) {
                Some(actual) => v.is_empty() || actual == *v,
                None => false,
            }),
            Filter::And(filters) => filters.iter().all(|f| f.matches(event)),
            Filter::Or(filters) => filters.iter().any(|f| f.matches(event)),
            Filter::Not(inner) => !inner.matches(event),
            Filter::Exact(pairs) => each(pairs, |a, v| a == v),
            Filter::Prefix(pairs) => each(pairs, |a, v| a.starts_with(v)),
            Filter::Suffix(pairs) => each(pairs, |a, v| a.ends_with(v)),
            Filter::Cesql(expression) => expression.matches(event),
        }
    }
}

impl Attributes for Event {
    fn attribute(&self, name: &str) -> Option<Value> {
        self.attributes.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trigger(spec: &str) -> Trigger {
        let yaml = format!(
            "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: t\nspec:\n  broker: default\n  subscriber:\n    uri: http://127.0.0.1:1/\n{spec}"
        );
        let (loaded, errors) =
            crds::load_str(std::path::Path::new("t.yaml"), &yaml, crds::Mode::Local);
        assert!(errors.is_empty(), "{errors:?}");
        match loaded.into_iter().next().map(|l| l.resource) {
            Some(crds::Resource::Trigger(t)) => t,
            other => panic!("not a trigger: {other:?}"),
        }
    }

    fn event(kind: &str, source: &str, extra: &[(&str, &str)]) -> Event {
        let mut e = Event::new("1", source, kind);
        for (k, v) in extra {
            e.set(k, *v);
        }
        e
    }

    #[test]
    fn attributes_filter_exact_and_presence() {
        let f = Filter::for_trigger(&trigger(
            "  filter:\n    attributes:\n      type: order.created\n      region: \"\"\n",
        ));
        assert!(f.matches(&event("order.created", "/s", &[("region", "eu")])));
        assert!(
            !f.matches(&event("order.created", "/s", &[])),
            "region must be present"
        );
        assert!(!f.matches(&event("order.paid", "/s", &[("region", "eu")])));
        assert!(Filter::for_trigger(&trigger("")).matches(&event("x", "/s", &[])));
    }

    #[test]
    fn subscriptions_api_dialects() {
        let f = Filter::for_trigger(&trigger(
            r#"  filters:
    - prefix:
        type: order.
    - suffix:
        source: /shop
    - any:
        - exact:
            region: eu
        - cesql: "priority = 1 OR priority > 5"
    - not:
        exact:
          test: "yes"
"#,
        ));
        assert!(f.matches(&event("order.created", "/eu/shop", &[("region", "eu")])));
        assert!(f.matches(&event("order.created", "/us/shop", &[("priority", "7")])));
        assert!(!f.matches(&event("order.created", "/us/shop", &[("priority", "3")])));
        assert!(!f.matches(&event("invoice.sent", "/eu/shop", &[("region", "eu")])));
        assert!(!f.matches(&event("order.created", "/eu/web", &[("region", "eu")])));
        assert!(!f.matches(&event(
            "order.created",
            "/eu/shop",
            &[("region", "eu"), ("test", "yes")]
        )));
    }

    #[test]
    fn filters_win_over_filter_and_cesql_errors_do_not_match() {
        let f = Filter::for_trigger(&trigger(
            "  filter:\n    attributes:\n      type: a\n  filters:\n    - cesql: \"INT(count) > 2\"\n",
        ));
        assert!(
            f.matches(&event("b", "/s", &[("count", "3")])),
            "filter is ignored"
        );
        assert!(
            !f.matches(&event("b", "/s", &[("count", "x")])),
            "a cast error is no match"
        );
        assert!(
            !f.matches(&event("b", "/s", &[])),
            "a missing attribute is no match"
        );
    }

    #[test]
    fn bad_cesql_is_a_load_error_with_its_position() {
        let yaml = "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: t\nspec:\n  broker: default\n  subscriber:\n    uri: http://127.0.0.1:1/\n  filters:\n    - cesql: \"type = 'a' AND\"\n";
        let (_, errors) = crds::load_str(std::path::Path::new("t.yaml"), yaml, crds::Mode::Local);
        let message = errors[0].to_string();
        assert!(
            message.starts_with(
                "t.yaml: document 1 (Trigger default/t): spec.filters[0].cesql: invalid CESQL expression at position 15"
            ),
            "{message}"
        );
    }
}
