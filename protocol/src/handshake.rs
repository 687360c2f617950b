//! Connection set-up: version negotiation, then a Noise `XK` handshake in which the agent
//! proves nothing yet but learns that it talks to the server whose public key it pinned, and
//! the server learns the agent's static key and the credential it brings.
//!
//! ```text
//! opener → acceptor   hello: "DSKFERRY" | min u16 | max u16 | role u8                  (plaintext)
//! acceptor → opener   hello: "DSKFERRY" | chosen u16 (0 = none) | min u16 | max u16 | role u8
//! agent → server      u16 len | Noise msg 1 (e, es)
//! server → agent      u16 len | Noise msg 2 (e, ee)    payload: params               or u16 0 = rejected
//! agent → server      u16 len | Noise msg 3 (s, se)    payload: params | credential
//! ```
//! The agent is always the Noise initiator, whoever opened the TCP connection: a listening
//! client is dialled by the server, a dial-back agent dials the server, and in both cases only
//! the holder of the server's private key can answer message 1. Both hellos are the Noise
//! prologue, so a tampered negotiation fails authentication. The params (wish for plaintext,
//! maximum payload, and from version 3 the compression codecs offered) travel inside authenticated messages, and plaintext mode is only chosen
//! when both authenticated sides asked for it; compression uses the best codec both offered
//! (none with a version-2 peer, whose params have no such byte). Why `XK` and no pre-shared key: ARCHITECTURE.md,
//! "Decisions".

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::compress::Codec;
use crate::key::{PublicKey, StaticKey};
use crate::record::{self, Opener, Sealer};
use crate::{ProtocolError, Role, MAX_PAYLOAD_LIMIT, VERSION_MAX, VERSION_MIN};

const MAGIC: &[u8; 8] = b"DSKFERRY";
const NOISE_PARAMS: &str = "Noise_XK_25519_AESGCM_SHA256";
/// Params of version 2: plaintext u8 | max payload u32.
const PARAMS_V2_LEN: usize = 5;
/// Params of version 3: those of version 2, then the compression capability bits u8.
const PARAMS_V3_LEN: usize = 6;
/// Smallest payload limit a peer may advertise (one 64 KiB request must always fit).
const MIN_PAYLOAD: u32 = 64 << 10;
/// Largest credential an agent may present (an enrollment token is 64 hex digits).
pub const MAX_CREDENTIAL: usize = 128;
/// Handshake messages are at most this long here; anything longer is hostile.
const MAX_HANDSHAKE_MSG: usize = 512;

/// What this side brings to a handshake.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub role: Role,
    /// This side's static keypair: the server's identity, or the agent's own key.
    pub key: StaticKey,
    /// For an agent: the server's public key it trusts (required). Ignored by the server.
    pub server_key: Option<PublicKey>,
    /// For an agent: what it shows the server after the handshake proved who the server is
    /// (an enrollment token), at most [`MAX_CREDENTIAL`] bytes.
    pub credential: Vec<u8>,
    /// Ask for an unencrypted transport after authentication (both sides must ask).
    pub plaintext: bool,
    /// Largest data payload this side accepts in one frame.
    pub max_payload: u32,
    /// Compression codecs this side offers ([`crate::compress`] capability bits; 0 = none).
    pub compression: u8,
    /// Highest protocol version this side announces (normally [`VERSION_MAX`]).
    pub version_max: u16,
    /// Give up on a peer that has not finished the handshake in this time.
    pub timeout: Duration,
    /// Give up on a connection whose peer, with requests outstanding, has sent nothing for
    /// this long (a stalled or hostile peer must not hang a job forever).
    pub reply_timeout: Duration,
}

impl SessionOptions {
    /// The server's side: its identity key.
    pub fn controller(key: StaticKey) -> Self {
        Self::new(Role::Controller, key, None)
    }

    /// An agent's side: its own key and the server key it pins.
    pub fn agent(key: StaticKey, server_key: PublicKey) -> Self {
        Self::new(Role::Agent, key, Some(server_key))
    }

