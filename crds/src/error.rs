//! Errors that say what is wrong and where.

use std::fmt;
use std::path::PathBuf;

/// One problem with one field of a resource, found by validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field path in the resource, `spec.template.spec.containers[0].command`.
    pub path: String,
    pub message: String,
}

/// A problem found while loading YAML, placed by file, document and (when known) field or line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadError {
    pub file: PathBuf,
    /// 1-based index of the document in the file; `None` for errors about the whole file.
    pub document: Option<usize>,
    pub location: Location,
    pub message: String,
    /// The resource the document declares, `Trigger default/badexpr`, when its kind and name
    /// could be read.
    pub resource: Option<String>,
}

/// Where inside a document a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Whole,
    Field(String),
    Line { line: u64, column: u64 },
}

// === impl FieldError ===

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

// === impl LoadError ===

impl LoadError {
    pub fn file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            document: None,
            location: Location::Whole,
            message: message.into(),
            resource: None,
        }
    }

    /// Names the resource the error is about.
    pub fn with_resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    pub fn field(file: impl Into<PathBuf>, document: usize, error: FieldError) -> Self {
        let location = if error.path.is_empty() {
            Location::Whole
        } else {
            Location::Field(error.path)
        };
        Self {
            file: file.into(),
            document: Some(document),
            location,
            message: error.message,
            resource: None,
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(document) = self.document {
            write!(f, ": document {document}")?;
        }
        if let Some(resource) = &self.resource {
            write!(f, " ({resource})")?;
        }
        match &self.location {
            Location::Whole => {}
            Location::Field(path) => write!(f, ": {path}")?,
            Location::Line { line, column } => write!(f, ": line {line} column {column}")?,
        }
        write!(f, ": {}", self.message)
    }
}
