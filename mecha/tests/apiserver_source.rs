//! ApiServerSource through the real `mecha up`: Mecha's own resources as Knative's API server
//! events, so a function can react to "a revision became ready".
#![allow(clippy::unwrap_used)]

mod support;

use support::subscriber::{Received, Subscriber};
use support::{Mecha, Workdir, wait_until};

const SERVER: &str = r#"
import os
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

fn data(event: &Received) -> serde_json::Value {
    serde_json::from_str(&event.body).unwrap()
}

#[test]
fn api_server_sources_report_mechas_own_resources() {
    let sink = Subscriber::ok();
    let dir = Workdir::new("apiserver");
    dir.write("server.py", SERVER);
    dir.write(
        "sources.yaml",
        &format!(
            "apiVersion: sources.knative.dev/v1\nkind: ApiServerSource\nmetadata:\n  name: revisions\nspec:\n  mode: Resource\n  resources:\n    - apiVersion: serving.knative.dev/v1\n      kind: Revision\n      selector:\n        matchLabels:\n          serving.knative.dev/service: hello\n  sink:\n    uri: {}\n---\napiVersion: sources.knative.dev/v1\nkind: ApiServerSource\nmetadata:\n  name: brokers\nspec:\n  resources:\n    - apiVersion: eventing.knative.dev/v1\n      kind: Broker\n  ceOverrides:\n    extensions:\n      team: blue\n  sink:\n    uri: {}\n",
            sink.url("/revisions"),
            sink.url("/brokers")
        ),
    );
    let mecha = Mecha::up(&[&dir.path]);
    let output = mecha.cli(&["get", "sources", "-o", "json"]);
    let sources: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let revisions = sources
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "revisions")
        .unwrap();
    assert_eq!(
        revisions["ceAttributes"][0]["type"],
        "dev.knative.apiserver.resource.add"
    );

    // A Service: its revision is added, then becomes ready (an update whose data says so).
    let service = dir.write(
        "service.yaml",
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: hello\nspec:\n  template:\n    metadata:\n      annotations:\n        autoscaling.knative.dev/min-scale: \"1\"\n    spec:\n      containers:\n        - command: [python3, server.py]\n---\napiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: other\nspec:\n  template:\n    spec:\n      containers:\n        - command: [python3, server.py]\n",
    );
    let output = mecha.cli(&["apply", "--no-wait", "-f", service.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let on = |path: &str, kind: &str| -> Vec<Received> {
        sink.all()
            .into_iter()
            .filter(|r| r.path == path && r.headers["ce-type"] == kind)
            .collect()
    };
    wait_until("the revision added", || {
        !on("/revisions", "dev.knative.apiserver.resource.add").is_empty()
    });
    let added = &on("/revisions", "dev.knative.apiserver.resource.add")[0];
    let h = &added.headers;
    assert_eq!(
        h["ce-subject"],
        "/apis/serving.knative.dev/v1/namespaces/default/revisions/hello-00001"
    );
    assert_eq!(h["ce-source"], "mecha://local");
    assert_eq!(h["ce-kind"], "Revision");
    assert_eq!(h["ce-name"], "hello-00001");
    assert_eq!(h["ce-namespace"], "default");
    assert_eq!(h["ce-apiversion"], "serving.knative.dev/v1");
    assert_eq!(
        data(added)["metadata"]["labels"]["serving.knative.dev/service"],
        "hello"
    );
    let ready = |event: &Received| data(event)["status"]["conditions"][0]["status"] == "True";
    wait_until("an event saying the revision is ready", || {
        sink.all()
            .iter()
            .any(|r| r.path == "/revisions" && ready(r))
    });
    // Only the selected Service's revisions.
    assert!(
        sink.all()
            .iter()
            .filter(|r| r.path == "/revisions")
            .all(|r| r.headers["ce-name"].starts_with("hello-"))
    );

    // Reference mode: a Broker applied, then deleted.
    let broker = dir.write(
        "broker.yaml",
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\n",
    );
    let output = mecha.cli(&["apply", "-f", broker.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    wait_until("the broker added", || {
        !on("/brokers", "dev.knative.apiserver.ref.add").is_empty()
    });
    let added = &on("/brokers", "dev.knative.apiserver.ref.add")[0];
    assert_eq!(
        data(added),
        serde_json::json!({"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "name": "default", "namespace": "default"})
    );
    assert_eq!(added.headers["ce-team"], "blue");
    let output = mecha.cli(&["delete", "broker", "default"]);
    assert!(output.status.success(), "{output:?}");
    wait_until("the broker deleted", || {
        !on("/brokers", "dev.knative.apiserver.ref.delete").is_empty()
    });
    assert!(on("/brokers", "dev.knative.apiserver.ref.update").is_empty());
}
