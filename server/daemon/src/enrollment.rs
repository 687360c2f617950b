//! Enrollment tokens: a machine that boots from the network asks `/boot.ipxe?mac=MAC` for its
//! boot script and gets a one-time token bound to that MAC address on its kernel command line.
//! Its agent presents the token inside the handshake (after it has proven the server's key), and
//! the agent port binds the connection to the machine that owns the MAC. Tokens expire, are
//! used once, and only so many wait at a time, so asking for them cannot exhaust memory.
//!
//! A token is not approval: a machine the catalog has never approved, or whose announced
//! identity changed, still waits for an administrator (`Catalog::enroll`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a token stays usable: a PXE boot takes a minute or two.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Tokens waiting at once; the oldest goes when a new one would exceed this.
pub const MAX_TOKENS: usize = 4096;

/// The tokens handed out and not yet used.
#[derive(Debug, Default)]
pub struct Tokens {
    issued: Mutex<HashMap<String, Issued>>,
}

#[derive(Debug)]
struct Issued {
    mac: String,
    at: Instant,
}

impl Tokens {
    /// A new token for the machine booting with `mac` (already normalized).
    pub fn issue(&self, mac: &str) -> String {
        let token = random_hex();
        let mut issued = self.lock();
        let now = Instant::now();
        issued.retain(|_, t| now.duration_since(t.at) < TOKEN_LIFETIME);
        if issued.len() >= MAX_TOKENS {
            if let Some(oldest) = issued
                .iter()
                .min_by_key(|(_, t)| t.at)
                .map(|(k, _)| k.clone())
            {
                issued.remove(&oldest);
            }
        }
        issued.insert(
            token.clone(),
            Issued {
                mac: mac.to_string(),
                at: now,
            },
        );
        token
    }

    /// Uses up a token: the MAC it was issued for, if it is known, unused and unexpired.
    pub fn redeem(&self, token: &[u8]) -> Option<String> {
        let token = std::str::from_utf8(token).ok()?;
        let issued = self.lock().remove(token)?;
        (issued.at.elapsed() < TOKEN_LIFETIME).then_some(issued.mac)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Issued>> {
        self.issued.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// 32 random bytes as 64 hex digits.
fn random_hex() -> String {
    diskferry_protocol::StaticKey::generate()
        .public()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_works_once_for_the_mac_it_was_issued_for() {
        let t = Tokens::default();
        let a = t.issue("52:54:00:00:00:01");
        let b = t.issue("52:54:00:00:00:02");
        assert_ne!(a, b);
        assert_eq!(t.redeem(a.as_bytes()).as_deref(), Some("52:54:00:00:00:01"));
        assert_eq!(t.redeem(a.as_bytes()), None, "used once");
        assert_eq!(t.redeem(b"not a token"), None);
        assert_eq!(t.redeem(&[0xff, 0xfe]), None);
        assert_eq!(t.redeem(b.as_bytes()).as_deref(), Some("52:54:00:00:00:02"));
    }

    #[test]
    fn a_flood_of_requests_keeps_the_store_bounded() {
        let t = Tokens::default();
        let first = t.issue("52:54:00:00:00:01");
        for _ in 0..MAX_TOKENS + 10 {
            t.issue("52:54:00:00:00:09");
        }
        assert_eq!(t.lock().len(), MAX_TOKENS);
        assert_eq!(t.redeem(first.as_bytes()), None, "the oldest went first");
    }
}
