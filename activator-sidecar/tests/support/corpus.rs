//! The request corpus in `activator-sidecar/tests/corpus/`, shared by the differential tests and
//! the end-to-end hostile tests of this crate and of `mecha` (which includes this file by path).
//!
//! A case file is the message, one line of the file per line of the message; the file's own
//! line breaks are not part of it, so every `\r\n` is written out (escapes: `\r`, `\n`, `\t`,
//! `\0`, `\\`, `\"`, `\xNN`). Leading `# ` lines are notes; `# expect: 200 400` lists the
//! statuses the client must get, in order.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub bytes: Vec<u8>,
    /// The statuses the client must get, in order (`# expect:`).
    pub expect: Option<Vec<u16>>,
}

/// The corpus directory, from this crate or from another crate of the workspace.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../activator-sidecar/tests/corpus")
}

/// Every case, sorted by name.
pub fn corpus() -> Vec<Case> {
    let mut cases: Vec<Case> = std::fs::read_dir(corpus_dir())
        .expect("the corpus")
        .map(|entry| entry.expect("an entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "http"))
        .map(|path| load(&path))
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

/// The cases whose names start with one of `prefixes`, sorted by name.
pub fn cases_starting_with(prefixes: &[&str]) -> Vec<Case> {
    corpus()
        .into_iter()
        .filter(|case| prefixes.iter().any(|p| case.name.starts_with(p)))
        .collect()
}

/// The case `name` (without `.http`).
pub fn case(name: &str) -> Case {
    load(&corpus_dir().join(format!("{name}.http")))
}

pub fn load(path: &Path) -> Case {
    let text = std::fs::read_to_string(path).expect("read a case");
    let mut expect = None;
    let mut message = String::new();
    let mut notes = true;
    for line in text.lines() {
        if notes && line.starts_with('#') {
            if let Some(list) = line.strip_prefix("# expect:") {
                expect = Some(
                    list.split_whitespace()
                        .map(|s| s.parse().expect("a status"))
                        .collect(),
                );
            }
            continue;
        }
        notes = false;
        message.push_str(line);
    }
    Case {
        name: path
            .file_stem()
            .expect("a name")
            .to_string_lossy()
            .into_owned(),
        bytes: unescape(&message),
        expect,
    }
}

pub fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.bytes();
    while let Some(b) = chars.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match chars.next().expect("an escape") {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'0' => out.push(0),
            b'x' => {
                let hex = [chars.next().expect("hex"), chars.next().expect("hex")];
                let hex = std::str::from_utf8(&hex).expect("hex");
                out.push(u8::from_str_radix(hex, 16).expect("hex"));
            }
            other => out.push(other),
        }
    }
    out
}

impl Case {
    /// The message with every `Host: echo` line (the corpus's service, in every head of a
    /// pipelined case) naming `host` instead. Requests smuggled inside bodies name other
    /// hosts (`Host: x`), so no body changes length.
    pub fn with_host(&self, host: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes.len());
        let mut rest = &self.bytes[..];
        let replaced = format!("Host: {host}\r\n");
        while !rest.is_empty() {
            let end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .map_or(rest.len(), |i| i + 2);
            let line = &rest[..end];
            if line == b"Host: echo\r\n" || line == b"Host: echo.default.localhost\r\n" {
                out.extend_from_slice(replaced.as_bytes());
            } else {
                out.extend_from_slice(line);
            }
            rest = &rest[end..];
        }
        out
    }
}
