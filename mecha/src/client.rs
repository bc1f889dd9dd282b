//! The CLI commands that talk to a running `mecha up` through its admin API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mecha_common::auth::{self, AdminToken, TokenError};

use crate::api::{BrokerView, ErrorsResponse, FileContent, FilesRequest, OutcomesResponse};
use crate::output;

/// A client of one `mecha up` admin address.
#[derive(Debug)]
pub struct AdminClient {
    addr: String,
    token: AdminToken,
    http: Client<HttpConnector, Full<Bytes>>,
    /// The longest a request may take, answer included (`--request-timeout`); a streamed
    /// answer (`logs -f`) only has this long to start.
    timeout: Duration,
}

/// The longest a connection may take to open (within the request timeout): a loopback port
/// answers at once, a dropped packet would otherwise wait for the kernel's minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach mecha at {addr}: {} — is `mecha up` running? (set --admin-addr or MECHA_ADMIN_ADDR)", chain(.source)
    )]
    Unreachable {
        addr: String,
        source: hyper_util::client::legacy::Error,
    },
    #[error(
        "no answer from {addr} within {}s ({what}; --request-timeout) — is it a `mecha up` admin port? (set --admin-addr or MECHA_ADMIN_ADDR)", .after.as_secs_f64()
    )]
    Timeout {
        addr: String,
        what: &'static str,
        after: Duration,
    },
    #[error("reading the answer from {addr}: {message}")]
    Protocol { addr: String, message: String },
    #[error("mecha at {addr} refused the request ({status}): {message}")]
    Refused {
        addr: String,
        status: StatusCode,
        message: String,
    },
    #[error("{source}")]
    NoCredential { source: TokenError },
    #[error(
        "{addr} is served by another user (uid {owner}), not by your `mecha up`; the credential was not sent (is `mecha up` running? set --admin-addr or --state-dir)"
    )]
    ForeignListener { addr: String, owner: u32 },
}

/// The admin API's credential as the client finds it on its own: `--token` or
/// `MECHA_ADMIN_TOKEN` (`given`), else the token file `mecha up` keeps in `state_dir`.
pub fn find_token(given: Option<&str>, state_dir: &Path) -> Result<AdminToken, ClientError> {
    if let Some(text) = given {
        return AdminToken::parse(text).map_err(|reason| ClientError::NoCredential {
            source: TokenError::Invalid {
                what: "--token or",
                path: PathBuf::from(auth::TOKEN_ENV),
                reason,
            },
        });
    }
    auth::read(&auth::token_path(state_dir)).map_err(|source| ClientError::NoCredential { source })
}

/// The file in the state directory where `mecha up` writes its admin address.
pub const ADMIN_ADDR_FILE: &str = "admin-addr";

/// Where the admin API is: `--admin-addr` / `MECHA_ADMIN_ADDR`, else what the `mecha up`
/// using `state_dir` wrote there (so that two `mecha up`s in two directories never mix) —
/// believed only when it is this user's own file naming a loopback address — else the
/// default port.
pub fn find_admin_addr(given: Option<&str>, state_dir: &Path) -> String {
    if let Some(addr) = given {
        return addr.to_string();
    }
    let path = state_dir.join(ADMIN_ADDR_FILE);
    match auth::read_private(&path, "the admin address file", 256) {
        Ok(Some(bytes)) => match String::from_utf8_lossy(&bytes).trim().parse::<SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => return addr.to_string(),
            _ => {
                tracing::warn!(path = %path.display(), "ignoring an admin address file that names no loopback address")
            }
        },
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, "ignoring the admin address file"),
    }
    "127.0.0.1:8081".to_string()
}

