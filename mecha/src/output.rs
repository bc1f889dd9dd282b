//! What the CLI prints.

use std::process::ExitCode;

use crds::LoadError;

use crate::api::ServiceView;

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
                .filter(|t| t.tag.is_none())
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
    let header = ["SERVICE", "URL", "LATEST", "READY", "MODE", "TRAFFIC"];
    let widths: Vec<usize> = (0..header.len())
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
    for row in &rows {
        line(row);
    }
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
    }
}
