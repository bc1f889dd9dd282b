//! The credential of the admin and control-plane API, and the `Host` rule that goes with it.
//!
//! Whoever can apply a Service runs its command, so the admin API is as sensitive as a shell.
//! Locally the credential is a random bearer token that `mecha up` creates on first start in
//! its state directory (`STATE_DIR/admin-token`, mode 0600, owned by the user that runs it)
//! and reuses across restarts. The `mecha` client reads it from there on its own; standalone
//! sidecars are given it (`AUTOSCALER_TOKEN` or `AUTOSCALER_TOKEN_FILE`). A header-based
//! credential, rather than an owner-only Unix socket, because the sidecars reach the
//! autoscaler over TCP and Kubernetes mode will present service-account tokens the same way.
//!
//! Every request to the admin API must also name a loopback `Host`: a web page that rebinds
//! its own DNS name to 127.0.0.1 reaches the port, but its requests still carry its name.
//!
//! In a cluster the same header carries a projected service-account token (audience
//! `mecha-autoscaler`), which the autoscaler checks with the API server (`k8s::auth`, a
//! [`Verify`] of its own) and the sidecars re-read when kubelet rotates it ([`TokenFile`]).
//! There the `Host` rule does not apply: callers are other pods, naming the autoscaler's
//! Service ([`guard_remote`]).
//!
//! The rules live here once; `mecha` (server and client), `activator-sidecar` and the
//! cluster's `autoscaler` binary use them.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{IntCounterVec, Opts, Registry};

/// Where `mecha up` keeps its state, and so where the client looks for the credential, when
/// neither `--state-dir` nor `MECHA_STATE_DIR` says otherwise.
pub const DEFAULT_STATE_DIR: &str = ".mecha";
/// The credential's file name in the state directory.
pub const TOKEN_FILE: &str = "admin-token";
/// The environment variable the `mecha` client takes the credential from.
pub const TOKEN_ENV: &str = "MECHA_ADMIN_TOKEN";

/// Random bytes in a new token: 256 bits, beyond guessing.
const TOKEN_BYTES: usize = 32;
/// A token file larger than this is not one of ours.
const MAX_TOKEN_FILE: u64 = 4096;
/// A projected service-account token is a signed JWT: a few kilobytes at most.
const MAX_PROJECTED_TOKEN_FILE: u64 = 16 * 1024;
/// The directory link kubelet's atomic writer swaps to update a projected volume at once.
const KUBELET_DATA_LINK: &str = "..data";

/// A bearer token. Its `Debug` form never shows the secret.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

/// Why no credential could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no admin credential found at {}", path.display())]
    Missing { path: PathBuf },
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{} can be read by other users (mode {mode:04o}): the credential may have leaked; delete it and restart `mecha up` to make a new one",
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "{} belongs to user {owner}, not to this user ({ours}): refusing to trust it",
        path.display()
    )]
    NotOwned {
        path: PathBuf,
        owner: u32,
        ours: u32,
    },
    #[error(
        "the state directory {} can be written by every user (mode {mode:04o}): choose another --state-dir or `chmod o-w` it",
        path.display()
    )]
    UnsafeDirectory { path: PathBuf, mode: u32 },
    #[error("{what} {}: {reason}", path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// What the admin API checks a request's credential against, and what it tells a client that
/// has none.
#[derive(Debug, Clone)]
pub struct Credential {
    token: AdminToken,
    /// Where a client finds the token, for the error answer.
    hint: Arc<str>,
}

/// What a [`Verify`] says of a presented bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Not a credential this API takes: 401, with the reason.
    Refused(String),
    /// It cannot be checked now (the cluster's token API did not answer): 503, try again.
    Unavailable(String),
}

/// Checks presented bearer tokens — the one question every guarded API asks. Locally it is
/// [`Credential`] (`mecha up`'s admin token); in a cluster, the API server's `TokenReview`.
pub trait Verify: Clone + Send + Sync + 'static {
    fn verify(&self, token: &str) -> impl Future<Output = Verdict> + Send;

    /// Where a refused client finds the right credential, said after the problem.
    fn hint(&self) -> &str;
}

/// A verifier with the counter of what it refused: the state of [`require_verified`].
#[derive(Debug, Clone)]
pub struct Gate<V> {
    verifier: V,
    refusals: Refusals,
}

/// A credential a client presents: fixed (given in a variable), or read from a file and read
/// again whenever the file changes.
#[derive(Debug, Clone)]
pub enum ClientToken {
    Fixed(AdminToken),
    File(TokenFile),
}

/// A credential file that is read again when it changes, since kubelet rotates projected
/// service-account tokens in place (a new directory behind the volume's `..data` link). When a
/// re-read fails the last good token is kept, and the failure logged.
#[derive(Debug, Clone)]
pub struct TokenFile {
    path: Arc<Path>,
    current: Arc<Mutex<(Stamp, AdminToken)>>,
}

/// What tells a changed file from the one read: its identity, size and modification time, as
/// `stat` sees them through links.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

