//! The client's side of TLS: a server is trusted when its certificate's SHA-256 is the one
//! pinned (`--tls-fingerprint`, or read from `DATA_DIR/tls/cert.pem` on the server's machine),
//! not through certificate authorities — the server's certificate is usually self-signed.
//! The handshake's signature is still verified with the provider's algorithms, so only the
//! holder of the pinned certificate's private key can complete it.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::tls::{provider, Fingerprint};

/// Accepts exactly one certificate, named by its fingerprint.
#[derive(Debug)]
pub struct PinnedCert {
    pin: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

/// The certificate the server showed is not the pinned one.
#[derive(thiserror::Error)]
#[error("the server's certificate is {got}, not the pinned {pinned}")]
struct WrongCertificate {
    got: Fingerprint,
    pinned: Fingerprint,
}

/// rustls shows the reason with `Debug`: the sentence, not the struct.
impl std::fmt::Debug for WrongCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl PinnedCert {
    pub fn new(pin: Fingerprint) -> PinnedCert {
        PinnedCert {
            pin,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity);
        if got == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        let wrong = WrongCertificate {
            got,
            pinned: self.pin,
        };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(wrong)),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client configuration that trusts only the certificate with fingerprint `pin`.
pub fn client_config(pin: Fingerprint) -> Result<Arc<ClientConfig>, rustls::Error> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert::new(pin)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a handshake between a client pinning `pin` and a server with `server`'s
    /// certificate, in memory; the first error either side meets.
    fn handshake(server: &crate::tls::ServerTls, pin: Fingerprint) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(client_config(pin)?, name)?;
        let mut srv = rustls::ServerConnection::new(Arc::clone(&server.config))?;
        for _ in 0..10 {
            if !client.is_handshaking() && !srv.is_handshaking() {
                return Ok(());
            }
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            srv.read_tls(&mut wire.as_slice()).unwrap();
            srv.process_new_packets()?;
            wire.clear();
            srv.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets()?;
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn only_the_pinned_certificate_completes_a_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let server = crate::tls::self_signed(dir.path(), &["localhost".into()]).unwrap();
        handshake(&server, server.fingerprint).unwrap();
        let mut other = server.fingerprint;
        other.0[31] ^= 1;
        let e = handshake(&server, other).unwrap_err();
        assert!(
            e.to_string().contains(&format!("not the pinned {other}")),
            "{e}"
        );
    }
}
