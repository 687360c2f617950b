//! Capture chains through the API and the pages (issue 16): overlays made by qemu-img
//! (`create -b`, on an ext4 base made by mkfs.ext4) show their base, children and chain and
//! are browsed through it; a base with overlays is not deleted
//! (409 naming them), a leaf is; capture requests with contradictory or unknown chain
//! fields are refused before anything starts; the machine's capture form offers
//! "Incremental on" the latest capture with a chunk map, chosen by default.

use std::path::Path;
use std::process::Command;

use diskferry_web::client::{self, Response};

fn qemu_img(args: &[&str], dir: &Path) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img is installed");
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
}

struct App {
    _dir: tempfile::TempDir,
    addr: String,
    token: String,
    captures: std::path::PathBuf,
    state: diskferry_web::SharedState,
}

impl App {
    /// The server, in this process, over a data directory holding base ← child ← grand.
    async fn start() -> App {
        let dir = tempfile::tempdir().unwrap();
        // Made before the server starts, so its first look at the captures finds them.
        let captures = dir.path().join("captures");
        std::fs::create_dir(&captures).unwrap();
        // The base holds an ext4 filesystem (mkfs.ext4 -d) with one file.
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("hello.txt"), b"from the base\n").unwrap();
        let fs = dir.path().join("fs.img");
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&fs)
            .arg("4M")
            .output()
            .expect("mkfs.ext4 is installed");
        assert!(mkfs.status.success(), "{mkfs:?}");
        qemu_img(
            &["convert", "-O", "qcow2", fs.to_str().unwrap(), "base.qcow2"],
            &captures,
        );
        for (child, base) in [
            ("child.qcow2", "base.qcow2"),
            ("grand.qcow2", "child.qcow2"),
        ] {
            qemu_img(
                &[
                    "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", child,
                ],
                &captures,
            );
        }
        let (state, startup) = diskferry_web::open(dir.path()).unwrap();
        let token = std::fs::read_to_string(&startup.token_file)
            .unwrap()
            .trim()
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(diskferry_web::serve(listener, state.clone(), None));
        App {
            _dir: dir,
            addr,
            token,
            captures,
            state,
        }
    }

    async fn call(&self, method: &str, target: &str, body: &str) -> Response {
        let (addr, auth) = (self.addr.clone(), format!("Bearer {}", self.token));
        let (method, target, body) = (method.to_string(), target.to_string(), body.to_string());
        tokio::task::spawn_blocking(move || {
            let headers = [
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ];
            client::request(&addr, &method, &target, &headers, body.as_bytes()).unwrap()
        })
        .await
        .unwrap()
    }

    async fn captures(&self) -> Vec<serde_json::Value> {
        let r = self.call("GET", "/api/captures", "").await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().as_array().unwrap().clone()
    }
}