/// `mecha_admin_refused_requests_total{reason}`: refused requests show up in metrics, so a
/// misconfigured sidecar or a probing process is seen, not only felt.
#[derive(Debug, Clone)]
pub struct Refusals(IntCounterVec);

/// Fills `bytes` from the kernel's random source: the admin token, the event log journal's
/// checksum salt.
pub fn random_bytes(bytes: &mut [u8]) -> io::Result<()> {
    File::open("/dev/urandom")?.read_exact(bytes)
}

// === impl AdminToken ===

impl AdminToken {
    /// A new token from the kernel's random source, hex-encoded.
    pub fn generate() -> io::Result<Self> {
        let mut bytes = [0u8; TOKEN_BYTES];
        random_bytes(&mut bytes)?;
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self(text.into()))
    }

    /// A token as written in a file or a variable; surrounding whitespace (the file's final
    /// newline) is not part of it.
    pub fn parse(text: &str) -> Result<Self, String> {
        const MIN_TOKEN_LEN: usize = 32;
        let text = text.trim();
        if text.is_empty() {
            return Err("empty".into());
        }
        // It travels in a header: printable ASCII without spaces.
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be printable ASCII without spaces".into());
        }
        // Short enough to guess is no credential (ours are 64 hex digits).
        if text.len() < MIN_TOKEN_LEN {
            return Err(format!("too short: at least {MIN_TOKEN_LEN} characters"));
        }
        Ok(Self(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `Authorization` header that presents this token.
    pub fn header_value(&self) -> HeaderValue {
        // Every token is printable ASCII (`generate`, `parse`), so the fallback never happens;
        // if it did, the server would answer that the credential is missing.
        let mut value = HeaderValue::from_str(&format!("Bearer {}", self.0))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer"));
        value.set_sensitive(true);
        value
    }

    /// Whether `presented` is this token, in time that does not depend on where they differ
    /// (so the answer's timing cannot be used to guess the token byte by byte). A hand-written
    /// fold rather than the `subtle` crate: one comparison of short byte strings, and the
    /// length it may leak is public (every token `mecha up` makes has the same length).
    pub fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if presented.len() != expected.len() {
            return false;
        }
        let difference = expected
            .iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | std::hint::black_box(a ^ b));
        std::hint::black_box(difference) == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

impl PartialEq for AdminToken {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl Eq for AdminToken {}

// === impl Credential ===

impl Credential {
    /// `hint` tells a refused client where the token is (e.g. the token file's path).
    pub fn new(token: AdminToken, hint: impl Into<Arc<str>>) -> Self {
        Self {
            token,
            hint: hint.into(),
        }
    }

    /// Whether `headers` carry exactly one `Authorization: Bearer` with this token; the error
    /// says what is wrong.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        if self.token.matches(bearer(headers)?) {
            Ok(())
        } else {
            Err("wrong credential")
        }
    }
}

impl Verify for Credential {
    async fn verify(&self, token: &str) -> Verdict {
        if self.token.matches(token.as_bytes()) {
            Verdict::Accepted
        } else {
            Verdict::Refused("wrong credential".into())
        }
    }

    fn hint(&self) -> &str {
        &self.hint
    }
}

/// The token of a request's one `Authorization: Bearer` header; the error says what is wrong.
pub fn bearer(headers: &HeaderMap) -> Result<&[u8], &'static str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err("missing credential");
    };
    let value = value.as_bytes();
    value
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
        .map(|_| value[7..].trim_ascii())
        .filter(|token| !token.is_empty())
        .ok_or("missing credential (the Authorization header must be `Bearer TOKEN`)")
}

// === impl Gate ===

impl<V: Verify> Gate<V> {
    pub fn new(verifier: V, refusals: Refusals) -> Self {
        Self { verifier, refusals }
    }
}

/// Middleware for the routes that need a credential: 401 without a good one (503 when it
/// cannot be checked now), and the route never runs (so nothing is applied, posted or
/// streamed).
pub async fn require_verified<V: Verify>(
    State(gate): State<Gate<V>>,
    request: Request,
    next: Next,
) -> Response {
    let verdict = match bearer(request.headers()) {
        Err(problem) => Verdict::Refused(problem.into()),
        Ok(token) => match std::str::from_utf8(token) {
            Ok(token) => gate.verifier.verify(token).await,
            Err(_) => Verdict::Refused("wrong credential".into()),
        },
    };
    match verdict {
        Verdict::Accepted => next.run(request).await,
        Verdict::Refused(problem) => {
            gate.refusals.count("credential");
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"mecha\"")],
                format!("{problem}: {}\n", gate.verifier.hint()),
            )
                .into_response()
        }
        Verdict::Unavailable(problem) => {
            gate.refusals.count("unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                format!("the credential cannot be checked now: {problem}\n"),
            )
                .into_response()
        }
    }
}