/// Refuses to present the credential to a loopback port that another user listens on (a
/// port a stopped `mecha up` left, taken by someone else): the kernel's socket table says
/// who listens. Other addresses, and machines without that table, are not checked.
fn check_listener(addr: &str) -> Result<(), ClientError> {
    let Ok(socket) = addr.parse::<SocketAddr>() else {
        return Ok(());
    };
    if !socket.ip().is_loopback() {
        return Ok(());
    }
    match auth::listener_owner(socket) {
        Some(owner) if owner != rustix::process::geteuid().as_raw() => {
            Err(ClientError::ForeignListener {
                addr: addr.to_string(),
                owner,
            })
        }
        _ => Ok(()),
    }
}

impl ClientError {
    /// What to do about it, printed after the error.
    pub fn hint(&self) -> Option<String> {
        match self {
            ClientError::NoCredential {
                source: TokenError::Missing { .. },
            } => Some(format!(
                "is `mecha up` running from this directory? pass --state-dir (or MECHA_STATE_DIR) naming its state directory, or --token / {}",
                auth::TOKEN_ENV
            )),
            _ => None,
        }
    }
}

/// An error and its causes, `outer: inner: …` (hyper's own text says only "client error").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

// === impl AdminClient ===

impl AdminClient {
    /// `timeout`: the longest one request may take (see [`AdminClient::timeout`]).
    pub fn new(addr: &str, token: AdminToken, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT.min(timeout)));
        Self {
            addr: addr
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
            token,
            http: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    fn timed_out(&self, addr: &str, what: &'static str) -> ClientError {
        ClientError::Timeout {
            addr: addr.to_string(),
            what,
            after: self.timeout,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, hyper::body::Incoming), ClientError> {
        check_listener(&self.addr)?;
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json")
            .header(hyper::header::AUTHORIZATION, self.token.header_value())
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| self.protocol(e))?;
        let response = tokio::time::timeout(self.timeout, self.http.request(request))
            .await
            .map_err(|_| self.timed_out(&self.addr, "waiting for the answer to start"))?
            .map_err(|source| ClientError::Unreachable {
                addr: self.addr.clone(),
                source,
            })?;
        let status = response.status();
        // The server's answer says what is missing and where to get it.
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let bytes = self.collect(response.into_body()).await?;
            return Err(ClientError::Refused {
                addr: self.addr.clone(),
                status,
                message: String::from_utf8_lossy(&bytes).trim_end().to_string(),
            });
        }
        Ok((status, response.into_body()))
    }

    async fn call_bytes(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (status, body) = self.call(method, path, body).await?;
        let bytes = tokio::time::timeout_at(deadline, body.collect())
            .await
            .map_err(|_| self.timed_out(&self.addr, "reading the answer"))?
            .map_err(|e| self.protocol(e))?
            .to_bytes();
        Ok((status, bytes))
    }

    /// A whole answer's body, within the request timeout.
    async fn collect(&self, body: hyper::body::Incoming) -> Result<Bytes, ClientError> {
        Ok(tokio::time::timeout(self.timeout, body.collect())
            .await
            .map_err(|_| self.timed_out(&self.addr, "reading the answer"))?
            .map_err(|e| self.protocol(e))?
            .to_bytes())
    }

    fn protocol(&self, error: impl std::fmt::Display) -> ClientError {
        ClientError::Protocol {
            addr: self.addr.clone(),
            message: error.to_string(),
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (_, bytes) = self.call_bytes(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|e| self.protocol(e))
    }
}

/// One listed resource: its namespace and name (for filters and `-w`) and its JSON view.
struct Item {
    namespace: String,
    name: String,
    value: serde_json::Value,
}

/// Every resource of `kind` the admin API lists, as JSON views (revisions flattened out of
/// their services, with `namespace` and `service` added).
async fn list(client: &AdminClient, kind: output::Kind) -> Result<Vec<Item>, ClientError> {
    use output::Kind;
    let path = match kind {
        Kind::Service | Kind::Revision => "/api/v1/services",
        Kind::Broker => "/api/v1/brokers",
        Kind::Trigger => "/api/v1/triggers",
        Kind::Source => "/api/v1/sources",
    };
    let values: Vec<serde_json::Value> = client.get_json(path).await?;
    let field =
        |value: &serde_json::Value, key: &str| value[key].as_str().unwrap_or_default().to_string();
    let mut items = Vec::new();
    for value in values {
        let namespace = field(&value, "namespace");
        if kind == Kind::Revision {
            let service = field(&value, "name");
            for mut revision in value["revisions"].as_array().cloned().unwrap_or_default() {
                revision["namespace"] = namespace.clone().into();
                revision["service"] = service.clone().into();
                items.push(Item {
                    namespace: namespace.clone(),
                    name: field(&revision, "name"),
                    value: revision,
                });
            }
        } else {
            items.push(Item {
                namespace,
                name: field(&value, "name"),
                value,
            });
        }
    }
    Ok(items)
}

