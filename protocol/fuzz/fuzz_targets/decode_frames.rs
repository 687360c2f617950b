//! Feeds arbitrary bytes to the frame decoder, whole and in the pieces the first byte selects.
//! Every input must end in frames, "need more", or an error: never a panic, never an
//! allocation beyond the frame limit. Run: `cd protocol/fuzz && cargo fuzz run decode_frames`.
#![no_main]

use bytes::BytesMut;
use diskferry_protocol::FrameCodec;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    let piece = usize::from(split).max(1);
    let mut codec = FrameCodec::new(1 << 20);
    let mut buf = BytesMut::new();
    for chunk in data.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(msg)) => {
                    // Whatever decodes must encode back to the same bytes' meaning.
                    let mut out = BytesMut::new();
                    codec.encode(&msg, &mut out).expect("a decoded frame re-encodes");
                    let again = codec.decode(&mut out).expect("re-encoded frame decodes").expect("whole frame");
                    assert_eq!(again, msg);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        // Growth may double a buffer, but a length field alone never buys more than a frame.
        let limit = 2 * ((codec.max_frame() as usize + 4) + data.len());
        assert!(buf.capacity() <= limit, "reservation of {} beyond the frame limit", buf.capacity());
    }
});
