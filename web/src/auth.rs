//! Who may use the server: the admin password (its argon2id hash in `DATA_DIR/admin-password`,
//! see [`crate::password`]) logs a browser in and gets an HttpOnly, SameSite=Strict session
//! cookie plus a CSRF token every mutating request must carry; scripts send
//! `Authorization: Bearer` with `DATA_DIR/api-token`. Both secrets are generated on first start
//! (mode 0600) when absent. Failed passwords and tokens are counted per client address
//! ([`crate::ratelimit`]).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};

use crate::ratelimit::Failures;

/// Name of the session cookie.
pub const COOKIE: &str = "diskferry_session";
/// Sessions end this long after login.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// At most this many live sessions; the oldest goes first.
const MAX_SESSIONS: usize = 1024;

/// A secret file's content and whether this start created it.
pub struct Secret {
    pub value: String,
    pub created: bool,
}

/// Reads `path`, or creates it (mode 0600) holding `generate()`'s value.
pub fn secret_file(path: &Path, generate: impl FnOnce() -> String) -> std::io::Result<Secret> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let value = s.trim().to_string();
            if value.len() < 8 {
                return Err(std::io::Error::other(format!(
                    "{} holds fewer than 8 characters; put a longer secret in it, or delete it to have one generated",
                    path.display()
                )));
            }
            Ok(Secret {
                value,
                created: false,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let value = generate();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(format!("{value}\n").as_bytes())?;
            f.sync_all()?;
            Ok(Secret {
                value,
                created: true,
            })
        }
        Err(e) => Err(e),
    }
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut raw = vec![0u8; n];
    getrandom::fill(&mut raw).expect("the operating system's random source is unavailable");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A logged-in browser.
#[derive(Clone)]
pub struct Session {
    pub csrf: String,
    expires: Instant,
}

/// How a request proved who it is.
#[derive(Clone)]
pub enum Identity {
    /// A browser session: mutations must carry its CSRF token.
    Browser { session_id: String, csrf: String },
    /// The API token: no ambient credential, so no CSRF check.
    Token,
}

impl Identity {
    /// The CSRF token pages embed in their forms (empty for token clients).
    pub fn csrf(&self) -> &str {
        match self {
            Identity::Browser { csrf, .. } => csrf,
            Identity::Token => "",
        }
    }
}

/// Most password checks running at once (each argon2id check holds 19 MiB for a moment).
const MAX_CHECKS: usize = 4;

/// Credentials, live sessions and recent failures.
pub struct Auth {
    /// The admin password's argon2id PHC string.
    password_hash: String,
    api_token: String,
    sessions: Mutex<HashMap<String, Session>>,
    /// Failed logins and tokens per client address.
    pub failures: Failures,
    /// Bounds the memory password checks take.
    checks: tokio::sync::Semaphore,
    /// Session cookies are marked `Secure` (the UI is served over TLS).
    secure_cookies: std::sync::atomic::AtomicBool,
}

impl Auth {
    pub fn new(password_hash: String, api_token: String) -> Auth {
        Auth {
            password_hash,
            api_token,
            sessions: Mutex::new(HashMap::new()),
            failures: Failures::default(),
            checks: tokio::sync::Semaphore::new(MAX_CHECKS),
            secure_cookies: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Marks session cookies `Secure` (the server speaks TLS) or not.
    pub fn set_secure_cookies(&self, secure: bool) {
        self.secure_cookies
            .store(secure, std::sync::atomic::Ordering::Relaxed);
    }

    /// The `Set-Cookie` value that opens (or, with an empty id, ends) a session.
    pub fn cookie_for(&self, session_id: &str) -> String {
        let secure = self
            .secure_cookies
            .load(std::sync::atomic::Ordering::Relaxed);
        session_cookie(session_id, secure)
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks the password (on a blocking thread, a few at a time); on success opens a
    /// session and returns its id.
    pub async fn login(self: &Arc<Self>, password: &str) -> Option<String> {
        let _permit = self.checks.acquire().await.ok()?;
        let auth = Arc::clone(self);
        let password = password.trim().to_string();
        let ok = tokio::task::spawn_blocking(move || {
            crate::password::verify(&password, &auth.password_hash)
        })
        .await
        .unwrap_or(false);
        ok.then(|| self.open_session())
    }

    /// A new session; the oldest goes when there are too many.
    fn open_session(&self) -> String {
        let id = random_hex(32);
        let now = Instant::now();
        let mut sessions = self.sessions();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            id.clone(),
            Session {
                csrf: random_hex(32),
                expires: now + SESSION_LIFETIME,
            },
        );
        id
    }

    pub fn logout(&self, session_id: &str) {
        self.sessions().remove(session_id);
    }

    /// Who sent these headers, if anyone we know. An `Authorization` header that does not
    /// hold the API token is no one, whatever cookies come with it.
    pub fn identify(&self, headers: &HeaderMap) -> Option<Identity> {
        if let Some(auth) = headers.get(header::AUTHORIZATION) {
            let token = auth.to_str().ok()?.strip_prefix("Bearer ")?.trim();
            return same_secret(token, &self.api_token).then_some(Identity::Token);
        }
        let id = cookie(headers, COOKIE)?;
        let sessions = self.sessions();
        let s = sessions.get(id)?;
        (s.expires > Instant::now()).then(|| Identity::Browser {
            session_id: id.to_string(),
            csrf: s.csrf.clone(),
        })
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The `Set-Cookie` value that opens (or, with an empty id, ends) a session; `secure` (the
/// server speaks TLS) keeps browsers from ever sending it over plain HTTP.
pub fn session_cookie(id: &str, secure: bool) -> String {
    let max_age = if id.is_empty() {
        0
    } else {
        SESSION_LIFETIME.as_secs()
    };
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_and_tokens() {
        let hash = crate::password::hash("correct horse battery").unwrap();
        let auth = Arc::new(Auth::new(hash, "t0ken-t0ken".into()));
        assert!(auth.login("wrong").await.is_none());
        let id = auth.login("correct horse battery\n").await.unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("a=b; {COOKIE}={id}").parse().unwrap(),
        );
        assert!(matches!(auth.identify(&h), Some(Identity::Browser { .. })));
        auth.logout(&id);
        assert!(auth.identify(&h).is_none());
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer t0ken-t0ken".parse().unwrap());
        assert!(matches!(auth.identify(&h), Some(Identity::Token)));
        h.insert(header::AUTHORIZATION, "Bearer t0ken-t0kem".parse().unwrap());
        assert!(auth.identify(&h).is_none());
    }

    #[test]
    fn session_cookies_are_secure_over_tls() {
        let auth = Auth::new(String::new(), String::new());
        assert!(!auth.cookie_for("abc").contains("Secure"));
        auth.set_secure_cookies(true);
        let c = auth.cookie_for("abc");
        assert!(c.ends_with("; Secure") && c.contains("HttpOnly"), "{c}");
    }

    #[test]
    fn secret_files_are_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin-password");
        let a = secret_file(&p, || "generated-secret".into()).unwrap();
        assert!(a.created);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = secret_file(&p, || unreachable!()).unwrap();
        assert_eq!((b.value.as_str(), b.created), ("generated-secret", false));
        std::fs::write(&p, "short").unwrap();
        assert!(secret_file(&p, || unreachable!()).is_err());
    }
}