fn named<'a>(all: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    all.iter().find(|c| c["name"] == name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_and_pages_show_chains() {
    let app = App::start().await;
    let all = app.captures().await;
    let (base, child, grand) = (
        named(&all, "base.qcow2"),
        named(&all, "child.qcow2"),
        named(&all, "grand.qcow2"),
    );
    assert_eq!(grand["base"]["name"], "child.qcow2", "{grand}");
    assert_eq!(grand["base"]["id"], child["id"]);
    assert_eq!(grand["base"]["relation"], "overlay");
    assert_eq!(
        grand["chain"],
        serde_json::json!(["child.qcow2", "base.qcow2"])
    );
    assert_eq!(base["base"], serde_json::Value::Null);
    assert_eq!(base["children"][0]["name"], "child.qcow2", "{base}");
    assert_eq!(base["chunk_map"], false);
    assert_eq!(grand["virtual_size"], 4 << 20, "{grand}");

    let one = app
        .call("GET", &format!("/api/captures/{}", child["id"]), "")
        .await;
    assert_eq!(one.status, 200);
    let one = one.json();
    assert_eq!(one["children"][0]["name"], "grand.qcow2", "{one}");
    assert_eq!(one["chain"], serde_json::json!(["base.qcow2"]));

    // The capture page links to its base and to what is built on it.
    let page = app
        .call("GET", &format!("/captures/{}", child["id"]), "")
        .await;
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(html.contains("overlay on "), "{html}");
    assert!(
        html.contains(&format!("href=\"/captures/{}\"", base["id"])),
        "{html}"
    );
    assert!(
        html.contains(&format!("href=\"/captures/{}\"", grand["id"])),
        "{html}"
    );
    assert!(
        !html.contains("Delete this capture"),
        "a base of overlays offers no delete"
    );
    // The leaf offers its delete; its files read through the chain from the base.
    let leaf = app
        .call("GET", &format!("/captures/{}", grand["id"]), "")
        .await
        .text();
    assert!(leaf.contains("Delete this capture"), "{leaf}");
    let dir = app
        .call(
            "GET",
            &format!("/api/captures/{}/partitions/1/dir?path=/", grand["id"]),
            "",
        )
        .await;
    assert_eq!(dir.status, 200, "{}", dir.text());
    assert!(dir.text().contains("hello.txt"), "{}", dir.text());
    let list = app.call("GET", "/captures", "").await.text();
    assert!(list.contains("overlay on"), "{list}");
    assert!(list.contains("base of 1"), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_page_says_what_the_capture_built_on() {
    use diskferry_daemon::catalog::JobState;
    let app = App::start().await;
    let catalog = &app.state.catalog;
    let id = catalog
        .create_job(
            "capture",
            &serde_json::json!({"source": "sda@web-01", "output": "c.qcow2"}),
        )
        .unwrap();
    let result = serde_json::json!({
        "base": null,
        "fallback": "the base <b.qcow2> changed since it was captured",
        "summary": "full capture; chunk map written",
    });
    catalog.set_job_result(id, &result).unwrap();
    catalog.finish_job(id, JobState::Succeeded, None).unwrap();
    let page = app.call("GET", &format!("/jobs/{id}"), "").await.text();
    assert!(page.contains("full capture; chunk map written"), "{page}");
    assert!(page.contains("the base &lt;b.qcow2&gt; changed"), "{page}");
    let api = app.call("GET", &format!("/api/jobs/{id}"), "").await.json();
    assert_eq!(api["result"]["fallback"], result["fallback"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_of_overlays_is_not_deleted() {
    let app = App::start().await;
    let all = app.captures().await;
    let id = |n: &str| named(&all, n)["id"].as_i64().unwrap();
    let r = app
        .call("DELETE", &format!("/api/captures/{}", id("base.qcow2")), "")
        .await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("child.qcow2"), "{}", r.text());
    assert!(app.captures.join("base.qcow2").exists());
    for name in ["grand.qcow2", "child.qcow2", "base.qcow2"] {
        let r = app
            .call("DELETE", &format!("/api/captures/{}", id(name)), "")
            .await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert!(!app.captures.join(name).exists());
    }
    let r = app
        .call("DELETE", &format!("/api/captures/{}", id("base.qcow2")), "")
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_requests_with_bad_chain_fields_are_refused() {
    let app = App::start().await;
    let job = |extra: &str| {
        format!(r#"{{"kind":"capture","source":"/dev/sda@127.0.0.1:9","output":"x.qcow2"{extra}}}"#)
    };
    for (extra, status, words) in [
        (r#","base":"nope.qcow2""#, 404, "nope.qcow2"),
        (r#","incremental":"sometimes""#, 400, "sometimes"),
        (
            r#","base":"base.qcow2","incremental":"full""#,
            400,
            "contradict",
        ),
        (r#","chunk_map":"yes""#, 400, "expected a boolean"),
    ] {
        let r = app.call("POST", "/api/jobs", &job(extra)).await;
        assert_eq!(r.status, status, "{extra}: {}", r.text());
        assert!(r.text().contains(words), "{extra}: {}", r.text());
    }
    // The OpenAPI description names the new fields.
    let spec = app.call("GET", "/api/openapi.json", "").await.json();
    let props = &spec["components"]["schemas"]["JobRequest"]["properties"];
    for field in ["base", "incremental", "chunk_map"] {
        assert!(props.get(field).is_some(), "{field}");
    }
}
