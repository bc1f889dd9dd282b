//! Local mode's desired state: what `mecha up` loaded and `mecha apply` sent, in memory,
//! published to the controller as immutable snapshots, and kept in the state directory
//! (`resources.json`) so that the next `mecha up` starts with it.
//!
//! What is kept is each resource's identity and the YAML file it was last applied from (path
//! and content as they were then): restoring loads those files again, through the same
//! validation as `mecha apply`, and applies only the resources still present, in the order
//! they were applied. A Service's working directory is its file's directory, as at apply.
//!
//! A Service also keeps the file version (and document) each of its revisions was made from:
//! restoring applies those first, in order, so its revisions come back under their names
//! (`hello-00001`, `hello-00002`, …) with their templates, traffic naming an old revision
//! still finds it, and the next template change after a restart makes `hello-00003` rather
//! than reusing a name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use autoscaler::{Applied, ServingState};
use crds::{LoadError, Loaded, Resource};
use eventing_broker::{Change, EventingState};
use importers::SourcesState;
use mecha_common::routing::ServiceKey;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

#[derive(Debug)]
pub struct LocalStore {
    state: Mutex<(ServingState, EventingState, SourcesState)>,
    tx: watch::Sender<Arc<ServingState>>,
    eventing: watch::Sender<Arc<EventingState>>,
    sources: watch::Sender<Arc<SourcesState>>,
    /// When each revision was created (by `mecha up`'s load or an apply).
    created: Mutex<HashMap<String, SystemTime>>,
    /// What is written to `resources.json` (taken with `state` held).
    journal: Mutex<Journal>,
    /// `STATE_DIR/resources.json`; `None`: nothing is kept (tests).
    state_file: Option<PathBuf>,
}

/// The file name of the kept resources in the state directory.
pub const STATE_FILE: &str = "resources.json";
/// The largest `resources.json` read back.
const MAX_STATE_FILE: u64 = 256 << 20;

/// Every resource applied, in order, with the file it came from.
#[derive(Debug, Default, Clone)]
struct Journal {
    resources: Vec<Kept>,
}

#[derive(Debug, Clone)]
struct Kept {
    key: ResourceKey,
    /// The file, absolute, and its content when the resource was applied (shared by the
    /// resources applied from it together).
    file: PathBuf,
    content: Arc<str>,
    /// A Service's revisions, oldest first, each with the file version it was made from.
    revisions: Vec<KeptRevision>,
}

#[derive(Debug, Clone)]
struct KeptRevision {
    name: String,
    file: PathBuf,
    content: Arc<str>,
    /// 1-based, as `crds::Source::document`.
    document: usize,
    created: Option<SystemTime>,
}

/// `resources.json`: each file version once, resources pointing at theirs.
#[derive(Debug, Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    files: Vec<DiskFile>,
    resources: Vec<DiskResource>,
}

#[derive(Debug, Serialize, Deserialize)]
struct DiskFile {
    path: PathBuf,
    content: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct DiskResource {
    #[serde(flatten)]
    key: ResourceKey,
    /// Index into `files`.
    file: usize,
    /// A Service's revisions, oldest first (absent in files written before they were kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    revisions: Vec<DiskRevision>,
}

#[derive(Debug, Serialize, Deserialize)]
struct DiskRevision {
    name: String,
    /// Index into `files`.
    file: usize,
    document: usize,
    /// When it was made, in nanoseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created_ns: Option<u64>,
}

impl Journal {
    fn to_disk(&self) -> OnDisk {
        let mut files: Vec<DiskFile> = Vec::new();
        // Each file version once, however many resources and revisions came from it.
        let mut seen: HashMap<(&Path, &str), usize> = HashMap::new();
        let mut resources = Vec::new();
        for kept in &self.resources {
            let file = disk_file(&mut seen, &mut files, &kept.file, &kept.content);
            let revisions = kept
                .revisions
                .iter()
                .map(|revision| DiskRevision {
                    name: revision.name.clone(),
                    file: disk_file(&mut seen, &mut files, &revision.file, &revision.content),
                    document: revision.document,
                    created_ns: revision.created.and_then(|at| {
                        let since = at.duration_since(std::time::UNIX_EPOCH).ok()?;
                        u64::try_from(since.as_nanos()).ok()
                    }),
                })
                .collect();
            resources.push(DiskResource {
                key: kept.key.clone(),
                file,
                revisions,
            });
        }
        OnDisk {
            version: 1,
            files,
            resources,
        }
    }

