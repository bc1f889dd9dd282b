//! The control-plane API's credential in a cluster: a projected service-account token with the
//! audience [`AUDIENCE`], checked by the API server with a `TokenReview`.
//!
//! [`TokenReviewer`] is the cluster's [`Verify`] (local mode's is `mecha up`'s admin token;
//! the middleware, the 401 and the refusal metric are `mecha_common::auth`'s, in one place). A
//! token is accepted when the API server authenticates it for the audience as a service
//! account (`system:serviceaccount:…`): every pod that mounts such a token — revision pods'
//! sidecars, the gateway, the broker — may watch the tables and report load, as Knative's
//! queue-proxies may.
//!
//! Answers are cached briefly, keyed by the token's SHA-256 (the token itself is not kept):
//! [`ACCEPTED_FOR`] for an accepted token, [`REFUSED_FOR`] for a refused one, at most
//! [`MAX_CACHED`] tokens. At most [`MAX_REVIEWS_IN_FLIGHT`] reviews run at once; beyond that,
//! and when the API server does not answer, the request gets 503 (try again), never a 401.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Api;
use kube::api::PostParams;
use mecha_common::auth::{Refusals, Verdict, Verify, guard_remote};
use prometheus::{IntCounterVec, Opts, Registry};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// The audience the sidecars' projected tokens are made for.
pub const AUDIENCE: &str = "mecha-autoscaler";
/// How long an accepted token is taken without asking again.
pub const ACCEPTED_FOR: Duration = Duration::from_secs(10);
/// How long a refused token is refused without asking again.
pub const REFUSED_FOR: Duration = Duration::from_secs(2);
/// Tokens remembered at most; when full, expired answers go first, then all.
pub const MAX_CACHED: usize = 4096;
/// `TokenReview`s running at once at most.
pub const MAX_REVIEWS_IN_FLIGHT: usize = 32;

/// The largest body the control-plane API reads (a batch of stats or pokes).
pub const MAX_BODY: usize = 1024 * 1024;

/// Checks bearer tokens with the API server's `TokenReview`.
#[derive(Clone)]
pub struct TokenReviewer {
    api: Api<TokenReview>,
    cache: Arc<Mutex<HashMap<[u8; 32], Cached>>>,
    in_flight: Arc<Semaphore>,
    reviews: IntCounterVec,
    hint: Arc<str>,
}

/// The control-plane API as a cluster's autoscaler serves it: every route needs a token
/// `verifier` accepts; nothing is answered before `caches` have listed the cluster once (503:
/// a sidecar keeps its last tables rather than take the empty ones of a replica that has not
/// read the cluster yet); on a follower, reports and pokes go on to the leader (`to_leader`,
/// see [`crate::forward`]).
pub fn control_plane<V: Verify>(
    api: autoscaler::api::ApiState,
    verifier: V,
    refusals: Refusals,
    caches: crate::state::Caches,
    to_leader: Option<crate::forward::ToLeader>,
) -> Router {
    let mut protected = autoscaler::api::router(api);
    if let Some(to_leader) = to_leader {
        protected = protected.layer(axum::middleware::from_fn_with_state(
            to_leader,
            crate::forward::to_leader,
        ));
    }
    guard_remote(Router::new(), protected, verifier, refusals)
        .layer(axum::middleware::from_fn_with_state(caches, until_synced))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

async fn until_synced(
    State(caches): State<crate::state::Caches>,
    request: Request,
    next: Next,
) -> Response {
    if caches.synced() {
        next.run(request).await
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "the autoscaler has not read the cluster yet\n",
        )
            .into_response()
    }
}

/// A remembered answer: until when, accepted or not, and why not.
type Cached = (Instant, bool, String);

// === impl TokenReviewer ===

impl TokenReviewer {
    pub fn new(client: kube::Client, registry: &Registry) -> Self {
        let reviews = IntCounterVec::new(
            Opts::new(
                "mecha_autoscaler_token_reviews_total",
                "TokenReviews of control-plane credentials, by result: accepted, refused, unavailable, cached",
            ),
            &["result"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(reviews.clone()));
        Self {
            api: Api::all(client),
            cache: Arc::default(),
            in_flight: Arc::new(Semaphore::new(MAX_REVIEWS_IN_FLIGHT)),
            reviews,
            hint: format!(
                "present the pod's projected service-account token with audience {AUDIENCE} (AUTOSCALER_TOKEN_FILE)"
            )
            .into(),
        }
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Verdict> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let (until, accepted, why) = cache.get(key)?;
        if *until <= Instant::now() {
            return None;
        }
        Some(if *accepted {
            Verdict::Accepted
        } else {
            Verdict::Refused(why.clone())
        })
    }

    fn remember(&self, key: [u8; 32], accepted: bool, why: String) {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (until, _, _)| *until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        let ttl = if accepted { ACCEPTED_FOR } else { REFUSED_FOR };
        cache.insert(key, (now + ttl, accepted, why));
    }

    async fn review(&self, token: &str) -> Result<(bool, String), String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..TokenReview::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|error| format!("TokenReview: {error}"))?;
        let status = answer.status.unwrap_or_default();
        let username = status
            .user
            .as_ref()
            .and_then(|u| u.username.clone())
            .unwrap_or_default();
        let for_us = status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == AUDIENCE));
        Ok(match status.authenticated {
            Some(true) if !for_us => (false, format!("the token is not for audience {AUDIENCE}")),
            Some(true) if !username.starts_with("system:serviceaccount:") => {
                (false, "the token is not a service account's".to_string())
            }
            Some(true) => (true, username),
            _ => (
                false,
                match status.error {
                    Some(error) if !error.is_empty() => format!("wrong credential ({error})"),
                    _ => "wrong credential".to_string(),
                },
            ),
        })
    }
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer").finish_non_exhaustive()
    }
}

impl Verify for TokenReviewer {
    async fn verify(&self, token: &str) -> Verdict {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(verdict) = self.cached(&key) {
            self.reviews.with_label_values(&["cached"]).inc();
            return verdict;
        }
        let Ok(_permit) = self.in_flight.try_acquire() else {
            self.reviews.with_label_values(&["unavailable"]).inc();
            return Verdict::Unavailable("too many credentials being checked at once".into());
        };
        match self.review(token).await {
            Ok((true, username)) => {
                tracing::debug!(%username, "control-plane credential accepted");
                self.reviews.with_label_values(&["accepted"]).inc();
                self.remember(key, true, String::new());
                Verdict::Accepted
            }
            Ok((false, why)) => {
                self.reviews.with_label_values(&["refused"]).inc();
                self.remember(key, false, why.clone());
                Verdict::Refused(why)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot check a control-plane credential");
                self.reviews.with_label_values(&["unavailable"]).inc();
                Verdict::Unavailable(error)
            }
        }
    }

    fn hint(&self) -> &str {
        &self.hint
    }
}
