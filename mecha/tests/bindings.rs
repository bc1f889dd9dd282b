//! ContainerSource and SinkBinding through the real `mecha up`: real Python processes that
//! read `K_SINK` and `K_CE_OVERRIDES`, and a sink of the test's own.
#![allow(clippy::unwrap_used)]

mod support;

use support::subscriber::Subscriber;
use support::{Mecha, Workdir, alive, wait_until};

/// Posts one CloudEvent (binary mode) to `K_SINK` every 200 ms, its data the two variables,
/// after writing its pid to `pid.txt`; exits with 3 when told to by `crash.txt`.
const EMITTER: &str = r#"
import json, os, time, urllib.request
with open("pid.txt", "w") as f:
    f.write(str(os.getpid()))
n = 0
while True:
    if os.path.exists("crash.txt"):
        os.remove("crash.txt")
        raise SystemExit(3)
    n += 1
    overrides = json.loads(os.environ["K_CE_OVERRIDES"])
    headers = {"ce-specversion": "1.0", "ce-id": "e%d-%d" % (os.getpid(), n),
               "ce-source": "/emitter", "ce-type": "dev.example.emitted",
               "content-type": "application/json"}
    for name, value in overrides.get("extensions", {}).items():
        headers["ce-" + name] = value
    body = json.dumps({"sink": os.environ["K_SINK"], "overrides": os.environ["K_CE_OVERRIDES"]})
    try:
        urllib.request.urlopen(urllib.request.Request(os.environ["K_SINK"], body.encode(), headers), timeout=5)
    except Exception as e:
        print("send failed:", e, flush=True)
    time.sleep(0.2)
"#;

/// A function that answers with its pid and the two variables (empty when unset).
const BOUND: &str = r#"
import os
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = "%d|%s|%s" % (os.getpid(), os.environ.get("K_SINK", ""), os.environ.get("K_CE_OVERRIDES", ""))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

fn source_named(mecha: &Mecha, name: &str) -> serde_json::Value {
    let output = mecha.cli(&["get", "sources", "-o", "json"]);
    assert!(output.status.success(), "{output:?}");
    let sources: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    sources
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_container_source_runs_its_program_with_k_sink_and_restarts_it() {
    let sink = Subscriber::ok();
    let dir = Workdir::new("container-source");
    dir.write("emitter.py", EMITTER);
    dir.write(
        "source.yaml",
        &format!(
            "apiVersion: sources.knative.dev/v1\nkind: ContainerSource\nmetadata:\n  name: emitter\nspec:\n  template:\n    spec:\n      containers:\n        - image: example/emitter\n          command: [python3, emitter.py]\n  ceOverrides:\n    extensions:\n      team: blue\n  sink:\n    uri: {}\n",
            sink.url("/events")
        ),
    );
    let mecha = Mecha::up(&[&dir.path]);
    wait_until("an event from the program", || sink.count("/events") >= 1);
    let event = &sink.all()[0];
    assert_eq!(event.headers["ce-type"], "dev.example.emitted");
    assert_eq!(event.headers["ce-team"], "blue", "K_CE_OVERRIDES applied");
    let data: serde_json::Value = serde_json::from_str(&event.body).unwrap();
    assert_eq!(data["sink"], sink.url("/events"));
    assert_eq!(data["overrides"], r#"{"extensions":{"team":"blue"}}"#);
    wait_until("the source ready", || {
        source_named(&mecha, "emitter")["ready"] == true
    });

    // A crash: the program is started again, with the same variables.
    let pid_file = dir.path.join("pid.txt");
    let first: u32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    dir.write("crash.txt", "");
    wait_until("the program restarted", || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|p| p != first)
    });
    let before = sink.count("/events");
    wait_until("events from the restarted program", || {
        sink.count("/events") > before
    });

    // Deleted: the process is stopped.
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    let output = mecha.cli(&["delete", "containersource", "emitter"]);
    assert!(output.status.success(), "{output:?}");
    wait_until("the program stopped", || !alive(pid));
}

