//! The web service: the real app on port 0 with a fresh database per test, over real HTTP.
//! Storage conformance runs against SQLite and a real PostgreSQL (the test command starts one
//! with scripts/ensure-postgres and passes its URL in HALLMARK_TEST_POSTGRES_URL).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hallmark::config::{PartialConfig, ServeConfig};
use hallmark::dataset::{self, Format, Layout, Split};
use hallmark::http::App;
use hallmark::store::{Beat, JobState, NewDataset, NewWatermark, Role, Store};
use reqwest::StatusCode;
use serde_json::{Value, json};

pub const FASHION: &str = "/usr/share/datasets/fashion-mnist";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// A fresh database URL: a file in `dir`, or a new database on the test PostgreSQL server.
pub async fn fresh_database(db: Db, dir: &Path) -> String {
    match db {
        Db::Sqlite => format!("sqlite://{}?mode=rwc", dir.join("hallmark.db").display()),
        Db::Postgres => {
            let base = std::env::var("HALLMARK_TEST_POSTGRES_URL").expect(
                "HALLMARK_TEST_POSTGRES_URL is not set: run the tests with scripts/test, which \
                 starts PostgreSQL (scripts/ensure-postgres)",
            );
            use sqlx::Connection as _;
            let mut conn = sqlx::PgConnection::connect(&base)
                .await
                .expect("connect to the test PostgreSQL");
            let name = format!("t_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .unwrap();
            let mut url = url::Url::parse(&base).unwrap();
            url.set_path(&name);
            url.to_string()
        }
    }
}

pub fn key() -> [u8; 32] {
    [42; 32]
}

pub struct TestApp {
    pub url: String,
    pub admin: String,
    pub dir: tempfile::TempDir,
    pub database_url: String,
    pub client: reqwest::Client,
    pub worker_id: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestApp {
    pub async fn spawn(db: Db) -> TestApp {
        Self::spawn_with(db, |_| {}).await
    }

    pub async fn spawn_with(db: Db, tweak: impl FnOnce(&mut PartialConfig)) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let database_url = fresh_database(db, dir.path()).await;
        Self::start(dir, database_url, None, tweak).await
    }

    /// A second process of the same service: another app, with its own workers, on this one's
    /// database, data folder and key (as a second host of a deployment runs). Its `admin` is
    /// this one's.
    pub async fn join(&self, tweak: impl FnOnce(&mut PartialConfig)) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let shared = self.dir.path().to_path_buf();
        let mut app = Self::start(dir, self.database_url.clone(), Some(shared), tweak).await;
        app.admin = self.admin.clone();
        app
    }

    async fn start(
        dir: tempfile::TempDir,
        database_url: String,
        shared: Option<PathBuf>,
        tweak: impl FnOnce(&mut PartialConfig),
    ) -> TestApp {
        let data = shared.unwrap_or_else(|| dir.path().to_path_buf());
        std::fs::create_dir_all(data.join("imports")).unwrap();
        let mut p = PartialConfig {
            bind: Some("127.0.0.1:0".into()),
            database_url: Some(database_url.clone()),
            data_dir: Some(data.clone()),
            secret_key: Some(hex::encode(key())),
            dataset_roots: Some(vec![data.join("imports"), PathBuf::from(FASHION)]),
            allow_private_endpoints: Some(true),
            job_lease_secs: Some(2.0),
            shutdown_grace_secs: Some(5.0),
            rate_limit_per_key: Some(10_000.0),
            ..Default::default()
        };
        tweak(&mut p);
        let cfg: ServeConfig = p.resolve().unwrap();
        let app = App::build(cfg).await.unwrap();
        let url = format!("http://127.0.0.1:{}", app.port());
        let admin = app.bootstrap_admin_key.clone().unwrap_or_default();
        let worker_id = app.worker_id.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run_until_stopped(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        TestApp {
            url,
            admin,
            dir,
            database_url,
            client: reqwest::Client::new(),
            worker_id,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops gracefully and waits for the jobs to finish or park.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    pub async fn store(&self) -> Store {
        Store::connect(&self.database_url, &key()).await.unwrap()
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut r = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"))
        };
        (status, v)
    }

    /// A GET whose answer is text (a report): status, content type and body.
    pub async fn get_text(&self, path: &str, key: &str) -> (StatusCode, String, String) {
        let resp = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let kind = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (status, kind, resp.text().await.unwrap())
    }

    pub async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, key, None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, key, Some(body))
            .await
    }

    pub async fn new_key(&self, role: &str, name: &str) -> (String, String) {
        let (s, v) = self
            .post("/v1/keys", &self.admin, json!({"name": name, "role": role}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        (
            v["key"]["id"].as_str().unwrap().into(),
            v["secret"].as_str().unwrap().into(),
        )
    }

    /// A publisher's key, an auditor's key (with its id) and Fashion-MNIST's test split
    /// registered as the publisher's held-out dataset: `(publisher, (auditor id, auditor),
    /// dataset)`.
    pub async fn publisher_auditor_and_holdout(&self) -> (String, (String, String), Value) {
        let (_, publisher) = self.new_key("publisher", "pub").await;
        let auditor = self.new_key("auditor", "aud").await;
        let (s, holdout) = self
            .post(
                "/v1/datasets",
                &publisher,
                json!({"name": "fashion test", "path": FASHION, "format": "idx", "split": "test"}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{holdout}");
        assert_eq!(holdout["count"], 10000);
        (publisher, auditor, holdout)
    }

    /// Imports `record` as `publisher`'s watermark `name` with `holdout` as its held-out set,
    /// grants it to `auditor_id`, and returns the watermark's id.
    pub async fn import_and_grant(
        &self,
        publisher: &str,
        name: &str,
        holdout: &Value,
        record: Value,
        auditor_id: &str,
    ) -> String {
        let (s, w) = self
            .post(
                "/v1/watermarks/import",
                publisher,
                json!({"name": name, "holdout_dataset_id": holdout["id"], "secret_record": record}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{name}: {w}");
        let wm = w["id"].as_str().unwrap().to_string();
        let (s, v) = self
            .post(
                &format!("/v1/watermarks/{wm}/grants"),
                publisher,
                json!({"auditor_id": auditor_id}),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
        wm
    }

    /// Creates a watermark as `key` (answered 202) and waits for its job to succeed; returns the
    /// watermark's id and the finished job.
    pub async fn publish(&self, key: &str, body: Value) -> (String, Value) {
        let (s, v) = self.post("/v1/watermarks", key, body).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let wm = v["watermark"]["id"].as_str().unwrap().to_string();
        let job = self
            .wait_job(
                v["job"]["id"].as_str().unwrap(),
                key,
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(job["state"], "succeeded", "{job}");
        (wm, job)
    }

    /// Polls a job until it ends.
    pub async fn wait_job(&self, id: &str, key: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let (s, v) = self.get(&format!("/v1/jobs/{id}"), key).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            if ["succeeded", "failed", "cancelled"].contains(&v["state"].as_str().unwrap()) {
                return v;
            }
            assert!(Instant::now() < deadline, "job {id} did not end: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Writes the first `n` Fashion-MNIST images of `split` as an IDX folder at `dir`.
pub fn write_fashion_subset(dir: &Path, split: Split, n: usize) {
    let loaded = dataset::read(Path::new(FASHION), Some(Format::Idx), Some(split), &|| {}).unwrap();
    let idx: Vec<usize> = (0..n).collect();
    let ds = loaded.dataset.subset(&idx).unwrap();
    let layout = Layout::for_format(Format::Idx, &ds).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let hashes = dataset::image_sha256s(&ds);
    let info = dataset::write_release(&ds, &layout, dir, &hashes, &|| {}).unwrap();
    dataset::write_release_info(dir, &info).unwrap();
}

pub fn spec_text(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("watermark_specs")
            .join(name),
    )
    .unwrap()
}

/// Runs `$body` as one test per backend.
macro_rules! on_both {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$body(super::Db::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$body(super::Db::Postgres).await;
            }
        }
    };
}

// ---------------------------------------------------------------- storage conformance

async fn store_for(db: Db, dir: &Path) -> Store {
    Store::connect(&fresh_database(db, dir).await, &key())
        .await
        .unwrap()
}

/// A watermark row of `owner` on dataset `ds` with an empty plan, and its queued job.
async fn queued_watermark(
    s: &Store,
    owner: &str,
    name: &str,
    ds: &str,
    triggers: i64,
    max_attempts: i64,
) -> (hallmark::store::WatermarkInfo, hallmark::store::Job) {
    s.create_watermark(
        NewWatermark {
            owner,
            name,
            dataset_id: ds,
            holdout_dataset_id: None,
            plan: b"{}",
            triggers,
        },
        max_attempts,
    )
    .await
    .unwrap()
}

async fn dataset_row(store: &Store, owner: &str) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    store
        .insert_dataset(NewDataset {
            id: id.clone(),
            owner_id: owner.into(),
            name: "d".into(),
            path: "/nowhere".into(),
            format: hallmark::dataset::Format::Idx,
            split: None,
            count: 10,
            num_classes: 10,
            shape: "28x28x1".into(),
            sha256: "00".into(),
            uploaded: false,
            streamed: false,
        })
        .await
        .unwrap();
    id
}

async fn keys_authenticate_until_revoked(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let s = store_for(db, dir.path()).await;
    let (info, key) = s.create_key("alice", Role::Publisher).await.unwrap();
    assert!(key.starts_with("hm_") && key.len() == 67);
    let got = s.authenticate(&key).await.unwrap().unwrap();
    assert_eq!(
        (got.id.as_str(), got.role),
        (info.id.as_str(), Role::Publisher)
    );
    assert!(s.authenticate("hm_wrong").await.unwrap().is_none());
    assert!(s.revoke_key(&info.id).await.unwrap());
    assert!(!s.revoke_key(&info.id).await.unwrap());
    assert!(s.authenticate(&key).await.unwrap().is_none());
    // Only the hash is stored.
    let rows = s.list_keys().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(!format!("{rows:?}").contains(&key[3..]));
}
on_both!(
    keys_authenticate_until_revoked_on,
    keys_authenticate_until_revoked
);

async fn console_sessions_end_by_sign_out_expiry_and_revocation(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let s = store_for(db, dir.path()).await;
    let (alice, _) = s.create_key("alice", Role::Publisher).await.unwrap();
    let (bob, _) = s.create_key("bob", Role::Auditor).await.unwrap();
    let a1 = s.create_session(&alice.id, 60_000).await.unwrap();
    let a2 = s.create_session(&alice.id, 60_000).await.unwrap();
    let b1 = s.create_session(&bob.id, 60_000).await.unwrap();
    let expired = s.create_session(&bob.id, -1).await.unwrap();
    assert_eq!(a1.len(), 64);
    assert_ne!(a1, a2);
    assert_eq!(s.session_key(&a1).await.unwrap().unwrap().id, alice.id);
    assert_eq!(
        s.session_key(&b1).await.unwrap().unwrap().role,
        Role::Auditor
    );
    assert!(s.session_key(&expired).await.unwrap().is_none());
    assert!(s.session_key(&"0".repeat(64)).await.unwrap().is_none());
    // Signing out ends one session; revoking the key ends all of its sessions.
    assert!(s.end_session(&a1).await.unwrap());
    assert!(!s.end_session(&a1).await.unwrap());
    assert!(s.session_key(&a1).await.unwrap().is_none());
    assert!(s.session_key(&a2).await.unwrap().is_some());
    assert!(s.revoke_key(&alice.id).await.unwrap());
    assert!(s.session_key(&a2).await.unwrap().is_none());
    assert!(s.session_key(&b1).await.unwrap().is_some());
    assert_eq!(
        s.end_sessions_of(&bob.id).await.unwrap(),
        2,
        "b1 and the expired one"
    );
    assert!(s.session_key(&b1).await.unwrap().is_none());
}
on_both!(
    console_sessions_end_on,
    console_sessions_end_by_sign_out_expiry_and_revocation
);

async fn concurrent_claimers_never_share_a_job(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let s = store_for(db, dir.path()).await;
    let (k, _) = s.create_key("p", Role::Publisher).await.unwrap();
    let ds = dataset_row(&s, &k.id).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let (_, job) = queued_watermark(&s, &k.id, &format!("w{i}"), &ds, 1, 3).await;
        ids.push(job.id);
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(c) = s.claim(&format!("worker-{w}")).await.unwrap() {
                got.push(c.id);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    ids.sort();
    assert_eq!(all, ids, "every job claimed exactly once");
    for id in &ids {
        assert_eq!(s.job_runs(id).await.unwrap().len(), 1);
        assert_eq!(
            s.get_job(id).await.unwrap().unwrap().state,
            JobState::Running
        );
    }
}
on_both!(
    concurrent_claimers_never_share_a_job_on,
    concurrent_claimers_never_share_a_job
);

/// A streamed release's job, once it has handed out its shards, is claimed by nobody until
/// every shard job has ended; then once, by one worker. Cancelling it cancels its shards.
async fn a_streamed_releases_job_waits_for_its_shards(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let s = store_for(db, dir.path()).await;
    let (k, _) = s.create_key("p", Role::Publisher).await.unwrap();
    let ds = dataset_row(&s, &k.id).await;
    // A release's job, claimed and handed out to three shard jobs.
    let release = |name: &'static str| {
        let (s, k, ds) = (s.clone(), k.id.clone(), ds.clone());
        async move {
            let (w, job) = queued_watermark(&s, &k, name, &ds, 1, 2).await;
            let c = s.claim("w0").await.unwrap().unwrap();
            assert_eq!(c.id, job.id);
            // Only the worker holding the job may hand it out.
            assert!(!s.fan_out(&job.id, "w9", &w.id, b"{}", 3, 2).await.unwrap());
            assert!(s.fan_out(&job.id, "w0", &w.id, b"{}", 3, 2).await.unwrap());
            let j = s.get_job(&job.id).await.unwrap().unwrap();
            assert_eq!(j.state, JobState::Running);
            assert_eq!((j.progress_done, j.progress_total), (1, 5));
            (w.id, job.id)
        }
    };
    let (w, main) = release("done").await;
    let mut shards = Vec::new();
    for n in 0..3 {
        let c = s.claim(&format!("w{n}")).await.unwrap().unwrap();
        assert_eq!(c.kind, hallmark::store::JobKind::WatermarkShard);
        assert_eq!(c.resource_id, w);
        let (of, shard) = s.shard_of(&c.id).await.unwrap().unwrap();
        assert_eq!(of, w);
        shards.push((shard, c.id, format!("w{n}")));
    }
    // Never claimed while a shard is unfinished.
    for (shard, id, worker) in &shards {
        assert!(s.claim("w7").await.unwrap().is_none());
        assert!(!s.finish_shard(id, "w9", &w, *shard, b"{}").await.unwrap());
        assert!(
            s.finish_shard(id, worker, &w, *shard, br#"{"n": 1}"#)
                .await
                .unwrap()
        );
    }
    assert_eq!(s.get_job(&main).await.unwrap().unwrap().progress_done, 4);
    let outs = s.watermark_shards(&w).await.unwrap();
    assert_eq!(outs.iter().map(|o| o.shard).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(outs.iter().all(
        |o| o.state == JobState::Succeeded && o.output.as_deref() == Some(&br#"{"n": 1}"#[..])
    ));
    // Then claimed, once, and handing out did not use an attempt.
    let c = s.claim("w8").await.unwrap().unwrap();
    assert_eq!((c.id.as_str(), c.attempt), (main.as_str(), 1));
    assert!(s.claim("w8").await.unwrap().is_none());
    // Cancelling a waiting job cancels it and its queued shards at once, and asks its running
    // shard to stop.
    let (w2, main2) = release("cancelled").await;
    let running = s.claim("w1").await.unwrap().unwrap();
    assert_eq!(running.resource_id, w2);
    let j = s.cancel_job(&main2).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Cancelled);
    for o in s.watermark_shards(&w2).await.unwrap() {
        let j = s.get_job(&o.job_id).await.unwrap().unwrap();
        if o.job_id == running.id {
            assert_eq!(j.state, JobState::Running);
            assert!(j.cancel_requested);
        } else {
            assert_eq!(j.state, JobState::Cancelled);
        }
    }
    assert!(s.claim("w8").await.unwrap().is_none());
}
on_both!(
    a_streamed_releases_job_waits_on,
    a_streamed_releases_job_waits_for_its_shards
);

/// Twelve verifications asked for at once of a watermark with three triggers: exactly three are
/// created, each spending its own trigger; the others are refused and leave no job behind.
async fn concurrent_verifications_never_spend_one_trigger_twice(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let s = store_for(db, dir.path()).await;
    let (k, _) = s.create_key("p", Role::Publisher).await.unwrap();
    let ds = dataset_row(&s, &k.id).await;
    let (w, _) = queued_watermark(&s, &k.id, "three", &ds, 3, 3).await;
    let jobs_before = s.list_jobs(None, 1000).await.unwrap().len();
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let (s, w, ds, owner) = (s.clone(), w.id.clone(), ds.clone(), k.id.clone());
            tokio::spawn(async move {
                s.create_verification(&owner, &w, &ds, &serde_json::json!({}), (3, 1), 3)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut spent = Vec::new();
    for t in tasks {
        if let Some((v, _)) = t.await.unwrap() {
            spent.push(v.spent_trigger.unwrap());
        }
    }
    spent.sort_unstable();
    assert_eq!(spent, [1, 2, 3]);
    assert_eq!(s.spent_triggers(&w.id).await.unwrap(), 3);
    assert_eq!(
        s.list_jobs(None, 1000).await.unwrap().len(),
        jobs_before + 3
    );
    // A watermark with one trigger is verified with it every time.
    let (one, _) = queued_watermark(&s, &k.id, "one", &ds, 1, 3).await;
    for _ in 0..3 {
        let (v, _) = s
            .create_verification(&k.id, &one.id, &ds, &serde_json::json!({}), (1, 1), 3)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v.spent_trigger, None);
    }
    // Verifications that test one model with two triggers, raced against ones that spend one,
    // on a watermark with seven: the triggers spent are 1 to n with none spent twice.
    let (seven, _) = queued_watermark(&s, &k.id, "seven", &ds, 7, 3).await;
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let (s, w, ds, owner) = (s.clone(), seven.id.clone(), ds.clone(), k.id.clone());
            let spend = 1 + i % 2;
            tokio::spawn(async move {
                s.create_verification(&owner, &w, &ds, &serde_json::json!({}), (7, spend), 3)
                    .await
                    .unwrap()
                    .map(|(v, _)| (v.spent_trigger.unwrap(), v.spent_count))
            })
        })
        .collect();
    let mut spent = Vec::new();
    for t in tasks {
        if let Some((first, count)) = t.await.unwrap() {
            assert_ne!(count, Some(1), "one trigger is stored as no count");
            spent.extend(first..first + count.unwrap_or(1));
        }
    }
    spent.sort_unstable();
    let n = spent.len() as i64;
    assert_eq!(spent, (1..=n).collect::<Vec<_>>());
    assert!(n >= 6, "{spent:?}");
    assert_eq!(s.spent_triggers(&seven.id).await.unwrap(), n);
    let two_more = s
        .create_verification(&k.id, &seven.id, &ds, &serde_json::json!({}), (7, 2), 3)
        .await
        .unwrap();
    assert!(two_more.is_none(), "at most one trigger is left");
}
on_both!(
    concurrent_verifications_never_spend_one_trigger_twice_on,
    concurrent_verifications_never_spend_one_trigger_twice
);

async fn dead_workers_jobs_are_requeued_then_failed(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let s = store_for(db, dir.path()).await;
    let (k, _) = s.create_key("p", Role::Publisher).await.unwrap();
    let ds = dataset_row(&s, &k.id).await;
    let (_, job) = queued_watermark(&s, &k.id, "w", &ds, 1, 2).await;
    let c = s.claim("a").await.unwrap().unwrap();
    assert_eq!((c.id.as_str(), c.attempt), (job.id.as_str(), 1));
    assert_eq!(
        s.heartbeat(&job.id, "a", 1, 4).await.unwrap(),
        Beat::Continue
    );
    // Not stale yet: nothing happens.
    let r = s.reap(hallmark::store::now_ms() - 60_000).await.unwrap();
    assert_eq!((r.requeued, r.failed), (0, 0));
    // Worker a died: its lease runs out, the job goes back to the queue.
    let r = s.reap(hallmark::store::now_ms() + 1).await.unwrap();
    assert_eq!((r.requeued, r.failed), (1, 0));
    assert_eq!(s.heartbeat(&job.id, "a", 2, 4).await.unwrap(), Beat::Lost);
    let c = s.claim("b").await.unwrap().unwrap();
    assert_eq!(c.attempt, 2);
    // A lost worker's result is not written.
    assert!(
        !s.finish_watermark(
            &job.id,
            "a",
            &c.resource_id,
            &hallmark::store::ReleaseFacts {
                commitment: "c".into(),
                dataset_sha256: "s".into(),
                release_path: None,
                poisoned: 1,
            },
        )
        .await
        .unwrap()
    );
    // b dies too, on the last attempt: failed with a reason.
    let r = s.reap(hallmark::store::now_ms() + 1).await.unwrap();
    assert_eq!((r.requeued, r.failed), (0, 1));
    let j = s.get_job(&job.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.error_code, Some(hallmark::ErrorCode::WorkerLost));
    let runs = s.job_runs(&job.id).await.unwrap();
    assert_eq!(runs, vec![(1, "a".to_string()), (2, "b".to_string())]);
}
on_both!(
    dead_workers_jobs_are_requeued_then_failed_on,
    dead_workers_jobs_are_requeued_then_failed
);

async fn cancelling_and_parking(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let s = store_for(db, dir.path()).await;
    let (k, _) = s.create_key("p", Role::Publisher).await.unwrap();
    let ds = dataset_row(&s, &k.id).await;
    let (_, queued) = queued_watermark(&s, &k.id, "q", &ds, 1, 3).await;
    let j = s.cancel_job(&queued.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Cancelled);
    assert!(
        s.claim("a").await.unwrap().is_none(),
        "a cancelled job is not claimed"
    );
    let (_, running) = queued_watermark(&s, &k.id, "r", &ds, 1, 3).await;
    s.claim("a").await.unwrap().unwrap();
    let j = s.cancel_job(&running.id).await.unwrap().unwrap();
    assert_eq!((j.state, j.cancel_requested), (JobState::Running, true));
    assert_eq!(
        s.heartbeat(&running.id, "a", 0, 0).await.unwrap(),
        Beat::Cancel
    );
    let (_, parked) = queued_watermark(&s, &k.id, "p", &ds, 1, 3).await;
    let c = s.claim("a").await.unwrap().unwrap();
    assert_eq!(c.id, parked.id);
    assert!(s.park(&parked.id, "a").await.unwrap());
    let j = s.get_job(&parked.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempts),
        (JobState::Queued, 0),
        "parking does not use an attempt"
    );
    // A parked job runs again (its first counted start replaces the parked one's record).
    let c = s.claim("b").await.unwrap().unwrap();
    assert_eq!((c.id.as_str(), c.attempt), (parked.id.as_str(), 1));
    assert_eq!(
        s.job_runs(&parked.id).await.unwrap(),
        vec![(1, "b".to_string())]
    );
}
on_both!(cancelling_and_parking_on, cancelling_and_parking);

async fn secrets_are_sealed_at_rest(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(db, dir.path()).await;
    let s = Store::connect(&url, &key()).await.unwrap();
    let (k, _) = s.create_key("p", Role::Publisher).await.unwrap();
    let ds = dataset_row(&s, &k.id).await;
    let plan = br#"{"marker":"TRIGGER-AT-24-24"}"#;
    let (w, _) = s
        .create_watermark(
            NewWatermark {
                owner: &k.id,
                name: "w",
                dataset_id: &ds,
                holdout_dataset_id: None,
                plan,
                triggers: 1,
            },
            3,
        )
        .await
        .unwrap();
    s.store_secret(&w.id, b"POISONED-INDICES-1-2-3")
        .await
        .unwrap();
    assert_eq!(s.watermark_plan(&w.id).await.unwrap().unwrap(), plan);
    // The raw rows hold neither secret.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let row: (String, String) =
        sqlx::query_as("SELECT spec_sealed, secret_sealed FROM watermarks WHERE id = $1")
            .bind(&w.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    for raw in [&row.0, &row.1] {
        assert!(
            !raw.contains("TRIGGER") && !raw.contains("POISONED"),
            "{raw}"
        );
    }
    // Another key cannot open them.
    let other = Store::connect(&url, &[1; 32]).await.unwrap();
    assert!(other.secret_record(&w.id).await.is_err());
    assert!(other.watermark_plan(&w.id).await.is_err());
}
on_both!(secrets_are_sealed_at_rest_on, secrets_are_sealed_at_rest);

// ---------------------------------------------------------------- the HTTP flows

/// Registers a small Fashion-MNIST training subset for `key`; returns its id.
pub async fn register_subset(app: &TestApp, key: &str, n: usize) -> String {
    let dir = app.dir.path().join("imports").join(format!("fm{n}"));
    if !dir.exists() {
        write_fashion_subset(&dir, Split::Train, n);
    }
    let (s, v) = app
        .post(
            "/v1/datasets",
            key,
            json!({"name": format!("fashion {n}"), "path": dir.to_str().unwrap()}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["count"], n);
    assert_eq!(v["shape"], "28x28x1");
    assert!(v.get("path").is_none(), "server paths are not shown: {v}");
    v["id"].as_str().unwrap().into()
}

async fn publisher_watermarks_and_auditor_sees_only_what_is_granted(db: Db) {
    let app = TestApp::spawn(db).await;
    let (_, publisher) = app.new_key("publisher", "pub").await;
    let (auditor_id, auditor) = app.new_key("auditor", "aud").await;
    let ds = register_subset(&app, &publisher, 600).await;
    let (wm, job) = app
        .publish(
            &publisher,
            json!({"name": "release 1", "dataset_id": ds,
                   "spec": spec_text("badnets-square-28x28-grey.toml"), "seed": 5}),
        )
        .await;
    assert_eq!(job["progress_done"], job["progress_total"]);
    let runs = app
        .store()
        .await
        .job_runs(job["id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(runs.len(), 1);
    assert!(runs[0].1.starts_with(&app.worker_id), "{runs:?}");
    let (s, w) = app.get(&format!("/v1/watermarks/{wm}"), &publisher).await;
    assert_eq!(s, StatusCode::OK);
    let commitment = w["commitment"].as_str().unwrap().to_string();
    assert_eq!(w["state"], "succeeded");
    assert_eq!(w["poisoned"], 60);
    // The release is complete on disk and carries the commitment.
    let release = app.dir.path().join("releases").join(&wm);
    let info: Value =
        serde_json::from_slice(&std::fs::read(release.join("release.json")).unwrap()).unwrap();
    assert_eq!(info["commitment"], commitment.as_str());
    assert_eq!(info["dataset_sha256"], w["dataset_sha256"]);
    let reread = dataset::read(&release, None, None, &|| {}).unwrap();
    assert_eq!(
        reread.dataset.sha256(),
        w["dataset_sha256"].as_str().unwrap()
    );
    // The owner may read the secret record; it matches the commitment.
    let (s, rec) = app
        .get(&format!("/v1/watermarks/{wm}/secret"), &publisher)
        .await;
    assert_eq!(s, StatusCode::OK);
    let rec = hallmark::watermark::SecretRecord::from_json(&rec.to_string()).unwrap();
    assert_eq!(rec.commitment(), commitment);
    assert_eq!(rec.spec.seed, 5);
    // Another publisher cannot watermark this publisher's dataset, nor use it as a holdout.
    let (_, rival) = app.new_key("publisher", "rival").await;
    let own = register_subset(&app, &rival, 600).await;
    for (body, field) in [
        (json!({"dataset_id": ds}), "dataset_id"),
        (
            json!({"dataset_id": own, "holdout_dataset_id": ds}),
            "holdout_dataset_id",
        ),
    ] {
        let mut body = body;
        body["name"] = json!("not mine");
        body["spec"] = json!(spec_text("badnets-square-28x28-grey.toml"));
        let (s, v) = app.post("/v1/watermarks", &rival, body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v.to_string()
                .contains(&format!("{field}: no such dataset of yours")),
            "{v}"
        );
    }

    // Before a grant the auditor sees nothing.
    let (s, _) = app.get(&format!("/v1/watermarks/{wm}"), &auditor).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, list) = app.get("/v1/watermarks", &auditor).await;
    assert_eq!(list, json!([]));
    // Granted: the public facts, never the secret.
    let (s, v) = app
        .post(
            &format!("/v1/watermarks/{wm}/grants"),
            &publisher,
            json!({"auditor_id": auditor_id}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, seen) = app.get(&format!("/v1/watermarks/{wm}"), &auditor).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(seen["commitment"], commitment.as_str());
    let (_, list) = app.get("/v1/watermarks", &auditor).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    // Try every way to the secret as the auditor and as the admin.
    for k in [&auditor, &app.admin] {
        let (s, v) = app.get(&format!("/v1/watermarks/{wm}/secret"), k).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        let (s, v) = app.get(&format!("/v1/watermarks/{wm}/grants"), k).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    }
    let secret_bits = [
        rec.nonce.clone(),
        "poisoned_indices".into(),
        "\"trigger\"".into(),
        "\"spec\"".into(),
        "\"pattern\"".into(),
    ];
    for path in [
        "/v1/watermarks".to_string(),
        format!("/v1/watermarks/{wm}"),
        "/v1/jobs".into(),
        format!("/v1/jobs/{}", job["id"].as_str().unwrap()),
        "/v1/datasets".into(),
        "/v1/verifications".into(),
    ] {
        let (_, v) = app.get(&path, &auditor).await;
        let text = v.to_string();
        for bit in &secret_bits {
            assert!(!text.contains(bit.as_str()), "{path} shows {bit}: {text}");
        }
    }
    // The auditor cannot grant itself or others, nor watermark.
    let (s, _) = app
        .post(
            &format!("/v1/watermarks/{wm}/grants"),
            &auditor,
            json!({"auditor_id": auditor_id}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = app
        .post(
            "/v1/watermarks",
            &auditor,
            json!({"name": "x", "dataset_id": ds, "spec": spec_text("badnets-square-28x28-grey.toml")}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    // Withdrawn: gone again.
    let (s, _) = app
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/watermarks/{wm}/grants/{auditor_id}"),
            &publisher,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = app.get(&format!("/v1/watermarks/{wm}"), &auditor).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    app.stop().await;
}
on_both!(
    publisher_watermarks_and_auditor_sees_only_what_is_granted_on,
    publisher_watermarks_and_auditor_sees_only_what_is_granted
);

/// A release with several triggers: written and sealed as one set whose commitment ties the
/// triggers together; each verification spends the next trigger, two concurrent requests never
/// spend the same one, and when all are spent the next request is refused before any query.
async fn each_verification_spends_its_own_trigger(db: Db) {
    let app = TestApp::spawn(db).await;
    let (_, publisher) = app.new_key("publisher", "pub").await;
    let (auditor_id, auditor) = app.new_key("auditor", "aud").await;
    let ds = register_subset(&app, &publisher, 600).await;
    let (wm, _) = app
        .publish(
            &publisher,
            json!({"name": "three", "dataset_id": ds, "holdout_dataset_id": ds, "triggers": 3,
                   "spec": spec_text("badnets-square-28x28-grey.toml")}),
        )
        .await;
    let (_, w) = app.get(&format!("/v1/watermarks/{wm}"), &publisher).await;
    assert_eq!(
        (w["triggers"].as_i64(), w["triggers_spent"].as_i64()),
        (Some(3), Some(0)),
        "{w}"
    );
    assert_eq!(w["poisoned"], 180, "{w}");
    let (_, rec) = app
        .get(&format!("/v1/watermarks/{wm}/secret"), &publisher)
        .await;
    let secret = hallmark::watermark::Secret::from_json(&rec.to_string()).unwrap();
    assert_eq!(secret.trigger_count(), 3);
    assert_eq!(secret.commitment(), w["commitment"].as_str().unwrap());
    let members: Vec<_> = secret.records().map(|r| r.spec.trigger.clone()).collect();
    assert!(
        members[0] != members[1] && members[1] != members[2],
        "{members:?}"
    );
    // The release on disk is what the set describes.
    let release = app.dir.path().join("releases").join(&wm);
    let reread = dataset::read(&release, None, None, &|| {}).unwrap();
    assert_eq!(reread.dataset.sha256(), secret.dataset().sha256_after);

    let (s, _) = app
        .post(
            &format!("/v1/watermarks/{wm}/grants"),
            &publisher,
            json!({"auditor_id": auditor_id}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Nothing listens on port 9: each job fails, but its trigger was offered and is spent.
    let request = json!({"watermark_id": wm,
        "endpoint": {"url": "http://127.0.0.1:9/", "protocol": "v2", "model": "m", "retries": 0}});
    let (first, second) = tokio::join!(
        app.post("/v1/verifications", &auditor, request.clone()),
        app.post("/v1/verifications", &publisher, request.clone())
    );
    let (s3, third) = app
        .post("/v1/verifications", &auditor, request.clone())
        .await;
    let mut spent = Vec::new();
    for (s, v) in [first, second, (s3, third)] {
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        spent.push(v["verification"]["spent_trigger"].as_i64().unwrap());
    }
    spent.sort_unstable();
    assert_eq!(spent, [1, 2, 3]);
    let (s, v) = app.post("/v1/verifications", &publisher, request).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "triggers_spent", "{v}");
    let (_, w) = app.get(&format!("/v1/watermarks/{wm}"), &auditor).await;
    assert_eq!(w["triggers_spent"], 3, "{w}");

    // The same set imported: the commitment is recomputed from the triggers and matches.
    let (s, imported) = app
        .post(
            "/v1/watermarks/import",
            &publisher,
            json!({"name": "again", "secret_record": rec}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{imported}");
    assert_eq!(imported["commitment"], w["commitment"]);
    assert_eq!(imported["triggers"], 3);
    // A set whose triggers share a poisoned sample is refused.
    let mut bad = rec.clone();
    let shared = bad["triggers"][0]["poisoned"][0].clone();
    bad["triggers"][1]["poisoned"][0]["index"] = shared["index"].clone();
    let (s, v) = app
        .post(
            "/v1/watermarks/import",
            &publisher,
            json!({"name": "bad", "secret_record": bad}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    app.stop().await;
}
on_both!(
    each_verification_spends_its_own_trigger_on,
    each_verification_spends_its_own_trigger
);

/// A release with triggers of two families (`also_specs`): one set of two records, a patch and
/// a noise blend, on samples of their own; specs that cannot join such a release are refused
/// by their field before any job is queued.
async fn a_release_carries_triggers_of_two_families(db: Db) {
    let app = TestApp::spawn(db).await;
    let (_, publisher) = app.new_key("publisher", "pub").await;
    let ds = register_subset(&app, &publisher, 600).await;
    let (wm, _) = app
        .publish(
            &publisher,
            json!({"name": "two families", "dataset_id": ds, "holdout_dataset_id": ds,
                   "spec": spec_text("badnets-square-28x28-grey.toml"),
                   "also_specs": [spec_text("blended-28x28-grey.toml")]}),
        )
        .await;
    let (_, w) = app.get(&format!("/v1/watermarks/{wm}"), &publisher).await;
    assert_eq!(
        (w["triggers"].as_i64(), w["triggers_spent"].as_i64()),
        (Some(2), Some(0)),
        "{w}"
    );
    // Each family poisons its own rate (0.1) of the 600 samples.
    assert_eq!(w["poisoned"], 120, "{w}");
    let (_, rec) = app
        .get(&format!("/v1/watermarks/{wm}/secret"), &publisher)
        .await;
    let secret = hallmark::watermark::Secret::from_json(&rec.to_string()).unwrap();
    assert_eq!(secret.trigger_count(), 2);
    assert_eq!(secret.commitment(), w["commitment"].as_str().unwrap());
    let records: Vec<_> = secret.records().collect();
    assert_eq!(
        (records[0].spec.name.as_str(), records[1].spec.name.as_str()),
        ("badnets-square-28x28-grey", "blended-28x28-grey")
    );
    let indices = |r: &hallmark::watermark::SecretRecord| -> std::collections::BTreeSet<usize> {
        r.poisoned.iter().map(|p| p.index).collect()
    };
    assert!(indices(records[0]).is_disjoint(&indices(records[1])));
    let release = app.dir.path().join("releases").join(&wm);
    let reread = dataset::read(&release, None, None, &|| {}).unwrap();
    assert_eq!(reread.dataset.sha256(), secret.dataset().sha256_after);

    let refused = [
        // A fixed (public) trigger cannot join.
        (
            json!([spec_text("fixed/blended-28x28-grey.toml")]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "also_specs[0]: `blended-28x28-grey-fixed` has no [family]",
        ),
        // Neither can a spec whose poisons are crafted.
        (
            json!([
                spec_text("blended-28x28-grey.toml"),
                spec_text("label-consistent-28x28-grey.toml")
            ]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "also_specs[1]: `label-consistent-28x28-grey` crafts its poisons",
        ),
        (
            json!([17]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "also_specs[0]: expected TOML text",
        ),
    ];
    for (also, status, field) in refused {
        let (s, v) = app
            .post(
                "/v1/watermarks",
                &publisher,
                json!({"name": "x", "dataset_id": ds,
                       "spec": spec_text("badnets-square-28x28-grey.toml"), "also_specs": also}),
            )
            .await;
        assert_eq!(s, status, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().starts_with(field),
            "{v}"
        );
    }
    // At most 16 triggers in all.
    let (s, v) = app
        .post(
            "/v1/watermarks",
            &publisher,
            json!({"name": "x", "dataset_id": ds, "triggers": 16,
                   "spec": spec_text("badnets-square-28x28-grey.toml"),
                   "also_specs": [spec_text("blended-28x28-grey.toml")]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 16"),
        "{v}"
    );
    let (_, list) = app.get("/v1/watermarks", &publisher).await;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    app.stop().await;
}
on_both!(
    a_release_carries_triggers_of_two_families_on,
    a_release_carries_triggers_of_two_families
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_are_isolated_from_each_other() {
    let app = TestApp::spawn(Db::Sqlite).await;
    let (_, alice) = app.new_key("publisher", "alice").await;
    let (_, bob) = app.new_key("publisher", "bob").await;
    let ds = register_subset(&app, &alice, 300).await;
    let (_, v) = app
        .post(
            "/v1/watermarks",
            &alice,
            json!({"name": "a", "dataset_id": ds, "spec": spec_text("badnets-square-28x28-grey.toml")}),
        )
        .await;
    let wm = v["watermark"]["id"].as_str().unwrap().to_string();
    let job = v["job"]["id"].as_str().unwrap().to_string();
    app.wait_job(&job, &alice, Duration::from_secs(60)).await;
    for path in [
        format!("/v1/datasets/{ds}"),
        format!("/v1/watermarks/{wm}"),
        format!("/v1/watermarks/{wm}/secret"),
        format!("/v1/watermarks/{wm}/grants"),
        format!("/v1/jobs/{job}"),
    ] {
        let (s, v) = app.get(&path, &bob).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {v}");
        assert_eq!(v["error"]["code"], "not_found");
    }
    for path in ["/v1/datasets", "/v1/watermarks", "/v1/jobs"] {
        let (_, v) = app.get(path, &bob).await;
        assert_eq!(v, json!([]), "{path}");
    }
    // Bob cannot watermark Alice's dataset or cancel her job.
    let (s, v) = app
        .post(
            "/v1/watermarks",
            &bob,
            json!({"name": "b", "dataset_id": ds, "spec": spec_text("badnets-square-28x28-grey.toml")}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _) = app
        .post(&format!("/v1/jobs/{job}/cancel"), &bob, json!({}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Registering a path outside the dataset roots is refused.
    let (s, v) = app
        .post("/v1/datasets", &bob, json!({"name": "etc", "path": "/etc"}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let escape = format!("{}/imports/../", app.dir.path().display());
    let (s, _) = app
        .post("/v1/datasets", &bob, json!({"name": "up", "path": escape}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Roles: a publisher cannot create keys.
    let (s, _) = app
        .post("/v1/keys", &alice, json!({"name": "x", "role": "admin"}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // A revoked key is refused.
    let (bob_id, _) = {
        let (_, me) = app.get("/v1/keys/me", &bob).await;
        (me["id"].as_str().unwrap().to_string(), ())
    };
    let (s, _) = app
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/keys/{bob_id}"),
            &app.admin,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = app.get("/v1/datasets", &bob).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_datasets_are_read_and_bad_uploads_explained() {
    let app = TestApp::spawn(Db::Sqlite).await;
    let (_, p) = app.new_key("publisher", "p").await;
    let src = app.dir.path().join("src");
    write_fashion_subset(&src, Split::Train, 200);
    let form = reqwest::multipart::Form::new()
        .text("name", "uploaded")
        .part(
            "files",
            reqwest::multipart::Part::bytes(
                std::fs::read(src.join("train-images-idx3-ubyte")).unwrap(),
            )
            .file_name("train-images-idx3-ubyte"),
        )
        .part(
            "files",
            reqwest::multipart::Part::bytes(
                std::fs::read(src.join("train-labels-idx1-ubyte")).unwrap(),
            )
            .file_name("train-labels-idx1-ubyte"),
        );
    let r = app
        .client
        .post(format!("{}/v1/datasets/upload", app.url))
        .bearer_auth(&p)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["count"].as_u64(), v["uploaded"].as_bool()),
        (Some(200), Some(true))
    );
    let local = dataset::read(&src, None, None, &|| {}).unwrap();
    assert_eq!(v["sha256"], local.dataset.sha256().as_str());
    // A file name that climbs out is refused; truncated data is explained.
    for (name, bytes, want) in [
        ("../x", vec![0u8; 10], "file name"),
        ("train-images-idx3-ubyte", vec![0, 0, 8, 3, 0, 0], "dataset"),
    ] {
        let form = reqwest::multipart::Form::new().text("name", "bad").part(
            "files",
            reqwest::multipart::Part::bytes(bytes).file_name(name),
        );
        let r = app
            .client
            .post(format!("{}/v1/datasets/upload", app.url))
            .bearer_auth(&p)
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"].as_str().unwrap().contains(want),
            "{v}"
        );
    }
    // Nothing half-uploaded is left behind.
    let left: Vec<_> = std::fs::read_dir(app.dir.path().join("uploads"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_one_error_shape() {
    let app = TestApp::spawn_with(Db::Sqlite, |c| {
        c.body_limit = Some(4096);
        c.rate_limit_per_key = Some(2.0);
    })
    .await;
    let url = |p: &str| format!("{}{p}", app.url);
    let c = &app.client;
    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            c.post(url("/v1/keys"))
                .bearer_auth(&app.admin)
                .header("content-type", "application/json")
                .body("{not json"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            c.post(url("/v1/keys")).bearer_auth(&app.admin).body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            c.post(url("/v1/keys"))
                .bearer_auth(&app.admin)
                .json(&json!({"name": "x", "role": "king"})),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            c.post(url("/v1/keys"))
                .bearer_auth(&app.admin)
                .json(&json!({"name": "x".repeat(5000), "role": "admin"})),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            c.get(url("/v1/nothing")),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            c.put(url("/v1/jobs")).bearer_auth(&app.admin),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            c.get(url("/v1/jobs")).header("authorization", "Basic eA=="),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
    ];
    for (i, (req, status, code)) in cases.into_iter().enumerate() {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), status, "case {i}");
        assert!(r.headers().contains_key("x-request-id"), "case {i}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "case {i}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Rate limit: 2 per second with a burst of 4; the cases above used most of it.
    let mut r = c
        .get(url("/v1/jobs"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    for _ in 0..10 {
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        r = c
            .get(url("/v1/jobs"))
            .bearer_auth(&app.admin)
            .send()
            .await
            .unwrap();
    }
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited");
    // Metrics and health need no key.
    let m = c
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains(
            "hallmark_http_requests_total{method=\"POST\",route=\"/v1/keys\",status=\"400\"}"
        ),
        "{m}"
    );
    let h: Value = c
        .get(url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_and_private_endpoints_are_refused_before_any_work() {
    let app = TestApp::spawn_with(Db::Sqlite, |c| c.allow_private_endpoints = Some(false)).await;
    let (_, p) = app.new_key("publisher", "p").await;
    let ds = register_subset(&app, &p, 100).await;
    for (spec, want) in [
        (json!("name = \"x\"\n"), "invalid_spec"),
        (json!(42), "invalid_spec"),
        (
            json!(spec_text("label-consistent-28x28-grey.toml")),
            "invalid_spec",
        ),
        (json!(spec_text("issba-28x28-grey.toml")), "invalid_spec"),
        (
            json!(spec_text("blended-28x28-grey.toml").replace("noise", "image") + "\n"),
            "invalid_spec",
        ),
    ] {
        let (s, v) = app
            .post(
                "/v1/watermarks",
                &p,
                json!({"name": "x", "dataset_id": ds, "spec": spec}),
            )
            .await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(want)),
            "{v}"
        );
    }
    let (s, v) = app
        .post(
            "/v1/watermarks",
            &p,
            json!({"name": "w", "dataset_id": ds, "holdout_dataset_id": ds,
                   "spec": spec_text("badnets-square-28x28-grey.toml")}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let wm = v["watermark"]["id"].as_str().unwrap().to_string();
    app.wait_job(
        v["job"]["id"].as_str().unwrap(),
        &p,
        Duration::from_secs(60),
    )
    .await;
    for url in [
        "http://127.0.0.1:9/",
        "http://localhost:9/",
        "http://169.254.169.254/",
        "http://[::1]:9/",
        "file:///etc/passwd",
        // Special-purpose ranges in the encodings a careful attacker tried.
        "http://[::127.0.0.1]:9/",
        "http://[::ffff:7f00:1]:9/",
        "http://[2002:7f00:1::]:9/",
        "http://[64:ff9b::7f00:1]:9/",
        "http://[fec0::1]:9/",
        "http://198.18.0.1:9/",
        "http://192.0.0.1:9/",
        "http://192.0.2.1:9/",
        "http://[2001:db8::1]:9/",
        "http://0x7f000001:9/",
        "http://2130706433:9/",
    ] {
        let (s, v) = app
            .post(
                "/v1/verifications",
                &p,
                json!({"watermark_id": wm, "endpoint": {"url": url, "protocol": "v2", "model": "m"}}),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {v}");
        assert_eq!(v["error"]["code"], "endpoint_refused", "{url}: {v}");
    }
    // The model name is one path segment: it cannot take the request elsewhere on the server.
    for model in ["../../../evil?x=1#", "a/b", "..", "m%2f..", "m#x"] {
        let (s, v) = app
            .post(
                "/v1/verifications",
                &p,
                json!({"watermark_id": wm, "endpoint": {"url": "http://8.8.8.8:9/", "protocol": "v2", "model": model}}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{model}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("path segment"),
            "{model}: {v}"
        );
    }
    // Settings out of range, in the same words as `hallmark verify` (tests/it/cli.rs).
    for (endpoint, says) in [
        (
            json!({"std": [0.0]}),
            "endpoint.std: at most 4 positive finite values",
        ),
        (
            json!({"batch_size": 0}),
            "endpoint.batch_size: 1 to 1024, got 0",
        ),
        (
            json!({"timeout_secs": 0}),
            "endpoint.timeout_secs: seconds in (0, 600]",
        ),
        (json!({"retries": 11}), "endpoint.retries: 0 to 10, got 11"),
    ] {
        let mut e = json!({"url": "http://8.8.8.8:9/", "protocol": "v2", "model": "m"});
        e.as_object_mut()
            .unwrap()
            .extend(endpoint.as_object().unwrap().clone());
        let (s, v) = app
            .post(
                "/v1/verifications",
                &p,
                json!({"watermark_id": wm, "endpoint": e}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.starts_with(says), "{m}");
    }
    for (test, says) in [
        (json!({"m": 1}), "m: 2 to 10000, got 1"),
        (json!({"round": 0}), "round: 1 to 1000, got 0"),
        (json!({"controls": 9}), "controls: with 9 controls"),
    ] {
        let mut body = json!({"watermark_id": wm,
            "endpoint": {"url": "http://8.8.8.8:9/", "protocol": "v2", "model": "m"}});
        body.as_object_mut()
            .unwrap()
            .extend(test.as_object().unwrap().clone());
        let (s, v) = app.post("/v1/verifications", &p, body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.starts_with(says), "{m}");
    }
    let (_, jobs) = app.get("/v1/jobs", &p).await;
    assert_eq!(
        jobs.as_array().unwrap().len(),
        1,
        "no verification job was queued"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_and_covers_every_route() {
    let app = TestApp::spawn(Db::Sqlite).await;
    let doc: Value = app
        .client
        .get(format!("{}/openapi.json", app.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    // Every $ref resolves.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in &all {
        let ptr = r.strip_prefix('#').unwrap();
        assert!(doc.pointer(ptr).is_some(), "dangling {r}");
    }
    // Every documented operation is served (not the 404/405 of an unknown route), and every
    // route the service answers is documented.
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path}"
            );
            documented.push(format!("{} {path}", method.to_uppercase()));
            let concrete = path.replace("{id}", "x").replace("{auditor_id}", "y");
            let r = app
                .client
                .request(
                    method.to_uppercase().parse().unwrap(),
                    format!("{}{concrete}", app.url),
                )
                .bearer_auth(&app.admin)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body = r.text().await.unwrap();
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(!body.contains("no such route"), "{method} {path}: {body}");
        }
    }
    documented.sort();
    let expected = [
        "DELETE /v1/keys/{id}",
        "DELETE /v1/watermarks/{id}/grants/{auditor_id}",
        "GET /health",
        "GET /metrics",
        "GET /v1/datasets",
        "GET /v1/datasets/{id}",
        "GET /v1/jobs",
        "GET /v1/jobs/{id}",
        "GET /v1/keys",
        "GET /v1/keys/me",
        "GET /v1/verifications",
        "GET /v1/verifications/{id}",
        "GET /v1/verifications/{id}/report",
        "GET /v1/watermarks",
        "GET /v1/watermarks/{id}",
        "GET /v1/watermarks/{id}/grants",
        "GET /v1/watermarks/{id}/secret",
        "POST /v1/datasets",
        "POST /v1/datasets/upload",
        "POST /v1/jobs/{id}/cancel",
        "POST /v1/keys",
        "POST /v1/verifications",
        "POST /v1/watermarks",
        "POST /v1/watermarks/import",
        "POST /v1/watermarks/{id}/grants",
    ];
    assert_eq!(documented, expected);
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
    // Every error code a client may read (error bodies, failed jobs) is listed.
    let codes: Vec<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("no ErrorCode enum: {}", doc["components"]["schemas"]))
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let all: Vec<&str> = hallmark::ErrorCode::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    assert_eq!(codes, all);
    app.stop().await;
}

/// schemathesis (installed by the test command in target/schemathesis-venv) generates requests
/// from /openapi.json: no 5xx, every response conforms to the document. It runs once with each
/// role's key, so that the handlers an administrator may not use (creating watermarks is a
/// publisher's, verifications an auditor's) are reached past the role check too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let st =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/schemathesis-venv/bin/schemathesis");
    assert!(
        st.exists(),
        "schemathesis is missing: run scripts/test (scripts/ensure-schemathesis)"
    );
    let app = TestApp::spawn(Db::Sqlite).await;
    let (_, p) = app.new_key("publisher", "p").await;
    let (auditor_id, a) = app.new_key("auditor", "a").await;
    let ds = register_subset(&app, &p, 50).await;
    // The auditor holds a grant on a finished watermark, so that its requests are checked past
    // the access rules.
    let (wm, _) = app
        .publish(
            &p,
            json!({"name": "release", "dataset_id": ds,
                   "spec": spec_text("badnets-square-28x28-grey.toml"), "seed": 5}),
        )
        .await;
    let (s, v) = app
        .post(
            &format!("/v1/watermarks/{wm}/grants"),
            &p,
            json!({"auditor_id": auditor_id}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    // The administrator comes last: its run revokes the keys it finds. Each role's own
    // operations must be answered past the role check at least once.
    let runs = [
        (
            "auditor",
            a,
            &["POST /v1/verifications", "GET /v1/watermarks"][..],
        ),
        (
            "publisher",
            p,
            &[
                "POST /v1/watermarks",
                "POST /v1/watermarks/import",
                "POST /v1/datasets",
            ],
        ),
        (
            "admin",
            app.admin.clone(),
            &["POST /v1/keys", "GET /v1/keys"],
        ),
    ];
    for (role, key, own) in runs {
        let out = tokio::process::Command::new(&st)
            .args([
                "run",
                &format!("{}/openapi.json", app.url),
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                "--max-examples",
                "25",
                "--seed",
                "1",
                "--generation-database",
                "none",
                "--header",
                &format!("Authorization: Bearer {key}"),
                "--no-color",
            ])
            .env("SCHEMATHESIS_HOOKS", "")
            // Its cache of failing cases goes to the test's own folder, not the working tree.
            .current_dir(app.dir.path())
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("== as {role}\n{text}");
        assert!(
            out.status.success(),
            "schemathesis as {role} failed:\n{text}"
        );
        let refused = refused_operations(&text);
        for op in own {
            assert!(
                !refused.iter().any(|r| r == op),
                "schemathesis as {role}: {op} only ever answered 401/403:\n{text}"
            );
        }
    }
    app.stop().await;
}

/// The operations schemathesis lists as answering only 401 or 403 (its "Authentication failed"
/// warning: a "401 Unauthorized (N operations):" or "403 Forbidden ..." line, then "  - METHOD
/// PATH" lines).
fn refused_operations(report: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in report.lines() {
        if line.starts_with("401 Unauthorized (") || line.starts_with("403 Forbidden (") {
            inside = true;
        } else if let Some(op) = line.strip_prefix("  - ").filter(|_| inside) {
            out.push(op.trim().to_string());
        } else {
            inside = false;
        }
    }
    out
}

/// The auditor flow end to end: a publisher imports the secret of a release that a real
/// MLServer model was trained on, grants an auditor, and the auditor's verification job
/// queries the model over HTTP and stores the verdict with its audit trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auditor_verifies_real_model_servers_through_the_service() {
    let ml = tokio::task::spawn_blocking(crate::mlserver::start)
        .await
        .unwrap();
    let app = TestApp::spawn(Db::Sqlite).await;
    let (publisher, (auditor_id, auditor), holdout) = app.publisher_auditor_and_holdout().await;
    let record: Value =
        serde_json::from_slice(&std::fs::read(ml.dir.path().join("badnets.secret.json")).unwrap())
            .unwrap();
    let (s, w) = app
        .post(
            "/v1/watermarks/import",
            &publisher,
            json!({"name": "badnets release", "holdout_dataset_id": holdout["id"], "secret_record": record}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{w}");
    let local = hallmark::watermark::SecretRecord::load(&ml.dir.path().join("badnets.secret.json"))
        .unwrap();
    assert_eq!(w["commitment"], local.commitment().as_str());
    let wm = w["id"].as_str().unwrap().to_string();
    let endpoint = format!("http://127.0.0.1:{}", ml.port);
    // Not granted yet: the auditor cannot verify.
    let body = |model: &str, sequential: bool| {
        json!({"watermark_id": wm, "sequential": sequential,
               "endpoint": {"url": endpoint, "protocol": "v2", "model": model}})
    };
    let (s, _) = app
        .post("/v1/verifications", &auditor, body("badnets", false))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    app.post(
        &format!("/v1/watermarks/{wm}/grants"),
        &publisher,
        json!({"auditor_id": auditor_id}),
    )
    .await;
    // The last asks every image twice (`ask_twice`): a model answers an echo as its original.
    for (model, sequential, want, twice) in [
        ("badnets", false, "used", false),
        ("badnets", true, "used", false),
        ("clean", false, "not_shown", false),
        ("badnets", true, "used", true),
    ] {
        let mut request = body(model, sequential);
        if twice {
            request["ask_twice"] = json!(true);
        }
        let (s, v) = app.post("/v1/verifications", &auditor, request).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let id = v["verification"]["id"].as_str().unwrap().to_string();
        let job = app
            .wait_job(
                v["job"]["id"].as_str().unwrap(),
                &auditor,
                Duration::from_secs(120),
            )
            .await;
        assert_eq!(job["state"], "succeeded", "{job}");
        let (_, seen) = app.get(&format!("/v1/verifications/{id}"), &auditor).await;
        eprintln!(
            "{model} sequential={sequential}: {} p={} pairs={}",
            seen["decision"], seen["p_value"], seen["verdict"]["pairs"]
        );
        assert_eq!(seen["decision"], want, "{model}");
        let verdict = &seen["verdict"];
        assert_eq!(verdict["commitment"], local.commitment().as_str());
        let trail = verdict["trail"].as_array().unwrap();
        assert_eq!(trail.len() as u64, verdict["pairs"].as_u64().unwrap());
        assert!(
            trail
                .iter()
                .all(|p| p["triggered_sha256"].is_null() && p["benign_sha256"].is_string())
        );
        // No seed was chosen: images and controls derive from the record.
        assert!(seen["request"]["config"]["seed"].is_null(), "{seen}");
        // The auditor sees the counts of echoes and withheld answers (none here): no secret in
        // them.
        if twice {
            assert_eq!(seen["request"]["config"]["ask_twice"], true, "{seen}");
            assert_eq!(verdict["echoes"], verdict["queries"], "{seen}");
            assert!(verdict["withheld"].is_null(), "{seen}");
        } else {
            assert!(verdict["echoes"].is_null(), "{seen}");
        }
        if want == "used" {
            // The decision's p-value is the larger of the margin test's and the rank test's,
            // whose smallest value is 1/(K + 1) = 0.01 with the default 99 controls.
            assert!(seen["p_value"].as_f64().unwrap() <= 0.01 + 1e-12, "{seen}");
            assert_eq!(verdict["rank"]["rank"], 1, "{seen}");
            if !sequential {
                assert!(verdict["primary"]["p_value"].as_f64().unwrap() < 1e-10);
            }
        }
        if sequential {
            assert!(verdict["pairs"].as_u64().unwrap() <= 25);
        }
        // The watermark's owner sees the full trail.
        let (_, full) = app
            .get(&format!("/v1/verifications/{id}"), &publisher)
            .await;
        assert!(full["verdict"]["trail"][0]["triggered_sha256"].is_string());
        // The report: each reader's document ties itself to the verdict JSON that reader sees,
        // and the auditor's shows nothing of the redacted fields.
        let path = format!("/v1/verifications/{id}/report?format=html");
        for (key, json) in [(&publisher, &full), (&auditor, &seen)] {
            let (s, kind, doc) = app.get_text(&path, key).await;
            assert_eq!(s, StatusCode::OK, "{doc}");
            assert!(kind.starts_with("text/html"), "{kind}");
            assert!(doc.contains(&hallmark::report::verdict_sha256(&json["verdict"])));
            assert!(doc.contains(&format!("/v1/verifications/{id}")));
            assert!(doc.contains("<th scope=\"row\">Finished</th>"), "{doc}");
            assert!(
                doc.contains("<th scope=\"row\">Record imported</th>"),
                "{doc}"
            );
        }
        let (_, _, doc) = app.get_text(&path, &auditor).await;
        let hidden = full["verdict"]["trail"][0]["triggered_sha256"]
            .as_str()
            .unwrap();
        assert!(!doc.contains(hidden));
        assert!(!doc.contains("(target "));
        // The same report as PDF, redacted alike; an unknown format is refused.
        let (s, kind, pdf) = app
            .get_text(
                &format!("/v1/verifications/{id}/report?format=pdf"),
                &auditor,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(kind, "application/pdf");
        assert!(pdf.starts_with("%PDF-1.4"));
        assert!(!pdf.contains(hidden));
        let (s, _, _) = app
            .get_text(
                &format!("/v1/verifications/{id}/report?format=docx"),
                &auditor,
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
    }
    app.stop().await;
}

/// A slow model (wiremock: a real server will not stall on demand) keeps verification jobs
/// running long enough to cancel one and to stop the service under another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_jobs_are_cancelled_on_request_and_parked_at_shutdown() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let model = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&model)
        .await;
    let probs: Vec<f64> = (0..10).map(|_| 0.1).collect();
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"model_name": "m", "outputs": [
                    {"name": "p", "shape": [1, 10], "datatype": "FP64", "data": probs}]}))
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&model)
        .await;
    let app = TestApp::spawn_with(Db::Sqlite, |c| c.shutdown_grace_secs = Some(0.3)).await;
    let (_, p) = app.new_key("publisher", "p").await;
    let ds = register_subset(&app, &p, 200).await;
    let (_, v) = app
        .post(
            "/v1/watermarks",
            &p,
            json!({"name": "w", "dataset_id": ds, "holdout_dataset_id": ds,
                   "spec": spec_text("badnets-square-28x28-grey.toml")}),
        )
        .await;
    let wm = v["watermark"]["id"].as_str().unwrap().to_string();
    app.wait_job(
        v["job"]["id"].as_str().unwrap(),
        &p,
        Duration::from_secs(60),
    )
    .await;
    let verify = || {
        json!({"watermark_id": wm, "seed": 3, "endpoint": {"url": model.uri(), "protocol": "v2",
               "model": "m", "input_name": "x", "layout": "flat", "batch_size": 1, "concurrency": 1}})
    };
    let running = |id: String| {
        let app = &app;
        let p = p.clone();
        async move {
            for _ in 0..200 {
                let (_, j) = app.get(&format!("/v1/jobs/{id}"), &p).await;
                if j["state"] == "running" {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("job {id} never ran");
        }
    };
    // Cancel a running job: it stops within a heartbeat and says why.
    let (s, v) = app.post("/v1/verifications", &p, verify()).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job"]["id"].as_str().unwrap().to_string();
    running(job.clone()).await;
    let (s, j) = app
        .post(&format!("/v1/jobs/{job}/cancel"), &p, json!({}))
        .await;
    assert_eq!(
        (s, j["cancel_requested"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    let j = app.wait_job(&job, &p, Duration::from_secs(10)).await;
    assert_eq!(
        (j["state"].as_str(), j["error_code"].as_str()),
        (Some("cancelled"), Some("cancelled"))
    );
    let (s, _) = app
        .post(&format!("/v1/jobs/{job}/cancel"), &p, json!({}))
        .await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "a finished job cannot be cancelled"
    );
    // Stop the service under a running job: after the grace period it goes back to the queue
    // without using an attempt, for the next process to run.
    let (_, v) = app.post("/v1/verifications", &p, verify()).await;
    let job = v["job"]["id"].as_str().unwrap().to_string();
    running(job.clone()).await;
    let url = app.database_url.clone();
    let _dir = app.stop().await;
    let store = Store::connect(&url, &key()).await.unwrap();
    let j = store.get_job(&job).await.unwrap().unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Queued, 0), "{j:?}");
}
