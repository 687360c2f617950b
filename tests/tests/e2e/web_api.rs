//! The web server's JSON API and pages against a real `diskferry serve`: captures registered
//! from the data directory, listings and file bytes inside ext4, FAT and NTFS partitions
//! (compared with what the fixtures hold and with mtools/ntfs-3g), tar downloads read by GNU
//! tar, comparisons, and the security rules — no credentials, wrong tokens, CSRF, path
//! traversal of every kind, oversized and malformed bodies: each a 4xx with a message, never
//! a 500.

use std::path::Path;

use diskferry_e2e::fixtures::SampleDisk;
use diskferry_e2e::http::{request, Response, Server};
use diskferry_e2e::{diskferry, run_ok, sh, Client};

fn convert(src: &Path, out: &Path) {
    let (ok, _, err) = diskferry(&["convert".as_ref(), src.as_os_str(), out.as_os_str()]);
    assert!(ok, "convert: {err}");
}

/// Asserts a failure status and a JSON message.
fn assert_refused(r: &Response, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(!msg.is_empty(), "{what}: an error message");
}

fn dir_names(s: &Server, target: &str) -> Vec<String> {
    let r = s.get(target);
    assert_eq!(r.status, 200, "{target}: {}", r.text());
    r.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn api_browses_captures_and_refuses_what_it_must() {
    let disk = SampleDisk::build();
    let data = tempfile::tempdir().unwrap();
    let caps = data.path().join("captures");
    std::fs::create_dir_all(&caps).unwrap();
    convert(&disk.gpt, &caps.join("sample.vhdx"));
    // A second capture of the same disk with the ext4 changed: one file added, one removed,
    // one rewritten.
    let changed = disk.dir.join("changed.img");
    std::fs::copy(&disk.gpt, &changed).unwrap();
    let ext4 = disk.dir.join("changed.ext4");
    std::fs::copy(&disk.ext4, &ext4).unwrap();
    sh(&format!(
        "m={d}/changed.mnt; mkdir -p $m; mount -o loop {e} $m; echo new > $m/etc/motd; \
         rm $m/home/alice/empty; echo changed > $m/home/alice/hello.txt; umount $m",
        d = disk.dir.display(),
        e = ext4.display()
    ));
    diskferry_e2e::fixtures::place(&changed, disk.gpt_offsets[1], &ext4);
    convert(&changed, &caps.join("sample-later.qcow2"));

    let s = Server::start(data.path()).unwrap();
    let mut statuses = Vec::new();
    let mut check = |r: Response| {
        statuses.push(r.status);
        r
    };

    // Who may ask.
    let r = check(request(&s.addr, "GET", "/api/captures", &[], b"").unwrap());
    assert_refused(&r, 401, "no credentials");
    let r = check(
        request(
            &s.addr,
            "GET",
            "/api/captures",
            &[("Authorization", "Bearer wrong-token")],
            b"",
        )
        .unwrap(),
    );
    assert_refused(&r, 401, "wrong token");
    let r = check(request(&s.addr, "GET", "/captures", &[], b"").unwrap());
    assert_eq!(r.status, 303, "pages send browsers to the login");
    assert!(r.header("location").unwrap().starts_with("/login?next="));
    let spec = check(request(&s.addr, "GET", "/api/openapi.json", &[], b"").unwrap()).json();
    for p in [
        "/api/captures",
        "/api/captures/{id}",
        "/api/captures/{id}/partitions/{n}/dir",
        "/api/captures/{id}/partitions/{n}/file",
        "/api/jobs",
        "/api/jobs/{id}",
        "/api/machines",
        "/api/machines/{key}",
        "/api/machines/{key}/approve",
        "/api/machines/{key}/name",
        "/api/machines/{key}/power",
        "/api/machines/{key}/wake",
        "/api/machines/{key}/groups",
        "/api/schedules",
        "/api/schedules/{id}",
    ] {
        assert!(spec["paths"][p].is_object(), "OpenAPI describes {p}");
    }

    // Captures and their analysis.
    let list = check(s.get("/api/captures")).json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    let sample = list.iter().find(|c| c["name"] == "sample.vhdx").unwrap();
    let later = list
        .iter()
        .find(|c| c["name"] == "sample-later.qcow2")
        .unwrap();
    let (id, id2) = (
        sample["id"].as_i64().unwrap(),
        later["id"].as_i64().unwrap(),
    );
    assert_eq!(sample["format"], "vhdx");
    assert_eq!(later["format"], "qcow2");
    assert_eq!(
        sample["virtual_size"].as_u64().unwrap(),
        std::fs::metadata(&disk.gpt).unwrap().len()
    );
    assert!(sample["allocated_size"].as_u64().unwrap() > 0);
    let fss: Vec<&str> = sample["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["filesystem"].as_str().unwrap())
        .collect();
    assert_eq!(fss, ["fat32", "ext4", "ntfs", "unknown"]);
    assert_eq!(sample["partitions"][0]["number"], 1);
    let one = check(s.get(&format!("/api/captures/{id}"))).json();
    assert_eq!(one["analysis"]["partitions"][1]["label"], "rootfs");
    let filtered = check(s.get("/api/captures?fs=ntfs&q=later")).json();
    assert_eq!(filtered.as_array().unwrap().len(), 1);
    assert_refused(&check(s.get("/api/captures/9999")), 404, "unknown capture");
    assert_refused(&check(s.get("/api/captures/abc")), 400, "non-numeric id");

    // Three directories deep in each filesystem.
    let base = format!("/api/captures/{id}/partitions");
    assert!(
        dir_names(&s, &format!("{base}/2/dir?path=/home/alice/docs"))
            .contains(&"report.bin".into())
    );
    assert!(dir_names(&s, &format!("{base}/1/dir?path=/EFI/BOOT")).contains(&"BOOTX64.EFI".into()));
    assert!(
        dir_names(&s, &format!("{base}/3/dir?path=/Windows/System32/config"))
            .contains(&"SOFTWARE".into())
    );
    let listing = check(s.get(&format!("{base}/2/dir?path=/home/alice"))).json();
    let link = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "fast-link")
        .unwrap()
        .clone();
    assert_eq!(
        (link["kind"].as_str(), link["target"].as_str()),
        (Some("symlink"), Some("hello.txt"))
    );
    let hello = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "hello.txt")
        .unwrap()
        .clone();
    let mode = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(disk.tree.join("home/alice/hello.txt"))
            .unwrap()
            .mode()
            & 0o7777
    };
    assert_eq!(hello["mode"], mode);
    assert_eq!(
        hello["permissions"], "rw-rw----",
        "the ACL mask shows in the group bits"
    );
    assert_eq!(hello["mtime"], 981173106, "2001-02-03 04:05:06 UTC");

    // File bytes, against the fixture tree, mtools and ntfs-3g.
    let r = check(s.get(&format!("{base}/2/file?path=/home/alice/docs/report.bin")));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        std::fs::read(disk.tree.join("home/alice/docs/report.bin")).unwrap()
    );
    assert!(r
        .header("content-disposition")
        .unwrap()
        .contains("report.bin"));
    let r = check(s.get(&format!("{base}/1/file?path=/A%20Long%20File%20Name.bin")));
    let mtools = disk.dir.join("fat-long.bin");
    run_ok(
        "mcopy",
        &[
            "-n",
            "-i",
            disk.fat32.to_str().unwrap(),
            "::/A Long File Name.bin",
            mtools.to_str().unwrap(),
        ],
    );
    assert_eq!(r.body, std::fs::read(&mtools).unwrap());
    let r = check(s.get(&format!("{base}/3/file?path=/Big%20File.bin")));
    let ntfscat = std::process::Command::new("ntfscat")
        .args([disk.ntfs.to_str().unwrap(), "Big File.bin"])
        .output()
        .unwrap();
    assert!(ntfscat.status.success());
    assert_eq!(r.body, ntfscat.stdout);

    // A directory as tar, read back by GNU tar.
    let r = check(s.get(&format!("{base}/2/tar?path=/home/alice")));
    assert_eq!(r.status, 200, "{}", r.text());
    let tarball = disk.dir.join("alice.tar");
    std::fs::write(&tarball, &r.body).unwrap();
    let out = disk.dir.join("untar");
    std::fs::create_dir_all(&out).unwrap();
    run_ok(
        "tar",
        &[
            "-xf",
            tarball.to_str().unwrap(),
            "-C",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(out.join("alice/hello.txt")).unwrap(),
        b"hello\n"
    );
    assert_eq!(
        std::fs::read(out.join("alice/docs/report.bin")).unwrap(),
        std::fs::read(disk.tree.join("home/alice/docs/report.bin")).unwrap()
    );
    assert_eq!(
        std::fs::read_link(out.join("alice/fast-link")).unwrap(),
        Path::new("hello.txt")
    );

    // Paths never leave the partition.
    for (target, status) in [
        (format!("{base}/2/dir?path=.."), 400),
        (format!("{base}/2/dir?path=/home/../../etc"), 400),
        (format!("{base}/2/dir?path=%2e%2e%2f%2e%2e%2fetc"), 400),
        (format!("{base}/2/file?path=/../../../../etc/passwd"), 400),
        (format!("{base}/2/file?path=%2F..%2F..%2Fetc%2Fpasswd"), 400),
        (format!("{base}/2/file?path=/home/alice/x%00y"), 400),
        // A link whose target climbs above the root.
        (format!("{base}/2/file?path=/home/alice/escape"), 400),
        // Absolute paths are the partition's, not the server's: no /etc/passwd in there.
        (format!("{base}/2/file?path=/etc/passwd"), 404),
        // `..` in the URL path itself matches no route.
        (format!("{base}/2/../../../../../etc/passwd"), 404),
        (
            format!("/api/captures/{id}/partitions/2%2F..%2F..%2Fetc/file?path=/"),
            400,
        ),
        (format!("{base}/0/dir?path=/"), 400),
        (format!("{base}/9/dir?path=/"), 404),
        (format!("{base}/4/dir?path=/"), 422),
        (format!("{base}/2/dir?path=/etc/hostname"), 400),
        (format!("{base}/2/file?path=/home"), 400),
    ] {
        let r = check(s.get(&target));
        assert_refused(&r, status, &target);
        assert!(
            !r.text().contains("root:x:0:0"),
            "{target} leaked the host's passwd"
        );
    }
    // An absolute link target resolves inside the partition (its /etc/hostname).
    let r = check(s.get(&format!("{base}/2/file?path=/home/alice/abs-link")));
    assert_eq!((r.status, r.text()), (200, "fixture-host\n".to_string()));

    // Comparing two captures.
    let cmp = check(s.get(&format!("/api/compare?a={id}&b={id2}&partition=2"))).json();
    assert_eq!(cmp["added"], serde_json::json!(["/etc/motd"]), "{cmp}");
    assert_eq!(cmp["removed"], serde_json::json!(["/home/alice/empty"]));
    assert!(cmp["changed"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p == "/home/alice/hello.txt"));

    // Jobs and machines: bad requests are 4xx with a reason.
    assert_refused(
        &check(s.api("POST", "/api/jobs", b"{not json")),
        400,
        "bad JSON",
    );
    assert_refused(
        &check(s.api("POST", "/api/jobs", &vec![b' '; 100 << 10])),
        413,
        "oversized body",
    );
    for body in [
        r#"{"kind":"format-everything","source":"a@127.0.0.1:1","output":"x.vhdx"}"#,
        r#"{"kind":"capture","source":"/etc/passwd","output":"x.vhdx"}"#,
        r#"{"kind":"capture","source":"a@127.0.0.1:1","output":"../x.vhdx"}"#,
        r#"{"kind":"capture","source":"a@127.0.0.1:1","output":"x.exe"}"#,
        r#"{"kind":"capture","source":"a@127.0.0.1:1","output":"x.vhdx","mode":"fast"}"#,
        r#"{"kind":"capture","source":"a@127.0.0.1:1","output":"x.vhdx","surprise":1}"#,
    ] {
        assert_refused(
            &check(s.api("POST", "/api/jobs", body.as_bytes())),
            400,
            body,
        );
    }
    let body = br#"{"kind":"capture","source":"a@127.0.0.1:1","output":"sample.vhdx"}"#;
    assert_refused(
        &check(s.api("POST", "/api/jobs", body)),
        409,
        "existing name",
    );
    assert_refused(&check(s.get("/api/jobs/4242")), 404, "unknown job");
    assert_refused(
        &check(s.api("POST", "/api/jobs/4242/cancel", b"")),
        409,
        "job not running",
    );
    assert_refused(&check(s.get("/api/nothing-here")), 404, "unknown endpoint");
    let machines = check(s.get("/api/machines"));
    assert_eq!(machines.status, 200);
    assert!(machines.json().is_array());

    // A browser: login, session cookie, CSRF.
    let password = s.password.clone();
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let r = check(
        request(
            &s.addr,
            "POST",
            "/login",
            &form,
            b"password=wrong&next=/captures",
        )
        .unwrap(),
    );
    assert_eq!(r.status, 401);
    let foreign = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Origin", "https://evil.example"),
    ];
    let login_body = format!("password={}&next=/captures", password.trim());
    let r = check(request(&s.addr, "POST", "/login", &foreign, login_body.as_bytes()).unwrap());
    assert_eq!(r.status, 403, "login from another site");
    let r = check(request(&s.addr, "POST", "/login", &form, login_body.as_bytes()).unwrap());
    assert_eq!(r.status, 303, "{}", r.text());
    let set_cookie = r.header("set-cookie").unwrap().to_string();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let page = check(request(&s.addr, "GET", "/captures", &[("Cookie", &cookie)], b"").unwrap());
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(
        html.contains("sample.vhdx") && html.contains("Debian GNU/Linux 12"),
        "{html}"
    );
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    let job = br#"{"kind":"capture","source":"a@127.0.0.1:1","output":"sample.vhdx"}"#;
    let json_cookie = [
        ("Cookie", cookie.as_str()),
        ("Content-Type", "application/json"),
    ];
    let r = check(request(&s.addr, "POST", "/api/jobs", &json_cookie, job).unwrap());
    assert_refused(&r, 403, "no CSRF token");
    let mut with_bad = json_cookie.to_vec();
    with_bad.push(("X-CSRF-Token", "0000"));
    assert_refused(
        &check(request(&s.addr, "POST", "/api/jobs", &with_bad, job).unwrap()),
        403,
        "bad CSRF",
    );
    let mut with_good = json_cookie.to_vec();
    with_good.push(("X-CSRF-Token", &csrf));
    // Past the CSRF check, the request itself is judged (that name exists).
    assert_refused(
        &check(request(&s.addr, "POST", "/api/jobs", &with_good, job).unwrap()),
        409,
        "good CSRF",
    );

    // Pages: detail with the layout bars, the browser, a text file inline, a bad path.
    let get_page = |t: &str| request(&s.addr, "GET", t, &[("Cookie", &cookie)], b"").unwrap();
    let d = check(get_page(&format!("/captures/{id}")));
    assert!(
        d.status == 200 && d.text().matches("class=\"bar\"").count() == 2,
        "{}",
        d.text()
    );
    let b = check(get_page(&format!(
        "/captures/{id}/p/2/browse?path=/home/alice"
    )));
    assert!(b.text().contains("hello.txt") && b.text().contains("→ hello.txt"));
    let v = check(get_page(&format!(
        "/captures/{id}/p/2/view?path=/etc/hostname"
    )));
    assert!(
        v.text().contains("<pre class=\"file\">fixture-host"),
        "{}",
        v.text()
    );
    let bad = check(get_page(&format!("/captures/{id}/p/2/browse?path=/../..")));
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("may not contain"));
    let c = check(get_page(&format!("/compare?a={id}&b={id2}&partition=2")));
    assert!(c.text().contains("/etc/motd"));

    assert!(
        statuses.iter().all(|&st| st < 500),
        "a 5xx answered: {statuses:?}"
    );
}