fn table(
    client: &AdminClient,
    kind: output::Kind,
    items: &[Item],
    layout: output::Layout,
) -> Result<(output::Table, Vec<String>), ClientError> {
    use output::Kind;
    fn typed<T: serde::de::DeserializeOwned>(
        client: &AdminClient,
        items: &[Item],
    ) -> Result<Vec<T>, ClientError> {
        items
            .iter()
            .map(|i| serde_json::from_value(i.value.clone()).map_err(|e| client.protocol(e)))
            .collect()
    }
    Ok(match kind {
        Kind::Service => {
            let services = typed(client, items)?;
            (
                output::services_table(&services, layout),
                output::service_notes(&services),
            )
        }
        Kind::Revision => {
            let revisions = typed::<crate::api::RevisionView>(client, items)?
                .into_iter()
                .zip(items)
                .map(|(revision, item)| {
                    let service = item.value["service"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    (item.namespace.clone(), service, revision)
                })
                .collect::<Vec<_>>();
            (output::revisions_table(&revisions, layout), Vec::new())
        }
        Kind::Broker => (
            output::brokers_table(&typed(client, items)?, layout),
            Vec::new(),
        ),
        Kind::Trigger => (
            output::triggers_table(&typed(client, items)?, layout),
            Vec::new(),
        ),
        Kind::Source => (
            output::sources_table(&typed(client, items)?, layout),
            Vec::new(),
        ),
    })
}

/// JSON or YAML text of `value`.
fn render(
    client: &AdminClient,
    value: &serde_json::Value,
    yaml: bool,
) -> Result<String, ClientError> {
    if yaml {
        serde_saphyr::to_string(value).map_err(|e| client.protocol(e))
    } else {
        serde_json::to_string_pretty(value).map_err(|e| client.protocol(e))
    }
}

/// `mecha get KIND [NAME] [-n NS | -A] [-o table|wide|json|yaml] [-w]`.
pub async fn get(
    client: &AdminClient,
    kind: output::Kind,
    args: &crate::GetArgs,
) -> Result<ExitCode, ClientError> {
    use crate::OutputFormat;
    let select = |items: Vec<Item>| -> Vec<Item> {
        items
            .into_iter()
            .filter(|i| args.all_namespaces || i.namespace == args.namespace)
            .filter(|i| args.name.as_ref().is_none_or(|name| &i.name == name))
            .collect()
    };
    let items = select(list(client, kind).await?);
    if let Some(name) = &args.name
        && items.is_empty()
    {
        eprintln!("error: {} {}/{name} not found", kind.name(), args.namespace);
        return Ok(ExitCode::from(1));
    }
    let layout = output::Layout {
        all_namespaces: args.all_namespaces,
        wide: args.output == OutputFormat::Wide,
    };
    let structured = matches!(args.output, OutputFormat::Json | OutputFormat::Yaml);
    let yaml = args.output == OutputFormat::Yaml;
    // What was printed for each resource, so that `-w` prints only what changed.
    let mut printed: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    if structured {
        let value = if args.name.is_some() {
            items[0].value.clone()
        } else {
            serde_json::Value::Array(items.iter().map(|i| i.value.clone()).collect())
        };
        println!("{}", render(client, &value, yaml)?.trim_end());
        for item in &items {
            printed.insert(
                format!("{}/{}", item.namespace, item.name),
                item.value.to_string(),
            );
        }
    } else {
        let (table, notes) = table(client, kind, &items, layout)?;
        if table.rows.is_empty() && !args.watch {
            let scope = if args.all_namespaces {
                String::new()
            } else {
                format!(" in namespace {}", args.namespace)
            };
            println!("No {}{scope}.", kind.plural());
            return Ok(ExitCode::SUCCESS);
        }
        table.print();
        for note in notes {
            println!("{note}");
        }
        for (key, row) in &table.rows {
            printed.insert(key.clone(), row.join("\u{1f}"));
        }
    }
    if !args.watch {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let items = select(list(client, kind).await?);
        if structured {
            for item in &items {
                let key = format!("{}/{}", item.namespace, item.name);
                let text = item.value.to_string();
                if printed.get(&key) != Some(&text) {
                    let rendered = render(client, &item.value, yaml)?;
                    println!("{}{}", if yaml { "---\n" } else { "" }, rendered.trim_end());
                    printed.insert(key, text);
                }
            }
        } else {
            let (table, _) = table(client, kind, &items, layout)?;
            let widths = table.widths();
            for (key, row) in &table.rows {
                let text = row.join("\u{1f}");
                if printed.get(key) != Some(&text) {
                    println!("{}", output::Table::line(row, &widths));
                    printed.insert(key.clone(), text);
                }
            }
        }
    }
}

/// `mecha delete KIND NAME [-n NS]`.
pub async fn delete_one(
    client: &AdminClient,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<ExitCode, ClientError> {
    let Some(kind) = resource_kind(kind) else {
        eprintln!(
            "error: unknown kind {kind:?}: use service (ksvc, svc), broker, trigger, pingsource, githubsource, gitlabsource, redisstreamsource, natssource, mqttsource, containersource or sinkbinding"
        );
        return Ok(ExitCode::from(2));
    };
    let path = format!(
        "/api/v1/namespaces/{}/{kind}/{}",
        percent_query(namespace),
        percent_query(name)
    );
    let (status, bytes) = client.call_bytes(Method::DELETE, &path, None).await?;
    if !status.is_success() {
        eprintln!(
            "error: {status}: {}",
            String::from_utf8_lossy(&bytes).trim_end()
        );
        return Ok(ExitCode::from(1));
    }
    let outcomes: OutcomesResponse =
        serde_json::from_slice(&bytes).map_err(|e| client.protocol(e))?;
    let mut code = ExitCode::SUCCESS;
    for o in outcomes.results {
        if o.action == "not found" {
            eprintln!("error: {} {}/{} not found", o.kind, o.namespace, o.name);
            code = ExitCode::from(1);
        } else {
            println!(
                "{}/{}/{} {}",
                o.kind.to_lowercase(),
                o.namespace,
                o.name,
                o.action
            );
        }
    }
    Ok(code)
}

/// The kind as the admin API names it, from what a user typed: kn's short names, or any
/// kind Mecha loads, singular or plural, in any case.
fn resource_kind(word: &str) -> Option<&'static str> {
    let word = word.to_ascii_lowercase();
    if matches!(word.as_str(), "ksvc" | "svc" | "kservice") {
        return Some(crds::serving::KIND);
    }
    [
        crds::serving::KIND,
        crds::eventing::BROKER_KIND,
        crds::eventing::TRIGGER_KIND,
        crds::sources::PING_KIND,
        crds::sources::GITHUB_KIND,
        crds::sources::GITLAB_KIND,
        crds::queues::REDIS_KIND,
        crds::queues::NATS_KIND,
        crds::queues::MQTT_KIND,
        crds::bindings::CONTAINER_KIND,
        crds::bindings::BINDING_KIND,
        crds::apiserver::KIND,
    ]
    .into_iter()
    .find(|kind| {
        let kind = kind.to_ascii_lowercase();
        word == kind || word.strip_suffix('s') == Some(kind.as_str())
    })
}

/// `mecha version`: this client's version, and the server's when one answers.
pub async fn version(client: &AdminClient) -> Result<ExitCode, ClientError> {
    println!("Client: mecha {}", env!("CARGO_PKG_VERSION"));
    match client
        .get_json::<crate::api::VersionView>("/api/v1/version")
        .await
    {
        Ok(server) => println!("Server: mecha {} at {}", server.version, client.addr),
        Err(error) => println!("Server: not reachable ({error})"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `mecha describe KIND NAME`.
pub async fn describe(
    client: &AdminClient,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<ExitCode, ClientError> {
    let Some(kind) = output::Kind::parse(kind) else {
        eprintln!(
            "error: unknown kind {kind:?}: use service (ksvc, svc), revision (rev), broker, trigger or source"
        );
        return Ok(ExitCode::from(2));
    };
    let item = list(client, kind)
        .await?
        .into_iter()
        .find(|i| i.namespace == namespace && i.name == name);
    let Some(item) = item else {
        eprintln!("error: {} {namespace}/{name} not found", kind.name());
        return Ok(ExitCode::from(1));
    };
    let service = match kind {
        output::Kind::Service => Some(name.to_string()),
        output::Kind::Revision => item.value["service"].as_str().map(String::from),
        _ => None,
    };
    let events = match &service {
        Some(service) => {
            let path = format!(
                "/api/v1/namespaces/{}/services/{}/events",
                percent_query(namespace),
                percent_query(service)
            );
            let mut events: Vec<crate::api::EventView> = client.get_json(&path).await?;
            if kind == output::Kind::Revision {
                events.retain(|e| e.revision == name);
            }
            events
        }
        None => Vec::new(),
    };
    print!("{}", output::describe(kind, &item.value, &events));
    Ok(ExitCode::SUCCESS)
}

/// One event for `mecha send`.
#[derive(Debug)]
pub struct SendRequest {
    pub broker: String,
    pub kind: String,
    pub source: String,
    pub id: Option<String>,
    pub data: Option<String>,
    pub extensions: Vec<String>,
}

/// `mecha send`: posts one event in binary mode to the broker's ingress and prints the answer.
pub async fn send_event(client: &AdminClient, send: SendRequest) -> Result<ExitCode, ClientError> {
    let usage = |message: String| {
        eprintln!("error: {message}");
        Ok(ExitCode::from(2))
    };
    let Some((namespace, name)) = send.broker.split_once('/') else {
        return usage(format!(
            "--broker {:?}: use NAMESPACE/NAME, e.g. default/default",
            send.broker
        ));
    };
    let mut headers = vec![
        ("ce-specversion".to_string(), "1.0".to_string()),
        ("ce-type".to_string(), send.kind.clone()),
        ("ce-source".to_string(), send.source.clone()),
    ];
    let id = send.id.clone().unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{nanos:x}-{:08x}", fastrand::u32(..))
    });
    headers.push(("ce-id".into(), id.clone()));
    for extension in &send.extensions {
        let Some((key, value)) = extension.split_once('=') else {
            return usage(format!("--extension {extension:?}: use NAME=VALUE"));
        };
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return usage(format!(
                "--extension {extension:?}: extension names are lower-case letters and digits"
            ));
        }
        headers.push((
            format!("ce-{key}"),
            eventing_broker::event::percent_encode(value),
        ));
    }
    let body = match send.data.as_deref() {
        None => Vec::new(),
        Some(data) => {
            let (text, from) = match data.strip_prefix('@') {
                Some(path) => match std::fs::read(path) {
                    Ok(bytes) => (bytes, format!("file {path}")),
                    Err(error) => return usage(format!("--data @{path}: cannot read: {error}")),
                },
                None => (data.as_bytes().to_vec(), "--data".to_string()),
            };
            if let Err(error) = serde_json::from_slice::<serde_json::Value>(&text) {
                return usage(format!("{from} is not valid JSON: {error}"));
            }
            headers.push(("content-type".into(), "application/json".into()));
            text
        }
    };
    let brokers: Vec<BrokerView> = client.get_json("/api/v1/brokers").await?;
    let Some(broker) = brokers
        .iter()
        .find(|b| b.namespace == namespace && b.name == name)
    else {
        eprintln!("error: broker {namespace}/{name} not found (see `mecha get brokers`)");
        return Ok(ExitCode::from(1));
    };
    // The address names localhost; connect to the loopback address it stands for.
    let target = broker.address.replacen("://localhost", "://127.0.0.1", 1);
    let mut request = Request::builder().method(Method::POST).uri(&target);
    for (k, v) in &headers {
        request = request.header(k.as_str(), v.as_str());
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| client.protocol(e))?;
    let response = tokio::time::timeout(client.timeout, client.http.request(request))
        .await
        .map_err(|_| client.timed_out(&target, "waiting for the broker's answer"))?
        .map_err(|source| ClientError::Unreachable {
            addr: target.clone(),
            source,
        })?;
    let status = response.status();
    let text = client.collect(response.into_body()).await?;
    if status.is_success() {
        println!("{status}: event {id} accepted by broker {namespace}/{name}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "{status}: broker {namespace}/{name} refused event {id}: {}",
            String::from_utf8_lossy(&text).trim()
        );
        Ok(ExitCode::from(1))
    }
}

/// How `mecha apply` waits for the revisions it created.
#[derive(Debug, Clone, Copy)]
pub struct Wait {
    /// `false` with `--no-wait`.
    pub enabled: bool,
    pub timeout: std::time::Duration,
}

/// `mecha apply -f` and `mecha delete -f`: the files are validated here first (so errors name
/// them as the user wrote them), then sent with absolute paths. An apply then waits until
/// every new revision is ready or has failed.
pub async fn send_files(
    client: &AdminClient,
    paths: &[PathBuf],
    delete: bool,
    wait: Wait,
) -> Result<ExitCode, ClientError> {
    if let Err(errors) = crds::load_paths(paths, crds::Mode::Local) {
        return Ok(output::refuse(&errors));
    }
    let mut files = Vec::new();
    for path in crds::load::yaml_files(paths).0 {
        let content = match std::fs::read_to_string(&path) {
            Ok(content) => content,
            Err(error) => {
                eprintln!("error: {}: cannot read: {error}", path.display());
                return Ok(ExitCode::from(2));
            }
        };
        let absolute = std::path::absolute(&path).unwrap_or(path);
        files.push(FileContent {
            path: absolute.to_string_lossy().into_owned(),
            content,
        });
    }
    let body = serde_json::to_vec(&FilesRequest { files }).map_err(|e| client.protocol(e))?;
    let path = if delete {
        "/api/v1/delete"
    } else {
        "/api/v1/apply"
    };
    let (status, bytes) = client.call_bytes(Method::POST, path, Some(body)).await?;
    if status.is_success() {
        let outcomes: OutcomesResponse =
            serde_json::from_slice(&bytes).map_err(|e| client.protocol(e))?;
        // Every Service the files hold: its new revision, or (unchanged or only its traffic
        // changed) whatever keeps it from being Ready.
        let services: Vec<(String, String, Option<String>)> = outcomes
            .results
            .iter()
            .filter(|o| o.kind == "Service")
            .map(|o| (o.namespace.clone(), o.name.clone(), o.revision.clone()))
            .collect();
        for o in outcomes.results {
            let revision = o
                .revision
                .map(|r| format!(" (revision {r})"))
                .unwrap_or_default();
            println!(
                "{}/{}/{} {}{revision}",
                o.kind.to_lowercase(),
                o.namespace,
                o.name,
                o.action
            );
        }
        if delete || !wait.enabled || services.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        return wait_ready(client, services, wait.timeout).await;
    }
    match serde_json::from_slice::<ErrorsResponse>(&bytes) {
        Ok(errors) => output::print_errors(errors.errors),
        Err(_) => eprintln!("error: {status}: {}", String::from_utf8_lossy(&bytes)),
    }
    Ok(ExitCode::from(2))
}

/// Lines of a failed revision's output shown when a wait ends.
const FAILURE_TAIL: usize = 10;
/// How often a wait with nothing new to say prints that it is still waiting.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The revision a Service that is not Ready waits on: a failing one its traffic or its latest
/// revision names, else its latest; `None` when the Service is Ready (or has no revision).
fn holding_back(service: &crate::api::ServiceView) -> Option<String> {
    let ready = service
        .conditions
        .iter()
        .any(|c| c.kind == "Ready" && c.is_true());
    if ready {
        return None;
    }
    let named = |revision: &&crate::api::RevisionView| {
        service.latest_revision.as_ref() == Some(&revision.name)
            || service.traffic.iter().any(|t| t.revision == revision.name)
    };
    service
        .revisions
        .iter()
        .filter(named)
        .find(|r| r.reason.is_some())
        .map(|r| r.name.clone())
        .or_else(|| service.latest_revision.clone())
}

/// Waits until each `(namespace, service, revision)` is ready (printing its URL), has failed
/// (printing the reason and the end of its output), or `timeout` passes; a Service given
/// without a revision (applied unchanged) is waited on only while it is not Ready, through
/// the revision that holds it back. Progress is printed when it changes and every few
/// seconds.
async fn wait_ready(
    client: &AdminClient,
    mut pending: Vec<(String, String, Option<String>)>,
    timeout: std::time::Duration,
) -> Result<ExitCode, ClientError> {
    use crate::api::ServiceView;
    let started = tokio::time::Instant::now();
    let mut last_progress: std::collections::HashMap<String, (String, tokio::time::Instant)> =
        std::collections::HashMap::new();
    let mut failed = false;
    loop {
        let services: Vec<ServiceView> = client.get_json("/api/v1/services").await?;
        let mut still = Vec::new();
        for (namespace, name, wanted) in pending {
            let service = services
                .iter()
                .find(|s| s.namespace == namespace && s.name == name);
            let revision = match (&wanted, service) {
                (Some(revision), _) => revision.clone(),
                (None, Some(service)) => match holding_back(service) {
                    Some(revision) => revision,
                    None => {
                        // Ready: said only when it was waited on.
                        if last_progress
                            .keys()
                            .any(|k| k.starts_with(&format!("{namespace}/{name}/")))
                        {
                            println!("Service {namespace}/{name}: ready");
                            println!("  {}", service.url);
                        }
                        continue;
                    }
                },
                (None, None) => String::new(),
            };
            let view = service.and_then(|s| s.revisions.iter().find(|r| r.name == revision));
            let (Some(service), Some(view)) = (service, view) else {
                eprintln!(
                    "error: Service {namespace}/{name} was deleted while waiting for it to be ready"
                );
                failed = true;
                continue;
            };
            let seconds = started.elapsed().as_secs_f64();
            // Ready, and serving its share: the gateway routes to it (kn's "Ready" includes
            // the route; a revision no traffic entry names is done when ready).
            let serving = view.traffic == 0 && view.tags.is_empty() || view.routed;
            if view.ready && serving || view.waiting_for_request {
                let note = if view.ready {
                    format!("ready after {seconds:.1}s")
                } else {
                    "created; it starts on the first request (initial-scale 0)".into()
                };
                println!("Service {namespace}/{name}: revision {revision} {note}");
                println!("  {}", service.url);
                continue;
            }
            if let Some(reason) = &view.reason {
                eprintln!(
                    "error: Service {namespace}/{name}: revision {revision} failed: {reason}"
                );
                print_tail(client, &namespace, &name, &revision).await?;
                failed = true;
                continue;
            }
            if started.elapsed() >= timeout {
                let why = if view.replicas.iter().any(|r| r.pid.is_some()) {
                    "its replicas run but their readiness probe has not passed"
                } else {
                    "no replica has started"
                };
                eprintln!(
                    "error: Service {namespace}/{name}: revision {revision} not ready after {}s (--timeout): {why}",
                    timeout.as_secs()
                );
                print_tail(client, &namespace, &name, &revision).await?;
                failed = true;
                continue;
            }
            let ready = view
                .replicas
                .iter()
                .filter(|r| r.ready && !r.stopping)
                .count();
            let restarts: u32 = view.replicas.iter().map(|r| r.restarts).sum();
            let progress = format!(
                "{ready}/{} replicas ready{}",
                view.desired.max(1),
                if restarts > 0 {
                    format!(", {restarts} restarts")
                } else {
                    String::new()
                }
            );
            let now = tokio::time::Instant::now();
            let key = format!("{namespace}/{name}/{revision}");
            let say = match last_progress.get(&key) {
                Some((said, at)) => *said != progress || now - *at >= PROGRESS_EVERY,
                None => true,
            };
            if say {
                eprintln!(
                    "waiting for Service {namespace}/{name} revision {revision}: {progress} ({seconds:.0}s)"
                );
                last_progress.insert(key, (progress, now));
            }
            still.push((namespace, name, wanted));
        }
        pending = still;
        if pending.is_empty() {
            return Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The last lines a revision's replicas wrote, after a failed wait.
async fn print_tail(
    client: &AdminClient,
    namespace: &str,
    name: &str,
    revision: &str,
) -> Result<(), ClientError> {
    let path = format!(
        "/api/v1/namespaces/{}/services/{}/logs?tail={FAILURE_TAIL}&revision={}",
        percent_query(namespace),
        percent_query(name),
        percent_query(revision)
    );
    let (status, bytes) = client.call_bytes(Method::GET, &path, None).await?;
    let text = String::from_utf8_lossy(&bytes);
    if status.is_success() && !text.trim().is_empty() {
        eprintln!("its last output:");
        for line in text.lines() {
            eprintln!("  {line}");
        }
    }
    Ok(())
}

/// What `mecha logs` prints.
#[derive(Debug, Default)]
pub struct LogsOptions {
    pub follow: bool,
    pub tail: Option<usize>,
    pub since: Option<std::time::Duration>,
    pub timestamps: bool,
    pub revision: Option<String>,
}

/// `mecha logs SERVICE [-f]`: prints the service's recent output, and with `follow` keeps
/// printing until `mecha up` stops or the user interrupts.
pub async fn logs(
    client: &AdminClient,
    namespace: &str,
    name: &str,
    options: &LogsOptions,
) -> Result<ExitCode, ClientError> {
    let mut path = format!(
        "/api/v1/namespaces/{}/services/{}/logs?follow={}&timestamps={}",
        percent_query(namespace),
        percent_query(name),
        options.follow,
        options.timestamps
    );
    if let Some(tail) = options.tail {
        path.push_str(&format!("&tail={tail}"));
    }
    if let Some(since) = options.since {
        path.push_str(&format!("&since_ms={}", since.as_millis()));
    }
    if let Some(revision) = &options.revision {
        path.push_str(&format!("&revision={}", percent_query(revision)));
    }
    // Only the start of the answer is timed: with --follow it lasts as long as the user wants.
    let (status, mut body) = client.call(Method::GET, &path, None).await?;
    if !status.is_success() {
        let bytes = client.collect(body).await?;
        eprintln!("error: {}", String::from_utf8_lossy(&bytes).trim_end());
        return Ok(ExitCode::from(1));
    }
    use std::io::Write;
    // Without --follow the answer is whole, and timed like any other.
    let deadline = (!options.follow).then(|| tokio::time::Instant::now() + client.timeout);
    loop {
        let next = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, body.frame())
                .await
                .map_err(|_| client.timed_out(&client.addr, "reading the answer"))?,
            None => body.frame().await,
        };
        let Some(frame) = next else { break };
        let frame = frame.map_err(|e| client.protocol(e))?;
        if let Some(data) = frame.data_ref() {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(data);
            let _ = out.flush();
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A query-string value: everything but unreserved characters percent-encoded.
fn percent_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
