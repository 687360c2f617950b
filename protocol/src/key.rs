//! Static X25519 keys: the server's identity (its private key never leaves the server; its
//! public key may be printed, pinned and served to booting machines) and each agent's own
//! keypair (made in memory at start, or kept in a file so a restarted agent is recognised).
//!
//! A key file holds exactly 64 hex digits — 32 random bytes — and a newline: anything else
//! (a passphrase, a truncated key) is refused, so no human-chosen secret can be guessed from a
//! recorded handshake. `diskferry keygen` writes one.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use snow::resolvers::{CryptoResolver, DefaultResolver};

/// Key files larger than this are not key files.
const MAX_KEY_FILE: u64 = 4096;

/// A public key: an agent's or the server's.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

/// A static keypair. The private half is shown nowhere (`Debug` prints the public half).
#[derive(Clone)]
pub struct StaticKey {
    private: [u8; 32],
    public: PublicKey,
}

/// Why a key could not be loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is larger than {MAX_KEY_FILE} bytes; it should hold one line (see `diskferry keygen`)")]
    TooLarge { path: String },
    #[error("{what} must be 64 hex digits (32 random bytes); passphrases are not accepted (make a key with `diskferry keygen FILE`)")]
    NotAKey { what: String },
}

impl PublicKey {
    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<PublicKey, KeyError> {
        parse_hex(text.trim())
            .map(PublicKey)
            .ok_or(KeyError::NotAKey {
                what: format!("public key {:?}", shorten(text)),
            })
    }

    /// A key given on a command line: 64 hex digits, or the name of a file holding them.
    pub fn from_hex_or_file(value: &str) -> Result<PublicKey, KeyError> {
        if let Some(raw) = parse_hex(value.trim()) {
            return Ok(PublicKey(raw));
        }
        let text = read_key_text(Path::new(value))?;
        parse_hex(&text).map(PublicKey).ok_or(KeyError::NotAKey {
            what: format!("the public key in {value}"),
        })
    }

    pub fn from_bytes(raw: [u8; 32]) -> PublicKey {
        PublicKey(raw)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 16 hex digits: enough for a person to compare two keys at a glance.
    pub fn fingerprint(&self) -> String {
        self.to_string()[..16].to_string()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

impl StaticKey {
    /// A fresh keypair from the operating system's random source.
    pub fn generate() -> StaticKey {
        let mut private = [0u8; 32];
        getrandom::fill(&mut private).expect("the operating system's random source is unavailable");
        StaticKey::from_private(private)
    }

    fn from_private(private: [u8; 32]) -> StaticKey {
        let mut dh = DefaultResolver
            .resolve_dh(&snow::params::DHChoice::Curve25519)
            .expect("snow's default resolver has Curve25519");
        dh.set(&private);
        let mut public = [0u8; 32];
        public.copy_from_slice(dh.pubkey());
        StaticKey {
            private,
            public: PublicKey(public),
        }
    }

    /// Loads a key file (64 hex digits).
    pub fn from_file(path: &Path) -> Result<StaticKey, KeyError> {
        let text = read_key_text(path)?;
        parse_hex(&text)
            .map(StaticKey::from_private)
            .ok_or(KeyError::NotAKey {
                what: format!("the key in {}", path.display()),
            })
    }

    /// Writes a new key file, readable by its owner only; refuses to replace an existing file.
    pub fn create_file(path: &Path) -> Result<StaticKey, KeyError> {
        let key = StaticKey::generate();
        let err = |source| KeyError::Write {
            path: path.display().to_string(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        f.write_all(key.file_text().as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        Ok(key)
    }

    /// Loads the key file, or creates it when it does not exist yet.
    pub fn load_or_create(path: &Path) -> Result<StaticKey, KeyError> {
        match StaticKey::create_file(path) {
            Err(KeyError::Write { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                StaticKey::from_file(path)
            }
            other => other,
        }
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The text of a key file holding this key.
    pub fn file_text(&self) -> String {
        let mut s = PublicKey(self.private).to_string();
        s.push('\n');
        s
    }

    #[cfg(feature = "io")]
    pub(crate) fn private_bytes(&self) -> &[u8; 32] {
        &self.private
    }
}

impl fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StaticKey(public {})", self.public.fingerprint())
    }
}

fn read_key_text(path: &Path) -> Result<String, KeyError> {
    let shown = path.display().to_string();
    let read_err = |source| KeyError::Read {
        path: shown.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut raw = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut raw)
        .map_err(read_err)?;
    if raw.len() as u64 > MAX_KEY_FILE {
        return Err(KeyError::TooLarge { path: shown });
    }
    Ok(String::from_utf8_lossy(raw.trim_ascii()).into_owned())
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(text.chunks(2)) {
        let s = std::str::from_utf8(pair).ok()?;
        *o = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

fn shorten(text: &str) -> String {
    text.chars().take(20).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_hold_32_random_bytes_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        let made = StaticKey::create_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let loaded = StaticKey::from_file(&path).unwrap();
        assert_eq!(made.public(), loaded.public());
        assert!(
            StaticKey::create_file(&path).is_err(),
            "never replaces a key"
        );
        assert_eq!(
            StaticKey::load_or_create(&path).unwrap().public(),
            made.public()
        );
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "correct horse battery staple, a long passphrase\n").unwrap();
        assert!(matches!(
            StaticKey::from_file(&pass),
            Err(KeyError::NotAKey { .. })
        ));
        let public = made.public().to_string();
        assert_eq!(PublicKey::from_hex(&public).unwrap(), made.public());
        std::fs::write(dir.path().join("pub"), &public).unwrap();
        let from_file =
            PublicKey::from_hex_or_file(dir.path().join("pub").to_str().unwrap()).unwrap();
        assert_eq!(from_file, made.public());
        assert_ne!(
            StaticKey::generate().public(),
            made.public(),
            "keys are random"
        );
    }
}