/// Middleware for every route of a loopback-only API: 403 unless the request names a loopback
/// host, which defeats DNS rebinding.
pub async fn require_loopback_host(
    State(refusals): State<Refusals>,
    request: Request,
    next: Next,
) -> Response {
    match request_names_loopback(&request) {
        Ok(()) => next.run(request).await,
        Err(problem) => {
            refusals.count("host");
            let why = "this API answers only to localhost, 127.0.0.1 or [::1] (a request \
                       naming another host may come from a web page through DNS rebinding)";
            (StatusCode::FORBIDDEN, format!("{problem}: {why}\n")).into_response()
        }
    }
}

/// How an admin or control-plane API is served — the one place that says so: every route
/// answers only to a loopback `Host`; the `protected` ones need the credential too. `open`
/// holds what a local process may read without it (`/live`, `/ready`, `/metrics`).
pub fn guard(
    open: Router,
    protected: Router,
    credential: Credential,
    refusals: Refusals,
) -> Router {
    // The Host rule covers the open routes too: they are harmless to a local process, but
    // through DNS rebinding `/metrics` would show a web page every service's name.
    guard_remote(open, protected, credential, refusals.clone()).layer(
        axum::middleware::from_fn_with_state(refusals, require_loopback_host),
    )
}

/// How an API that other machines call is served (the cluster's autoscaler): the `protected`
/// routes need a credential `verifier` accepts; `open` routes need nothing. No `Host` rule:
/// callers name the autoscaler's Service, and a web page rebinding a name to it holds no
/// service-account token.
pub fn guard_remote<V: Verify>(
    open: Router,
    protected: Router,
    verifier: V,
    refusals: Refusals,
) -> Router {
    open.merge(protected.route_layer(axum::middleware::from_fn_with_state(
        Gate::new(verifier, refusals),
        require_verified::<V>,
    )))
}

// === impl Refusals ===

impl Refusals {
    pub fn register(registry: &Registry) -> Self {
        let counter = IntCounterVec::new(
            Opts::new(
                "mecha_admin_refused_requests_total",
                "Admin and control-plane API requests refused, by reason: credential (missing or wrong), host (not loopback) or unavailable (the credential could not be checked)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(counter.clone()));
        Self(counter)
    }

    fn count(&self, reason: &str) {
        self.0.with_label_values(&[reason]).inc();
    }
}

/// The request's host — its one `Host` header, and the authority of an absolute target if it
/// has one — must be loopback. A request without a host (HTTP/1.0) is refused: it cannot show
/// that it was meant for this machine.
fn request_names_loopback(request: &Request) -> Result<(), String> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err("more than one Host header".into()),
        (Some(value), None) => Some(
            value
                .to_str()
                .map_err(|_| "a Host header that is not text".to_string())?,
        ),
        (None, _) => None,
    };
    let authority = request.uri().authority().map(|a| a.as_str());
    if host.is_none() && authority.is_none() {
        return Err("no Host header".into());
    }
    for name in host.into_iter().chain(authority) {
        if !is_loopback_host(name) {
            return Err(format!("Host {name:?} is not a loopback name or address"));
        }
    }
    Ok(())
}

/// `localhost`, an address in 127.0.0.0/8 or `[::1]`, each with or without a port. Strict:
/// no subdomains of `localhost`, no trailing dot, no other spellings of addresses.
pub fn is_loopback_host(host: &str) -> bool {
    let port_ok = |port: &str| {
        !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
    };
    if let Some(rest) = host.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        let port_fits = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        return port_fits && ip.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
    }
    let name = match host.split_once(':') {
        Some((name, port)) if port_ok(port) => name,
        Some(_) => return false,
        None => host,
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// The token file of a state directory.
pub fn token_path(state_dir: &Path) -> PathBuf {
    state_dir.join(TOKEN_FILE)
}

/// The token of `mecha up` with state in `state_dir`: the one made on an earlier start, or a
/// new one. Creates the directory (mode 0700) if needed and refuses one that every user can
/// write, a token file that other users can read, and one that belongs to someone else.
pub fn load_or_create(state_dir: &Path) -> Result<AdminToken, TokenError> {
    private_dir(state_dir)?;
    let path = token_path(state_dir);
    match read(&path) {
        Err(TokenError::Missing { .. }) => {}
        found => return found,
    }
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| TokenError::Io {
            action,
            path,
            source,
        }
    };
    let token = AdminToken::generate().map_err(io("reading random bytes for", &path))?;
    // Written whole under a name of its own, then linked into place: nobody ever reads half a
    // token, and if another `mecha up` got there first, its token stands and is used.
    static ATTEMPT: AtomicUsize = AtomicUsize::new(0);
    let temporary = state_dir.join(format!(
        ".{TOKEN_FILE}.{}.{}",
        std::process::id(),
        ATTEMPT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_file(&temporary);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(format!("{}\n", token.as_str()).as_bytes())?;
            file.sync_all()
        });
    if let Err(source) = written {
        let _ = fs::remove_file(&temporary);
        return Err(io("writing", &temporary)(source));
    }
    let linked = fs::hard_link(&temporary, &path);
    let _ = fs::remove_file(&temporary);
    match linked {
        Ok(()) => Ok(token),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => read(&path),
        Err(source) => Err(io("creating", &path)(source)),
    }
}

