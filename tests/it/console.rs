//! The web console in a real browser: headless Chromium (Debian's package, installed by
//! scripts/test) driven over WebDriver (chromedriver) against a live `hallmark serve` and a real
//! MLServer, through the admin's, the publisher's and the auditor's flows. Each step saves a
//! screenshot under target/console-screenshots/.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::service::FASHION;
use crate::service_process::Server;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One browser, driven by chromedriver.
struct Browser {
    driver: Child,
    base: String,
    shots: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = curl("DELETE", &self.base, None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A WebDriver call with curl: the answer's `value`.
fn curl(method: &str, url: &str, body: Option<&Value>) -> Value {
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "-X",
        method,
        url,
        "-H",
        "Content-Type: application/json",
    ]);
    if let Some(b) = body {
        c.args(["--data-binary", &b.to_string()]);
    } else if method == "POST" {
        c.args(["--data-binary", "{}"]);
    }
    let out = c.output().expect("curl runs");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["value"].clone()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    fn start(shots: &Path) -> Browser {
        let driver_bin = which("chromedriver").expect(
            "chromedriver is missing: run the tests with scripts/test (scripts/ensure-chromium)",
        );
        // A port found free can be taken by another test before chromedriver binds it; the
        // driver then exits, and it is started again on another port.
        let (driver, root) = (1..=5)
            .find_map(|attempt| {
                let port = free_port();
                let mut driver = Command::new(&driver_bin)
                    .arg(format!("--port={port}"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                let root = format!("http://127.0.0.1:{port}");
                let deadline = Instant::now() + Duration::from_secs(30);
                while curl("GET", &format!("{root}/status"), None)["ready"] != json!(true) {
                    if driver.try_wait().ok().flatten().is_some() {
                        eprintln!("chromedriver exited (attempt {attempt}); trying another port");
                        return None;
                    }
                    assert!(Instant::now() < deadline, "chromedriver did not start");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Some((driver, root))
            })
            .expect("chromedriver exited five times before it was ready");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": which("chromium").expect("chromium is missing: run scripts/test"),
                // Scripts off: the console must work without them.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1600",
                         "--blink-settings=scriptEnabled=false"]
            }
        }}});
        let session = curl("POST", &format!("{root}/session"), Some(&caps));
        let id = session["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {session}"))
            .to_string();
        std::fs::create_dir_all(shots).unwrap();
        Browser {
            driver,
            base: format!("{root}/session/{id}"),
            shots: shots.to_path_buf(),
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        curl(method, &format!("{}{path}", self.base), body.as_ref())
    }

    fn go(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    fn url(&self) -> String {
        self.call("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .into()
    }

    fn source(&self) -> String {
        self.call("GET", "/source", None)
            .as_str()
            .unwrap_or_default()
            .into()
    }

    /// The visible text of the page.
    fn text(&self) -> String {
        let body = self.find("body");
        self.call("GET", &format!("/element/{body}/text"), None)
            .as_str()
            .unwrap_or_default()
            .into()
    }

    fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css} on {}: {v}", self.url()))
            .to_string()
    }

    fn exists(&self, css: &str) -> bool {
        let v = self.call(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_array().is_some_and(|a| !a.is_empty())
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.call("POST", &format!("/element/{e}/clear"), None);
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        );
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.call("POST", &format!("/element/{e}/click"), None);
    }

    /// Picks `value` in the select `name` of the form that `form` (a CSS selector) finds.
    fn choose(&self, form: &str, name: &str, value: &str) {
        self.click(&format!(
            "{form} select[name={name}] option[value=\"{value}\"]"
        ));
    }

    fn value(&self, css: &str) -> String {
        let e = self.find(css);
        self.call("GET", &format!("/element/{e}/property/value"), None)
            .as_str()
            .unwrap_or_default()
            .into()
    }

    /// Waits until the page's text contains `needle` (pages of running work refresh themselves).
    fn wait_for(&self, needle: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let t = self.source();
            if t.contains(needle) {
                return self.text();
            }
            assert!(
                !t.contains("Something went wrong"),
                "an error page instead of {needle:?}: {}",
                self.text()
            );
            assert!(
                Instant::now() < deadline,
                "{needle:?} did not appear on {} within {secs} s: {t}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn cookie(&self, name: &str) -> Option<Value> {
        self.call("GET", "/cookie", None)
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == name).cloned())
    }

    /// Saves a screenshot, and checks that every form control on the page has a label.
    fn screenshot(&self, name: &str) {
        assert_labelled(&self.source(), name);
        let png = self.call("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG"),
            "screenshot {name} is not a PNG"
        );
        std::fs::write(self.shots.join(format!("{name}.png")), bytes).unwrap();
    }

    fn sign_in(&self, site: &str, key: &str) {
        self.go(site);
        self.type_into("#f-key", key);
        self.click("form[action='/console/sign-in'] button");
        self.wait_for("Signed in as", 10);
    }

    fn sign_out(&self) {
        self.click("header form[action='/console/sign-out'] button");
        self.wait_for("Sign in with your API key", 10);
    }
}

