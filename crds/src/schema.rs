//! JSON schemas for what `#[derive(JsonSchema)]` cannot say in a Kubernetes structural schema
//! (compiled with the `schema` feature, for the CRDs).

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

use crate::serving::PortRef;

/// Any JSON object, kept as written (`x-kubernetes-preserve-unknown-fields`): for fields whose
/// shape the API server cannot check (a broker class's config) or that would recurse.
pub fn any_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// A list of [`any_object`]s.
pub fn any_object_list(generator: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": any_object(generator),
    })
}

/// Kubernetes' IntOrString.
impl JsonSchema for PortRef {
    fn schema_name() -> Cow<'static, str> {
        "IntOrString".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "x-kubernetes-int-or-string": true })
    }

    fn inline_schema() -> bool {
        true
    }
}