    fn new(role: Role, key: StaticKey, server_key: Option<PublicKey>) -> Self {
        SessionOptions {
            role,
            key,
            server_key,
            credential: Vec::new(),
            plaintext: false,
            max_payload: crate::DEFAULT_MAX_PAYLOAD,
            compression: crate::compress::SUPPORTED,
            version_max: VERSION_MAX,
            timeout: Duration::from_secs(15),
            reply_timeout: Duration::from_secs(120),
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
    /// The codec both sides offered, if any: data payloads may then travel compressed.
    pub compression: Option<Codec>,
    pub peer_role: Role,
    /// The peer's static key: the agent's (seen by the server) or the server's (seen by the
    /// agent, equal to the pinned one).
    pub peer_key: PublicKey,
    /// What the agent presented (empty on the agent's side).
    pub credential: Vec<u8>,
    pub(crate) cipher: Option<(Sealer, Opener)>,
}

/// Runs the handshake as the side that opened the connection.
pub async fn initiate<S>(io: &mut S, opts: &SessionOptions) -> Result<Session, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    check_options(opts)?;
    with_timeout(opts.timeout, async {
        let hello = hello_as_opener(io, opts.role, opts.version_max).await?;
        noise(io, opts, &hello).await
    })
    .await
}

/// Runs the handshake as the side that accepted the connection.
pub async fn respond<S>(io: &mut S, opts: &SessionOptions) -> Result<Session, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    check_options(opts)?;
    with_timeout(opts.timeout, async {
        let hello = hello_as_acceptor(io, opts.role, opts.version_max).await?;
        noise(io, opts, &hello).await
    })
    .await
}

/// An agent must pin a server key and bring a credential that fits.
fn check_options(opts: &SessionOptions) -> Result<(), ProtocolError> {
    if opts.role == Role::Agent && opts.server_key.is_none() {
        return Err(ProtocolError::NoServerKey);
    }
    if !(VERSION_MIN..=VERSION_MAX).contains(&opts.version_max) {
        return Err(ProtocolError::malformed(format!(
            "cannot announce protocol version {}: this build speaks {VERSION_MIN}..={VERSION_MAX}",
            opts.version_max
        )));
    }
    if opts.credential.len() > MAX_CREDENTIAL {
        return Err(ProtocolError::malformed(format!(
            "a credential of {} bytes is longer than {MAX_CREDENTIAL}",
            opts.credential.len()
        )));
    }
    Ok(())
}

async fn with_timeout<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, ProtocolError>>,
) -> Result<T, ProtocolError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| ProtocolError::HandshakeTimeout(limit.as_secs()))?
}

fn role_byte(role: Role) -> u8 {
    match role {
        Role::Agent => 1,
        Role::Controller => 2,
    }
}

fn role_from(byte: u8) -> Result<Role, ProtocolError> {
    match byte {
        1 => Ok(Role::Agent),
        2 => Ok(Role::Controller),
        r => Err(ProtocolError::malformed(format!("unknown role {r}"))),
    }
}

/// What the hellos settled: the version, the peer's role and the Noise prologue (both hellos).
struct Hello {
    version: u16,
    peer_role: Role,
    prologue: Vec<u8>,
}

/// Sends our hello, reads the acceptor's.
async fn hello_as_opener<S>(io: &mut S, role: Role, max: u16) -> Result<Hello, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut ours = [0u8; 13];
    ours[..8].copy_from_slice(MAGIC);
    ours[8..10].copy_from_slice(&VERSION_MIN.to_be_bytes());
    ours[10..12].copy_from_slice(&max.to_be_bytes());
    ours[12] = role_byte(role);
    io.write_all(&ours).await?;
    io.flush().await?;
    let mut theirs = [0u8; 15];
    read_exact(io, &mut theirs[..14]).await?;
    if &theirs[..8] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let version = u16::from_be_bytes([theirs[8], theirs[9]]);
    if version == 0 || !(VERSION_MIN..=max).contains(&version) {
        return Err(ProtocolError::VersionMismatch {
            our_min: VERSION_MIN,
            our_max: max,
            peer_min: u16::from_be_bytes([theirs[10], theirs[11]]),
            peer_max: u16::from_be_bytes([theirs[12], theirs[13]]),
        });
    }
    read_exact(io, &mut theirs[14..]).await?;
    let peer_role = check_roles(role, role_from(theirs[14])?)?;
    Ok(Hello {
        version,
        peer_role,
        prologue: [&ours[..], &theirs[..]].concat(),
    })
}