    fn from_disk(disk: OnDisk) -> Result<Self, String> {
        if disk.version != 1 {
            return Err(format!(
                "written by a mecha with format version {}; this one reads version 1",
                disk.version
            ));
        }
        let files: Vec<(PathBuf, Arc<str>)> = disk
            .files
            .into_iter()
            .map(|f| (f.path, Arc::from(f.content)))
            .collect();
        let resources = disk
            .resources
            .into_iter()
            .map(|r| {
                let (file, content) = files.get(r.file).ok_or_else(|| {
                    format!(
                        "resource {:?} names file {} of {}",
                        r.key,
                        r.file,
                        files.len()
                    )
                })?;
                let revisions = r
                    .revisions
                    .into_iter()
                    .map(|revision| {
                        let (file, content) = files.get(revision.file).ok_or_else(|| {
                            format!(
                                "revision {} names file {} of {}",
                                revision.name,
                                revision.file,
                                files.len()
                            )
                        })?;
                        Ok(KeptRevision {
                            name: revision.name,
                            file: file.clone(),
                            content: content.clone(),
                            document: revision.document,
                            created: revision.created_ns.and_then(|ns| {
                                std::time::UNIX_EPOCH
                                    .checked_add(std::time::Duration::from_nanos(ns))
                            }),
                        })
                    })
                    .collect::<Result<_, String>>()?;
                Ok(Kept {
                    key: r.key,
                    file: file.clone(),
                    content: content.clone(),
                    revisions,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { resources })
    }
}

/// The index in `files` of one file version, added when it is not there yet.
fn disk_file<'a>(
    seen: &mut HashMap<(&'a Path, &'a str), usize>,
    files: &mut Vec<DiskFile>,
    file: &'a Path,
    content: &'a str,
) -> usize {
    *seen.entry((file, content)).or_insert_with(|| {
        files.push(DiskFile {
            path: file.to_path_buf(),
            content: content.to_string(),
        });
        files.len() - 1
    })
}

/// Why the kept resources could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{error}")]
    Unsafe {
        error: mecha_common::auth::TokenError,
    },
    #[error("{path} is not a resources file mecha wrote: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: the resources kept there no longer load:\n  {}", .errors.join("\n  "))]
    Invalid { path: PathBuf, errors: Vec<String> },
}

/// What happened to one resource.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// `created`, `configured`, `unchanged`, `deleted` or `not found`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

// === impl LocalStore ===

impl LocalStore {
    pub fn new() -> Self {
        Self {
            state: Mutex::default(),
            tx: watch::channel(Arc::default()).0,
            eventing: watch::channel(Arc::default()).0,
            sources: watch::channel(Arc::default()).0,
            created: Mutex::default(),
            journal: Mutex::default(),
            state_file: None,
        }
    }

