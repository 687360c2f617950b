//! Who may use the server: the admin password (`DATA_DIR/admin-password`) logs a browser in
//! and gets an HttpOnly, SameSite=Strict session cookie plus a CSRF token every mutating
//! request must carry; scripts send `Authorization: Bearer` with `DATA_DIR/api-token`. Both
//! secrets are generated on first start (mode 0600) when absent.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};

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

/// Credentials and live sessions.
pub struct Auth {
    password: String,
    api_token: String,
    sessions: Mutex<HashMap<String, Session>>,
}

impl Auth {
    pub fn new(password: String, api_token: String) -> Auth {
        Auth {
            password,
            api_token,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks the password; on success opens a session and returns its id.
    pub fn login(&self, password: &str) -> Option<String> {
        if !same_secret(password.trim(), &self.password) {
            return None;
        }
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
        Some(id)
    }

    pub fn logout(&self, session_id: &str) {
        self.sessions().remove(session_id);
    }

    /// Who sent these headers, if anyone we know.
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

/// The `Set-Cookie` value that opens (or, with an empty id, ends) a session.
pub fn session_cookie(id: &str) -> String {
    let max_age = if id.is_empty() {
        0
    } else {
        SESSION_LIFETIME.as_secs()
    };
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_and_tokens() {
        let auth = Auth::new("correct horse".into(), "t0ken-t0ken".into());
        assert!(auth.login("wrong").is_none());
        let id = auth.login("correct horse\n").unwrap();
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
