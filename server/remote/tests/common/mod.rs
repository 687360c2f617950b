//! What the remote tests share: a scripted agent that completes the real handshake and then
//! answers each request as the test's script says (or stays silent).

#![allow(dead_code)]

use diskferry_protocol::handshake::respond;
use diskferry_protocol::stream::split;
use diskferry_protocol::{Message, Reply, Request, SessionOptions, StaticKey};

/// A listening agent trusting `server`: after the handshake it answers every request with
/// `script(request)`, or not at all when that is `None`. Returns its address.
pub async fn scripted_agent(
    server: &StaticKey,
    script: impl Fn(Request) -> Option<Reply> + Send + 'static,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let opts = SessionOptions::agent(StaticKey::generate(), server.public());
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let session = respond(&mut stream, &opts).await.unwrap();
        let (r, w) = tokio::io::split(stream);
        let (mut reader, mut writer) = split(session, r, w);
        while let Ok(Some(Message::Request { cookie, request })) = reader.next().await {
            if let Some(reply) = script(request) {
                writer
                    .send(&Message::Reply { cookie, reply })
                    .await
                    .unwrap();
            }
        }
    });
    addr
}

/// The reply to `Open` for a read-only disk of `size` bytes.
pub fn opened(size: u64) -> Reply {
    Reply::Opened {
        handle: 1,
        size,
        logical_sector: 512,
        physical_sector: 512,
        read_only: true,
    }
}
