//! diskferry's web side (axum): server-rendered pages to browse captures, run and watch jobs
//! and see machines, and the JSON API under `/api` (described by `/api/openapi.json`) that the
//! pages' small scripts and other programs use. The only crate that knows HTTP.
//!
//! Every route but the login page, static assets and the OpenAPI file needs a browser session
//! or the API token ([`auth`]); every mutating request from a browser carries the session's
//! CSRF token; request bodies are bounded. The UI and API may be served over TLS ([`tls`]);
//! the boot endpoints can also have a plain-HTTP listener of their own ([`serve_boot`]), so the
//! boot network need not reach the UI at all.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod boot;
pub mod browse;
pub mod client;
pub mod error;
pub mod innerpath;
pub mod pages;
pub mod password;
pub mod pin;
pub mod ratelimit;
pub mod security_headers;
pub mod server;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Router;
use diskferry_daemon::agents::Agents;
use diskferry_daemon::catalog::{Catalog, CatalogError};
use diskferry_daemon::enrollment::Tokens;
use diskferry_protocol::{PublicKey, SessionOptions, StaticKey};

use crate::auth::{Auth, Identity};
use crate::error::Failure;

/// Largest request body accepted (forms and JSON are small).
pub const MAX_BODY: usize = 64 << 10;

/// Everything a request handler may need.
pub struct AppState {
    pub catalog: Arc<Catalog>,
    pub auth: Arc<Auth>,
    pub volumes: browse::Volumes,
    /// Rendered directory listings (the API's), reused while a capture is unchanged.
    pub listings: browse::Listings,
    pub jobs: Arc<diskferry_daemon::jobs::Jobs>,
    /// Machines connected over the agent port.
    pub agents: Arc<Agents>,
    /// Network boot, once the server knows its agent port.
    pub boot: std::sync::OnceLock<boot::BootConfig>,
    /// Enrollment tokens handed to booting machines.
    pub tokens: Arc<Tokens>,
    /// When the captures directory was last rescanned.
    pub refreshed: std::sync::Mutex<Option<std::time::Instant>>,
    /// Where the captures are exported over NBD, once the server listens there.
    pub nbd: std::sync::OnceLock<diskferry_nbd::ListenAddr>,
}

pub type SharedState = Arc<AppState>;

/// What `diskferry serve` learns while starting, to tell the operator.
#[derive(Debug)]
pub struct Startup {
    /// The admin password when this start generated it (print it once).
    pub new_password: Option<String>,
    pub password_file: PathBuf,
    pub token_file: PathBuf,
    /// The server's identity key file (private).
    pub key_file: PathBuf,
    /// Its public key: clients pin it, the boot script carries it.
    pub server_key: PublicKey,
    pub key_created: bool,
    pub captures: usize,
    pub interrupted_jobs: usize,
}

/// Why the data directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] diskferry_protocol::KeyError),
    #[error(transparent)]
    Password(#[from] password::PasswordError),
}

/// Opens the data directory: catalog (registering every capture), secrets, job state.
pub fn open(data_dir: &Path) -> Result<(SharedState, Startup), OpenError> {
    std::fs::create_dir_all(data_dir).map_err(|source| OpenError::CreateDir {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let catalog = Arc::new(Catalog::open(data_dir)?);
    let interrupted_jobs = catalog.interrupt_unfinished_jobs()?;
    catalog.refresh_captures()?;
    let captures = catalog.captures()?.len();
    let secret = |name: &str, generate: fn() -> String| {
        let path = data_dir.join(name);
        auth::secret_file(&path, generate)
            .map(|s| (s, path.clone()))
            .map_err(|source| OpenError::Secret { path, source })
    };
    let password_file = data_dir.join("admin-password");
    let password = password::load_or_create(&password_file, || auth::random_hex(12))?;
    let (token, token_file) = secret("api-token", || auth::random_hex(32))?;
    let key_file = data_dir.join("server.key");
    let key_created = !key_file.exists();
    let server_key = StaticKey::load_or_create(&key_file)?;
    let session = SessionOptions::controller(server_key.clone());
    let tokens = Arc::new(Tokens::default());
    let agents = Arc::new(Agents::new(
        Arc::clone(&catalog),
        session.clone(),
        Arc::clone(&tokens),
    ));
    let state = Arc::new(AppState {
        jobs: Arc::new(diskferry_daemon::jobs::Jobs::new(
            Arc::clone(&catalog),
            session,
            Arc::clone(&agents),
        )),
        tokens,
        agents,
        catalog,
        auth: Arc::new(Auth::new(password.hash, token.value)),
        volumes: browse::Volumes::default(),
        listings: browse::Listings::default(),
        refreshed: std::sync::Mutex::new(Some(std::time::Instant::now())),
        boot: std::sync::OnceLock::new(),
        nbd: std::sync::OnceLock::new(),
    });
    Ok((
        state,
        Startup {
            new_password: password.generated,
            password_file,
            token_file,
            key_file,
            key_created,
            server_key: server_key.public(),
            captures,
            interrupted_jobs,
        },
    ))
}

/// The whole application.
pub fn router(state: SharedState) -> Router {
    let routes = Router::new()
        .merge(boot::routes())
        .merge(pages::routes())
        .nest("/api", api::routes())
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            require_auth,
        ));
    with_common_layers(routes, state)
}

