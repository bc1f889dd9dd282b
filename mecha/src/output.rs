//! What the CLI prints.

use std::process::ExitCode;

use crds::LoadError;

use crate::api::{
    BrokerView, ConditionView, EventView, RevisionView, ServiceView, SourceView, TriggerView,
};

/// Prints every load error and returns the exit code for refused input.
pub fn refuse(errors: &[LoadError]) -> ExitCode {
    print_errors(errors.iter().map(ToString::to_string));
    ExitCode::from(2)
}

pub fn print_errors(errors: impl IntoIterator<Item = String>) {
    let mut count = 0;
    for error in errors {
        eprintln!("error: {error}");
        count += 1;
    }
    eprintln!(
        "{count} error{}; nothing was changed",
        if count == 1 { "" } else { "s" }
    );
}

/// The kinds `mecha get` and `describe` know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Service,
    Revision,
    Broker,
    Trigger,
    Source,
}

impl Kind {
    /// The kind a user typed, kubectl- and kn-style: singular, plural or short name.
    pub fn parse(word: &str) -> Option<Self> {
        Some(match word.to_ascii_lowercase().as_str() {
            "service" | "services" | "ksvc" | "svc" | "kservice" => Kind::Service,
            "revision" | "revisions" | "rev" => Kind::Revision,
            "broker" | "brokers" => Kind::Broker,
            "trigger" | "triggers" => Kind::Trigger,
            "source" | "sources" => Kind::Source,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Revision => "Revision",
            Kind::Broker => "Broker",
            Kind::Trigger => "Trigger",
            Kind::Source => "Source",
        }
    }

    /// What `get` prints when nothing matches.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::Revision => "revisions",
            Kind::Broker => "brokers",
            Kind::Trigger => "triggers",
            Kind::Source => "sources",
        }
    }
}

/// A table: a header and rows, each row keyed by namespace and name (for `-w`, which prints
/// a row again when it changes).
#[derive(Debug, Default)]
pub struct Table {
    pub header: Vec<&'static str>,
    pub rows: Vec<(String, Vec<String>)>,
}

/// How a table is laid out: with a NAMESPACE column (`-A`), and with the wide columns.
#[derive(Debug, Clone, Copy, Default)]
pub struct Layout {
    pub all_namespaces: bool,
    pub wide: bool,
}

impl Table {
    fn new(layout: Layout, header: &[&'static str], wide: &[&'static str]) -> Self {
        let mut columns = Vec::new();
        if layout.all_namespaces {
            columns.push("NAMESPACE");
        }
        columns.extend_from_slice(header);
        if layout.wide {
            columns.extend_from_slice(wide);
        }
        Self {
            header: columns,
            rows: Vec::new(),
        }
    }

    fn push(&mut self, layout: Layout, namespace: &str, cells: Vec<String>, wide: Vec<String>) {
        let key = format!("{namespace}/{}", cells.first().map_or("", String::as_str));
        let mut row = Vec::new();
        if layout.all_namespaces {
            row.push(namespace.to_string());
        }
        row.extend(cells);
        if layout.wide {
            row.extend(wide);
        }
        self.rows.push((key, row));
    }

