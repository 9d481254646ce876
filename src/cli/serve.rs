//! `hallmark serve`, `hallmark keys` and `hallmark health`.

use crate::Invalid;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use crate::config::{PartialConfig, ServeConfig};
use crate::store::{Role, Store};

/// Configuration flags (highest precedence; then `HALLMARK_*`, then the file).
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// A TOML configuration file (also `HALLMARK_CONFIG`).
    #[arg(long, env = "HALLMARK_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    pub bind: Option<String>,
    /// `sqlite://PATH` or `postgres://USER@HOST/DB` [default: sqlite in the data folder].
    #[arg(long)]
    pub database_url: Option<String>,
    /// Releases, uploads, the default database and key [default: ./hallmark-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Folders whose datasets may be registered by path (repeatable) [default: DATA_DIR/imports].
    #[arg(long = "dataset-root")]
    pub dataset_roots: Vec<PathBuf>,
    /// Let verifications query private and loopback addresses (local model servers).
    #[arg(long)]
    pub allow_private_endpoints: bool,
    /// Jobs run at once by this process [default: 2].
    #[arg(long)]
    pub workers: Option<usize>,
}

impl ConfigArgs {
    /// File, then environment, then these flags.
    pub fn resolve(&self) -> Result<ServeConfig> {
        let file = match &self.config {
            Some(p) => PartialConfig::from_file(p)?,
            None => PartialConfig::default(),
        };
        let env = PartialConfig::from_env(|k| std::env::var(k).ok())?;
        let flags = PartialConfig {
            bind: self.bind.clone(),
            database_url: self.database_url.clone(),
            data_dir: self.data_dir.clone(),
            dataset_roots: (!self.dataset_roots.is_empty()).then(|| self.dataset_roots.clone()),
            allow_private_endpoints: self.allow_private_endpoints.then_some(true),
            workers: self.workers,
            ..Default::default()
        };
        Ok(file.overridden_by(env).overridden_by(flags).resolve()?)
    }
}

/// Arguments of `hallmark serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `hallmark keys`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key directly in the database; prints the key (shown once).
    Create {
        /// Who will hold it.
        #[arg(long)]
        name: String,
        /// admin, publisher or auditor.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Configuration (the database and sealing key are what matter).
        #[command(flatten)]
        config: ConfigArgs,
    },
}

fn parse_role(s: &str) -> Result<Role, Invalid> {
    match s {
        "admin" => Ok(Role::Admin),
        "publisher" => Ok(Role::Publisher),
        "auditor" => Ok(Role::Auditor),
        _ => Err(Invalid(format!(
            "unknown role {s:?}: expected admin, publisher or auditor"
        ))),
    }
}

/// Arguments of `hallmark health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The service's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HALLMARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown requested");
}

/// Runs the service until SIGINT or SIGTERM.
pub fn serve_cmd(a: ServeArgs) -> Result<()> {
    init_logging();
    let cfg = a.config.resolve()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let app = crate::http::App::build(cfg).await?;
        // Tests and scripts read this line to learn the port when binding port 0.
        eprintln!("listening on port {}", app.port());
        app.run_until_stopped(shutdown_signal()).await
    })
}

/// `hallmark keys create`.
pub fn keys_cmd(c: KeysCommand) -> Result<()> {
    let KeysCommand::Create { name, role, config } = c;
    init_logging();
    let cfg = config.resolve()?;
    let name = name.trim();
    if name.is_empty() {
        bail!("--name must not be empty");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        crate::fsutil::create_private_dir(&cfg.data_dir)
            .with_context(|| format!("cannot create {}", cfg.data_dir.display()))?;
        let key = cfg.load_or_create_key()?;
        let store = Store::connect(&cfg.database_url, &key)
            .await
            .with_context(|| {
                format!(
                    "cannot open the database {}",
                    crate::http::redact_url(&cfg.database_url)
                )
            })?;
        let (info, secret) = store.create_key(name, role).await?;
        eprintln!("created {:?} key {} for {}", info.role, info.id, info.name);
        println!("{secret}");
        store.close().await;
        Ok(())
    })
}

/// `hallmark health`: exit 0 when the service answers healthy (for container health checks).
pub fn health_cmd(a: HealthArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let url = format!("{}/health", a.url.trim_end_matches('/'));
        let r = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()?
            .get(&url)
            .send()
            .await
            .with_context(|| format!("{url}: no answer"))?;
        if !r.status().is_success() {
            bail!("{url}: {}", r.status());
        }
        println!("{}", r.text().await?);
        Ok(())
    })
}