#[test]
fn a_sink_binding_gives_the_services_it_selects_k_sink_and_replaces_their_replicas() {
    let dir = Workdir::new("sink-binding");
    dir.write("bound.py", BOUND);
    dir.write(
        "service.yaml",
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: emitter\n  labels:\n    app: emitter\nspec:\n  template:\n    metadata:\n      annotations:\n        autoscaling.knative.dev/min-scale: \"1\"\n    spec:\n      containers:\n        - command: [python3, bound.py]\n---\napiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: other\nspec:\n  template:\n    metadata:\n      annotations:\n        autoscaling.knative.dev/min-scale: \"1\"\n    spec:\n      containers:\n        - command: [python3, bound.py]\n",
    );
    let mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("emitter", 1);
    let ask = |service: &str| {
        let host = format!("{service}.default.localhost");
        let answer = mecha.get(&host, "/");
        assert_eq!(answer.status, 200, "{answer:?}");
        let parts: Vec<String> = answer.body.split('|').map(String::from).collect();
        (
            parts[0].parse::<u32>().unwrap(),
            parts[1].clone(),
            parts[2].clone(),
        )
    };
    let (before, unbound, _) = ask("emitter");
    assert_eq!(unbound, "", "no binding yet");

    let binding = dir.write(
        "binding.yaml",
        "apiVersion: sources.knative.dev/v1\nkind: SinkBinding\nmetadata:\n  name: bind\nspec:\n  subject:\n    apiVersion: serving.knative.dev/v1\n    kind: Service\n    selector:\n      matchLabels:\n        app: emitter\n  ceOverrides:\n    extensions:\n      team: blue\n  sink:\n    ref:\n      apiVersion: eventing.knative.dev/v1\n      kind: Broker\n      name: default\n---\napiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\n",
    );
    let output = mecha.cli(&["apply", "-f", binding.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let broker = format!("http://localhost:{}/default/default", mecha.gateway.port());
    wait_until("the emitter's replica replaced with K_SINK", || {
        let (pid, sink, overrides) = ask("emitter");
        pid != before && sink == broker && overrides == r#"{"extensions":{"team":"blue"}}"#
    });
    wait_until("the old replica stopped", || !alive(before));
    assert_eq!(ask("other").1, "", "a Service the selector does not match");
    let view = source_named(&mecha, "bind");
    assert_eq!(view["ready"], true, "{view}");
    assert_eq!(view["sinkUri"], broker);

    // Deleted: the variables go, with another replacement.
    let (bound_pid, _, _) = ask("emitter");
    let output = mecha.cli(&["delete", "sinkbinding", "bind"]);
    assert!(output.status.success(), "{output:?}");
    wait_until("the emitter's replica replaced without K_SINK", || {
        let (pid, sink, _) = ask("emitter");
        pid != bound_pid && sink.is_empty()
    });
}

#[test]
fn bad_container_sources_bindings_and_api_server_sources_are_load_errors_naming_the_field() {
    let dir = Workdir::new("bindings-bad");
    let file = dir.write(
        "bad.yaml",
        "apiVersion: sources.knative.dev/v1\nkind: ContainerSource\nmetadata:\n  name: c\nspec:\n  template:\n    spec:\n      containers:\n        - image: x\n          env:\n            - name: K_SINK\n              value: http://elsewhere/\n  sink:\n    uri: http://127.0.0.1:1/\n---\napiVersion: sources.knative.dev/v1\nkind: SinkBinding\nmetadata:\n  name: b\nspec:\n  subject:\n    apiVersion: apps/v1\n    kind: Deployment\n    name: d\n  sink:\n    uri: http://127.0.0.1:1/\n---\napiVersion: sources.knative.dev/v1\nkind: ApiServerSource\nmetadata:\n  name: a\nspec:\n  mode: Everything\n  resources:\n    - apiVersion: v1\n      kind: Pod\n  sink:\n    uri: http://127.0.0.1:1/\n",
    );
    let stderr = support::refused_up(&file, &dir.path.join(".state"));
    for needle in [
        "document 1 (ContainerSource default/c): spec.template.spec.containers[0].command: required in local mode",
        "document 1 (ContainerSource default/c): spec.template.spec.containers[0].env[0].name: K_SINK is set by Mecha",
        "document 2 (SinkBinding default/b): spec.subject: Mecha binds Service (serving.knative.dev/v1) subjects, not Deployment (apps/v1)",
        "document 3 (ApiServerSource default/a): spec.resources[0]: Pod (v1) is not a Mecha resource",
        "document 3 (ApiServerSource default/a): spec.mode: \"Everything\" is not Reference or Resource",
    ] {
        assert!(stderr.contains(needle), "{needle}\n{stderr}");
    }
}