    /// Column widths over the header and `rows`.
    pub fn widths(&self) -> Vec<usize> {
        (0..self.header.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|(_, r)| r.get(i).map_or(0, String::len))
                    .chain([self.header[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// One line, left-aligned columns two spaces apart, as kubectl prints them.
    pub fn line(cells: &[String], widths: &[usize]) -> String {
        let mut out = String::new();
        for (cell, width) in cells.iter().zip(widths) {
            out.push_str(&format!("{cell:<width$}  "));
        }
        out.trim_end().to_string()
    }

    pub fn print(&self) {
        let widths = self.widths();
        println!(
            "{}",
            Self::line(
                &self
                    .header
                    .iter()
                    .map(|h| h.to_string())
                    .collect::<Vec<_>>(),
                &widths
            )
        );
        for (_, row) in &self.rows {
            println!("{}", Self::line(row, &widths));
        }
    }
}

/// How long ago an RFC 3339 time was, as kubectl's AGE: `45s`, `12m`, `3h`, `2d`.
pub fn age(created: Option<&str>) -> String {
    let Some(created) = created.and_then(|c| c.parse::<jiff::Timestamp>().ok()) else {
        return "-".into();
    };
    let seconds = (jiff::Timestamp::now().as_second() - created.as_second()).max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// kn's CONDITIONS column: how many are True out of how many.
fn conditions(conditions: &[ConditionView]) -> String {
    let ok = conditions.iter().filter(|c| c.is_true()).count();
    format!("{ok} OK / {}", conditions.len())
}

/// The `Ready` condition's status, and the reason of the first condition that is not True.
fn ready_and_reason(conditions: &[ConditionView]) -> (String, String) {
    let ready = conditions
        .iter()
        .find(|c| c.kind == "Ready")
        .map_or_else(|| "Unknown".to_string(), |c| c.status.clone());
    let reason = conditions
        .iter()
        .find(|c| !c.is_true())
        .and_then(|c| c.reason.clone())
        .unwrap_or_default();
    (ready, reason)
}

fn yes(value: bool) -> String {
    if value { "True" } else { "False" }.to_string()
}

pub fn services_table(services: &[ServiceView], layout: Layout) -> Table {
    let mut table = Table::new(
        layout,
        &[
            "NAME",
            "URL",
            "LATEST",
            "AGE",
            "CONDITIONS",
            "READY",
            "REPLICAS",
            "REASON",
        ],
        &["MODE", "TRAFFIC"],
    );
    for s in services {
        let (ready, reason) = ready_and_reason(&s.conditions);
        let traffic = s
            .traffic
            .iter()
            .filter(|t| t.percent > 0)
            .map(|t| format!("{}={}%", t.revision, t.percent))
            .collect::<Vec<_>>()
            .join(",");
        table.push(
            layout,
            &s.namespace,
            vec![
                s.name.clone(),
                s.url.clone(),
                s.latest_revision.clone().unwrap_or_else(|| "-".into()),
                age(s.created.as_deref()),
                conditions(&s.conditions),
                ready,
                format!("{}/{}", s.ready, s.desired),
                reason,
            ],
            vec![
                if s.panicking { "panic" } else { "stable" }.to_string(),
                traffic,
            ],
        );
    }
    table
}

/// `revisions`: (namespace, service, revision).
pub fn revisions_table(revisions: &[(String, String, RevisionView)], layout: Layout) -> Table {
    let mut table = Table::new(
        layout,
        &[
            "NAME",
            "SERVICE",
            "TRAFFIC",
            "TAGS",
            "GENERATION",
            "AGE",
            "CONDITIONS",
            "READY",
            "REPLICAS",
            "REASON",
        ],
        &["PIDS", "RESTARTS"],
    );
    {
        for (namespace, service, r) in revisions {
            let (ready, reason) = ready_and_reason(&r.conditions);
            let running = r.replicas.iter().filter(|x| x.ready && !x.stopping).count();
            table.push(
                layout,
                namespace,
                vec![
                    r.name.clone(),
                    service.clone(),
                    if r.traffic > 0 {
                        format!("{}%", r.traffic)
                    } else {
                        String::new()
                    },
                    r.tags.join(","),
                    r.generation.to_string(),
                    age(r.created.as_deref()),
                    conditions(&r.conditions),
                    ready,
                    format!("{running}/{}", r.desired),
                    reason,
                ],
                vec![
                    r.replicas
                        .iter()
                        .filter_map(|x| x.pid.map(|p| p.to_string()))
                        .collect::<Vec<_>>()
                        .join(","),
                    r.replicas
                        .iter()
                        .map(|x| x.restarts)
                        .sum::<u32>()
                        .to_string(),
                ],
            );
        }
    }
    table
}

pub fn brokers_table(brokers: &[BrokerView], layout: Layout) -> Table {
    let mut table = Table::new(
        layout,
        &["NAME", "ADDRESS", "READY", "TRIGGERS", "WAITING"],
        &[],
    );
    for b in brokers {
        table.push(
            layout,
            &b.namespace,
            vec![
                b.name.clone(),
                b.address.clone(),
                yes(b.ready),
                b.triggers.to_string(),
                b.waiting_events.to_string(),
            ],
            vec![],
        );
    }
    table
}

pub fn triggers_table(triggers: &[TriggerView], layout: Layout) -> Table {
    let mut table = Table::new(
        layout,
        &["NAME", "BROKER", "SUBSCRIBER_URI", "READY", "REASON"],
        &[],
    );
    for t in triggers {
        table.push(
            layout,
            &t.namespace,
            vec![
                t.name.clone(),
                t.broker.clone(),
                t.subscriber_uri.clone().unwrap_or_else(|| "-".into()),
                yes(t.ready),
                t.reason.clone().unwrap_or_default(),
            ],
            vec![],
        );
    }
    table
}

pub fn sources_table(sources: &[SourceView], layout: Layout) -> Table {
    let mut table = Table::new(
        layout,
        &[
            "NAME", "KIND", "SINK_URI", "READY", "SENT", "FAILED", "REASON",
        ],
        &["URL"],
    );
    for s in sources {
        table.push(
            layout,
            &s.namespace,
            vec![
                s.name.clone(),
                s.kind.clone(),
                s.sink_uri.clone().unwrap_or_else(|| "-".into()),
                yes(s.ready),
                s.sent.to_string(),
                s.failed.to_string(),
                s.reason.clone().unwrap_or_default(),
            ],
            vec![s.url.clone().unwrap_or_else(|| "-".into())],
        );
    }
    table
}

/// What `mecha up` prints at start: every namespace.
pub fn print_services(services: &[ServiceView]) {
    print_all(services_table(services, ALL), "services");
    for note in service_notes(services) {
        println!("{note}");
    }
}

/// Lines printed under the services table: tags, and replica counts not applied.
pub fn service_notes(services: &[ServiceView]) -> Vec<String> {
    let mut notes = Vec::new();
    for service in services {
        for tagged in service.traffic.iter().filter(|t| t.tag.is_some()) {
            notes.push(format!(
                "  tag {} of {} -> {} at {}",
                tagged.tag.as_deref().unwrap_or(""),
                service.name,
                tagged.revision,
                tagged.url.as_deref().unwrap_or("")
            ));
        }
        for revision in &service.revisions {
            if let Some(error) = revision
                .autoscaler
                .as_ref()
                .and_then(|a| a.actuation_error.as_deref())
            {
                notes.push(format!(
                    "  revision {}: replica count not applied ({error}); retrying",
                    revision.name
                ));
            }
        }
    }
    notes
}

const ALL: Layout = Layout {
    all_namespaces: true,
    wide: false,
};

fn print_all(table: Table, plural: &str) {
    if table.rows.is_empty() {
        println!("No {plural}.");
    } else {
        table.print();
    }
}

pub fn print_brokers(brokers: &[BrokerView]) {
    print_all(brokers_table(brokers, ALL), "brokers");
}

pub fn print_triggers(triggers: &[TriggerView]) {
    print_all(triggers_table(triggers, ALL), "triggers");
}

pub fn print_sources(sources: &[SourceView]) {
    print_all(sources_table(sources, ALL), "sources");
}

/// `mecha describe`: one resource in detail, kn-style.
pub fn describe(kind: Kind, value: &serde_json::Value, events: &[EventView]) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    match kind {
        Kind::Service => match serde_json::from_value::<ServiceView>(value.clone()) {
            Ok(s) => {
                line(format!("Name:       {}", s.name));
                line(format!("Namespace:  {}", s.namespace));
                line(format!("URL:        {}", s.url));
                line(format!("Age:        {}", age(s.created.as_deref())));
                line(format!(
                    "Latest:     {} (latest ready: {})",
                    s.latest_revision.as_deref().unwrap_or("-"),
                    s.latest_ready_revision.as_deref().unwrap_or("-")
                ));
                line(format!(
                    "Replicas:   {} ready of {} desired",
                    s.ready, s.desired
                ));
                line(String::new());
                line("Traffic:".into());
                for t in &s.traffic {
                    let mut text = format!("  {:>3}%  {}", t.percent, t.revision);
                    if t.latest_revision {
                        text.push_str(" (latest)");
                    }
                    if let Some(tag) = &t.tag {
                        text.push_str(&format!(" #{tag} {}", t.url.as_deref().unwrap_or("")));
                    }
                    line(text);
                }
                line(String::new());
                line("Revisions:".into());
                for r in &s.revisions {
                    line(revision_summary(r));
                    for replica_line in replica_lines(r) {
                        line(replica_line);
                    }
                }
                line(String::new());
                for text in condition_lines(&s.conditions) {
                    line(text);
                }
            }
            Err(error) => line(format!("(cannot read the service: {error})")),
        },
        Kind::Revision => match serde_json::from_value::<RevisionView>(value.clone()) {
            Ok(r) => {
                line(format!("Name:       {}", r.name));
                line(format!(
                    "Namespace:  {}",
                    value["namespace"].as_str().unwrap_or_default()
                ));
                line(format!(
                    "Service:    {}",
                    value["service"].as_str().unwrap_or_default()
                ));
                line(format!("Generation: {}", r.generation));
                line(format!("Age:        {}", age(r.created.as_deref())));
                line(format!("Traffic:    {}%", r.traffic));
                if !r.tags.is_empty() {
                    line(format!("Tags:       {}", r.tags.join(", ")));
                }
                if let Some(scaling) = &r.autoscaler {
                    line(format!(
                        "Autoscaler: {}",
                        serde_json::to_string(scaling).unwrap_or_default()
                    ));
                }
                line(String::new());
                for replica_line in replica_lines(&r) {
                    line(replica_line);
                }
                line(String::new());
                for text in condition_lines(&r.conditions) {
                    line(text);
                }
            }
            Err(error) => line(format!("(cannot read the revision: {error})")),
        },
        // Brokers, triggers and sources: every field of their view.
        _ => {
            if let Some(fields) = value.as_object() {
                for (key, field) in fields {
                    let text = match field {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    line(format!("{:<16}{text}", format!("{key}:")));
                }
            }
        }
    }
    if matches!(kind, Kind::Service | Kind::Revision) {
        line(String::new());
        line("Events:".into());
        if events.is_empty() {
            line("  (none)".into());
        }
        for event in events {
            line(format!(
                "  {}  {}",
                event.at.as_deref().unwrap_or("-"),
                event.message
            ));
        }
    }
    out
}

fn revision_summary(r: &RevisionView) -> String {
    let (ready, reason) = ready_and_reason(&r.conditions);
    let mut text = format!(
        "  {}  generation {}  age {}  ready {ready}  traffic {}%",
        r.name,
        r.generation,
        age(r.created.as_deref()),
        r.traffic
    );
    if !reason.is_empty() {
        text.push_str(&format!("  ({reason})"));
    }
    text
}

fn replica_lines(r: &RevisionView) -> Vec<String> {
    let mut lines = vec![format!(
        "    replicas: {} desired, {} running",
        r.desired,
        r.replicas.len()
    )];
    for x in &r.replicas {
        let mut text = format!(
            "      {}  pid {}  {}  {}  restarts {}",
            x.name,
            x.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            x.addr.map_or_else(|| "-".into(), |a| a.to_string()),
            if x.stopping {
                "stopping"
            } else if x.ready {
                "ready"
            } else {
                "not ready"
            },
            x.restarts
        );
        if let Some(exit) = &x.last_exit {
            text.push_str(&format!("  last exit: {exit}"));
        }
        lines.push(text);
    }
    lines
}

fn condition_lines(conditions: &[ConditionView]) -> Vec<String> {
    let mut lines = vec!["Conditions:".to_string()];
    for c in conditions {
        let mark = match c.status.as_str() {
            "True" => "++",
            "False" => "!!",
            _ => "??",
        };
        let mut text = format!("  {mark} {:<20}", c.kind);
        if let Some(reason) = &c.reason {
            text.push_str(&format!(" {reason}"));
        }
        if let Some(message) = &c.message {
            text.push_str(&format!(": {message}"));
        }
        lines.push(text.trim_end().to_string());
    }
    lines
}
