//! Connection set-up: version negotiation, then a Noise `NNpsk0` handshake.
//!
//! ```text
//! initiator → responder   hello: "DSKFERRY" | min u16 | max u16              (plaintext)
//! responder → initiator   hello: "DSKFERRY" | chosen u16 (0 = none) | min u16 | max u16
//! initiator → responder   u16 len | Noise msg 1 (e, psk)  payload: params     (authenticated)
//! responder → initiator   u16 len | Noise msg 2 (e, ee)   payload: params     or u16 0 = rejected
//! ```
//! Both hellos are the Noise prologue, so a tampered negotiation fails authentication. The
//! params (role, wish for plaintext, maximum payload) travel inside the authenticated messages:
//! a peer without the key learns nothing, and plaintext mode is only chosen when both
//! authenticated sides asked for it.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::record::{self, Opener, Sealer};
use crate::{ProtocolError, Psk, Role, MAX_PAYLOAD_LIMIT, VERSION_MAX, VERSION_MIN};

const MAGIC: &[u8; 8] = b"DSKFERRY";
const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
const PARAMS_LEN: usize = 6;
/// Smallest payload limit a peer may advertise (one 64 KiB request must always fit).
const MIN_PAYLOAD: u32 = 64 << 10;

/// What this side brings to a handshake.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub role: Role,
    pub psk: Psk,
    /// Ask for an unencrypted transport after authentication (both sides must ask).
    pub plaintext: bool,
    /// Largest data payload this side accepts in one frame.
    pub max_payload: u32,
    /// Give up on a peer that has not finished the handshake in this time.
    pub timeout: Duration,
}

impl SessionOptions {
    pub fn new(role: Role, psk: Psk) -> Self {
        SessionOptions {
            role,
            psk,
            plaintext: false,
            max_payload: crate::DEFAULT_MAX_PAYLOAD,
            timeout: Duration::from_secs(15),
        }
    }
}

/// An authenticated session, ready to exchange frames.
#[derive(Debug)]
pub struct Session {
    pub version: u16,
    /// True when both sides asked for plaintext: frames then go unencrypted.
    pub plaintext: bool,
    /// The smaller of both sides' limits: no frame may carry a larger payload.
    pub max_payload: u32,
    pub peer_role: Role,
    pub(crate) cipher: Option<(Sealer, Opener)>,
}

/// Runs the handshake as the side that opened the connection.
pub async fn initiate<S>(io: &mut S, opts: &SessionOptions) -> Result<Session, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    with_timeout(opts.timeout, initiate_inner(io, opts)).await
}

/// Runs the handshake as the side that accepted the connection.
pub async fn respond<S>(io: &mut S, opts: &SessionOptions) -> Result<Session, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    with_timeout(opts.timeout, respond_inner(io, opts)).await
}

async fn with_timeout<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, ProtocolError>>,
) -> Result<T, ProtocolError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| ProtocolError::HandshakeTimeout(limit.as_secs()))?
}

fn hello() -> [u8; 12] {
    let mut h = [0u8; 12];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION_MIN.to_be_bytes());
    h[10..12].copy_from_slice(&VERSION_MAX.to_be_bytes());
    h
}

async fn initiate_inner<S>(io: &mut S, opts: &SessionOptions) -> Result<Session, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ours = hello();
    io.write_all(&ours).await?;
    io.flush().await?;
    let mut theirs = [0u8; 14];
    read_exact(io, &mut theirs).await?;
    if &theirs[..8] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let version = u16::from_be_bytes([theirs[8], theirs[9]]);
    if version == 0 || !(VERSION_MIN..=VERSION_MAX).contains(&version) {
        return Err(ProtocolError::VersionMismatch {
            our_min: VERSION_MIN,
            our_max: VERSION_MAX,
            peer_min: u16::from_be_bytes([theirs[10], theirs[11]]),
            peer_max: u16::from_be_bytes([theirs[12], theirs[13]]),
        });
    }
    let prologue = [&ours[..], &theirs[..]].concat();
    let mut noise = builder(&opts.psk, &prologue)?
        .build_initiator()
        .map_err(noise_err)?;

    let mut buf = vec![0u8; 256];
    let n = noise
        .write_message(&encode_params(opts), &mut buf)
        .map_err(noise_err)?;
    write_handshake_msg(io, &buf[..n]).await?;

    let msg = read_handshake_msg(io).await?;
    if msg.is_empty() {
        return Err(ProtocolError::AuthenticationFailed);
    }
    let mut payload = vec![0u8; msg.len()];
    let n = noise
        .read_message(&msg, &mut payload)
        .map_err(|_| ProtocolError::AuthenticationFailed)?;
    let peer = decode_params(&payload[..n])?;
    finish(noise, version, opts, peer)
}

