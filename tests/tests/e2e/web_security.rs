//! The web server against guessing, redirects, framing and connection floods (issue 14,
//! findings 6 and 11), each attack performed against a real `diskferry serve`: wrong passwords
//! and tokens until 429, the password file read for clear text, a login with a `next` that
//! leaves the site, the security headers, and hundreds of idle and half-sent connections
//! while a browser still gets the login page.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use diskferry_e2e::http::{request, Response, Server, TEST_PASSWORD};
use diskferry_e2e::wait_for;

/// Hang guard for anything the server should answer or do.
const GUARD: Duration = Duration::from_secs(60);

fn login(s: &Server, password: &str, next: &str) -> Response {
    let body = format!("password={password}&next={next}");
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    request(&s.addr, "POST", "/login", &form, body.as_bytes()).unwrap()
}

fn bearer(s: &Server, token: &str) -> Response {
    let auth = format!("Bearer {token}");
    request(
        &s.addr,
        "GET",
        "/api/captures",
        &[("Authorization", &auth)],
        b"",
    )
    .unwrap()
}

#[test]
fn guesses_are_limited_and_the_password_is_stored_hashed() {
    let data = tempfile::tempdir().unwrap();
    let s = Server::start(data.path()).unwrap();
    let stored = std::fs::read_to_string(data.path().join("admin-password")).unwrap();
    assert!(stored.starts_with("$argon2id$"), "{stored}");
    assert!(
        !stored.contains(TEST_PASSWORD),
        "the password is kept in clear"
    );

    // Successes do not count.
    for _ in 0..7 {
        assert_eq!(login(&s, TEST_PASSWORD, "/captures").status, 303);
    }
    for i in 0..5 {
        assert_eq!(
            login(&s, "wrong-password-123", "/").status,
            401,
            "guess {i}"
        );
    }
    let r = login(&s, "wrong-password-123", "/");
    assert_eq!(r.status, 429, "{}", r.text());
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    assert_eq!(
        login(&s, TEST_PASSWORD, "/").status,
        429,
        "the right password waits too"
    );
    assert_eq!(
        bearer(&s, &s.token).status,
        429,
        "tokens share the address's budget"
    );

    // Wrong API tokens, on a server of their own.
    let data = tempfile::tempdir().unwrap();
    let s = Server::start(data.path()).unwrap();
    for _ in 0..3 {
        assert_eq!(bearer(&s, &s.token).status, 200);
    }
    for _ in 0..5 {
        assert_eq!(bearer(&s, "wrong-token").status, 401);
    }
    assert_eq!(bearer(&s, "wrong-token").status, 429);
    assert_eq!(login(&s, TEST_PASSWORD, "/").status, 429);
}

#[test]
fn login_redirects_stay_on_the_site_and_responses_carry_the_security_headers() {
    let data = tempfile::tempdir().unwrap();
    let s = Server::start(data.path()).unwrap();
    for next in [
        "/%2509/evil.example",
        "//evil.example",
        "/%5Cevil.example",
        "https://evil.example",
    ] {
        let r = login(&s, TEST_PASSWORD, next);
        assert_eq!(r.status, 303, "{next}: {}", r.text());
        assert_eq!(r.header("location"), Some("/captures"), "next={next}");
    }
    let r = login(&s, TEST_PASSWORD, "/jobs");
    assert_eq!(r.header("location"), Some("/jobs"));

    let login_page = request(&s.addr, "GET", "/login", &[], b"").unwrap();
    let not_found = s.get("/api/nothing-here");
    let refused = request(&s.addr, "GET", "/api/captures", &[], b"").unwrap();
    for r in [&login_page, &not_found, &refused] {
        let csp = r.header("content-security-policy").unwrap_or_default();
        assert!(
            csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{csp:?}"
        );
        assert_eq!(r.header("x-frame-options"), Some("DENY"));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(r.header("referrer-policy"), Some("same-origin"));
    }
    let html = login_page.text();
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "inline script or style the policy would block: {html}"
    );
}