    /// A store that keeps what is applied in `state_dir/resources.json` and starts with what
    /// is there. Nothing there: an empty store.
    pub fn restore(state_dir: &Path) -> Result<Self, RestoreError> {
        let path = state_dir.join(STATE_FILE);
        let mut store = Self::new();
        store.state_file = Some(path.clone());
        // Believed only when it is this user's own, owner-only file: what it holds is run.
        let text =
            match mecha_common::auth::read_private(&path, "the kept resources", MAX_STATE_FILE) {
                Ok(None) => return Ok(store),
                Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(error) => return Err(RestoreError::Unsafe { error }),
            };
        let disk: OnDisk = serde_json::from_str(&text).map_err(|source| RestoreError::Parse {
            path: path.clone(),
            source,
        })?;
        let mut journal = Journal::from_disk(disk).map_err(|message| RestoreError::Invalid {
            path: path.clone(),
            errors: vec![message],
        })?;
        // Each kept resource, from its own file version, in the order they were applied; a
        // Service's revisions first, each from the document it was made from, then the
        // Service as it was last applied (the last document naming it in that file).
        let mut loaded = Vec::new();
        let mut errors = Vec::new();
        // Services kept by a mecha that did not keep revisions: (index, their documents).
        let mut legacy: Vec<(usize, Vec<Loaded>)> = Vec::new();
        for (at, kept) in journal.resources.iter().enumerate() {
            for revision in &kept.revisions {
                let (ok, bad) =
                    crds::load_str(&revision.file, &revision.content, crds::Mode::Local);
                errors.extend(bad.iter().map(ToString::to_string));
                match ok
                    .into_iter()
                    .find(|l| key_of(l) == kept.key && l.source.document == revision.document)
                {
                    Some(document) => loaded.push(document),
                    None => errors.push(format!(
                        "{}: document {} no longer holds revision {} of {} {}/{}",
                        revision.file.display(),
                        revision.document,
                        revision.name,
                        kept.key.kind,
                        kept.key.namespace,
                        kept.key.name
                    )),
                }
            }
            let (ok, bad) = crds::load_str(&kept.file, &kept.content, crds::Mode::Local);
            errors.extend(bad.iter().map(ToString::to_string));
            let mut mine = ok.into_iter().filter(|l| key_of(l) == kept.key);
            if kept.revisions.is_empty() {
                let mine: Vec<Loaded> = mine.collect();
                if kept.key.kind == crds::serving::KIND {
                    legacy.push((at, mine.clone()));
                }
                loaded.extend(mine);
            } else {
                loaded.extend(mine.next_back());
            }
        }
        if errors.is_empty()
            && let Err(bad) = store.apply_loaded(loaded, None)
        {
            errors.extend(bad.iter().map(ToString::to_string));
        }
        if !errors.is_empty() {
            return Err(RestoreError::Invalid { path, errors });
        }
        // Revisions come back under the names they had, and as old as they were.
        {
            let snapshot = store.snapshot();
            // From now on, legacy Services keep the revisions just made, each with the first
            // document of its template.
            for (at, documents) in legacy {
                let kept = &mut journal.resources[at];
                let key = ServiceKey::new(&kept.key.namespace, &kept.key.name);
                let Some(record) = snapshot.get(&key) else {
                    continue;
                };
                kept.revisions = record
                    .revisions
                    .iter()
                    .filter_map(|revision| {
                        let document = documents.iter().find(|d| {
                            matches!(&d.resource, Resource::Service(s) if s.spec.template == revision.template)
                        })?;
                        Some(KeptRevision {
                            name: revision.name.clone(),
                            file: kept.file.clone(),
                            content: kept.content.clone(),
                            document: document.source.document,
                            created: store.created(&revision.name),
                        })
                    })
                    .collect();
            }
            let mut created = store.created.lock().unwrap_or_else(PoisonError::into_inner);
            for kept in journal.resources.iter().filter(|k| !k.revisions.is_empty()) {
                let key = ServiceKey::new(&kept.key.namespace, &kept.key.name);
                let now: Vec<&str> = snapshot
                    .get(&key)
                    .map(|r| r.revisions.iter().map(|r| r.name.as_str()).collect())
                    .unwrap_or_default();
                let was: Vec<&str> = kept.revisions.iter().map(|r| r.name.as_str()).collect();
                if now != was {
                    tracing::warn!(service = %key, ?was, ?now, "restored revisions are named differently from before");
                }
                for revision in &kept.revisions {
                    if let Some(at) = revision.created {
                        created.insert(revision.name.clone(), at);
                    }
                }
            }
        }
        *store.journal.lock().unwrap_or_else(PoisonError::into_inner) = journal;
        Ok(store)
    }

