//! Feeds arbitrary bytes to the compressed-payload decoder, directly (the first four bytes are
//! the claimed raw length) and inside a compressed Data frame through the frame decoder of a
//! session that negotiated LZ4. Every input must end in a payload of exactly the claimed
//! length within the limit, or an error: never a panic, never an allocation beyond the limit.
//! The input also goes through a compress/decompress round trip, which must give it back.
//! Run: `cd protocol/fuzz && cargo fuzz run decode_compressed`.
#![no_main]

use bytes::{BufMut, BytesMut};
use diskferry_protocol::compress::Codec;
use diskferry_protocol::{FrameCodec, Message, Reply};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

const MAX: u32 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((claim, z)) = data.split_first_chunk::<4>() else {
        return;
    };
    let claim = u32::from_be_bytes(*claim);
    if let Ok(out) = Codec::Lz4.decompress(claim, z, MAX) {
        assert_eq!(out.len(), claim as usize);
        assert!(claim <= MAX);
    }

    let mut frame = BytesMut::new();
    frame.put_u32((1 + 8 + 1 + 4 + z.len()) as u32);
    frame.put_u8(0x87); // a compressed Data reply
    frame.put_u64(1);
    frame.put_u8(Codec::Lz4.id());
    frame.put_u32(claim);
    frame.put_slice(z);
    let mut codec = FrameCodec::new(MAX).with_compression(Some(Codec::Lz4));
    if let Ok(Some(Message::Reply {
        reply: Reply::Data(d),
        ..
    })) = codec.decode(&mut frame)
    {
        assert_eq!(d.len(), claim as usize);
    }

    let mut packed = BytesMut::new();
    if Codec::Lz4.compress_into(data, &mut packed) {
        let back = Codec::Lz4
            .decompress(data.len() as u32, &packed, u32::MAX)
            .expect("round trip");
        assert_eq!(&back[..], data);
    }
});