/// Opens `n` connections to `addr` from the loopback address `from`.
fn connect_from(from: &str, addr: &str, n: usize) -> Vec<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..n {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
            match sock.connect(addr.parse().unwrap()).await {
                Ok(s) => out.push(s.into_std().unwrap()),
                Err(e) => panic!("connection {} from {from}: {e}", out.len()),
            }
        }
        out
    })
}

/// Whether the server closed `s` (a read ends or fails) within the guard.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

#[test]
fn idle_and_half_sent_connections_do_not_starve_the_login_page() {
    let data = tempfile::tempdir().unwrap();
    let s = Server::start(data.path()).unwrap();
    // 20 half-sent requests from one address, 500 idle connections from another.
    let mut half = connect_from("127.0.0.4", &s.addr, 20);
    for c in &mut half {
        let _ = c.write_all(b"GET /login HTTP/1.1\r\nHost: x\r\nX-Slow: ");
    }
    let idle = connect_from("127.0.0.2", &s.addr, 500);
    assert!(
        wait_for(GUARD, || request(&s.addr, "GET", "/login", &[], b"")
            .is_ok_and(|r| r.status == 200)),
        "the login page did not answer while two addresses held 520 connections"
    );
    // Many addresses at once (past the total cap): once the server drops the idle ones
    // (header deadline), the login page answers again.
    let many: Vec<Vec<TcpStream>> = (10..20)
        .map(|i| connect_from(&format!("127.0.0.{i}"), &s.addr, 60))
        .collect();
    assert!(
        wait_for(GUARD, || request(&s.addr, "GET", "/login", &[], b"")
            .is_ok_and(|r| r.status == 200)),
        "the login page did not come back after 600 idle connections from ten addresses"
    );
    // The server closes what never finishes its request head, and idle keep-alives.
    assert!(
        closed_by_server(&mut half[0]),
        "a half-sent request is kept open"
    );
    let mut kept = connect_from("127.0.0.3", &s.addr, 1).remove(0);
    kept.write_all(b"GET /login HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(
        closed_by_server(&mut kept),
        "an idle keep-alive connection is kept open"
    );
    drop((idle, many));
}

#[test]
fn the_boot_listener_serves_the_boot_endpoints_and_nothing_else() {
    let data = tempfile::tempdir().unwrap();
    let boot = data.path().join("boot");
    std::fs::create_dir_all(&boot).unwrap();
    std::fs::write(boot.join("vmlinuz"), b"not a kernel").unwrap();
    std::fs::write(boot.join("initramfs.img"), b"not an initramfs").unwrap();
    let s = Server::start_with(data.path(), &["--boot-listen", "127.0.0.1:0"]).unwrap();
    let boot_addr = s
        .boot_addr
        .clone()
        .expect("the boot listener's address is logged");
    assert_ne!(boot_addr, s.addr);
    let get = |target: &str| request(&boot_addr, "GET", target, &[], b"").unwrap();

    let r = get("/boot.ipxe?mac=52:54:00:12:34:56");
    assert_eq!(r.status, 200, "{}", r.text());
    let script = r.text();
    assert!(script.starts_with("#!ipxe"), "{script}");
    assert!(
        script.contains(&format!("http://{boot_addr}/boot/vmlinuz")),
        "{script}"
    );
    assert_eq!(get("/boot/vmlinuz").body, b"not a kernel");
    for path in [
        "/",
        "/login",
        "/api/machines",
        "/api/openapi.json",
        "/static/app.js",
    ] {
        let r = get(path);
        assert_eq!(r.status, 404, "{path}: {} {}", r.status, r.text());
        assert!(r.header("location").is_none(), "{path} redirects");
    }
    // The token works nowhere on it either.
    let auth = format!("Bearer {}", s.token);
    let r = request(
        &boot_addr,
        "GET",
        "/api/machines",
        &[("Authorization", &auth)],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    // The main listener still serves both.
    assert_eq!(s.get("/boot.ipxe").status, 200);
    assert_eq!(s.get("/api/machines").status, 200);
}
