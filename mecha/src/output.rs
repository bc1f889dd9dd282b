//! What the CLI prints.

use std::process::ExitCode;

use crds::LoadError;

use crate::api::{BrokerView, ServiceView, SourceView, TriggerView};

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

/// The `mecha get services` table.
pub fn print_services(services: &[ServiceView]) {
    if services.is_empty() {
        println!("No services.");
        return;
    }
    let rows: Vec<[String; 6]> = services
        .iter()
        .map(|s| {
            let traffic = s
                .traffic
                .iter()
                .filter(|t| t.percent > 0)
                .map(|t| format!("{}={}%", t.revision, t.percent))
                .collect::<Vec<_>>()
                .join(",");
            [
                format!("{}/{}", s.namespace, s.name),
                s.url.clone(),
                s.latest_revision.clone().unwrap_or_else(|| "-".into()),
                format!("{}/{}", s.ready, s.desired),
                if s.panicking { "panic" } else { "stable" }.to_string(),
                traffic,
            ]
        })
        .collect();
    print_table(
        &["SERVICE", "URL", "LATEST", "READY", "MODE", "TRAFFIC"],
        &rows,
    );
    for service in services {
        for tagged in service.traffic.iter().filter(|t| t.tag.is_some()) {
            println!(
                "  tag {} of {} -> {} at {}",
                tagged.tag.as_deref().unwrap_or(""),
                service.name,
                tagged.revision,
                tagged.url.as_deref().unwrap_or("")
            );
        }
        for revision in &service.revisions {
            if let Some(error) = revision
                .autoscaler
                .as_ref()
                .and_then(|a| a.actuation_error.as_deref())
            {
                println!(
                    "  revision {}: replica count not applied ({error}); retrying",
                    revision.name
                );
            }
        }
    }
}

/// Left-aligned columns, two spaces apart, as kubectl prints them.
fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let widths: Vec<usize> = (0..N)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (cell, width) in cells.iter().zip(&widths) {
            out.push_str(&format!("{cell:<width$}  "));
        }
        println!("{}", out.trim_end());
    };
    line(&header.map(String::from));
    for row in rows {
        line(row);
    }
}

pub fn print_brokers(brokers: &[BrokerView]) {
    if brokers.is_empty() {
        println!("No brokers.");
        return;
    }
    let rows: Vec<[String; 5]> = brokers
        .iter()
        .map(|b| {
            [
                format!("{}/{}", b.namespace, b.name),
                b.address.clone(),
                if b.ready { "True" } else { "False" }.to_string(),
                b.triggers.to_string(),
                b.waiting_events.to_string(),
            ]
        })
        .collect();
    print_table(
        &["BROKER", "ADDRESS", "READY", "TRIGGERS", "WAITING"],
        &rows,
    );
}

pub fn print_sources(sources: &[SourceView]) {
    if sources.is_empty() {
        println!("No sources.");
        return;
    }
    let rows: Vec<[String; 8]> = sources
        .iter()
        .map(|s| {
            [
                format!("{}/{}", s.namespace, s.name),
                s.kind.clone(),
                s.url.clone().unwrap_or_else(|| "-".into()),
                s.sink_uri.clone().unwrap_or_else(|| "-".into()),
                if s.ready { "True" } else { "False" }.to_string(),
                s.sent.to_string(),
                s.failed.to_string(),
                s.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &[
            "SOURCE", "KIND", "URL", "SINK_URI", "READY", "SENT", "FAILED", "REASON",
        ],
        &rows,
    );
}

pub fn print_triggers(triggers: &[TriggerView]) {
    if triggers.is_empty() {
        println!("No triggers.");
        return;
    }
    let rows: Vec<[String; 5]> = triggers
        .iter()
        .map(|t| {
            [
                format!("{}/{}", t.namespace, t.name),
                t.broker.clone(),
                t.subscriber_uri.clone().unwrap_or_else(|| "-".into()),
                if t.ready { "True" } else { "False" }.to_string(),
                t.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &["TRIGGER", "BROKER", "SUBSCRIBER_URI", "READY", "REASON"],
        &rows,
    );
}