/// The token in the file at `path`, which must be a regular file of this user that nobody
/// else can read.
pub fn read(path: &Path) -> Result<AdminToken, TokenError> {
    let io = |action| {
        move |source| TokenError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    let link = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(TokenError::Missing {
                path: path.to_path_buf(),
            });
        }
        Err(error) => return Err(io("reading")(error)),
    };
    if link.file_type().is_symlink() {
        return Err(TokenError::Invalid {
            what: "the credential file",
            path: path.to_path_buf(),
            reason: "is a symbolic link; it must be a file of its own".into(),
        });
    }
    if !link.file_type().is_file() {
        // A FIFO or a device would block the open or the read for ever.
        return Err(TokenError::Invalid {
            what: "the credential file",
            path: path.to_path_buf(),
            reason: "is not a regular file; delete it and restart `mecha up` to make one".into(),
        });
    }
    let mut file = File::open(path).map_err(io("opening"))?;
    // The checks are made on the file that was opened, not on the name, which could change.
    let meta = file.metadata().map_err(io("reading"))?;
    owned_by_us(path, &meta)?;
    if !meta.is_file() || meta.len() > MAX_TOKEN_FILE {
        return Err(TokenError::Invalid {
            what: "the credential file",
            path: path.to_path_buf(),
            reason: "is not a token file; delete it and restart `mecha up` to make one".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io("reading"))?;
    AdminToken::parse(&text).map_err(|reason| TokenError::Invalid {
        what: "the credential in",
        path: path.to_path_buf(),
        reason: format!("{reason}; delete the file and restart `mecha up` to make a new one"),
    })
}

/// The token in the file at `path`, checked by who wrote it: a file kubelet projected (a link
/// to `..data/NAME` beside it, how kubelet's atomic writer lays out every projected volume) is
/// taken with the ownership and mode kubelet gives it; any other file must pass [`read`]'s
/// checks of `mecha up`'s own token file.
pub fn read_any(path: &Path) -> Result<AdminToken, TokenError> {
    if !is_kubelet_projected(path) {
        return read(path);
    }
    let io = |action| {
        move |source| TokenError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut file = File::open(path).map_err(io("opening"))?;
    let meta = file.metadata().map_err(io("reading"))?;
    if !meta.is_file() || meta.len() > MAX_PROJECTED_TOKEN_FILE {
        return Err(TokenError::Invalid {
            what: "the projected token file",
            path: path.to_path_buf(),
            reason: format!("is not a regular file of at most {MAX_PROJECTED_TOKEN_FILE} bytes"),
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io("reading"))?;
    AdminToken::parse(&text).map_err(|reason| TokenError::Invalid {
        what: "the projected token in",
        path: path.to_path_buf(),
        reason,
    })
}

/// Whether `path` is laid out as kubelet projects a volume's files: a symbolic link to
/// `..data/NAME`, where `..data` beside it is itself a link (to the current timestamped
/// directory).
fn is_kubelet_projected(path: &Path) -> bool {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return false;
    };
    let Ok(target) = fs::read_link(path) else {
        return false;
    };
    target == Path::new(KUBELET_DATA_LINK).join(name)
        && fs::symlink_metadata(dir.join(KUBELET_DATA_LINK)).is_ok_and(|m| m.is_symlink())
}

// === impl ClientToken ===

impl ClientToken {
    /// The token to present now.
    pub fn current(&self) -> AdminToken {
        match self {
            Self::Fixed(token) => token.clone(),
            Self::File(file) => file.current(),
        }
    }
}

impl PartialEq for ClientToken {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Fixed(a), Self::Fixed(b)) => a == b,
            (Self::File(a), Self::File(b)) => a.path == b.path,
            _ => false,
        }
    }
}

impl Eq for ClientToken {}

impl From<AdminToken> for ClientToken {
    fn from(token: AdminToken) -> Self {
        Self::Fixed(token)
    }
}

// === impl TokenFile ===

