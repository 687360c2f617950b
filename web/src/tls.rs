//! TLS for the UI and API (rustls on `ring`, the crypto the agent protocol already uses): the
//! server's certificate — a self-signed one made at the first `diskferry serve --tls` in
//! `DATA_DIR/tls` and kept, or the admin's own (`--tls-cert`, `--tls-key`) — and its SHA-256
//! [`Fingerprint`], the value clients pin instead of trusting a certificate authority
//! ([`crate::pin`]).
//!
//! The boot listener stays plain HTTP: many iPXE builds have no TLS, and what it serves (the
//! boot files, the server's *public* key, one-time tokens bound to a MAC) is public anyway.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// Why the server's certificate could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a PEM {what}: {source}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        source: rustls_pki_types::pem::Error,
    },
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate and key cannot be used for TLS: {0}")]
    Config(#[from] rustls::Error),
}

/// The SHA-256 of a certificate (its DER bytes), shown as `SHA256:AB:CD:…` like OpenSSL's
/// `x509 -fingerprint -sha256`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

/// A fingerprint that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a certificate fingerprint: expected SHA256: and 32 bytes in hex (SHA256:AB:CD:...)")]
pub struct BadFingerprint(String);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex: Vec<String> = self.0.iter().map(|b| format!("{b:02X}")).collect();
        write!(f, "SHA256:{}", hex.join(":"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Accepts `SHA256:AB:CD:…`, with or without the prefix and colons, in either case.
impl FromStr for Fingerprint {
    type Err = BadFingerprint;

    fn from_str(s: &str) -> Result<Fingerprint, BadFingerprint> {
        let bad = || BadFingerprint(s.to_string());
        let t = s.trim();
        let t = match t.get(..7) {
            Some(p) if p.eq_ignore_ascii_case("sha256:") => &t[7..],
            _ => t,
        };
        let hex: Vec<u8> = t.bytes().filter(|&b| b != b':').collect();
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(hex.chunks(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            *o = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

/// A certificate and key ready to serve.
#[derive(Debug)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub fingerprint: Fingerprint,
    pub cert_file: PathBuf,
    /// Whether this start made the certificate.
    pub created: bool,
}

/// The crypto every TLS configuration here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where `diskferry serve --tls` keeps its own certificate and key.
pub fn self_signed_files(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// The names a self-signed certificate is made for: `localhost`, `127.0.0.1`, the listening
/// address when it is a specific one, and `extra` (`--tls-name`).
pub fn subject_names(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    names.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// The self-signed certificate in `DATA_DIR/tls`, made for `names` when there is none yet.
/// Names given later do not change a kept certificate: delete the directory to make another.
pub fn self_signed(data_dir: &Path, names: &[String]) -> Result<ServerTls, TlsError> {
    let (cert, key) = self_signed_files(data_dir);
    // The certificate is written last: when it is there, both are.
    let created = !cert.exists();
    if created {
        create(&cert, &key, names)?;
    }
    Ok(ServerTls {
        created,
        ..load(&cert, &key)?
    })
}

/// An admin-provided certificate (chain) and its private key, both PEM.
pub fn load(cert_file: &Path, key_file: &Path) -> Result<ServerTls, TlsError> {
    let chain = read_chain(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|source| TlsError::Pem {
        path: key_file.to_path_buf(),
        what: "private key",
        source,
    })?;
    let fingerprint = Fingerprint::of(&chain[0]);
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(ServerTls {
        config: Arc::new(config),
        fingerprint,
        cert_file: cert_file.to_path_buf(),
        created: false,
    })
}

/// The fingerprint of the first (end-entity) certificate in a PEM file.
pub fn fingerprint_of_file(cert_file: &Path) -> Result<Fingerprint, TlsError> {
    Ok(Fingerprint::of(&read_chain(cert_file)?[0]))
}

/// Every certificate in a PEM file, at least one.
fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        path: path.to_path_buf(),
        what: "certificate",
        source,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if chain.is_empty() {
        return Err(pem(rustls_pki_types::pem::Error::NoItemsFound));
    }
    Ok(chain)
}

/// Makes a self-signed certificate for `names` (ECDSA P-256): the key 0600, the directory 0700.
fn create(cert: &Path, key: &Path, names: &[String]) -> Result<(), TlsError> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "diskferry");
    let pair = rcgen::KeyPair::generate()?;
    let made = params.self_signed(&pair)?;
    let dir = cert.parent().unwrap_or(Path::new("."));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    write_private(key, pair.serialize_pem().as_bytes()).map_err(io(key))?;
    write_private(cert, made.pem().as_bytes()).map_err(io(cert))?;
    tracing::info!("made a self-signed certificate for {}", names.join(", "));
    Ok(())
}

/// Writes `path` whole (through `PATH.partial`, synced, renamed), readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let partial = path.with_extension("pem.partial");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_print_and_parse_like_openssl() {
        let f = Fingerprint::of(b"certificate");
        let shown = f.to_string();
        assert!(shown.starts_with("SHA256:"), "{shown}");
        assert_eq!(shown.len(), 7 + 32 * 3 - 1);
        assert_eq!(shown.parse::<Fingerprint>().unwrap(), f);
        let bare = shown[7..].replace(':', "").to_lowercase();
        assert_eq!(bare.parse::<Fingerprint>().unwrap(), f);
        assert!("SHA256:AB:CD".parse::<Fingerprint>().is_err());
        assert!(format!("SHA256:{}", "zz".repeat(32))
            .parse::<Fingerprint>()
            .is_err());
    }

    #[test]
    fn a_self_signed_certificate_is_made_once_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let names = subject_names("0.0.0.0:8443".parse().unwrap(), &["imaging.lan".into()]);
        assert_eq!(names, ["localhost", "127.0.0.1", "imaging.lan"]);
        let first = self_signed(dir.path(), &names).unwrap();
        assert!(first.created);
        let (cert, key) = self_signed_files(dir.path());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(cert.parent().unwrap()), 0o700);
        let again = self_signed(dir.path(), &names).unwrap();
        assert!(!again.created);
        assert_eq!(again.fingerprint, first.fingerprint);
        assert_eq!(fingerprint_of_file(&cert).unwrap(), first.fingerprint);
        assert!(load(&cert, &cert).is_err(), "a certificate is no key");
    }
}
