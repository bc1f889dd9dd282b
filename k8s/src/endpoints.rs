//! Ready endpoints from EndpointSlices, watched once for the whole cluster: the slices of every
//! per-revision headless Service (label `serving.knative.dev/revision`, which the EndpointSlice
//! controller copies from the Service) become the [`EndpointTable`] that the control-plane API
//! pushes to every gateway and outbound sidecar.
//!
//! An endpoint is a pod's address with the sidecar's serving port (the slice's `http` port,
//! 8012); only endpoints whose `ready` condition is not false count, and only for revisions
//! the desired state knows, keyed as it keys them: `{namespace}/{name}` of the slice's
//! namespace and revision label (revision names are unique within a namespace only).

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use autoscaler::ServingState;
use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector};
use mecha_common::routing::revision_key;
use mecha_common::{Endpoint, EndpointTable, RevisionEndpoints, ShutdownSignal};
use tokio::sync::{Notify, watch};

use crate::actuator::EverReady;
use crate::desired::{REVISION_LABEL, SIDECAR_SERVING_PORT};
use crate::state::CacheFlag;

/// The ready endpoints of `slices`, for the revisions `state` has, reusing the endpoints of
/// `previous` that did not change (so their load and outlier state carry over).
pub fn table<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    state: &ServingState,
    previous: &EndpointTable,
) -> EndpointTable {
    let known: HashSet<&str> = state
        .services()
        .flat_map(|record| record.revisions.iter().map(|r| r.name.as_str()))
        .collect();
    // Revision key → replica → address; sorted, so equal inputs give equal tables.
    let mut ready: BTreeMap<String, BTreeMap<String, SocketAddr>> = BTreeMap::new();
    for slice in slices {
        let Some(revision) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(REVISION_LABEL))
        else {
            continue;
        };
        let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
        let key = revision_key(namespace, revision);
        if !known.contains(key.as_str()) {
            continue;
        }
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let port = serving_port(slice);
        for endpoint in &slice.endpoints {
            let is_ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                // An unknown condition means ready, as the API documents.
                .unwrap_or(true);
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
            else {
                continue;
            };
            if !is_ready {
                continue;
            }
            let replica = endpoint
                .target_ref
                .as_ref()
                .and_then(|t| t.name.clone())
                .unwrap_or_else(|| ip.to_string());
            ready
                .entry(key.clone())
                .or_default()
                .entry(replica)
                .or_insert(SocketAddr::new(ip, port));
        }
    }
    let mut table = EndpointTable::default();
    for (revision, replicas) in ready {
        let old = previous.ready(&revision);
        let released = old
            .first()
            .map(Endpoint::released)
            .unwrap_or_else(|| Arc::new(Notify::new()));
        let endpoints = replicas
            .into_iter()
            .map(|(replica, addr)| {
                old.iter()
                    .find(|e| *e.replica == *replica && e.addr == addr)
                    .cloned()
                    .unwrap_or_else(|| Endpoint::new(replica, addr, released.clone()))
            })
            .collect();
        table.set(revision, RevisionEndpoints { ready: endpoints });
    }
    table
}

/// Whether two tables list the same replicas at the same addresses.
pub fn same_table(a: &EndpointTable, b: &EndpointTable) -> bool {
    let listed = |t: &EndpointTable| {
        let mut all: Vec<(String, String, SocketAddr)> = t
            .revisions()
            .flat_map(|(revision, endpoints)| {
                endpoints
                    .ready
                    .iter()
                    .map(|e| (revision.clone(), e.replica.to_string(), e.addr))
            })
            .collect();
        all.sort();
        all
    };
    listed(a) == listed(b)
}

/// The sidecar's serving port as the slice names it (`http`), 8012 when it does not.
fn serving_port(slice: &EndpointSlice) -> u16 {
    slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("http"))
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(SIDECAR_SERVING_PORT as u16)
}

/// Watches the slices of every revision until shutdown, publishing the table into `table`
/// whenever it or the desired state changes, and marking revisions seen ready in
/// `ever_ready`. `flag` shows whether the cache is synced and the watch healthy (a failed
/// watch is retried with backoff and keeps the last table).
pub async fn run(
    api: Api<EndpointSlice>,
    mut state: watch::Receiver<Arc<ServingState>>,
    table_tx: watch::Sender<Arc<EndpointTable>>,
    ever_ready: EverReady,
    flag: CacheFlag,
    shutdown: ShutdownSignal,
) {
    let (reader, writer) = reflector::store::<EndpointSlice>();
    let events = watcher::watcher(api, watcher::Config::default().labels(REVISION_LABEL))
        .default_backoff()
        .reflect(writer);
    tokio::pin!(events);
    let stop = shutdown.recv();
    tokio::pin!(stop);
    let mut synced = false;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(event)) => {
                    flag.set_error(None);
                    if matches!(event, Event::InitDone) {
                        synced = true;
                        flag.set_synced();
                    }
                    if !synced || matches!(event, Event::Init | Event::InitApply(_)) {
                        continue;
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "watching EndpointSlices failed; keeping the last endpoints and retrying");
                    flag.set_error(Some(format!("watching EndpointSlices: {error}")));
                    continue;
                }
                None => return,
            },
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                if !synced {
                    continue;
                }
            }
            () = &mut stop => return,
        }
        let slices = reader.state();
        let next = {
            let state = state.borrow_and_update();
            let previous = table_tx.borrow();
            table(slices.iter().map(|s| &**s), &state, &previous)
        };
        for (revision, _) in next.revisions() {
            ever_ready.mark(revision);
        }
        table_tx.send_if_modified(|current| {
            if same_table(current, &next) {
                false
            } else {
                *current = Arc::new(next);
                true
            }
        });
    }
}
