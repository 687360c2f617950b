//! The web server against guessing, redirects and framing (issue 14, finding 11), each attack
//! performed against a real `diskferry serve`: wrong passwords and tokens until 429, the
//! password file read for clear text, a login with a `next` that leaves the site, the
//! security headers.

use diskferry_e2e::http::{request, Response, Server, TEST_PASSWORD};

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
