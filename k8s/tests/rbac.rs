//! `deploy/base/rbac.yaml` against what the code does: every request the scripted API server
//! records while the reconcilers and the runtime (actuator, endpoints, desired state, Lease,
//! token reviews) run their scenarios is allowed by the autoscaler's roles, no
//! rule has a wildcard, and every rule is used by some recorded request — least privilege,
//! checked rather than described.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde_json::Value;
use support::Recorded;

const NAMESPACE: &str = "mecha-system";
const ACCOUNT: &str = "mecha-autoscaler";

/// (API group, resource or `resource/subresource`, verb).
type Permission = (String, String, String);

struct Manifest {
    account: ServiceAccount,
    cluster_role: ClusterRole,
    cluster_binding: ClusterRoleBinding,
    role: Role,
    binding: RoleBinding,
}

fn manifest() -> Manifest {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/rbac.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/base/rbac.yaml");
    let documents: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML documents");
    let mut account = None;
    let mut cluster_role = None;
    let mut cluster_binding = None;
    let mut role = None;
    let mut binding = None;
    for document in documents {
        let kind = document["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "ServiceAccount" => account = Some(typed(document, &kind)),
            "ClusterRole" => cluster_role = Some(typed(document, &kind)),
            "ClusterRoleBinding" => cluster_binding = Some(typed(document, &kind)),
            "Role" => role = Some(typed(document, &kind)),
            "RoleBinding" => binding = Some(typed(document, &kind)),
            other => panic!("unexpected kind {other:?} in rbac.yaml"),
        }
    }
    Manifest {
        account: account.expect("a ServiceAccount"),
        cluster_role: cluster_role.expect("a ClusterRole"),
        cluster_binding: cluster_binding.expect("a ClusterRoleBinding"),
        role: role.expect("a Role"),
        binding: binding.expect("a RoleBinding"),
    }
}

/// A document as its k8s-openapi type.
fn typed<T: DeserializeOwned>(document: Value, kind: &str) -> T {
    serde_json::from_value(document)
        .unwrap_or_else(|e| panic!("the {kind} in rbac.yaml is not a valid {kind}: {e}"))
}

/// Every (group, resource, verb) a rule grants.
fn granted(rules: &[PolicyRule]) -> BTreeSet<Permission> {
    let mut granted = BTreeSet::new();
    for rule in rules {
        assert!(
            rule.resource_names.is_none(),
            "no rule is limited by name yet: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    granted
}

/// What the API server authorizes a recorded request as: its verb on its (sub)resource, and
/// `create` as well when a server-side apply created the object.
fn needed(request: &Recorded) -> Vec<Permission> {
    let resource = match &request.subresource {
        Some(sub) => format!("{}/{sub}", request.resource),
        None => request.resource.clone(),
    };
    let mut verbs = vec![request.verb.clone()];
    if request.created {
        verbs.push("create".into());
    }
    verbs
        .into_iter()
        .map(|verb| (request.group.clone(), resource.clone(), verb))
        .collect()
}

#[test]
fn the_manifest_binds_the_autoscalers_service_account_to_its_roles() {
    let m = manifest();
    assert_eq!(m.account.metadata.name.as_deref(), Some(ACCOUNT));
    assert_eq!(m.account.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(m.cluster_role.metadata.name.as_deref(), Some(ACCOUNT));
    assert_eq!(m.role.metadata.namespace.as_deref(), Some(NAMESPACE));
    for (role_ref, subjects, role_name) in [
        (
            &m.cluster_binding.role_ref,
            &m.cluster_binding.subjects,
            &m.cluster_role.metadata.name,
        ),
        (
            &m.binding.role_ref,
            &m.binding.subjects,
            &m.role.metadata.name,
        ),
    ] {
        assert_eq!(Some(&role_ref.name), role_name.as_ref());
        let subjects = subjects.as_ref().expect("subjects");
        assert_eq!(subjects.len(), 1);
        assert_eq!(
            (
                subjects[0].kind.as_str(),
                subjects[0].name.as_str(),
                subjects[0].namespace.as_deref()
            ),
            ("ServiceAccount", ACCOUNT, Some(NAMESPACE))
        );
    }
    assert_eq!(m.cluster_binding.role_ref.kind, "ClusterRole");
    assert_eq!(m.binding.role_ref.kind, "Role");
    assert_eq!(m.binding.metadata.namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn no_rule_has_a_wildcard() {
    let m = manifest();
    let rules = m
        .cluster_role
        .rules
        .iter()
        .flatten()
        .chain(m.role.rules.iter().flatten());
    for rule in rules {
        let words = rule
            .api_groups
            .iter()
            .flatten()
            .chain(rule.resources.iter().flatten())
            .chain(&rule.verbs);
        for word in words {
            assert!(!word.contains('*'), "a wildcard in {rule:?}");
        }
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
    }
}

#[tokio::test]
async fn every_request_is_allowed_and_every_rule_is_used() {
    let m = manifest();
    let cluster = granted(m.cluster_role.rules.as_deref().unwrap_or_default());
    let local = granted(m.role.rules.as_deref().unwrap_or_default());

    let mut recorded = support::serving::all().await;
    recorded.extend(support::runtime::all().await);
    recorded.extend(support::sources::all().await);
    let mut used = BTreeSet::new();
    for (scenario, requests) in &recorded {
        assert!(!requests.is_empty(), "{scenario} made requests");
        for request in requests {
            for permission in needed(request) {
                // The Role holds in its namespace only; a request across namespaces (a
                // cluster-wide LIST or WATCH) needs the ClusterRole.
                let in_own_namespace = request.namespace.as_deref() == Some(NAMESPACE);
                let allowed = cluster.contains(&permission)
                    || (in_own_namespace && local.contains(&permission));
                assert!(
                    allowed,
                    "scenario {scenario}: {permission:?} (namespace {:?}) is not granted by deploy/base/rbac.yaml",
                    request.namespace
                );
                used.insert(permission);
            }
        }
    }
    let unused: Vec<&Permission> = cluster
        .union(&local)
        .filter(|p| !used.contains(*p))
        .collect();
    assert!(
        unused.is_empty(),
        "rules no test exercised (grant nothing the code does not use): {unused:?}"
    );
}