impl TokenFile {
    /// Reads the file now ([`read_any`]'s checks); an error here is a setting to fix.
    pub fn open(path: &Path) -> Result<Self, TokenError> {
        let stamp = Stamp::of(path);
        let token = read_any(path)?;
        Ok(Self {
            path: path.into(),
            current: Arc::new(Mutex::new((stamp.unwrap_or_default(), token))),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's token, read again first if the file changed since the last read.
    pub fn current(&self) -> AdminToken {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        match Stamp::of(&self.path) {
            Some(stamp) if stamp != current.0 => match read_any(&self.path) {
                Ok(token) => {
                    tracing::info!(path = %self.path.display(), "the credential file changed; using the new token");
                    *current = (stamp, token);
                }
                Err(error) => {
                    // Marked as read, so the warning comes once per change, not per request.
                    current.0 = stamp;
                    tracing::warn!(%error, "cannot read the changed credential file; keeping the last token");
                }
            },
            Some(_) => {}
            None if current.0 != Stamp::default() => {
                // Said once: the stamp of "no file" is the default one.
                current.0 = Stamp::default();
                tracing::warn!(path = %self.path.display(), "the credential file is gone; keeping the last token");
            }
            None => {}
        }
        current.1.clone()
    }
}

// === impl Stamp ===

impl Stamp {
    fn of(path: &Path) -> Option<Self> {
        let meta = fs::metadata(path).ok()?;
        Some(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        })
    }
}

/// Creates `dir` (mode 0700) or checks the one there: ours, and not writable by every user
/// (who could delete or swap the files in it). An existing directory's mode is otherwise left
/// alone: the token file's own checks (ours, 0600, no link, created exclusively) keep the
/// token private, and a group-writable directory is what `create_dir_all` makes under the
/// usual umask 002 of user-private groups (every `.mecha` made before the credential was).
fn private_dir(dir: &Path) -> Result<(), TokenError> {
    let io = |action| {
        move |source| TokenError::Io {
            action,
            path: dir.to_path_buf(),
            source,
        }
    };
    match fs::metadata(dir) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("creating the state directory")),
        Err(error) => Err(io("reading the state directory")(error)),
        Ok(meta) if !meta.is_dir() => Err(TokenError::Invalid {
            what: "the state directory",
            path: dir.to_path_buf(),
            reason: "is not a directory".into(),
        }),
        Ok(meta) => {
            owned_by_us(dir, &meta)?;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o002 != 0 {
                return Err(TokenError::UnsafeDirectory {
                    path: dir.to_path_buf(),
                    mode,
                });
            }
            Ok(())
        }
    }
}

