//! An NBD client's whole byte stream, as a hostile client sends it: the handshake's options
//! (lengths that lie, unknown options, meta-context queries) and then requests (lengths past
//! the end, oversized payloads, unknown commands) against a small writable export. Nothing may
//! panic, allocate past the protocol's bounds, or loop without consuming input. Run:
//! `cd server/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir . nbd_session`.
#![no_main]

use std::io::{BufRead, Read, Write};
use std::sync::Arc;

use diskferry_blockdev::MemoryDevice;
use diskferry_nbd::handshake::negotiate;
use diskferry_nbd::proto::{CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES};
use diskferry_nbd::transmission::{serve, RequestSource};
use diskferry_nbd::{Export, Exports};
use libfuzzer_sys::fuzz_target;

/// The client's bytes in, the server's replies thrown away.
struct Client<'a> {
    input: &'a [u8],
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl BufRead for Client<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        Ok(self.input)
    }
    fn consume(&mut self, n: usize) {
        self.input = &self.input[n..];
    }
}

impl RequestSource for Client<'_> {
    fn buffered(&self) -> usize {
        self.input.len()
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let exports = Exports::new(vec![Export {
        name: "disk".into(),
        description: "fuzz".into(),
        device: Arc::new(MemoryDevice::new(1 << 20)),
        writable: true,
    }]);
    // The client flags are always valid, so inputs explore the options and requests.
    let mut stream = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes().to_vec();
    stream.extend_from_slice(data);
    let mut client = Client { input: &stream };
    if let Ok(Some(chosen)) = negotiate(&mut client, &exports) {
        let mut sink = std::io::sink();
        let _ = serve(&mut client, &mut sink, &chosen);
    }
});
