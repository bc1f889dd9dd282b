//! Every failure of the data path and the HTTP status it becomes (the "rescue" stage).

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};
use mecha_common::routing::ServiceKey;

use crate::body::BoxError;
use crate::body::{ProxyBody, full};
use crate::rules::Refusal;

/// Why a forwarded request got no response from the replica, on either path.
#[derive(Debug)]
pub enum Failure {
    /// The replica could not be reached; it never saw the request.
    Connect(BoxError),
    /// The request's deadline passed before the response head.
    Timeout,
    /// The replica failed or sent something that is not HTTP.
    Upstream(BoxError),
    /// The request breaks the hop rules (found when it was prepared).
    Refused(Refusal),
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request breaks the data path's HTTP rules ([`crate::rules`]).
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("the request names no host")]
    MissingHost,
    #[error(
        "no service answers on host {host:?}; services answer on {{name}}.{{namespace}}.{domain}"
    )]
    UnknownHost { host: String, domain: String },
    #[error("no ready replica of service {service} (revision {revision}) within {}s", waited.as_secs_f64())]
    NoReadyReplica {
        service: ServiceKey,
        revision: String,
        waited: Duration,
    },
    #[error(
        "service {service} (revision {revision}) has no free replica and its buffer is full ({limit}); retry later"
    )]
    BufferFull {
        service: ServiceKey,
        revision: String,
        limit: String,
    },
    #[error(
        "service {service} is overloaded: {queue} requests already wait for the container; retry later"
    )]
    Overloaded { service: ServiceKey, queue: u32 },
    #[error("service {service} did not answer within its timeout of {}s", timeout.as_secs_f64())]
    Timeout {
        service: ServiceKey,
        timeout: Duration,
    },
    /// The outbound role could not pass a call for a host outside Mecha on.
    #[error("cannot pass the call on to {authority}: {reason}")]
    PassThrough {
        authority: String,
        reason: String,
        status: StatusCode,
    },
    #[error("service {service} failed: {source}")]
    Upstream {
        service: ServiceKey,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

// === impl ProxyError ===

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Refused(refusal) => refusal.status(),
            ProxyError::MissingHost => StatusCode::BAD_REQUEST,
            ProxyError::UnknownHost { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoReadyReplica { .. } | ProxyError::Timeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::PassThrough { status, .. } => *status,
            ProxyError::BufferFull { .. } | ProxyError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// What a fast-path exchange that got no response becomes, for `service` with `timeout`.
    pub fn from_failure(service: ServiceKey, timeout: Duration, failure: Failure) -> Self {
        match failure {
            Failure::Timeout => ProxyError::Timeout { service, timeout },
            Failure::Connect(source) | Failure::Upstream(source) => {
                ProxyError::Upstream { service, source }
            }
            Failure::Refused(refusal) => ProxyError::Refused(refusal),
        }
    }

    /// What went wrong, with every cause, ending in a newline: the body of the response.
    pub fn message(&self) -> String {
        let mut message = self.to_string();
        if let ProxyError::Upstream { source, .. } = self {
            // hyper's outer error ("client error (Connect)") hides the useful cause.
            let mut cause = source.source();
            while let Some(inner) = cause {
                message.push_str(&format!(": {inner}"));
                cause = inner.source();
            }
        }
        message.push('\n');
        message
    }

    /// The headers of the answer besides its length: plain text, and `Retry-After` on a 503.
    pub fn headers(&self) -> Vec<(&'static str, &'static str)> {
        let mut headers = vec![("content-type", "text/plain; charset=utf-8")];
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            headers.push(("retry-after", "1"));
        }
        headers
    }

    /// A plain-text response that says what went wrong (hyper's path; the fast path writes the
    /// same status, headers and body from [`crate::h1::Answer`]).
    pub fn into_response(self) -> Response<ProxyBody> {
        let mut response = Response::new(full(self.message()));
        *response.status_mut() = self.status();
        for (name, value) in self.headers() {
            response
                .headers_mut()
                .insert(name, HeaderValue::from_static(value));
        }
        response
    }
}