/// Every input (but hidden ones), select and textarea of `html` has an id, no other element has,
/// that a `<label for>` names.
fn assert_labelled(html: &str, page: &str) {
    let mut ids = std::collections::HashSet::new();
    for (at, _) in html.match_indices(" id=\"") {
        let id = html[at + 5..].split('"').next().unwrap();
        assert!(ids.insert(id), "{page}: the id {id:?} is not unique");
    }
    for tag in ["<input", "<select", "<textarea"] {
        for (at, _) in html.match_indices(tag) {
            let element = &html[at..at + html[at..].find('>').unwrap()];
            if element.contains("type=\"hidden\"") {
                continue;
            }
            let id = element
                .split("id=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or_else(|| panic!("{page}: a control without an id: {element}"));
            assert!(
                html.contains(&format!("<label for=\"{id}\"")),
                "{page}: no label for {element}"
            );
        }
    }
}

fn which(name: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// An API call with a key, for what the test checks behind the browser's back.
fn api(method: &str, url: &str, key: &str) -> (u16, Value) {
    let out = Command::new("curl")
        .args(["-s", "-X", method, "-H"])
        .arg(format!("Authorization: Bearer {key}"))
        .args(["-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// A form post with a session cookie, as another site's page would try it.
fn post_with_cookie(url: &str, cookie: &str, form: &str, origin: Option<&str>) -> u16 {
    let mut c = Command::new("curl");
    c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .args(["-H", &format!("Cookie: hallmark_session={cookie}")])
        .args(["--data", form]);
    if let Some(o) = origin {
        c.args(["-H", &format!("Origin: {o}")]);
    }
    let out = c.arg(url).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn id_in_url(url: &str) -> String {
    url.rsplit('/').next().unwrap_or_default().to_string()
}

#[test]
fn publisher_and_auditor_walk_the_console_in_a_real_browser() {
    let ml = crate::mlserver::start();
    let data = tempfile::tempdir().unwrap();
    let (server, admin_key) = Server::beside(&ml, data.path());
    let site = server.url("/");
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    let b = Browser::start(&shots);

    // Signing in: a wrong key is refused on the page; the admin's key opens a session whose
    // cookie the page's scripts cannot read and other sites cannot send.
    b.go(&site);
    b.screenshot("01-sign-in");
    b.type_into("#f-key", "hm_not_a_key");
    b.click("form[action='/console/sign-in'] button");
    b.wait_for("unknown or was revoked", 10);
    b.sign_in(&site, admin_key.trim());
    let cookie = b.cookie("hallmark_session").expect("a session cookie");
    assert_eq!(cookie["httpOnly"], json!(true), "{cookie}");
    assert_eq!(cookie["sameSite"], json!("Strict"), "{cookie}");
    assert!(
        !cookie["value"].as_str().unwrap().contains(admin_key.trim()),
        "the cookie is not the key"
    );
    b.screenshot("02-admin-home");

    // Admin: two keys, each shown once.
    b.click("nav a[href='/console/keys']");
    b.wait_for("Create a key", 10);
    let mut keys = Vec::new();
    for (name, role) in [("Pat Publisher", "publisher"), ("Ada Auditor", "auditor")] {
        b.type_into("#f-name", name);
        b.choose("form[action='/console/keys']", "role", role);
        b.click("form[action='/console/keys'] button");
        b.wait_for("is shown this once", 10);
        let key = b.value("#new-key");
        assert!(key.starts_with("hm_"), "{key}");
        keys.push(key);
    }
    b.screenshot("03-admin-keys");
    let (publisher, auditor) = (keys[0].clone(), keys[1].clone());
    let auditor_id = api("GET", &server.url("/v1/keys/me"), &auditor).1["id"]
        .as_str()
        .unwrap()
        .to_string();
    b.sign_out();

    // Publisher: datasets, a watermark from a shipped spec, an imported record, a grant.
    b.sign_in(&site, &publisher);
    assert!(
        !b.exists("nav a[href='/console/keys']"),
        "a publisher has no keys page"
    );
    b.click("nav a[href='/console/datasets']");
    b.wait_for("Register a dataset", 10);
    let clean = ml.dir.path().join("clean");
    for (name, path, split) in [
        ("Fashion-MNIST train subset", clean.to_str().unwrap(), ""),
        ("Fashion-MNIST test", FASHION, "test"),
    ] {
        b.type_into("#f-name", name);
        b.type_into("#f-path", path);
        if !split.is_empty() {
            b.choose("form[action='/console/datasets']", "split", split);
        }
        b.click("form[action='/console/datasets'] button");
        b.wait_for(name, 60);
    }
    // A streamed dataset: WebDataset shards of mixed-size colour images, registered with the
    // form's stream box (read shard by shard).
    let shards = ml.dir.path().join("shards");
    crate::stream::generate("webdataset", 30, 2, "", 90, 0, &shards);
    b.type_into("#f-name", "Hub shards");
    b.type_into("#f-path", shards.to_str().unwrap());
    b.click("#f-stream");
    b.click("form[action='/console/datasets'] button");
    let text = b.wait_for("Hub shards", 60);
    assert!(text.contains("registered, streamed"), "{text}");
    // An upload from the browser: Fashion-MNIST's test split as two IDX files.
    b.type_into("#u-name", "Uploaded test split");
    let files = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
        .map(|f| format!("{FASHION}/{f}"))
        .join("\n");
    let input = b.find("#u-files");
    b.call(
        "POST",
        &format!("/element/{input}/value"),
        Some(json!({ "text": files })),
    );
    b.click("form[action^='/console/datasets/upload'] button");
    let text = b.wait_for("Uploaded test split", 60);
    assert!(
        text.contains("10000"),
        "the upload holds 10,000 images: {text}"
    );
    b.screenshot("04-publisher-datasets");
    let datasets = api("GET", &server.url("/v1/datasets"), &publisher).1;
    let dataset_id = |name: &str| {
        datasets
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (train_id, test_id) = (
        dataset_id("Fashion-MNIST train subset"),
        dataset_id("Fashion-MNIST test"),
    );

    b.click("nav a[href='/console/watermarks']");
    b.wait_for("Watermark a release", 10);
    b.type_into("#f-name", "Spring release");
    b.choose(
        "form[action='/console/watermarks']",
        "dataset_id",
        &train_id,
    );
    b.choose(
        "form[action='/console/watermarks']",
        "spec",
        "badnets-square-28x28-grey",
    );
    b.click("form[action='/console/watermarks'] button");
    let text = b.wait_for("class=\"state ready\"", 180);
    assert!(text.contains("Commitment"), "{text}");
    let commitment = b.value("#commitment");
    assert!(
        commitment.len() == 64 && commitment.bytes().all(|c| c.is_ascii_hexdigit()),
        "{commitment}"
    );
    let spring_url = b.url();
    b.screenshot("05-publisher-watermark");

    b.click("nav a[href='/console/watermarks']");
    b.wait_for("Import a secret record", 10);
    b.type_into("#i-name", "Offline release");
    b.choose(
        "form[action^='/console/watermarks/import']",
        "holdout_dataset_id",
        &test_id,
    );
    let record = ml.dir.path().join("badnets.secret.json");
    let file = b.find("#i-record");
    b.call(
        "POST",
        &format!("/element/{file}/value"),
        Some(json!({"text": record.to_str().unwrap()})),
    );
    b.click("form[action^='/console/watermarks/import'] button");
    b.wait_for("Auditors", 20);
    let offline_url = b.url();
    let offline_id = id_in_url(&offline_url);
    b.type_into("#f-auditor_id", &auditor_id);
    b.click("form[action$='/grants'] button");
    b.wait_for(&auditor_id, 10);
    b.screenshot("06-publisher-grant");

    // The publisher verifies the suspect model (trained on the offline release) and reads the
    // verdict, then the report.
    b.click("a[href^='/console/verifications?watermark=']");
    b.wait_for("Verify a model", 10);
    b.choose(
        "form[action='/console/verifications']",
        "watermark_id",
        &offline_id,
    );
    b.type_into("#f-url", &format!("http://127.0.0.1:{}", ml.port));
    b.type_into("#f-model", "badnets");
    b.click("form[action='/console/verifications'] button");
    let text = b.wait_for("id=\"verdict\"", 300);
    assert!(text.contains("Verdict: used"), "{text}");
    assert!(text.contains("What it does not show"), "{text}");
    let publisher_verification = b.url();
    b.screenshot("07-publisher-verdict");
    b.click("a[href$='/report']");
    let report = b.wait_for("sha256", 20);
    assert!(
        report.contains("trained on the watermarked release"),
        "{report}"
    );
    b.screenshot("08-publisher-report");
    // The same report as PDF, from the API: pdftoppm renders its pages, pdftotext finds the
    // decision and the sha256 of the verdict it summarises.
    let id = id_in_url(&publisher_verification);
    let pdf = shots.join("report.pdf");
    let status = Command::new("curl")
        .args(["-s", "-f", "-o"])
        .arg(&pdf)
        .args(["-H", &format!("Authorization: Bearer {publisher}")])
        .arg(server.url(&format!("/v1/verifications/{id}/report?format=pdf")))
        .status()
        .unwrap();
    assert!(status.success());
    let verdict = api(
        "GET",
        &server.url(&format!("/v1/verifications/{id}")),
        &publisher,
    )
    .1["verdict"]
        .clone();
    let text = Command::new("pdftotext")
        .arg(&pdf)
        .arg("-")
        .output()
        .unwrap();
    assert!(text.status.success(), "pdftotext cannot read the report");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("Used: evidence of training on the release"),
        "{text}"
    );
    assert!(
        text.contains(&hallmark::report::verdict_sha256(&verdict)),
        "{text}"
    );
    for old in std::fs::read_dir(&shots).unwrap().flatten() {
        if old.file_name().to_string_lossy().starts_with("report-pdf") {
            std::fs::remove_file(old.path()).unwrap();
        }
    }
    let render = Command::new("pdftoppm")
        .args(["-png", "-r", "60"])
        .arg(&pdf)
        .arg(shots.join("report-pdf"))
        .output()
        .unwrap();
    assert!(
        render.status.success(),
        "{}",
        String::from_utf8_lossy(&render.stderr)
    );
    let pages: Vec<PathBuf> = std::fs::read_dir(&shots)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("report-pdf")
        })
        .collect();
    assert!(pages.len() >= 2, "{} pages", pages.len());
    for p in &pages {
        let png = std::fs::read(p).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 5_000,
            "{}",
            p.display()
        );
    }
    b.go(&site);
    b.sign_out();

    // Auditor: sees only what it was granted, never a secret; verifies the clean model.
    b.sign_in(&site, &auditor);
    let home = b.text();
    assert!(home.contains(&auditor_id), "{home}");
    b.click("nav a[href='/console/watermarks']");
    let text = b.wait_for("Watermarks granted to you", 10);
    assert!(text.contains("Offline release"), "{text}");
    assert!(!text.contains("Spring release"), "{text}");
    assert!(
        !b.exists("form[action='/console/watermarks']"),
        "an auditor cannot watermark"
    );
    b.screenshot("09-auditor-watermarks");
    b.go(&spring_url);
    assert!(b.text().contains("no such watermark"), "{}", b.text());
    b.go(&publisher_verification);
    assert!(b.text().contains("no such verification"), "{}", b.text());
    b.go(&server.url("/console/keys"));
    assert!(b.text().contains("needs the admin role"), "{}", b.text());
    b.go(&offline_url);
    let text = b.wait_for("Verify a model with this watermark", 10);
    assert!(
        !text.contains("Auditors"),
        "the grants are the publisher's: {text}"
    );
    b.click("a[href^='/console/verifications?watermark=']");
    b.wait_for("Verify a model", 10);
    b.type_into("#f-url", &format!("http://127.0.0.1:{}", ml.port));
    b.type_into("#f-model", "clean");
    b.click("form[action='/console/verifications'] button");
    let text = b.wait_for("id=\"verdict\"", 300);
    assert!(text.contains("Verdict: not shown"), "{text}");
    b.screenshot("10-auditor-verdict");
    let verification = b.url();
    b.go(&format!("{verification}/verdict.json"));
    let json_text = b.text();
    assert!(json_text.contains("\"decision\""), "{json_text}");
    for secret in ["\"trigger\"", "triggered_sha256", "\"pattern\""] {
        assert!(!json_text.contains(secret), "{secret} shown to the auditor");
    }
    b.go(&format!("{verification}/report"));
    let report = b.wait_for("sha256", 20);
    assert!(report.contains("no evidence"), "{report}");
    b.screenshot("11-auditor-report");

    // Forms need the session's CSRF token and this site's origin.
    let cookie = b.cookie("hallmark_session").unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    let start = server.url("/console/verifications");
    let form = format!(
        "watermark_id={offline_id}&url=http%3A%2F%2F127.0.0.1%3A{}&protocol=v2&model=clean",
        ml.port
    );
    assert_eq!(post_with_cookie(&start, &cookie, &form, None), 403);
    assert_eq!(
        post_with_cookie(&start, &cookie, &form, Some("https://evil.example")),
        403
    );
    assert_eq!(
        post_with_cookie(&server.url("/console/sign-out"), "", "csrf=x", None),
        303,
        "no session: back to the sign-in page"
    );

    // Revoking the auditor's key ends its session.
    let (status, _) = api(
        "DELETE",
        &server.url(&format!("/v1/keys/{auditor_id}")),
        admin_key.trim(),
    );
    assert_eq!(status, 204);
    b.go(&site);
    let text = b.wait_for("Sign in with your API key", 10);
    assert!(!text.contains("Signed in as"), "{text}");
    b.screenshot("12-revoked");
}
