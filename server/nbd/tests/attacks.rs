//! Hostile NBD clients, spoken to byte by byte: lies about lengths, stalls, floods of
//! connections. Each must cost the server one closed connection and nothing else.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use diskferry_blockdev::{BlockDevice, MemoryDevice};
use diskferry_nbd::proto::*;
use diskferry_nbd::{Export, Exports, Limits, Server};

const SIZE: usize = 1 << 20;

fn serve(limits: Limits) -> SocketAddr {
    let device = Arc::new(MemoryDevice::new(SIZE));
    device.write_at(&[0xabu8; SIZE], 0).unwrap();
    let exports = Exports::new(vec![Export {
        name: "disk".into(),
        description: String::new(),
        device,
        writable: true,
    }]);
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), exports, limits).unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.run(&AtomicBool::new(false)));
    addr
}

fn quick() -> Limits {
    Limits {
        max_connections: 4,
        handshake: Duration::from_millis(500),
        stall: Duration::from_millis(300),
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    // Generous: only a server that never closes fails the tests.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Greeting read, fixed newstyle answered.
fn greet(s: &mut TcpStream) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .unwrap();
}

fn option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut o = OPT_MAGIC.to_be_bytes().to_vec();
    o.extend_from_slice(&option.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    s.write_all(&o).unwrap();
}

/// Into transmission on "disk" (simple replies).
fn open(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr);
    greet(&mut s);
    option(&mut s, OPT_EXPORT_NAME, b"disk");
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    assert_eq!(
        u64::from_be_bytes(export[..8].try_into().unwrap()),
        SIZE as u64
    );
    s
}

fn request(kind: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&7u64.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// A simple reply's error, and the data of a successful read.
fn reply(s: &mut TcpStream, data: usize) -> (u32, Vec<u8>) {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).unwrap();
    assert_eq!(
        u32::from_be_bytes(head[..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
    let mut buf = vec![0u8; if error == 0 { data } else { 0 }];
    s.read_exact(&mut buf).unwrap();
    (error, buf)
}

/// The server closed the connection (end of stream or reset), within the read timeout.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// A read of 4 KiB works on a fresh connection: the server still serves.
fn still_serves(addr: SocketAddr) {
    let mut s = open(addr);
    s.write_all(&request(CMD_READ, 0, 4096)).unwrap();
    let (error, data) = reply(&mut s, 4096);
    assert_eq!(error, 0);
    assert!(data.iter().all(|&b| b == 0xab));
}

#[test]
fn an_option_claiming_more_data_than_allowed_closes_the_connection() {
    let addr = serve(quick());
    let mut s = connect(addr);
    greet(&mut s);
    let mut o = OPT_MAGIC.to_be_bytes().to_vec();
    o.extend_from_slice(&OPT_GO.to_be_bytes());
    o.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&o).unwrap();
    assert!(closed(&mut s));
    still_serves(addr);
}

#[test]
fn a_write_longer_than_the_maximum_payload_closes_the_connection() {
    let addr = serve(quick());
    let mut s = open(addr);
    s.write_all(&request(CMD_WRITE, 0, MAX_PAYLOAD + 1))
        .unwrap();
    assert!(closed(&mut s));
    still_serves(addr);
}

#[test]
fn requests_past_the_end_or_too_long_are_refused_and_the_connection_goes_on() {
    let addr = serve(quick());
    let mut s = open(addr);
    s.write_all(&request(CMD_READ, SIZE as u64 - 10, 4096))
        .unwrap();
    assert_eq!(reply(&mut s, 4096).0, EINVAL);
    s.write_all(&request(CMD_READ, u64::MAX - 1, 4096)).unwrap();
    assert_eq!(reply(&mut s, 4096).0, EINVAL);
    s.write_all(&request(CMD_READ, 0, u32::MAX)).unwrap();
    assert_eq!(reply(&mut s, 0).0, EINVAL);
    // Block status without structured replies and base:allocation.
    s.write_all(&request(CMD_BLOCK_STATUS, 0, 4096)).unwrap();
    assert_eq!(reply(&mut s, 0).0, EINVAL);
    s.write_all(&request(99, 0, 0)).unwrap();
    assert_eq!(reply(&mut s, 0).0, EINVAL);
    s.write_all(&request(CMD_READ, 4096, 16)).unwrap();
    assert_eq!(reply(&mut s, 16), (0, vec![0xab; 16]));
}

#[test]
fn a_client_that_stalls_in_the_handshake_or_mid_request_is_cut_off_but_an_idle_one_is_not() {
    let addr = serve(quick());
    // Connects and says nothing.
    let mut silent = connect(addr);
    let mut greeting = [0u8; 18];
    silent.read_exact(&mut greeting).unwrap();
    // Half a request header, then nothing.
    let mut stalled = open(addr);
    stalled
        .write_all(&request(CMD_READ, 0, 4096)[..10])
        .unwrap();
    // Idle between requests for longer than the stall timeout: still served.
    let mut idle = open(addr);
    assert!(closed(&mut silent));
    assert!(closed(&mut stalled));
    idle.write_all(&request(CMD_READ, 0, 8)).unwrap();
    assert_eq!(reply(&mut idle, 8), (0, vec![0xab; 8]));
}

#[test]
fn connections_past_the_limit_are_closed_and_the_others_keep_working() {
    let limits = Limits {
        max_connections: 2,
        ..quick()
    };
    let addr = serve(limits);
    let mut a = open(addr);
    let _b = open(addr);
    let mut third = connect(addr);
    assert!(closed(&mut third), "a third connection is closed at once");
    a.write_all(&request(CMD_READ, 0, 8)).unwrap();
    assert_eq!(reply(&mut a, 8), (0, vec![0xab; 8]));
    drop(a);
    // A slot frees when a client leaves (the server notices the end of stream).
    let mut served = false;
    for _ in 0..50 {
        let mut s = connect(addr);
        let mut greeting = [0u8; 18];
        if s.read_exact(&mut greeting).is_ok() {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(served);
}

#[test]
fn garbage_instead_of_a_request_closes_the_connection() {
    let addr = serve(quick());
    let mut s = open(addr);
    s.write_all(&[0x55; 28]).unwrap();
    assert!(closed(&mut s));
    still_serves(addr);
}

#[test]
fn a_disconnect_request_is_answered_by_closing_the_connection_and_freeing_its_slot() {
    let addr = serve(Limits {
        max_connections: 1,
        ..quick()
    });
    for _ in 0..3 {
        let mut s = open(addr);
        s.write_all(&request(CMD_READ, 0, 8)).unwrap();
        assert_eq!(reply(&mut s, 8), (0, vec![0xab; 8]));
        s.write_all(&request(CMD_DISC, 0, 0)).unwrap();
        // libnbd waits for this end of stream before it lets its caller go on.
        assert!(closed(&mut s), "the server closes after NBD_CMD_DISC");
    }
}