    /// Loads `files` (path as given, content) and applies what they hold, all or nothing;
    /// the resources are kept for the next start.
    pub fn apply_files(&self, files: &[(PathBuf, String)]) -> Result<Vec<Outcome>, Vec<LoadError>> {
        let mut loaded = Vec::new();
        let mut errors = Vec::new();
        for (path, content) in files {
            let (ok, bad) = crds::load_str(path, content, crds::Mode::Local);
            loaded.extend(ok);
            errors.extend(bad);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        self.apply_loaded(loaded, Some(files))
    }

    /// Writes the journal; a failure is logged (what is applied stays applied, and the next
    /// successful write keeps it).
    fn persist(&self, journal: &Journal) {
        let Some(path) = &self.state_file else {
            return;
        };
        let result = serde_json::to_vec(&journal.to_disk())
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let dir = path.parent().unwrap_or(Path::new("."));
                mecha_common::auth::write_private(dir, STATE_FILE, &bytes)
            });
        if let Err(error) = result {
            tracing::error!(path = %path.display(), %error, "cannot keep the applied resources for the next start");
        }
    }

    /// When `revision` was created; `None` for a name this store never made.
    pub fn created(&self, revision: &str) -> Option<SystemTime> {
        self.created
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(revision)
            .copied()
    }

    pub fn subscribe_sources(&self) -> watch::Receiver<Arc<SourcesState>> {
        self.sources.subscribe()
    }