#[test]
fn a_capture_job_runs_to_the_end_and_joins_the_catalog() {
    let disk = SampleDisk::build();
    let data = tempfile::tempdir().unwrap();
    let s = Server::start(data.path()).unwrap();
    let key = data.path().join("server.key");
    let client = Client::start(&key, &["--disk", disk.gpt.to_str().unwrap()]).unwrap();
    let body = serde_json::json!({
        "kind": "capture", "source": client.source(&disk.gpt), "output": "sample.qcow2",
        "mode": "auto", "verify": true,
    });
    let r = s.api("POST", "/api/jobs", body.to_string().as_bytes());
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    // The event stream ends when the job does; its last event is the final state.
    let events = s.get(&format!("/api/jobs/{id}/events")).text();
    let last: serde_json::Value = events
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .next_back()
        .unwrap();
    assert_eq!(last["state"], "succeeded", "{events}");
    assert!(
        events.contains("\"overall_done\""),
        "progress events were streamed: {events}"
    );
    let job = s.get(&format!("/api/jobs/{id}")).json();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(
        job["log"].as_str().unwrap().contains("no differences"),
        "{job}"
    );
    let out = data.path().join("captures/sample.qcow2");
    run_ok("qemu-img", &["check", out.to_str().unwrap()]);
    let caps = s.get("/api/captures").json();
    let cap = &caps.as_array().unwrap()[0];
    assert_eq!(cap["name"], "sample.qcow2");
    assert_eq!(cap["source_machine"], client.addr.as_str());
    assert!(!data.path().join("captures/sample.qcow2.partial").exists());
    assert_eq!(
        cap["chunk_map"], true,
        "capture jobs write a chunk map: {cap}"
    );
    assert_eq!(cap["layout"], "partitions");

    // The same disk again, incremental on the newest capture of it: nothing changed, every
    // file comes from the base, and the result still verifies against the source.
    let body = serde_json::json!({
        "kind": "capture", "source": client.source(&disk.gpt), "output": "again.qcow2",
        "mode": "auto", "verify": true, "incremental": "auto",
    });
    let r = s.api("POST", "/api/jobs", body.to_string().as_bytes());
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    s.get(&format!("/api/jobs/{id}/events")).text();
    let job = s.get(&format!("/api/jobs/{id}")).json();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["base"], "sample.qcow2", "{job}");
    assert_eq!(job["result"]["relation"], "files", "{job}");
    assert_eq!(job["result"]["incremental"]["changed_chunks"], 0, "{job}");
    assert!(
        job["log"].as_str().unwrap().contains("no differences"),
        "{job}"
    );
    let again = data.path().join("captures/again.qcow2");
    run_ok("qemu-img", &["check", again.to_str().unwrap()]);
    let caps = s.get("/api/captures").json();
    let named = |n: &str| {
        caps.as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(
        named("again.qcow2")["base"]["name"],
        "sample.qcow2",
        "{caps}"
    );
    assert_eq!(
        named("again.qcow2")["chain"],
        serde_json::json!(["sample.qcow2"])
    );
    assert_eq!(named("sample.qcow2")["children"][0]["name"], "again.qcow2");
    // A files child does not hold its base: the base may go.
    let base_id = named("sample.qcow2")["id"].as_i64().unwrap();
    let r = s.api("DELETE", &format!("/api/captures/{base_id}"), b"");
    assert_eq!(r.status, 200, "{}", r.text());
}
