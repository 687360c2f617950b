//! The server's TFTP side for legacy PXE, fetched with curl's TFTP client (not ours): files of
//! the boot directory by plain name, with and without the blksize option, a file spanning more
//! than 65,535 blocks (block numbers roll over), and nothing outside the directory.

use std::process::Command;

use diskferry_e2e::http::Server;

fn curl_tftp(url: &str, out: &std::path::Path, extra: &[&str]) -> bool {
    Command::new("curl")
        .args(["-s", "--fail", "--max-time", "60", "-o"])
        .arg(out)
        .args(extra)
        .arg(url)
        .status()
        .unwrap()
        .success()
}

#[test]
fn boot_files_come_over_tftp_and_nothing_else_does() {
    let data = tempfile::tempdir().unwrap();
    let boot = data.path().join("boot");
    std::fs::create_dir_all(&boot).unwrap();
    // 40 MiB at 512-byte blocks is 81,920 blocks: the block number wraps.
    let kernel: Vec<u8> = (0..40u32 << 20).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(boot.join("vmlinuz"), &kernel).unwrap();
    std::fs::write(boot.join("undionly.kpxe"), b"ipxe image").unwrap();
    let s = Server::start_with(data.path(), &["--tftp-listen", "127.0.0.1:0"]).unwrap();
    let addr = s.tftp_addr.clone().expect("tftp address printed");
    let out = data.path().join("got");

    assert!(curl_tftp(
        &format!("tftp://{addr}/undionly.kpxe"),
        &out,
        &[]
    ));
    assert_eq!(std::fs::read(&out).unwrap(), b"ipxe image");
    assert!(curl_tftp(
        &format!("tftp://{addr}/vmlinuz"),
        &out,
        &["--tftp-blksize", "1468"]
    ));
    assert_eq!(std::fs::read(&out).unwrap(), kernel);
    assert!(curl_tftp(
        &format!("tftp://{addr}/vmlinuz"),
        &out,
        &["--tftp-no-options"]
    ));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        kernel,
        "512-byte blocks, rolled over"
    );

    for bad in [
        "../api-token",
        "..%2Fapi-token",
        "nothing-here",
        "%2Fetc%2Fpasswd",
    ] {
        assert!(
            !curl_tftp(&format!("tftp://{addr}/{bad}"), &out, &[]),
            "{bad} must not be served"
        );
    }
}