async fn respond_inner<S>(io: &mut S, opts: &SessionOptions) -> Result<Session, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut theirs = [0u8; 12];
    read_exact(io, &mut theirs).await?;
    if &theirs[..8] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let peer_min = u16::from_be_bytes([theirs[8], theirs[9]]);
    let peer_max = u16::from_be_bytes([theirs[10], theirs[11]]);
    let common = VERSION_MAX.min(peer_max);
    let version = if common >= VERSION_MIN.max(peer_min) {
        common
    } else {
        0
    };
    let mut ours = [0u8; 14];
    ours[..8].copy_from_slice(MAGIC);
    ours[8..10].copy_from_slice(&version.to_be_bytes());
    ours[10..12].copy_from_slice(&VERSION_MIN.to_be_bytes());
    ours[12..14].copy_from_slice(&VERSION_MAX.to_be_bytes());
    io.write_all(&ours).await?;
    io.flush().await?;
    if version == 0 {
        return Err(ProtocolError::VersionMismatch {
            our_min: VERSION_MIN,
            our_max: VERSION_MAX,
            peer_min,
            peer_max,
        });
    }
    let prologue = [&theirs[..], &ours[..]].concat();
    let mut noise = builder(&opts.psk, &prologue)?
        .build_responder()
        .map_err(noise_err)?;

    let msg = read_handshake_msg(io).await?;
    let mut payload = vec![0u8; msg.len()];
    let peer = match noise.read_message(&msg, &mut payload) {
        Ok(n) => decode_params(&payload[..n])?,
        Err(_) => {
            // Tell the peer plainly; it learns nothing but that the keys differ.
            let _ = io.write_all(&0u16.to_be_bytes()).await;
            let _ = io.flush().await;
            return Err(ProtocolError::AuthenticationFailed);
        }
    };
    let mut buf = vec![0u8; 256];
    let n = noise
        .write_message(&encode_params(opts), &mut buf)
        .map_err(noise_err)?;
    write_handshake_msg(io, &buf[..n]).await?;
    finish(noise, version, opts, peer)
}

struct Params {
    role: Role,
    plaintext: bool,
    max_payload: u32,
}

fn encode_params(opts: &SessionOptions) -> [u8; PARAMS_LEN] {
    let mut p = [0u8; PARAMS_LEN];
    p[0] = match opts.role {
        Role::Agent => 1,
        Role::Controller => 2,
    };
    p[1] = u8::from(opts.plaintext);
    p[2..6].copy_from_slice(
        &opts
            .max_payload
            .clamp(MIN_PAYLOAD, MAX_PAYLOAD_LIMIT)
            .to_be_bytes(),
    );
    p
}

fn decode_params(p: &[u8]) -> Result<Params, ProtocolError> {
    if p.len() != PARAMS_LEN {
        return Err(ProtocolError::malformed(format!(
            "handshake parameters of {} bytes",
            p.len()
        )));
    }
    let role = match p[0] {
        1 => Role::Agent,
        2 => Role::Controller,
        r => return Err(ProtocolError::malformed(format!("unknown role {r}"))),
    };
    let max_payload = u32::from_be_bytes([p[2], p[3], p[4], p[5]]);
    if !(MIN_PAYLOAD..=MAX_PAYLOAD_LIMIT).contains(&max_payload) {
        return Err(ProtocolError::malformed(format!(
            "advertised payload limit {max_payload} is out of bounds"
        )));
    }
    Ok(Params {
        role,
        plaintext: p[1] == 1,
        max_payload,
    })
}

fn finish(
    mut noise: snow::HandshakeState,
    version: u16,
    opts: &SessionOptions,
    peer: Params,
) -> Result<Session, ProtocolError> {
    if peer.role == opts.role {
        return Err(ProtocolError::RoleConflict(peer.role));
    }
    let plaintext = opts.plaintext && peer.plaintext;
    let max_payload = peer
        .max_payload
        .min(opts.max_payload.clamp(MIN_PAYLOAD, MAX_PAYLOAD_LIMIT));
    let cipher = if plaintext {
        None
    } else {
        if !noise.is_handshake_finished() {
            return Err(ProtocolError::malformed("handshake ended early"));
        }
        // Noise's split: k1 protects initiator → responder, k2 the other way.
        let (k1, k2) = noise.dangerously_get_raw_split();
        let (send, recv) = if noise.is_initiator() {
            (k1, k2)
        } else {
            (k2, k1)
        };
        Some(record::halves(&send, &recv, record_limit(max_payload)))
    };
    Ok(Session {
        version,
        plaintext,
        max_payload,
        peer_role: peer.role,
        cipher,
    })
}

/// Largest record plaintext for a payload limit: one maximal frame with its length prefix.
pub(crate) fn record_limit(max_payload: u32) -> usize {
    crate::FrameCodec::new(max_payload).max_frame() as usize + 4
}

fn builder<'a>(psk: &'a Psk, prologue: &'a [u8]) -> Result<snow::Builder<'a>, ProtocolError> {
    let params = NOISE_PARAMS.parse().map_err(noise_err)?;
    snow::Builder::new(params)
        .psk(0, psk.bytes())
        .map_err(noise_err)?
        .prologue(prologue)
        .map_err(noise_err)
}

fn noise_err(e: snow::Error) -> ProtocolError {
    ProtocolError::malformed(format!("noise: {e}"))
}

async fn read_exact<S: AsyncRead + Unpin>(io: &mut S, buf: &mut [u8]) -> Result<(), ProtocolError> {
    match io.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ProtocolError::Closed),
        Err(e) => Err(e.into()),
    }
}

async fn write_handshake_msg<S: AsyncWrite + Unpin>(
    io: &mut S,
    msg: &[u8],
) -> Result<(), ProtocolError> {
    io.write_all(&(msg.len() as u16).to_be_bytes()).await?;
    io.write_all(msg).await?;
    io.flush().await?;
    Ok(())
}

/// Handshake messages are at most 256 bytes here; anything longer is hostile.
async fn read_handshake_msg<S: AsyncRead + Unpin>(io: &mut S) -> Result<Vec<u8>, ProtocolError> {
    let mut len = [0u8; 2];
    read_exact(io, &mut len).await?;
    let len = u16::from_be_bytes(len) as usize;
    if len > 256 {
        return Err(ProtocolError::FrameTooLarge {
            len: len as u64,
            max: 256,
        });
    }
    let mut msg = vec![0u8; len];
    read_exact(io, &mut msg).await?;
    Ok(msg)
}

impl Session {
    /// The record-layer halves of an encrypted session (`None` in plaintext mode), for callers
    /// that run their own I/O instead of [`crate::stream::split`].
    pub fn into_record_halves(self) -> Option<(Sealer, Opener)> {
        self.cipher
    }
}
