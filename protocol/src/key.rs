//! The pre-shared key both peers must hold: loaded from a key file, or generated.

use std::fmt;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Key files larger than this are not key files.
const MAX_KEY_FILE: u64 = 4096;
/// Fewer secret characters than this is a password, not a key.
const MIN_KEY_CHARS: usize = 16;

/// A 32-byte pre-shared key, derived from the key file's contents (whitespace trimmed).
#[derive(Clone)]
#[cfg_attr(not(feature = "io"), allow(dead_code))]
pub struct Psk([u8; 32]);

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is larger than {MAX_KEY_FILE} bytes; it should hold one line (see `diskferry keygen`)")]
    TooLarge { path: String },
    #[error("key file {path} holds {len} characters; use at least {MIN_KEY_CHARS} (generate one with `diskferry keygen FILE`)")]
    TooShort { path: String, len: usize },
}

impl Psk {
    /// Derives the key from secret text (for example one line of 64 hex digits).
    pub fn from_secret(secret: &[u8]) -> Psk {
        let mut h = Sha256::new();
        h.update(b"diskferry psk v1\0");
        h.update(secret);
        Psk(h.finalize().into())
    }

    /// Loads a key file: its trimmed contents are the secret.
    pub fn from_file(path: &Path) -> Result<Psk, KeyError> {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut raw = Vec::new();
        file.take(MAX_KEY_FILE + 1)
            .read_to_end(&mut raw)
            .map_err(|source| KeyError::Read {
                path: shown.clone(),
                source,
            })?;
        if raw.len() as u64 > MAX_KEY_FILE {
            return Err(KeyError::TooLarge { path: shown });
        }
        let secret = raw.trim_ascii();
        if secret.len() < MIN_KEY_CHARS {
            return Err(KeyError::TooShort {
                path: shown,
                len: secret.len(),
            });
        }
        Ok(Psk::from_secret(secret))
    }

    /// A fresh random secret, as the text to store in a key file (64 hex digits + newline).
    pub fn generate_secret() -> String {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).expect("the operating system's random source is unavailable");
        let mut s: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        s.push('\n');
        s
    }

    #[cfg(feature = "io")]
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(..)")
    }
}