/// The content of a file `mecha up` keeps in its state directory (`what` names it in errors):
/// `None` when there is none; refused when it is a link, not a regular file, someone else's,
/// open to other users, or longer than `max_len` — a planted file must not be believed.
pub fn read_private(
    path: &Path,
    what: &'static str,
    max_len: u64,
) -> Result<Option<Vec<u8>>, TokenError> {
    let invalid = |reason: &str| TokenError::Invalid {
        what,
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    let io = |action| {
        move |source| TokenError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    let link = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io("reading")(error)),
    };
    if link.file_type().is_symlink() {
        return Err(invalid("is a symbolic link; it must be a file of its own"));
    }
    if !link.file_type().is_file() {
        return Err(invalid("is not a regular file"));
    }
    let mut file = File::open(path).map_err(io("opening"))?;
    let meta = file.metadata().map_err(io("reading"))?;
    owned_by_us(path, &meta)?;
    if !meta.is_file() || meta.len() > max_len {
        return Err(invalid(&format!(
            "is not a regular file of at most {max_len} bytes"
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut bytes = Vec::new();
    (&mut file)
        .take(max_len + 1)
        .read_to_end(&mut bytes)
        .map_err(io("reading"))?;
    Ok(Some(bytes))
}

/// Replaces `dir/name` with `bytes`, owner-only: written whole to a new file of its own
/// (created exclusively, so a planted link is never followed), synced, then renamed into
/// place (which replaces a link at `name` rather than writing through it).
pub fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    static ATTEMPT: AtomicUsize = AtomicUsize::new(0);
    let temporary = dir.join(format!(
        ".{name}.{}.{}",
        std::process::id(),
        ATTEMPT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_file(&temporary);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&temporary, dir.join(name)));
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

/// The user that listens on the loopback TCP address `addr`, from the kernel's socket table
/// (`/proc/net/tcp`, `tcp6`): `None` when nobody listens there or the table cannot be read.
/// A client checks it before it presents the credential, so that a port another user took
/// (after `mecha up` stopped, say) never receives it.
pub fn listener_owner(addr: std::net::SocketAddr) -> Option<u32> {
    const LISTEN: &str = "0A";
    let (table, want) = match addr.ip() {
        std::net::IpAddr::V4(ip) => (
            "/proc/net/tcp",
            format!("{:08X}", u32::from_le_bytes(ip.octets())),
        ),
        std::net::IpAddr::V6(ip) => (
            "/proc/net/tcp6",
            ip.octets()
                .chunks(4)
                .map(|word| {
                    format!(
                        "{:08X}",
                        u32::from_le_bytes([word[0], word[1], word[2], word[3]])
                    )
                })
                .collect(),
        ),
    };
    let any = "0".repeat(want.len());
    let text = fs::read_to_string(table).ok()?;
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, uid) = (fields.get(1)?, fields.get(3)?, fields.get(7)?);
        let (ip, port) = local.split_once(':')?;
        let matches = *state == LISTEN
            && u16::from_str_radix(port, 16).ok()? == addr.port()
            && (ip.eq_ignore_ascii_case(&want) || *ip == any);
        matches.then(|| uid.parse().ok()).flatten()
    })
}

fn owned_by_us(path: &Path, meta: &fs::Metadata) -> Result<(), TokenError> {
    let ours = rustix::process::geteuid().as_raw();
    if meta.uid() == ours {
        Ok(())
    } else {
        Err(TokenError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            ours,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "mecha-auth-{}-{name}-{}",
                std::process::id(),
                &AdminToken::generate().expect("random").as_str()[..8]
            ));
            let _ = fs::remove_dir_all(&path);
            Self(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn loopback_hosts_pass_and_every_other_name_is_refused() {
        for host in [
            "localhost",
            "LocalHost:8081",
            "127.0.0.1",
            "127.0.0.1:8081",
            "127.1.2.3:1",
            "[::1]",
            "[::1]:8081",
        ] {
            assert!(is_loopback_host(host), "{host} should pass");
        }
        for host in [
            "evil.example",
            "evil.example:8081",
            "127.0.0.1.nip.io",
            "127.0.0.1.nip.io:8081",
            "localhost.",
            "foo.localhost",
            "localhost.evil.example",
            "10.0.0.1",
            "0.0.0.0:8081",
            "[::]:8081",
            "[::ffff:127.0.0.1]",
            "127.1",
            "2130706433",
            "localhost:",
            "localhost:80:80",
            "localhost:http",
            "[::1]8081",
            "[::1",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host:?} should be refused");
        }
    }

    #[test]
    fn tokens_compare_whole_and_hide_themselves() {
        let token = AdminToken::generate().expect("random");
        assert_eq!(token.as_str().len(), 64);
        assert!(token.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(token.matches(token.as_str().as_bytes()));
        let mut wrong = token.as_str().as_bytes().to_vec();
        wrong[63] ^= 1;
        assert!(!token.matches(&wrong));
        assert!(!token.matches(&token.as_str().as_bytes()[..63]));
        assert!(!token.matches(b""));
        assert_ne!(
            token.as_str(),
            AdminToken::generate().expect("random").as_str()
        );
        assert!(!format!("{token:?}").contains(token.as_str()));
        assert!(AdminToken::parse("  \n").is_err());
        assert!(AdminToken::parse("a b").is_err());
        let long = "x".repeat(32);
        assert_eq!(
            AdminToken::parse(&format!("{long}\n"))
                .expect("ok")
                .as_str(),
            long
        );
        assert!(AdminToken::parse("a").is_err(), "a guessable token");
    }

    #[test]
    fn the_token_file_is_made_once_private_and_reused() {
        let scratch = Scratch::new("create");
        let dir = scratch.0.join("nested").join(".mecha");
        let token = load_or_create(&dir).expect("created");
        let path = token_path(&dir);
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(
            fs::read_to_string(&path).expect("read").trim(),
            token.as_str()
        );
        // A restart reuses it; the client reads the same.
        assert_eq!(load_or_create(&dir).expect("again"), token);
        assert_eq!(read(&path).expect("read"), token);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(TOKEN_FILE)]);
    }

    #[test]
    fn an_exposed_or_broken_token_file_is_refused() {
        let scratch = Scratch::new("exposed");
        let dir = &scratch.0;
        load_or_create(dir).expect("created");
        let path = token_path(dir);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let error = load_or_create(dir).expect_err("readable by others");
        assert!(
            matches!(error, TokenError::Exposed { mode: 0o644, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("delete it"), "{error}");
        assert!(matches!(read(&path), Err(TokenError::Exposed { .. })));

        fs::remove_file(&path).expect("rm");
        assert!(matches!(read(&path), Err(TokenError::Missing { .. })));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .expect("empty file");
        assert!(matches!(read(&path), Err(TokenError::Invalid { .. })));

        fs::remove_file(&path).expect("rm");
        let elsewhere = dir.join("elsewhere");
        fs::write(&elsewhere, "x").expect("write");
        std::os::unix::fs::symlink(&elsewhere, &path).expect("symlink");
        assert!(matches!(read(&path), Err(TokenError::Invalid { .. })));
    }

    #[test]
    fn private_files_are_written_without_following_links_and_read_only_when_ours() {
        let dir = Scratch::new("private-files");
        fs::create_dir_all(&dir.0).unwrap();
        let target = dir.0.join("victim.txt");
        fs::write(&target, "mine").unwrap();
        // A link planted where the file goes, and where a temporary file might go.
        std::os::unix::fs::symlink(&target, dir.0.join("kept.json")).unwrap();
        write_private(&dir.0, "kept.json", b"{}").unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "mine");
        assert_eq!(
            read_private(&dir.0.join("kept.json"), "kept", 10)
                .unwrap()
                .unwrap(),
            b"{}"
        );
        let mode = fs::metadata(dir.0.join("kept.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        // Refused: a link, a file others can read, a file too long; absent is None.
        std::os::unix::fs::symlink(&target, dir.0.join("link")).unwrap();
        assert!(read_private(&dir.0.join("link"), "kept", 10).is_err());
        fs::set_permissions(dir.0.join("kept.json"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_private(&dir.0.join("kept.json"), "kept", 10),
            Err(TokenError::Exposed { .. })
        ));
        fs::set_permissions(dir.0.join("kept.json"), fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_private(&dir.0.join("kept.json"), "kept", 1).is_err());
        assert!(
            read_private(&dir.0.join("absent"), "kept", 10)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_owner_of_a_listening_socket_is_found() {
        let ours = rustix::process::geteuid().as_raw();
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(listener_owner(v4.local_addr().unwrap()), Some(ours));
        if let Ok(v6) = std::net::TcpListener::bind("[::1]:0") {
            assert_eq!(listener_owner(v6.local_addr().unwrap()), Some(ours));
        }
        let port = v4.local_addr().unwrap().port();
        drop(v4);
        assert_eq!(listener_owner(([127, 0, 0, 1], port).into()), None);
    }

    #[test]
    fn a_state_directory_others_can_write_is_refused() {
        let scratch = Scratch::new("dir");
        fs::create_dir_all(&scratch.0).expect("mkdir");
        fs::set_permissions(&scratch.0, fs::Permissions::from_mode(0o777)).expect("chmod");
        let error = load_or_create(&scratch.0).expect_err("world-writable");
        assert!(
            matches!(error, TokenError::UnsafeDirectory { .. }),
            "{error}"
        );
        assert!(!token_path(&scratch.0).exists());
        // A directory others may only read, or the user's group write, is used as it is.
        fs::set_permissions(&scratch.0, fs::Permissions::from_mode(0o775)).expect("chmod");
        load_or_create(&scratch.0).expect("created");
    }

    /// One request through `app`: its status and body (also used by the admin router's tests).
    pub(crate) async fn call(
        app: &Router,
        request: axum::http::request::Builder,
    ) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_middleware_refuses_before_the_route_runs() {
        let token = AdminToken::generate().expect("random");
        let registry = Registry::new();
        let refusals = Refusals::register(&registry);
        let credential = Credential::new(token.clone(), "read it from .mecha/admin-token");
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = ran.clone();
        let app = guard(
            Router::new().route("/live", get(|| async { "ok" })),
            Router::new().route(
                "/api",
                post(move || async move {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    "done"
                }),
            ),
            credential,
            refusals.clone(),
        );
        let bearer = format!("Bearer {}", token.as_str());
        let post = |host: &str| axum::http::Request::post("/api").header(header::HOST, host);

        let (status, body) = call(&app, post("localhost:8081")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            body.starts_with("missing credential: read it from .mecha/admin-token"),
            "{body}"
        );
        let (status, body) = call(
            &app,
            post("localhost").header(header::AUTHORIZATION, "Bearer nope"),
        )
        .await;
        assert_eq!(
            (status, body.starts_with("wrong credential")),
            (StatusCode::UNAUTHORIZED, true)
        );
        let (status, _) = call(
            &app,
            post("localhost").header(header::AUTHORIZATION, token.as_str()),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "no scheme");
        let (status, _) = call(
            &app,
            post("localhost")
                .header(header::AUTHORIZATION, &bearer)
                .header(header::AUTHORIZATION, &bearer),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "two credentials");
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0);

        // A foreign Host is refused even with the right token.
        for host in ["evil.example", "127.0.0.1.nip.io:8081"] {
            let (status, body) =
                call(&app, post(host).header(header::AUTHORIZATION, &bearer)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{host}");
            assert!(body.contains("is not a loopback name"), "{body}");
        }
        let (status, _) = call(
            &app,
            axum::http::Request::post("/api").header(header::AUTHORIZATION, &bearer),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "no Host");
        let (status, _) = call(
            &app,
            axum::http::Request::post("http://evil.example/api")
                .header(header::HOST, "localhost")
                .header(header::AUTHORIZATION, &bearer),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "absolute target naming another host"
        );
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0);

        let (status, body) = call(
            &app,
            post("127.0.0.1:8081").header(header::AUTHORIZATION, &bearer),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "done"));
        let (status, _) = call(
            &app,
            post("[::1]").header(header::AUTHORIZATION, format!("bearer {}", token.as_str())),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "the scheme is case-insensitive");
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 2);

        // The open route needs no credential, but still a loopback Host.
        let live = |host: &str| axum::http::Request::get("/live").header(header::HOST, host);
        assert_eq!(call(&app, live("localhost")).await.0, StatusCode::OK);
        assert_eq!(
            call(&app, live("evil.example")).await.0,
            StatusCode::FORBIDDEN
        );
    }

    /// Lays `token` out as kubelet projects a volume: `DIR/..TIMESTAMP/token`, `..data` a
    /// link to that directory, `token` a link to `..data/token`; mode 0644, as kubelet's
    /// default for projected files.
    fn project(dir: &Path, stamp: &str, token: &str) {
        use std::os::unix::fs::symlink;
        let data = dir.join(format!("..{stamp}"));
        fs::create_dir_all(&data).expect("mkdir");
        fs::write(data.join("token"), token).expect("write");
        fs::set_permissions(data.join("token"), fs::Permissions::from_mode(0o644)).expect("chmod");
        // Swapped atomically, as kubelet's atomic writer does.
        let next = dir.join("..data_tmp");
        let _ = fs::remove_file(&next);
        symlink(format!("..{stamp}"), &next).expect("link");
        fs::rename(&next, dir.join("..data")).expect("swap");
        if fs::symlink_metadata(dir.join("token")).is_err() {
            symlink("..data/token", dir.join("token")).expect("link");
        }
    }

    #[test]
    fn a_projected_token_is_taken_with_kubelets_permissions_and_read_again_when_rotated() {
        let scratch = Scratch::new("projected");
        fs::create_dir_all(&scratch.0).expect("mkdir");
        let first = "eyJhbGciOiJSUzI1NiJ9.first-token-0123456789abcdef.signature";
        project(&scratch.0, "2026_11_30_17_00_00.1", first);
        let path = scratch.0.join("token");
        // The strict reader refuses it (a link, readable by others) ...
        assert!(read(&path).is_err());
        // ... the one for credential files takes it, since kubelet laid it out.
        let file = TokenFile::open(&path).expect("projected token");
        assert_eq!(file.current().as_str(), first);

        let second = "eyJhbGciOiJSUzI1NiJ9.second-token-0123456789abcdef.signature";
        project(&scratch.0, "2026_11_30_18_00_00.2", second);
        assert_eq!(file.current().as_str(), second, "rotated in place");
        // A rotation to something unreadable keeps the last good token.
        project(&scratch.0, "2026_11_30_19_00_00.3", " ");
        assert_eq!(file.current().as_str(), second);
    }

    #[test]
    fn a_token_file_not_laid_out_by_kubelet_gets_the_strict_checks() {
        use std::os::unix::fs::symlink;
        let scratch = Scratch::new("strict");
        fs::create_dir_all(&scratch.0).expect("mkdir");
        let token = AdminToken::generate().expect("random");
        let real = scratch.0.join("real");
        fs::write(&real, token.as_str()).expect("write");
        fs::set_permissions(&real, fs::Permissions::from_mode(0o644)).expect("chmod");
        let error = TokenFile::open(&real).expect_err("readable by others");
        assert!(matches!(error, TokenError::Exposed { .. }), "{error}");
        // A link that only looks projected (no `..data` link beside it) is still a link.
        fs::set_permissions(&real, fs::Permissions::from_mode(0o600)).expect("chmod");
        fs::create_dir_all(scratch.0.join("..data")).expect("mkdir");
        symlink("..data/token", scratch.0.join("token")).expect("link");
        fs::write(scratch.0.join("..data/token"), token.as_str()).expect("write");
        fs::set_permissions(
            scratch.0.join("..data/token"),
            fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        assert!(TokenFile::open(&scratch.0.join("token")).is_err());
        // mecha up's own file: read again when it is replaced (a new file renamed over it,
        // as atomic writers do; a rewrite in place within the same clock tick would keep its
        // size and time).
        let file = TokenFile::open(&real).expect("private file");
        assert_eq!(file.current(), token);
        let next = AdminToken::generate().expect("random");
        let replacement = scratch.0.join("real.new");
        fs::write(&replacement, next.as_str()).expect("write");
        fs::set_permissions(&replacement, fs::Permissions::from_mode(0o600)).expect("chmod");
        fs::rename(&replacement, &real).expect("rename");
        assert_eq!(file.current(), next);
    }

    #[derive(Clone)]
    struct Flaky;

    impl Verify for Flaky {
        async fn verify(&self, token: &str) -> Verdict {
            match token {
                "good" => Verdict::Accepted,
                "later" => Verdict::Unavailable("the token API did not answer".into()),
                _ => Verdict::Refused("wrong credential".into()),
            }
        }

        fn hint(&self) -> &str {
            "present the pod's token"
        }
    }

    #[tokio::test]
    async fn a_remote_guard_asks_its_verifier_and_has_no_host_rule() {
        let registry = Registry::new();
        let refusals = Refusals::register(&registry);
        let app = guard_remote(
            Router::new().route("/live", get(|| async { "ok" })),
            Router::new().route("/api", post(|| async { "done" })),
            Flaky,
            refusals,
        );
        let post = |token: &str| {
            axum::http::Request::post("/api")
                .header(header::HOST, "mecha-autoscaler.mecha-system.svc:8080")
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
        };
        assert_eq!(
            call(&app, post("good")).await,
            (StatusCode::OK, "done".into())
        );
        let (status, body) = call(&app, post("bad")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, "wrong credential: present the pod's token\n");
        let (status, body) = call(&app, post("later")).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "not a refusal: {body}"
        );
        let (status, _) = call(
            &app,
            axum::http::Request::post("/api").header(header::HOST, "anything"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            call(
                &app,
                axum::http::Request::get("/live").header(header::HOST, "x")
            )
            .await
            .0,
            StatusCode::OK
        );
        let text = format!("{:?}", registry.gather());
        assert!(text.contains("unavailable"), "{text}");
    }
}
