//! The web UI in real headless Chromium (Debian `chromium` + `chromium-driver`): log in, open a
//! capture, walk three directories deep in its ext4, FAT and NTFS partitions, download a file
//! and compare its bytes, move with the keyboard, then start a capture job against a loopback
//! client and watch its progress reach 100 %. Screenshots land in
//! `<target>/<profile>/web-screenshots/` as test artifacts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use diskferry_e2e::fixtures::SampleDisk;
use diskferry_e2e::http::Server;
use diskferry_e2e::webdriver::Browser;
use diskferry_e2e::{bin_dir, diskferry, wait_for, Client};

fn shots() -> PathBuf {
    let d = bin_dir().join("web-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn shot(b: &Browser, name: &str) {
    b.screenshot(&shots().join(name)).unwrap();
}

/// Walks from a partition's root down through `dirs` by clicking their links, and checks the
/// last listing holds `expect`.
fn walk(b: &Browser, base: &str, capture: &str, partition: u32, dirs: &[&str], expect: &str) {
    b.goto(&format!("{base}/captures")).unwrap();
    b.click_link(capture).unwrap();
    wait_url(b, "/captures/");
    let browse = b
        .find(&format!("a[href$='/p/{partition}/browse?path=/']"))
        .unwrap();
    b.click(&browse).unwrap();
    wait_url(b, "browse?path=/");
    for (i, d) in dirs.iter().enumerate() {
        b.click_link(&format!("{d}/")).unwrap();
        wait_url(b, &format!("path=/{}", dirs[..=i].join("/")));
    }
    let want = format!("/{}", dirs.join("/"));
    assert!(
        wait_for(Duration::from_secs(30), || b
            .find("h1")
            .and_then(|h| b.text(&h))
            .is_ok_and(|t| t == want)),
        "listing of {want}"
    );
    wait_source(b, expect);
}

/// Waits until the page (which a click may still be loading) contains `needle`.
fn wait_source(b: &Browser, needle: &str) {
    assert!(
        wait_for(Duration::from_secs(30), || b
            .source()
            .is_ok_and(|s| s.contains(needle))),
        "{needle} never appeared: {}",
        b.source().unwrap_or_default()
    );
}

/// Waits until the browser is at a URL containing `part` (a click that submits a form may
/// return before the next page has loaded).
fn wait_url(b: &Browser, part: &str) {
    assert!(
        wait_for(Duration::from_secs(30), || b
            .url()
            .is_ok_and(|u| u.contains(part))),
        "never reached {part}: at {}",
        b.url().unwrap_or_default()
    );
}

/// What the job page's own script says: `data-running` of `#job` and the text of `#job-state`,
/// read by one script from whatever document is current (`None` while there is none to read).
fn job_page(b: &Browser) -> anyhow::Result<Option<(String, String)>> {
    let v = b.execute(
        "const job = document.getElementById('job'), st = document.getElementById('job-state');
         return job && st ? [job.dataset.running, st.innerText] : null;",
    )?;
    Ok(v.as_array().map(|a| {
        let s = |i: usize| a[i].as_str().unwrap_or_default().to_string();
        (s(0), s(1))
    }))
}

/// Waits until the job page shows a finished job *as the server rendered it*, and returns its
/// state.
///
/// While the job runs, the page's script rewrites the figures from server-sent events; when the
/// last event says the job ended it reloads the page, which replaces every element. So "the
/// state element says succeeded" is not yet the end: an element found then goes stale a moment
/// later. The reloaded page is rendered with `data-running="false"` and its script neither
/// listens nor reloads again; from then on its elements stay put. Each poll reads the current
/// document afresh; a failed read (the document is being replaced) is just "not yet".
fn wait_job_settled(b: &Browser) -> String {
    let mut seen = Ok(None);
    let settled = wait_for(Duration::from_secs(120), || {
        seen = job_page(b);
        matches!(&seen, Ok(Some((running, _))) if running == "false")
    });
    assert!(
        settled,
        "the job page never showed a finished job; last read {seen:?}: {}",
        b.source().unwrap_or_default()
    );
    let Ok(Some((_, state))) = seen else {
        unreachable!("settled means the last read was a finished page")
    };
    state
}

fn wait_file(path: &Path, len: u64) -> bool {
    wait_for(Duration::from_secs(30), || {
        std::fs::metadata(path).is_ok_and(|m| m.len() == len)
    })
}

#[test]
fn browse_download_and_watch_a_capture_in_chromium() {
    let disk = SampleDisk::build();
    let data = tempfile::tempdir().unwrap();
    let caps = data.path().join("captures");
    std::fs::create_dir_all(&caps).unwrap();
    let (ok, _, err) = diskferry(&[
        "convert".as_ref(),
        disk.gpt.as_os_str(),
        caps.join("sample.vhdx").as_os_str(),
    ]);
    assert!(ok, "{err}");
    let s = Server::start(data.path()).unwrap();
    let base = format!("http://{}", s.addr);
    let downloads = tempfile::tempdir().unwrap();
    let b = Browser::start(downloads.path()).unwrap();

    // Log in: the login page comes first, then the captures.
    b.goto(&format!("{base}/captures")).unwrap();
    assert!(b.url().unwrap().contains("/login"));
    let password = s.password.clone();
    let field = b.find("#password").unwrap();
    b.type_into(&field, password.trim()).unwrap();
    b.click(&b.find("form.login button").unwrap()).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || b
            .url()
            .is_ok_and(|u| u.ends_with("/captures"))),
        "logged in: at {}",
        b.url().unwrap()
    );
    wait_source(&b, "Debian GNU/Linux 12");
    shot(&b, "01-captures.png");

    // The capture's page: layout and allocation bars.
    b.click_link("sample.vhdx").unwrap();
    wait_url(&b, "/captures/");
    wait_source(&b, "Allocated vs virtual size");
    assert_eq!(b.source().unwrap().matches("class=\"bar\"").count(), 2);
    shot(&b, "02-capture.png");

    // Three directories deep in each filesystem.
    for (partition, dirs, expect, picture) in [
        (
            2,
            &["home", "alice", "docs"][..],
            "report.bin",
            "03-ext4.png",
        ),
        (1, &["EFI", "BOOT", "fonts"][..], "README.TXT", "04-fat.png"),
        (
            3,
            &["Windows", "System32", "config"][..],
            "SOFTWARE",
            "05-ntfs.png",
        ),
    ] {
        walk(&b, &base, "sample.vhdx", partition, dirs, expect);
        shot(&b, picture);
    }

    // Keyboard: j moves to the first row's link, Backspace goes up a directory.
    b.keys("j").unwrap();
    wait_source(&b, "class=\"focus\"");
    b.keys("\u{E003}").unwrap(); // Backspace
    assert!(wait_for(Duration::from_secs(10), || b
        .url()
        .unwrap()
        .ends_with("path=/Windows/System32")));

    // Download a file through its link and compare the bytes.
    walk(
        &b,
        &base,
        "sample.vhdx",
        2,
        &["home", "alice", "docs"],
        "report.bin",
    );
    b.click_link("report.bin").unwrap();
    wait_url(&b, "/view?path=");
    b.click_link("Download").unwrap();
    let want = std::fs::read(disk.tree.join("home/alice/docs/report.bin")).unwrap();
    let got = downloads.path().join("report.bin");
    assert!(wait_file(&got, want.len() as u64), "download finished");
    assert_eq!(std::fs::read(&got).unwrap(), want);
    // A text file is shown inline.
    walk(&b, &base, "sample.vhdx", 2, &["etc"], "hostname");
    b.click_link("hostname").unwrap();
    wait_url(&b, "/view?path=");
    assert!(b
        .text(&b.find("pre.file").unwrap())
        .unwrap()
        .contains("fixture-host"));

    // A capture job against a loopback client, watched to 100 %.
    let client = Client::start(
        &data.path().join("server.key"),
        &["--disk", disk.gpt.to_str().unwrap()],
    )
    .unwrap();
    b.goto(&format!("{base}/jobs")).unwrap();
    b.type_into(&b.find("#source").unwrap(), &client.source(&disk.gpt))
        .unwrap();
    b.type_into(&b.find("#output").unwrap(), "from-browser.vhdx")
        .unwrap();
    b.click(&b.find("form.job button").unwrap()).unwrap();
    wait_url(&b, "/jobs/");
    shot(&b, "06-job-running.png");
    let final_state = wait_job_settled(&b);
    assert_eq!(final_state, "succeeded", "{}", b.source().unwrap());
    let progress = b.find("#job-progress").unwrap();
    assert_eq!(
        b.property(&progress, "value").unwrap().as_f64(),
        Some(100.0)
    );
    assert!(b
        .text(&b.find("#job-percent").unwrap())
        .unwrap()
        .starts_with("100"));
    assert!(b
        .text(&b.find("#job-log").unwrap())
        .unwrap()
        .contains("no differences"));
    shot(&b, "07-job-done.png");
    // The new capture is in the catalog (the list page shows it).
    b.goto(&format!("{base}/captures")).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || {
            b.source().unwrap().contains("from-browser.vhdx") || {
                b.goto(&format!("{base}/captures")).unwrap();
                false
            }
        }),
        "{}",
        b.source().unwrap()
    );
}

