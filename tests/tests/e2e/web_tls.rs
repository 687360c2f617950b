//! `diskferry serve --tls` against real clients (issue 14): the UI and API answer over TLS to a
//! client pinning the logged fingerprint and to `diskferry machines --data-dir`, a client
//! pinning another certificate fails its handshake, plain HTTP gets no page, a restart keeps
//! the certificate, and OpenSSL, an independent client, sees the same certificate.

use std::process::{Command, Stdio};

use diskferry_e2e::diskferry;
use diskferry_e2e::http::{request, Endpoint, Fingerprint, Server};

fn start_tls(data: &std::path::Path) -> Server {
    let s = Server::start_with(data, &["--tls"]).unwrap();
    assert!(s.fingerprint.is_some(), "no fingerprint logged");
    s
}

#[test]
fn the_ui_answers_over_tls_to_the_pinned_certificate_only() {
    let data = tempfile::tempdir().unwrap();
    let s = start_tls(data.path());
    let pin = s.fingerprint.unwrap();

    let r = Endpoint::tls(&s.addr, pin)
        .request("GET", "/login", &[], b"")
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("password"), "{}", r.text());
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let body = format!("password={}&next=/", s.password);
    let r = Endpoint::tls(&s.addr, pin)
        .request("POST", "/login", &form, body.as_bytes())
        .unwrap();
    assert_eq!(r.status, 303, "{}", r.text());
    let cookie = r.header("set-cookie").unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert_eq!(s.get("/api/machines").status, 200);

    let mut other = pin;
    other.0[0] ^= 0xff;
    let e = Endpoint::tls(&s.addr, other)
        .request("GET", "/login", &[], b"")
        .unwrap_err();
    assert!(e.to_string().contains("TLS handshake"), "{e}");

    // Plain HTTP to the TLS port: no page, at most an error.
    if let Ok(r) = request(&s.addr, "GET", "/login", &[], b"") {
        panic!("plain HTTP got a page: {} {}", r.status, r.text());
    }
}

#[test]
fn the_cli_finds_and_pins_a_tls_server() {
    let data = tempfile::tempdir().unwrap();
    let s = start_tls(data.path());
    let serve_addr = std::fs::read_to_string(data.path().join("serve.addr")).unwrap();
    assert_eq!(serve_addr.trim(), format!("https://{}", s.addr));
    let dd = data.path().as_os_str();
    let (ok, out, err) = diskferry(&["machines".as_ref(), "--data-dir".as_ref(), dd]);
    assert!(ok && out.contains("no machines yet"), "{out}{err}");

    let url = format!("https://{}", s.addr);
    let token = data.path().join("api-token");
    let remote = |extra: &[&str]| {
        let mut args = vec!["machines", "--server", &url, "--token-file"];
        args.push(token.to_str().unwrap());
        args.extend(extra);
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        diskferry(&args)
    };
    let (ok, _, err) = remote(&[]);
    assert!(!ok && err.contains("--tls-fingerprint"), "{err}");
    let pin = s.fingerprint.unwrap().to_string();
    let (ok, out, err) = remote(&["--tls-fingerprint", &pin]);
    assert!(ok && out.contains("no machines yet"), "{out}{err}");
    let wrong = format!("SHA256:{}", "00:".repeat(31) + "00");
    let (ok, _, err) = remote(&["--tls-fingerprint", &wrong]);
    assert!(!ok && err.contains("not the pinned"), "{err}");
}

#[test]
fn a_restart_keeps_the_certificate_and_openssl_sees_it() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let mut s = start_tls(data.path());
    let first = s.fingerprint.unwrap();
    let key = data.path().join("tls/key.pem");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    s.kill();
    let s = start_tls(data.path());
    assert_eq!(
        s.fingerprint.unwrap(),
        first,
        "a restart made another certificate"
    );

    match openssl_fingerprint(&s.addr) {
        Some(seen) => assert_eq!(seen, first),
        None => eprintln!("openssl is not installed: the independent check is skipped"),
    }
}

/// The fingerprint of the certificate `openssl s_client` is shown at `addr`, when openssl
/// is installed.
fn openssl_fingerprint(addr: &str) -> Option<Fingerprint> {
    let hello = Command::new("openssl")
        .args(["s_client", "-connect", addr, "-servername", "localhost"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let hello = match hello {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        other => other.expect("openssl s_client"),
    };
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl x509");
    std::io::Write::write_all(&mut x509.stdin.take().unwrap(), &hello.stdout).unwrap();
    let out = x509.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "sha256 Fingerprint=AB:CD:..." (the case of the prefix varies between versions).
    let (_, hex) = text
        .split_once('=')
        .unwrap_or_else(|| panic!("openssl printed no fingerprint: {text}"));
    Some(hex.trim().parse().unwrap())
}