/// Reads the opener's hello, answers with the chosen version.
async fn hello_as_acceptor<S>(io: &mut S, role: Role, max: u16) -> Result<Hello, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut theirs = [0u8; 13];
    read_exact(io, &mut theirs[..12]).await?;
    if &theirs[..8] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let peer_min = u16::from_be_bytes([theirs[8], theirs[9]]);
    let peer_max = u16::from_be_bytes([theirs[10], theirs[11]]);
    let common = max.min(peer_max);
    let version = if common >= VERSION_MIN.max(peer_min) {
        common
    } else {
        0
    };
    let mut ours = [0u8; 15];
    ours[..8].copy_from_slice(MAGIC);
    ours[8..10].copy_from_slice(&version.to_be_bytes());
    ours[10..12].copy_from_slice(&VERSION_MIN.to_be_bytes());
    ours[12..14].copy_from_slice(&max.to_be_bytes());
    ours[14] = role_byte(role);
    if version == 0 {
        // An older peer's hello has no role byte: answer before waiting for one.
        io.write_all(&ours).await?;
        io.flush().await?;
        return Err(ProtocolError::VersionMismatch {
            our_min: VERSION_MIN,
            our_max: max,
            peer_min,
            peer_max,
        });
    }
    read_exact(io, &mut theirs[12..]).await?;
    io.write_all(&ours).await?;
    io.flush().await?;
    let peer_role = check_roles(role, role_from(theirs[12])?)?;
    Ok(Hello {
        version,
        peer_role,
        prologue: [&theirs[..], &ours[..]].concat(),
    })
}

fn check_roles(ours: Role, theirs: Role) -> Result<Role, ProtocolError> {
    if ours == theirs {
        return Err(ProtocolError::RoleConflict(theirs));
    }
    Ok(theirs)
}

/// The three Noise messages, from this side's role.
async fn noise<S>(
    io: &mut S,
    opts: &SessionOptions,
    hello: &Hello,
) -> Result<Session, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match opts.role {
        Role::Agent => noise_as_agent(io, opts, hello).await,
        Role::Controller => noise_as_server(io, opts, hello).await,
    }
}

async fn noise_as_agent<S>(
    io: &mut S,
    opts: &SessionOptions,
    hello: &Hello,
) -> Result<Session, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let server = opts.server_key.ok_or(ProtocolError::NoServerKey)?;
    let mut hs = builder(opts, &hello.prologue)?
        .remote_public_key(server.as_bytes())
        .map_err(noise_err)?
        .build_initiator()
        .map_err(noise_err)?;
    let mut buf = vec![0u8; MAX_HANDSHAKE_MSG];
    let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
    write_handshake_msg(io, &buf[..n]).await?;

    let msg = read_handshake_msg(io).await?;
    if msg.is_empty() {
        return Err(ProtocolError::ServerKeyRefused);
    }
    let mut payload = vec![0u8; msg.len()];
    let n = hs
        .read_message(&msg, &mut payload)
        .map_err(|_| ProtocolError::ServerNotProven)?;
    let peer = decode_params(&payload[..n], hello.version)?;

    let mut ours = encode_params(opts, hello.version);
    ours.push(opts.credential.len() as u8);
    ours.extend_from_slice(&opts.credential);
    let n = hs.write_message(&ours, &mut buf).map_err(noise_err)?;
    write_handshake_msg(io, &buf[..n]).await?;
    finish(hs, hello, opts, peer, server, Vec::new())
}

async fn noise_as_server<S>(
    io: &mut S,
    opts: &SessionOptions,
    hello: &Hello,
) -> Result<Session, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hs = builder(opts, &hello.prologue)?
        .build_responder()
        .map_err(noise_err)?;
    let msg = read_handshake_msg(io).await?;
    let mut payload = vec![0u8; MAX_HANDSHAKE_MSG];
    if hs.read_message(&msg, &mut payload).is_err() {
        // The agent pinned another server key: tell it plainly, it learns nothing else.
        let _ = io.write_all(&0u16.to_be_bytes()).await;
        let _ = io.flush().await;
        return Err(ProtocolError::AuthenticationFailed);
    }
    let mut buf = vec![0u8; MAX_HANDSHAKE_MSG];
    let n = hs
        .write_message(&encode_params(opts, hello.version), &mut buf)
        .map_err(noise_err)?;
    write_handshake_msg(io, &buf[..n]).await?;

    let msg = read_handshake_msg(io).await?;
    let n = hs
        .read_message(&msg, &mut payload)
        .map_err(|_| ProtocolError::AuthenticationFailed)?;
    let (params, credential) = split_credential(&payload[..n], params_len(hello.version))?;
    let peer = decode_params(params, hello.version)?;
    let agent_key = hs
        .get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .map(PublicKey::from_bytes)
        .ok_or_else(|| ProtocolError::malformed("no agent key after the handshake"))?;
    finish(hs, hello, opts, peer, agent_key, credential.to_vec())
}