/// Logs in at `base` and lands on `path`.
fn log_in(b: &Browser, s: &Server, base: &str, path: &str) {
    b.goto(&format!("{base}{path}")).unwrap();
    let field = b.find("#password").unwrap();
    b.type_into(&field, s.password.trim()).unwrap();
    b.click(&b.find("form.login button").unwrap()).unwrap();
    wait_url(b, path);
}

#[test]
fn machines_are_added_grouped_woken_and_scheduled_in_chromium() {
    let data = tempfile::tempdir().unwrap();
    // Magic packets go to a local port nobody reads, not onto this machine's networks.
    let s = Server::start_with(data.path(), &["--wake-relay", "127.0.0.1:9"]).unwrap();
    let base = format!("http://{}", s.addr);
    let downloads = tempfile::tempdir().unwrap();
    let b = Browser::start(downloads.path()).unwrap();
    log_in(&b, &s, &base, "/machines");

    // Add a machine before it ever boots.
    b.type_into(&b.find("#reg-mac").unwrap(), "52-54-00-D1-5C-61")
        .unwrap();
    b.type_into(&b.find("#reg-name").unwrap(), "lab-61")
        .unwrap();
    b.type_into(&b.find("#reg-address").unwrap(), "192.0.2.61")
        .unwrap();
    b.click(&b.find("#register button").unwrap()).unwrap();
    wait_source(&b, "52:54:00:d1:5c:61");
    let m = s.get("/api/machines/lab-61").json();
    assert_eq!(
        (m["preregistered"].as_bool(), m["address"].as_str()),
        (Some(true), Some("192.0.2.61"))
    );

    // Groups, then the Wake button.
    let groups = b.find("input[name=groups]").unwrap();
    b.type_into(&groups, "room-4, all").unwrap();
    b.click(&b.find("form[action$='/groups'] button").unwrap())
        .unwrap();
    wait_source(&b, "[room-4]");
    assert_eq!(
        s.get("/api/machines/lab-61").json()["groups"],
        serde_json::json!(["all", "room-4"])
    );
    b.click(&b.find("form[action$='/wake'] button").unwrap())
        .unwrap();
    wait_url(&b, "/machines");
    shot(&b, "10-machines.png");

    // A weekly capture of it from the jobs page, listed, then deleted.
    b.goto(&format!("{base}/jobs")).unwrap();
    b.type_into(&b.find("#source").unwrap(), "lab-61").unwrap();
    b.type_into(&b.find("#output").unwrap(), "lab-61-weekly.qcow2")
        .unwrap();
    b.type_into(&b.find("#every").unwrap(), "sun 02:00")
        .unwrap();
    b.click(&b.find("form.job button").unwrap()).unwrap();
    wait_source(&b, "lab-61 → lab-61-weekly.qcow2");
    shot(&b, "11-schedules.png");
    let list = s.get("/api/schedules").json();
    assert_eq!(list[0]["every"], "sun 02:00", "{list}");
    b.click(&b.find("#schedules + div form button").unwrap())
        .unwrap();
    assert!(wait_for(Duration::from_secs(20), || s
        .get("/api/schedules")
        .json()
        .as_array()
        .is_some_and(|a| a.is_empty())));
    // A capture now waits for the machine, which the history says.
    b.goto(&format!("{base}/jobs")).unwrap();
    b.type_into(&b.find("#source").unwrap(), "lab-61").unwrap();
    b.type_into(&b.find("#output").unwrap(), "lab-61.qcow2")
        .unwrap();
    b.click(&b.find("form.job button").unwrap()).unwrap();
    wait_url(&b, "/jobs/");
    wait_source(&b, "waiting for machine lab-61 to connect");
    b.goto(&format!("{base}/jobs")).unwrap();
    wait_source(&b, "for lab-61");
}
