//! New SSH host keys, made on the server: ed25519, RSA (3072 bits) and ECDSA (NIST P-256),
//! in OpenSSH's own file format, installed as `/etc/ssh/ssh_host_*_key` (0600) and `.pub`
//! (0644), root's; the capture's keys are removed. Two machines deployed from one capture
//! therefore never share host keys.

use diskferry_fs::overlay::{Attrs, TreeOverlay};
use diskferry_fs::{FileKind, Filesystem};
use ssh_key::private::{EcdsaKeypair, KeypairData, RsaKeypair};
use ssh_key::{Algorithm, EcdsaCurve, LineEnding, PrivateKey};

use crate::CustomizeError;

/// RSA host keys get this many bits (what `ssh-keygen -A` makes).
const RSA_BITS: usize = 3072;

/// One host key: its file name's kind (`ed25519`), private and public files' text.
#[derive(Clone)]
pub(crate) struct HostKey {
    kind: &'static str,
    private: String,
    public: String,
}

fn key_err(e: ssh_key::Error) -> CustomizeError {
    CustomizeError::Keys(e.to_string())
}

/// A new key of each kind.
pub(crate) fn generate() -> Result<Vec<HostKey>, CustomizeError> {
    let mut rng = rand_core::OsRng;
    let keys = [
        (
            "ed25519",
            PrivateKey::random(&mut rng, Algorithm::Ed25519).map_err(key_err)?,
        ),
        (
            "rsa",
            PrivateKey::new(
                KeypairData::from(RsaKeypair::random(&mut rng, RSA_BITS).map_err(key_err)?),
                "",
            )
            .map_err(key_err)?,
        ),
        (
            "ecdsa",
            PrivateKey::new(
                KeypairData::from(
                    EcdsaKeypair::random(&mut rng, EcdsaCurve::NistP256).map_err(key_err)?,
                ),
                "",
            )
            .map_err(key_err)?,
        ),
    ];
    keys.into_iter()
        .map(|(kind, mut key)| {
            key.set_comment("root@diskferry");
            Ok(HostKey {
                kind,
                private: key.to_openssh(LineEnding::LF).map_err(key_err)?.to_string(),
                public: key.public_key().to_openssh().map_err(key_err)? + "\n",
            })
        })
        .collect()
}

/// Replaces the system's host keys with `keys` (nothing when it has no `/etc/ssh`: no SSH
/// server to use them).
pub(crate) fn install(
    o: &mut TreeOverlay,
    keys: &[HostKey],
) -> Result<Vec<String>, CustomizeError> {
    let Some((dir, FileKind::Dir)) = o.stat("/etc/ssh")? else {
        return Ok(vec![
            "SSH host keys: no /etc/ssh here, nothing written".into()
        ]);
    };
    let old: Vec<String> = o
        .read_dir(dir)?
        .into_iter()
        .map(|e| e.name_lossy())
        .filter(|n| n.starts_with("ssh_host_") && (n.ends_with("_key") || n.ends_with("_key.pub")))
        .collect();
    for name in &old {
        o.remove(&format!("/etc/ssh/{name}"))?;
    }
    for k in keys {
        let path = format!("/etc/ssh/ssh_host_{}_key", k.kind);
        o.write_file(&path, k.private.clone().into_bytes(), Attrs::root(0o600))?;
        o.write_file(
            &format!("{path}.pub"),
            k.public.clone().into_bytes(),
            Attrs::root(0o644),
        )?;
    }
    Ok(vec![format!(
        "SSH host keys: {} old file(s) removed, new ed25519, rsa {RSA_BITS} and ecdsa p256 keys",
        old.len()
    )])
}