    pub fn sources(&self) -> Arc<SourcesState> {
        self.sources.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ServingState>> {
        self.tx.subscribe()
    }

    pub fn snapshot(&self) -> Arc<ServingState> {
        self.tx.borrow().clone()
    }

    pub fn subscribe_eventing(&self) -> watch::Receiver<Arc<EventingState>> {
        self.eventing.subscribe()
    }

    pub fn eventing(&self) -> Arc<EventingState> {
        self.eventing.borrow().clone()
    }

    /// Applies every resource in order, as successive `kubectl apply`s would. All or
    /// nothing: if any resource is refused, none is applied and every error is returned.
    /// `files`: what `resources` were loaded from, to keep them for the next start; `None`
    /// keeps nothing (a restore, whose journal is already known).
    fn apply_loaded(
        &self,
        resources: Vec<Loaded>,
        files: Option<&[(PathBuf, String)]>,
    ) -> Result<Vec<Outcome>, Vec<LoadError>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let keys: Vec<(ResourceKey, PathBuf, usize)> = resources
            .iter()
            .map(|l| (key_of(l), l.source.file.clone(), l.source.document))
            .collect();
        let (mut next, mut eventing, mut sources) = state.clone();
        let mut outcomes = Vec::new();
        let mut errors = Vec::new();
        for loaded in resources {
            let kind = loaded.resource.kind();
            let (namespace, name) = (
                loaded.resource.namespace().to_string(),
                loaded.resource.name().to_string(),
            );
            let change = match loaded.resource {
                Resource::Service(service) => Err(service),
                Resource::Broker(broker) => Ok(eventing.apply_broker(broker)),
                Resource::Trigger(trigger) => Ok(eventing.apply_trigger(trigger)),
                Resource::Source(source) => Ok(match sources.apply(source) {
                    (true, _) => Change::Created,
                    (false, true) => Change::Configured,
                    (false, false) => Change::Unchanged,
                }),
                Resource::AutoscalerConfig(config) => {
                    let action = if next.config() == &config {
                        "unchanged"
                    } else {
                        "configured"
                    };
                    next.set_config(Some(config));
                    outcomes.push(Outcome {
                        kind: "ConfigMap".into(),
                        namespace: crds::config::NAMESPACE.into(),
                        name: crds::config::NAME.into(),
                        action: action.into(),
                        revision: None,
                    });
                    continue;
                }
            };
            let service = match change {
                Err(service) => service,
                Ok(change) => {
                    let action = match change {
                        Change::Created => "created",
                        Change::Configured => "configured",
                        Change::Unchanged => "unchanged",
                    };
                    outcomes.push(Outcome {
                        kind: kind.into(),
                        namespace,
                        name,
                        action: action.into(),
                        revision: None,
                    });
                    continue;
                }
            };
            let (namespace, name) = (
                service.namespace().to_string(),
                service.metadata.name.clone(),
            );
            match next.apply(service, loaded.source.clone()) {
                Ok(applied) => {
                    let (action, revision) = match applied {
                        Applied::Created { revision } => ("created", Some(revision)),
                        Applied::NewRevision { revision } => ("configured", Some(revision)),
                        Applied::Configured => ("configured", None),
                        Applied::Unchanged => ("unchanged", None),
                    };
                    outcomes.push(Outcome {
                        kind: "Service".into(),
                        namespace,
                        name,
                        action: action.into(),
                        revision,
                    });
                }
                Err(field_errors) => errors.extend(field_errors.into_iter().map(|e| {
                    LoadError::field(&loaded.source.file, loaded.source.document, e)
                        .with_resource(format!("Service {namespace}/{name}"))
                })),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let now = SystemTime::now();
        self.created
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(
                outcomes
                    .iter()
                    .filter_map(|o| o.revision.clone())
                    .map(|revision| (revision, now)),
            );
        if let Some(files) = files {
            let mut journal = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
            let shared: Vec<Arc<str>> = files.iter().map(|(_, c)| Arc::from(c.as_str())).collect();
            // One outcome per resource, in order.
            for ((key, file, document), outcome) in keys.into_iter().zip(&outcomes) {
                let Some(index) = files.iter().position(|(path, _)| *path == file) else {
                    continue;
                };
                let file = std::path::absolute(&file).unwrap_or(file);
                let mut revisions = journal
                    .resources
                    .iter()
                    .position(|kept| kept.key == key)
                    .map(|at| journal.resources.remove(at).revisions)
                    .unwrap_or_default();
                if let Some(name) = &outcome.revision {
                    revisions.push(KeptRevision {
                        name: name.clone(),
                        file: file.clone(),
                        content: shared[index].clone(),
                        document,
                        created: Some(now),
                    });
                }
                journal.resources.push(Kept {
                    key,
                    file,
                    content: shared[index].clone(),
                    revisions,
                });
            }
            self.persist(&journal);
        }
        *state = (next.clone(), eventing.clone(), sources.clone());
        self.tx.send_replace(Arc::new(next));
        self.eventing.send_if_modified(|current| {
            let changed = **current != eventing;
            *current = Arc::new(eventing);
            changed
        });
        self.sources.send_if_modified(|current| {
            let changed = **current != sources;
            *current = Arc::new(sources);
            changed
        });
        Ok(outcomes)
    }

    /// Deletes the resources named by `resources` (their content beyond kind, namespace and
    /// name does not matter).
    pub fn delete(&self, resources: &[Loaded]) -> Vec<Outcome> {
        let keys: Vec<ResourceKey> = resources.iter().map(key_of).collect();
        self.delete_keys(&keys)
    }

    /// Deletes resources by kind (`Service`, `Broker`, `Trigger`, a source kind, or
    /// `ConfigMap` for `config-autoscaler`), namespace and name. A resource named twice is
    /// deleted once and reported once.
    pub fn delete_keys(&self, keys: &[ResourceKey]) -> Vec<Outcome> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut next, mut eventing, mut sources) = state.clone();
        let mut seen = std::collections::HashSet::new();
        let outcomes = keys
            .iter()
            .filter(|key| seen.insert(*key))
            .map(|key| {
                let service = ServiceKey::new(&key.namespace, &key.name);
                let pair = (key.namespace.clone(), key.name.clone());
                let found = match key.kind.as_str() {
                    "Service" => next.delete(&service),
                    "ConfigMap" => {
                        let found = key.namespace == crds::config::NAMESPACE
                            && key.name == crds::config::NAME;
                        if found {
                            next.set_config(None);
                        }
                        found
                    }
                    crds::eventing::BROKER_KIND => eventing.brokers.remove(&pair).is_some(),
                    crds::eventing::TRIGGER_KIND => eventing.triggers.remove(&pair).is_some(),
                    kind => sources.remove(kind, &key.namespace, &key.name),
                };
                Outcome {
                    kind: key.kind.clone(),
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    action: if found { "deleted" } else { "not found" }.into(),
                    revision: None,
                }
            })
            .collect();
        {
            let mut journal = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
            journal.resources.retain(|kept| !keys.contains(&kept.key));
            self.persist(&journal);
        }
        *state = (next.clone(), eventing.clone(), sources.clone());
        self.tx.send_replace(Arc::new(next));
        self.eventing.send_replace(Arc::new(eventing));
        self.sources.send_replace(Arc::new(sources));
        outcomes
    }
}

fn key_of(loaded: &Loaded) -> ResourceKey {
    ResourceKey {
        kind: loaded.resource.kind().to_string(),
        namespace: loaded.resource.namespace().to_string(),
        name: loaded.resource.name().to_string(),
    }
}

/// A resource's identity, as `mecha delete KIND NAME` names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl Default for LocalStore {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(color: &str) -> String {
        format!(
            "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: hello\nspec:\n  template:\n    spec:\n      containers:\n        - command: [python3, app.py]\n          env: [{{name: COLOR, value: {color}}}]\n"
        )
    }

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir() -> Dir {
        let path = std::env::temp_dir().join(format!(
            "mecha-store-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&path).expect("dir");
        Dir(path)
    }

    fn names(store: &LocalStore) -> Vec<String> {
        store
            .snapshot()
            .get(&ServiceKey::new("default", "hello"))
            .expect("hello")
            .revisions
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }

    fn apply(store: &LocalStore, file: &Path, content: &str) -> Option<String> {
        let outcomes = store
            .apply_files(&[(file.to_path_buf(), content.to_string())])
            .expect("applies");
        outcomes.last().and_then(|o| o.revision.clone())
    }

    #[test]
    fn revisions_keep_their_names_across_restores_and_numbering_continues() {
        let dir = dir();
        let file = dir.0.join("svc.yaml");
        let store = LocalStore::restore(&dir.0).expect("empty");
        // Two versions in one file, then a third alone.
        apply(
            &store,
            &file,
            &format!("{}---\n{}", hello("blue"), hello("green")),
        );
        apply(&store, &file, &hello("red"));
        assert_eq!(names(&store), ["hello-00001", "hello-00002", "hello-00003"]);
        let created = store.created("hello-00002");
        drop(store);

        let store = LocalStore::restore(&dir.0).expect("restores");
        assert_eq!(names(&store), ["hello-00001", "hello-00002", "hello-00003"]);
        assert_eq!(store.created("hello-00002"), created);
        let record = store
            .snapshot()
            .get(&ServiceKey::new("default", "hello"))
            .cloned()
            .expect("hello");
        let color = |i: usize| record.revisions[i].container.env[0].value.clone();
        assert_eq!([color(0), color(1), color(2)], ["blue", "green", "red"]);
        assert_eq!(
            apply(&store, &file, &hello("white")).as_deref(),
            Some("hello-00004")
        );
        drop(store);
        let store = LocalStore::restore(&dir.0).expect("restores again");
        assert_eq!(names(&store).len(), 4);
    }

    #[test]
    fn a_file_kept_without_revisions_restores_as_before_and_keeps_them_from_then_on() {
        let dir = dir();
        let file = dir.0.join("svc.yaml");
        let legacy = serde_json::json!({
            "version": 1,
            "files": [{"path": file, "content": format!("{}---\n{}", hello("blue"), hello("green"))}],
            "resources": [{"kind": "Service", "namespace": "default", "name": "hello", "file": 0}],
        });
        mecha_common::auth::write_private(&dir.0, STATE_FILE, legacy.to_string().as_bytes())
            .expect("write");
        let store = LocalStore::restore(&dir.0).expect("restores");
        assert_eq!(names(&store), ["hello-00001", "hello-00002"]);
        assert_eq!(
            apply(&store, &file, &hello("red")).as_deref(),
            Some("hello-00003")
        );
        drop(store);
        let store = LocalStore::restore(&dir.0).expect("restores again");
        assert_eq!(names(&store), ["hello-00001", "hello-00002", "hello-00003"]);
        assert_eq!(
            apply(&store, &file, &hello("white")).as_deref(),
            Some("hello-00004")
        );
    }
}