/// The boot endpoints alone (`/boot.ipxe`, `/boot/{file}`): every other path is 404.
pub fn boot_router(state: SharedState) -> Router {
    let routes = boot::routes().fallback(|| async {
        Failure::not_found("only the network boot endpoints are served here")
    });
    with_common_layers(routes, state)
}

/// Bounded bodies read in time and the security headers, around every route.
fn with_common_layers(routes: Router<SharedState>, state: SharedState) -> Router {
    routes
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(server::read_body_in_time))
        .layer(axum::middleware::map_response(security_headers::add))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until the process ends, with timeouts and connection
/// caps ([`server`]); over TLS when given a configuration, and then session cookies are
/// marked `Secure`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: SharedState,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    state.auth.set_secure_cookies(tls.is_some());
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    server::serve(listener, router(state), acceptor).await
}

/// Serves `boot_router(state)`, plain HTTP, on `listener` until the process ends, with the
/// same timeouts and caps as [`serve`].
pub async fn serve_boot(
    listener: tokio::net::TcpListener,
    state: SharedState,
) -> std::io::Result<()> {
    server::serve(listener, boot_router(state), None).await
}

/// Paths anyone may fetch.
fn is_public(path: &str) -> bool {
    path == "/login"
        || path.starts_with("/static/")
        || path == "/api/openapi.json"
        // Booting machines cannot log in.
        || path == "/boot.ipxe"
        || path.starts_with("/boot/")
}

/// Lets a request through only with a session or the API token, and a browser's mutation only
/// with the session's CSRF token (header `X-CSRF-Token`, or a `csrf` form field).
async fn require_auth(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let api = path.starts_with("/api/");
    if is_public(&path) {
        return next.run(req).await;
    }
    // Wrong API tokens count as failed logins.
    let bearer = req.headers().contains_key(header::AUTHORIZATION);
    let ip = ratelimit::client_ip(req.extensions());
    if let (true, Err(wait)) = (bearer, state.auth.failures.check(ip)) {
        return ratelimit::too_many(wait);
    }
    let Some(identity) = state.auth.identify(req.headers()) else {
        if bearer {
            state.auth.failures.fail(ip);
        }
        return if api {
            Failure::new(
                StatusCode::UNAUTHORIZED,
                "log in first: send `Authorization: Bearer TOKEN` with the token from DATA_DIR/api-token",
            )
            .into_response()
        } else {
            let next_url = req
                .uri()
                .path_and_query()
                .map_or("/".to_string(), |p| p.to_string());
            Redirect::to(&format!(
                "/login?next={}",
                pages::layout::encode_query(&next_url)
            ))
            .into_response()
        };
    };
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let mut req = req;
    if mutating {
        // Bodies are read here, bounded, so an oversized one gets a clear answer.
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
            return Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than {MAX_BODY} bytes"),
            )
            .into_response();
        };
        if let Identity::Browser { csrf, .. } = &identity {
            let from_header = parts
                .headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let is_form = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
            let from_form = is_form.then(|| form_field(&bytes, "csrf")).flatten();
            let ok = from_header
                .or(from_form)
                .is_some_and(|t| auth::same_secret(&t, csrf));
            if !ok {
                return Failure::new(
                    StatusCode::FORBIDDEN,
                    "missing or wrong CSRF token: reload the page and try again",
                )
                .into_response();
            }
        }
        req = Request::from_parts(parts, Body::from(bytes));
    }
    req.extensions_mut().insert(identity);
    next.run(req).await
}

/// One field of an `application/x-www-form-urlencoded` body.
fn form_field(body: &[u8], name: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).ok()?;
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}
