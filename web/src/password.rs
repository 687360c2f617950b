//! The admin password at rest: `DATA_DIR/admin-password` holds an argon2id hash (a PHC
//! string, `$argon2id$v=19$…`), never the password. An operator may still put a password there
//! in clear before starting; the server checks it against the policy (at least
//! [`MIN_LENGTH`] characters, not one repeated character, not a well-known password) and
//! replaces it with its hash on start. When the file is absent a random password is generated,
//! its hash stored and the password itself handed back once to be printed.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Fewest characters an admin password may have.
pub const MIN_LENGTH: usize = 12;

/// Passwords of 12 or more characters that appear near the top of every leaked-password list.
const COMMON: &[&str] = &[
    "123456789012",
    "1234567890123",
    "12345678901234",
    "qwertyuiop12",
    "qwertyuiopas",
    "qwerty123456",
    "password1234",
    "password12345",
    "password123456",
    "passwordpassword",
    "administrator",
    "administrator1",
    "adminadminadmin",
    "adminpassword",
    "letmeinletmein",
    "iloveyou1234",
    "changeme1234",
    "welcome12345",
    "1q2w3e4r5t6y",
    "1qaz2wsx3edc",
    "qazwsxedcrfv",
    "zaq12wsxcde3",
    "abcdefghijkl",
    "abc123456789",
    "123123123123",
    "123qweasdzxc",
    "trustno1trustno1",
    "correcthorsebatterystaple",
    "diskferrydiskferry",
    "diskferry123",
    "diskferry1234",
];

/// Why a password or the password file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("the admin password must have at least {MIN_LENGTH} characters")]
    TooShort,
    #[error("the admin password is one character repeated")]
    Repeated,
    #[error("the admin password is one of the most common passwords")]
    Common,
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a usable argon2 hash ({reason}); put a new password there in clear, or delete the file to have one generated")]
    BadHash { path: PathBuf, reason: String },
    #[error("{path} holds a weak password: {source}; put a longer one there, or delete the file to have one generated")]
    Weak {
        path: PathBuf,
        source: Box<PasswordError>,
    },
    #[error("hashing the admin password failed: {0}")]
    Hash(String),
}

/// Refuses passwords that are short, one repeated character or well known.
pub fn check_strength(password: &str) -> Result<(), PasswordError> {
    if password.chars().count() < MIN_LENGTH {
        return Err(PasswordError::TooShort);
    }
    let mut chars = password.chars();
    let first = chars.next();
    if chars.all(|c| Some(c) == first) {
        return Err(PasswordError::Repeated);
    }
    let lower = password.to_lowercase();
    if COMMON.contains(&lower.as_str()) {
        return Err(PasswordError::Common);
    }
    Ok(())
}

/// An argon2id PHC string for `password`, with a random salt.
pub fn hash(password: &str) -> Result<String, PasswordError> {
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|e| PasswordError::Hash(e.to_string()))?;
    let salt = SaltString::encode_b64(&raw).map_err(|e| PasswordError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// Whether `password` matches the PHC string `phc` (false when `phc` is not one).
pub fn verify(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Whether `phc` is an argon2id hash [`verify`] can check: parameters, salt and hash.
fn check_hash(phc: &str) -> Result<(), String> {
    let h = PasswordHash::new(phc).map_err(|e| e.to_string())?;
    if h.algorithm != argon2::ARGON2ID_IDENT {
        return Err(format!("algorithm {}, not argon2id", h.algorithm));
    }
    if h.salt.is_none() || h.hash.is_none() {
        return Err("no salt or no hash".into());
    }
    argon2::Params::try_from(&h)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The stored hash, and the password when this start generated it.
#[derive(Debug)]
pub struct Stored {
    pub hash: String,
    pub generated: Option<String>,
}

/// Reads the password file at `path`: a hash is kept, a password in clear is checked and
/// replaced by its hash, a missing file gets a generated password (`generate()`).
pub fn load_or_create(
    path: &Path,
    generate: impl FnOnce() -> String,
) -> Result<Stored, PasswordError> {
    let file_err = |source| PasswordError::File {
        path: path.to_path_buf(),
        source,
    };
    let (clear, generated) = match std::fs::read_to_string(path) {
        Ok(text) if text.trim().starts_with("$argon2") => {
            let hash = text.trim().to_string();
            return match check_hash(&hash) {
                Ok(()) => Ok(Stored {
                    hash,
                    generated: None,
                }),
                Err(reason) => Err(PasswordError::BadHash {
                    path: path.to_path_buf(),
                    reason,
                }),
            };
        }
        Ok(text) => (text.trim().to_string(), false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (generate(), true),
        Err(e) => return Err(file_err(e)),
    };
    check_strength(&clear).map_err(|e| PasswordError::Weak {
        path: path.to_path_buf(),
        source: Box::new(e),
    })?;
    let hash = hash(&clear)?;
    replace_file(path, &hash).map_err(file_err)?;
    if !generated {
        tracing::info!(
            "{}: the admin password is now stored as an argon2id hash",
            path.display()
        );
    }
    Ok(Stored {
        hash,
        generated: generated.then_some(clear),
    })
}

/// Writes `text` to `path` (mode 0600) through a synced temporary file and a rename, so a
/// crash leaves the old content or the new, never half of either.
fn replace_file(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(format!("{text}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_passwords_are_refused() {
        assert!(matches!(
            check_strength("eleven-char"),
            Err(PasswordError::TooShort)
        ));
        assert!(matches!(
            check_strength("aaaaaaaaaaaaaaaa"),
            Err(PasswordError::Repeated)
        ));
        assert!(matches!(
            check_strength("Password1234"),
            Err(PasswordError::Common)
        ));
        assert!(check_strength("plum-vessel-quiet-42").is_ok());
    }

    #[test]
    fn a_clear_password_is_replaced_by_its_hash() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin-password");
        std::fs::write(&p, "plum-vessel-quiet-42\n").unwrap();
        let stored = load_or_create(&p, || unreachable!()).unwrap();
        let on_disk = std::fs::read_to_string(&p).unwrap();
        assert!(on_disk.starts_with("$argon2id$"), "{on_disk}");
        assert!(!on_disk.contains("plum-vessel"));
        assert_eq!(on_disk.trim(), stored.hash);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(verify("plum-vessel-quiet-42", &stored.hash));
        assert!(!verify("plum-vessel-quiet-43", &stored.hash));
        // The next start keeps the hash.
        let again = load_or_create(&p, || unreachable!()).unwrap();
        assert_eq!((again.hash, again.generated), (stored.hash, None));
    }

    #[test]
    fn a_missing_file_gets_a_generated_password_and_weak_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin-password");
        let stored = load_or_create(&p, || "generated-0123456789".into()).unwrap();
        assert_eq!(stored.generated.as_deref(), Some("generated-0123456789"));
        assert!(verify("generated-0123456789", &stored.hash));
        std::fs::write(&p, "short\n").unwrap();
        assert!(matches!(
            load_or_create(&p, || unreachable!()),
            Err(PasswordError::Weak { .. })
        ));
        std::fs::write(&p, "$argon2id$garbage\n").unwrap();
        assert!(matches!(
            load_or_create(&p, || unreachable!()),
            Err(PasswordError::BadHash { .. })
        ));
    }
}