/// Message 3's payload: params, then a length-prefixed credential.
fn split_credential(p: &[u8], params_len: usize) -> Result<(&[u8], &[u8]), ProtocolError> {
    if p.len() < params_len + 1 {
        return Err(ProtocolError::malformed("short handshake parameters"));
    }
    let (params, rest) = p.split_at(params_len);
    let len = rest[0] as usize;
    if len > MAX_CREDENTIAL || rest.len() != 1 + len {
        return Err(ProtocolError::malformed(format!(
            "credential of {} bytes where {len} were announced",
            rest.len() - 1
        )));
    }
    Ok((params, &rest[1..]))
}

struct Params {
    plaintext: bool,
    max_payload: u32,
    /// Compression capability bits (0 from a version-2 peer).
    compression: u8,
}

/// How long the params are in a session of `version`.
fn params_len(version: u16) -> usize {
    if version >= 3 {
        PARAMS_V3_LEN
    } else {
        PARAMS_V2_LEN
    }
}

fn encode_params(opts: &SessionOptions, version: u16) -> Vec<u8> {
    let mut p = vec![u8::from(opts.plaintext)];
    p.extend_from_slice(
        &opts
            .max_payload
            .clamp(MIN_PAYLOAD, MAX_PAYLOAD_LIMIT)
            .to_be_bytes(),
    );
    if version >= 3 {
        p.push(opts.compression);
    }
    p
}

fn decode_params(p: &[u8], version: u16) -> Result<Params, ProtocolError> {
    if p.len() != params_len(version) {
        return Err(ProtocolError::malformed(format!(
            "handshake parameters of {} bytes",
            p.len()
        )));
    }
    let max_payload = u32::from_be_bytes([p[1], p[2], p[3], p[4]]);
    if !(MIN_PAYLOAD..=MAX_PAYLOAD_LIMIT).contains(&max_payload) {
        return Err(ProtocolError::malformed(format!(
            "advertised payload limit {max_payload} is out of bounds"
        )));
    }
    Ok(Params {
        plaintext: p[0] == 1,
        max_payload,
        compression: p.get(PARAMS_V2_LEN).copied().unwrap_or(0),
    })
}

fn finish(
    mut noise: snow::HandshakeState,
    hello: &Hello,
    opts: &SessionOptions,
    peer: Params,
    peer_key: PublicKey,
    credential: Vec<u8>,
) -> Result<Session, ProtocolError> {
    let plaintext = opts.plaintext && peer.plaintext;
    let max_payload = peer
        .max_payload
        .min(opts.max_payload.clamp(MIN_PAYLOAD, MAX_PAYLOAD_LIMIT));
    if !noise.is_handshake_finished() {
        return Err(ProtocolError::malformed("handshake ended early"));
    }
    let cipher = if plaintext {
        None
    } else {
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
        version: hello.version,
        plaintext,
        max_payload,
        compression: Codec::choose(opts.compression, peer.compression),
        peer_role: hello.peer_role,
        peer_key,
        credential,
        cipher,
    })
}

/// Largest record plaintext for a payload limit: one maximal frame with its length prefix.
pub(crate) fn record_limit(max_payload: u32) -> usize {
    crate::FrameCodec::new(max_payload).max_frame() as usize + 4
}

fn builder<'a>(
    opts: &'a SessionOptions,
    prologue: &'a [u8],
) -> Result<snow::Builder<'a>, ProtocolError> {
    let params = NOISE_PARAMS.parse().map_err(noise_err)?;
    snow::Builder::new(params)
        .local_private_key(opts.key.private_bytes())
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

async fn read_handshake_msg<S: AsyncRead + Unpin>(io: &mut S) -> Result<Vec<u8>, ProtocolError> {
    let mut len = [0u8; 2];
    read_exact(io, &mut len).await?;
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_HANDSHAKE_MSG {
        return Err(ProtocolError::FrameTooLarge {
            len: len as u64,
            max: MAX_HANDSHAKE_MSG as u64,
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
