//! The service as real processes: killed with SIGKILL in the middle of a job, and two servers
//! sharing one PostgreSQL database.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hallmark::dataset::{self, Format, Layout, Split};
use hallmark::store::{JobState, Store};
use serde_json::{Value, json};

use crate::service::{Db, FASHION, fresh_database, key, spec_text, write_fashion_subset};

/// `hallmark serve` as a real process on a free loopback port.
pub struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Server {
    fn start(data_dir: &Path, database_url: &str, roots: &Path, log_name: &str) -> Server {
        Self::start_with(data_dir, database_url, &[roots], log_name, &[])
    }

    /// Starts a server with these dataset roots and extra command-line arguments.
    pub fn start_with(
        data_dir: &Path,
        database_url: &str,
        roots: &[&Path],
        log_name: &str,
        extra: &[&str],
    ) -> Server {
        let log = data_dir.join(log_name);
        let mut command = Command::new(env!("CARGO_BIN_EXE_hallmark"));
        command
            .args(["serve", "--bind", "127.0.0.1:0", "--workers", "2"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--database-url", database_url])
            .args(extra);
        for root in roots {
            command.arg("--dataset-root").arg(root);
        }
        let mut child = command
            .env("HALLMARK_SECRET_KEY", hex::encode(key()))
            .env("HALLMARK_JOB_LEASE_SECS", "1")
            .env("HALLMARK_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log_path = log.clone();
        std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                use std::io::Write as _;
                let _ = writeln!(file, "{line}");
                if let Some(p) = line.strip_prefix("listening on port ") {
                    let _ = tx.send(p.trim().parse::<u16>().unwrap());
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "the server did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        Server { child, port, log }
    }

    /// A server on SQLite in `data`, allowed to query loopback model servers, with the MLServer
    /// `ml`'s folder and Fashion-MNIST as dataset roots; and its bootstrap admin key.
    pub fn beside(ml: &crate::mlserver::Server, data: &Path) -> (Server, String) {
        let db = format!("sqlite://{}?mode=rwc", data.join("db.sqlite").display());
        let server = Self::start_with(
            data,
            &db,
            &[ml.dir.path(), Path::new(FASHION)],
            "server.log",
            &["--allow-private-endpoints"],
        );
        let admin = std::fs::read_to_string(data.join("admin.key")).unwrap();
        (server, admin.trim().to_string())
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn kill9(&mut self) {
        // SIGKILL: no shutdown code runs.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn call(method: &str, url: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut args = vec![
        "-s".to_string(),
        "-X".into(),
        method.into(),
        "-H".into(),
        format!("Authorization: Bearer {key}"),
        "-w".into(),
        "\n%{http_code}".into(),
    ];
    if let Some(b) = body {
        args.extend([
            "-H".into(),
            "Content-Type: application/json".into(),
            "--data-binary".into(),
            b.to_string(),
        ]);
    }
    args.push(url.into());
    let out = Command::new("curl").args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or(Value::String(body.into()))
    };
    (code.trim().parse().unwrap_or(0), v)
}

fn wait_state(
    server: &Server,
    key: &str,
    job: &str,
    done: impl Fn(&str) -> bool,
    limit: Duration,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let (_, v) = call("GET", &server.url(&format!("/v1/jobs/{job}")), key, None);
        if v["state"].as_str().is_some_and(&done) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "job {job} stuck at {v}; log: {}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A release folder that exists must be whole: readable, with the hash its release.json claims.
fn check_release_whole(dir: &Path) -> Value {
    let info: Value = serde_json::from_slice(&std::fs::read(dir.join("release.json")).unwrap())
        .unwrap_or_else(|e| panic!("{}: release.json unreadable: {e}", dir.display()));
    let ds = dataset::read(dir, None, None, &|| {}).unwrap();
    assert_eq!(
        ds.dataset.sha256(),
        info["dataset_sha256"].as_str().unwrap()
    );
    info
}

#[test]
fn a_server_killed_mid_job_resumes_it_after_restart_and_loses_nothing() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let imports = d.path().join("imports");
    // 10,000 PNG files: writing them takes long enough to be killed in the middle.
    let folder = imports.join("fashion-png");
    {
        let loaded = dataset::read(
            Path::new(FASHION),
            Some(Format::Idx),
            Some(Split::Test),
            &|| {},
        )
        .unwrap();
        std::fs::create_dir_all(&folder).unwrap();
        let hashes = dataset::image_sha256s(&loaded.dataset);
        let info = dataset::write_release(
            &loaded.dataset,
            &Layout::Folder(Default::default()),
            &folder,
            &hashes,
            &|| {},
        )
        .unwrap();
        dataset::write_release_info(&folder, &info).unwrap();
    }
    let db = format!(
        "sqlite://{}?mode=rwc",
        d.path().join("hallmark.db").display()
    );
    std::fs::create_dir_all(&data).unwrap();
    let mut server = Server::start(&data, &db, &imports, "server-1.log");
    let admin = std::fs::read_to_string(data.join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    let (_, k) = call(
        "POST",
        &server.url("/v1/keys"),
        &admin,
        Some(json!({"name": "p", "role": "publisher"})),
    );
    let publisher = k["secret"].as_str().unwrap().to_string();
    let (s, ds) = call(
        "POST",
        &server.url("/v1/datasets"),
        &publisher,
        Some(json!({"name": "png", "path": folder})),
    );
    assert_eq!(s, 201, "{ds}");
    let mut watermarks = Vec::new();
    let mut resumed = 0;
    for (round, delay_ms) in [0u64, 300, 900].into_iter().enumerate() {
        let (s, v) = call(
            "POST",
            &server.url("/v1/watermarks"),
            &publisher,
            Some(json!({"name": format!("r{round}"), "dataset_id": ds["id"],
                        "spec": spec_text("blended-28x28-grey.toml"), "seed": round})),
        );
        assert_eq!(s, 202, "{v}");
        let wm = v["watermark"]["id"].as_str().unwrap().to_string();
        let job = v["job"]["id"].as_str().unwrap().to_string();
        wait_state(
            &server,
            &publisher,
            &job,
            |s| s != "queued",
            Duration::from_secs(30),
        );
        std::thread::sleep(Duration::from_millis(delay_ms));
        server.kill9();
        // Right after the crash: the release is either absent or whole.
        let dest = data.join("releases").join(&wm);
        if dest.exists() {
            check_release_whole(&dest);
        }
        server = Server::start(&data, &db, &imports, &format!("server-{}.log", round + 2));
        let j = wait_state(
            &server,
            &publisher,
            &job,
            |s| s != "queued" && s != "running",
            Duration::from_secs(60),
        );
        assert_eq!(j["state"], "succeeded", "{j}");
        if j["attempts"].as_i64().unwrap() >= 2 {
            resumed += 1;
        }
        watermarks.push((wm, job));
    }
    assert!(resumed >= 1, "no kill landed in the middle of a job");
    // Every release of every round is whole, matches its stored commitment and secret record,
    // and no half-written folder is left.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(Store::connect(&db, &key())).unwrap();
    for (wm, job) in &watermarks {
        let w = rt.block_on(store.get_watermark(wm)).unwrap().unwrap();
        let info = check_release_whole(&data.join("releases").join(wm));
        assert_eq!(info["commitment"].as_str(), w.commitment.as_deref());
        assert_eq!(info["dataset_sha256"].as_str(), w.dataset_sha256.as_deref());
        let rec = rt.block_on(store.secret_record(wm)).unwrap().unwrap();
        let rec = hallmark::watermark::SecretRecord::from_json(std::str::from_utf8(&rec).unwrap())
            .unwrap();
        assert_eq!(Some(rec.commitment()), w.commitment);
        let j = rt.block_on(store.get_job(job)).unwrap().unwrap();
        assert_eq!(j.state, JobState::Succeeded);
        let runs = rt.block_on(store.job_runs(job)).unwrap();
        assert_eq!(runs.len() as i64, j.attempts, "{runs:?}");
    }
    let left: Vec<String> = std::fs::read_dir(data.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "leftovers: {left:?}");
}

#[test]
fn two_servers_on_one_postgres_do_each_job_exactly_once() {
    let d = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(fresh_database(Db::Postgres, d.path()));
    let data = d.path().join("data");
    let imports = d.path().join("imports");
    write_fashion_subset(&imports.join("fm"), Split::Train, 300);
    std::fs::create_dir_all(&data).unwrap();
    let a = Server::start(&data, &db, &imports, "a.log");
    let b = Server::start(&data, &db, &imports, "b.log");
    let admin = std::fs::read_to_string(data.join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    let (_, k) = call(
        "POST",
        &a.url("/v1/keys"),
        &admin,
        Some(json!({"name": "p", "role": "publisher"})),
    );
    let publisher = k["secret"].as_str().unwrap().to_string();
    let (s, ds) = call(
        "POST",
        &b.url("/v1/datasets"),
        &publisher,
        Some(json!({"name": "fm", "path": imports.join("fm")})),
    );
    assert_eq!(s, 201, "{ds}");
    let n = 30;
    let mut jobs = Vec::new();
    for i in 0..n {
        let server = if i % 2 == 0 { &a } else { &b };
        let (s, v) = call(
            "POST",
            &server.url("/v1/watermarks"),
            &publisher,
            Some(json!({"name": format!("w{i}"), "dataset_id": ds["id"],
                        "spec": spec_text("badnets-square-28x28-grey.toml"), "seed": i})),
        );
        assert_eq!(s, 202, "{v}");
        jobs.push((
            v["watermark"]["id"].as_str().unwrap().to_string(),
            v["job"]["id"].as_str().unwrap().to_string(),
        ));
    }
    for (_, job) in &jobs {
        let j = wait_state(
            &a,
            &publisher,
            job,
            |s| s != "queued" && s != "running",
            Duration::from_secs(120),
        );
        assert_eq!(j["state"], "succeeded", "{j}");
    }
    let store = rt.block_on(Store::connect(&db, &key())).unwrap();
    let mut processes = std::collections::BTreeMap::<String, usize>::new();
    for (wm, job) in &jobs {
        let runs = rt.block_on(store.job_runs(job)).unwrap();
        assert_eq!(
            runs.len(),
            1,
            "job {job} ran {} times: {runs:?}",
            runs.len()
        );
        // Worker ids are host-pid-nonce/n: the process is everything before the slash.
        let process = runs[0].1.split('/').next().unwrap().to_string();
        *processes.entry(process).or_default() += 1;
        let w = rt.block_on(store.get_watermark(wm)).unwrap().unwrap();
        let info = check_release_whole(Path::new(w.release_path.as_deref().unwrap()));
        assert_eq!(info["commitment"].as_str(), w.commitment.as_deref());
    }
    eprintln!("jobs per process: {processes:?}");
    assert_eq!(processes.values().sum::<usize>(), n);
    assert_eq!(processes.len(), 2, "both servers took work: {processes:?}");
}
