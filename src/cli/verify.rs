//! `hallmark verify`: tests a model behind an endpoint (or a local model) with a secret record.

use super::{DataArgs, bar, check_writable};
use crate::dataset;
use crate::endpoint::{
    Datatype, EndpointSettings, HttpEndpoint, OutputKind, Protocol, TensorLayout,
};
use crate::verify::{self, Decision, VerifySettings};
use crate::watermark::{self, SecretRecord};
use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

/// Arguments of `hallmark verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The secret record of the watermark.
    #[arg(long)]
    pub secret: PathBuf,
    /// Which trigger of a release with several (`hallmark watermark --triggers N`) this
    /// verification spends, 1 to N. Spend each once: the endpoint sees the triggered queries.
    /// Several (`--trigger 1,2`: the families of a release made with `--also-spec`, say),
    /// chosen before verifying, test the model with each at alpha / k and accuse it when any
    /// says `used` (Bonferroni: an innocent model is accused with probability at most alpha).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=16))]
    pub trigger: Vec<u64>,
    /// Held-out benign images (never training images), e.g. the test split's IDX files.
    #[command(flatten)]
    pub held_out: DataArgs,
    /// Base URL of the model server (the full URL for --protocol json).
    #[arg(long, required_unless_present = "local_model", requires = "protocol")]
    pub endpoint: Option<String>,
    /// Verify a model folder written by `hallmark train` offline, in-process (feature `train`).
    #[arg(long, conflicts_with = "endpoint")]
    pub local_model: Option<PathBuf>,
    /// Wire protocol.
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// Model name.
    #[arg(long, default_value = "")]
    pub model: String,
    /// Model version.
    #[arg(long)]
    pub model_version: Option<String>,
    /// Use predicted labels only.
    #[arg(long)]
    pub label_only: bool,
    /// Query in rounds and stop as soon as the anytime-valid test decides.
    #[arg(long)]
    pub sequential: bool,
    /// Pairs of the fixed design (the most the sequential design may use): 2 to 10000, default
    /// 100.
    #[arg(long)]
    pub m: Option<usize>,
    /// Margin of the null hypothesis: in [0, 1), default 0.2.
    #[arg(long)]
    pub tau: Option<f64>,
    /// Significance level: in (0, 1), default 0.01.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Pairs per round in sequential mode: 1 to 1000, default 4.
    #[arg(long)]
    pub round: Option<usize>,
    /// Research override of the seed of the image order, the controls and their tie-breaks,
    /// which otherwise derive from the secret record (so a re-run repeats the verdict); an
    /// override is written in the verdict.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Controls drawn from the trigger's family for the rank test (default ⌈1/alpha⌉ − 1).
    #[arg(long)]
    pub controls: Option<usize>,
    /// Images each trigger is queried on in the rank test's first round (default 1; 2 spares a
    /// trigger that fails on one image, at the price of K + 1 more queries).
    #[arg(long)]
    pub first_images: Option<usize>,
    /// What the rank test scores a trigger with a target by: `target` (default), its target's
    /// gain; `scattered`, also the triggered answers sent off the true class to scattered
    /// classes (against a gate that answers flagged queries with a random class; with
    /// `--first-images 8`).
    #[arg(long)]
    pub rank_effect: Option<crate::verify::RankEffect>,
    /// What the margin test scores a pair by: `target` (default), its target's gain;
    /// `true-class`, the true class's loss, so that triggered answers a gate sent to a random
    /// class count (with `--rank-effect scattered`; docs/verification.md).
    #[arg(long)]
    pub margin_effect: Option<crate::verify::MarginEffect>,
    /// Ask every image twice, the second time with 4 pixels one grey level off, and count an
    /// answer that names another class the second time (unless both were near ties) as
    /// withheld: a gate that answers flagged queries with a made-up class is caught where its lie
    /// moves (twice the queries; docs/verification.md).
    #[arg(long)]
    pub ask_twice: bool,
    /// Send this many benign decoys per image the tests ask for (0 to 10; their answers are
    /// dropped), shuffled in, so that the audit's traffic looks like use.
    #[arg(long)]
    pub decoys: Option<f64>,
    /// Send at most this many images a second (0.01 to 100000; decoys included), in requests of
    /// 8.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Research setting for an any-size trigger and a model whose input size differs from the
    /// held-out images': stamp at the held-out size, then resize each query (the default
    /// resizes the held-out images, then stamps; docs/verification.md). Written in the verdict.
    #[arg(long)]
    pub trigger_then_resize: bool,
    /// Where to write the full JSON report.
    #[arg(long)]
    pub report: PathBuf,
    /// Allow private, loopback and link-local endpoint addresses.
    #[arg(long)]
    pub allow_private: bool,
    /// Input tensor name (from V2 metadata when absent).
    #[arg(long)]
    pub input_name: Option<String>,
    /// Input datatype (from V2 metadata when absent, else FP32).
    #[arg(long, value_enum)]
    pub datatype: Option<Datatype>,
    /// Tensor layout (from V2 metadata when absent, else nchw).
    #[arg(long, value_enum)]
    pub layout: Option<TensorLayout>,
    /// Pixels are multiplied by this before normalisation (default 1/255).
    #[arg(long)]
    pub scale: Option<f64>,
    /// Per-channel means subtracted after scaling (comma-separated, at most 4).
    #[arg(long, value_delimiter = ',')]
    pub mean: Vec<f64>,
    /// Per-channel standard deviations divided by (comma-separated, at most 4, positive).
    #[arg(long, value_delimiter = ',')]
    pub std: Vec<f64>,
    /// Output tensor name or key.
    #[arg(long)]
    pub output_name: Option<String>,
    /// What the output holds: auto settles logits or probabilities from the output's name or the
    /// first answer, and says which in the report (labels are implied by --label-only, and come
    /// from the arg-max of a score output where the model gives no label output).
    #[arg(long, value_enum, default_value_t = OutputKind::Auto)]
    pub output: OutputKind,
    /// Images per request, 1 to 1024, default 32 (lowered to the server's published limit, or
    /// halved when the server refuses a batch as too large).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Requests in flight at once: 1 to 64, default 4.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Seconds before a request times out, at most 600, default 30; the first contact waits as
    /// long for a server that is still starting.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Retries after 5xx, 429, timeouts and connection errors: at most 10, default 3.
    #[arg(long)]
    pub retries: Option<u32>,
    /// --protocol json: file holding the request body with "$INSTANCES" where the batch goes.
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// --protocol json: JSON pointer to the predictions in the response.
    #[arg(long)]
    pub output_pointer: Option<String>,
    /// Replace an existing report.
    #[arg(long)]
    pub force: bool,
}

#[cfg(feature = "train")]
fn local_endpoint(dir: &Path) -> Result<Box<dyn crate::endpoint::ModelEndpoint>> {
    let model = crate::train::serve::LoadedModel::load(
        dir,
        crate::train::device(crate::train::DeviceChoice::Auto)?,
    )?;
    Ok(Box::new(crate::train::serve::LocalEndpoint::new(
        model,
        dir.display().to_string(),
    )))
}

#[cfg(not(feature = "train"))]
fn local_endpoint(_: &Path) -> Result<Box<dyn crate::endpoint::ModelEndpoint>> {
    anyhow::bail!("--local-model needs hallmark built with the `train` feature")
}

/// Prints a verdict's decision, its reason and the tests behind it.
fn print_verdict(verdict: &verify::Verdict, alpha: f64) {
    let p = &verdict.primary;
    println!(
        "verdict: {}",
        match verdict.decision {
            Decision::Used =>
                "USED: evidence that the model was trained on the watermarked release",
            Decision::NotShown =>
                "NOT SHOWN: no evidence that the model was trained on the release",
            Decision::Inconclusive =>
                "INCONCLUSIVE: the model reacts to the trigger, but the trigger is not secret",
        }
    );
    println!("why:      {}", verdict.reason);
    println!("protocol: {}", verdict.protocol);
    if let Some(t) = &verdict.trigger {
        println!(
            "trigger:  {} of {} (release commitment {})",
            t.number, t.of, t.release_commitment
        );
    }
    println!("model:    {}", verdict.endpoint);
    println!(
        "margin:   {}, {} pairs: p = {:.3e} (alpha {}), effect {:.4} (lower {:.0}% bound {:.4}, margin {})",
        p.test,
        p.n,
        p.p_value,
        alpha,
        p.effect,
        100.0 * p.ci_level,
        p.ci_low,
        p.tau
    );
    if let Some(r) = &verdict.rank {
        println!(
            "rank:     secret {} of {} {} triggers{}: p = {:.3} (secret effect {:.4} on {} images)",
            r.rank,
            r.controls + 1,
            r.kind,
            if r.exchangeable {
                " of its family"
            } else {
                " (controls not drawn from a secret family)"
            },
            r.p_value,
            r.secret.effect,
            r.secret.images
        );
        if !r.above.is_empty() && r.above.len() <= 5 {
            let list: Vec<String> = r.above.iter().map(|j| j.to_string()).collect();
            println!(
                "          below control{} {} (`hallmark spec controls` lists them)",
                if list.len() == 1 { "" } else { "s" },
                list.join(", ")
            );
        }
    }
    if let Some(d) = &verdict.dispersion {
        println!(
            "scatter:  {} answers moved, entropy {:.3} nats (needs {:.3}): {}",
            d.moved,
            d.entropy,
            d.threshold,
            if d.passed {
                "dispersed"
            } else {
                "concentrated"
            }
        );
    }
    if let Some(w) = &verdict.withheld {
        println!(
            "withheld: {} triggered and {} benign answers of {} pairs ({} refused, the rest \
             flattened); {}: p = {:.3}",
            w.triggered, w.benign, verdict.pairs, w.refused, w.test.test, w.test.p_value
        );
    }
    println!(
        "queries:  {} images ({} pairs, {} for the rank test){}{}{}",
        verdict.queries,
        verdict.pairs,
        verdict.rank.as_ref().map_or(0, |r| r.queries),
        if verdict.decoys > 0 {
            format!(", and {} benign decoys", verdict.decoys)
        } else {
            String::new()
        },
        if verdict.echoes > 0 {
            format!(", each asked again ({} echoes)", verdict.echoes)
        } else {
            String::new()
        },
        match verdict.config.seed {
            Some(s) => format!(", research seed {s}"),
            None => String::new(),
        }
    );
}

pub(super) fn verify_cmd(a: VerifyArgs) -> Result<u8> {
    check_writable(&a.report, a.force)?;
    // The record and the held-out images load while the endpoint is contacted.
    let (secret, held_out) = (a.secret.clone(), a.held_out.clone());
    let numbers: Vec<Option<usize>> = if a.trigger.is_empty() {
        vec![None]
    } else {
        a.trigger.iter().map(|&n| Some(n as usize)).collect()
    };
    for (i, n) in a.trigger.iter().enumerate() {
        if a.trigger[..i].contains(n) {
            anyhow::bail!("--trigger {n} is given twice: each trigger is verified once");
        }
    }
    let k = numbers.len();
    type Loaded = (
        Vec<(SecretRecord, Option<watermark::SpentTrigger>)>,
        dataset::Dataset,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let loading = runtime.spawn_blocking(move || -> Result<Loaded> {
        let all = watermark::Secret::load(&secret)?;
        let records = numbers
            .iter()
            .map(|&number| {
                all.trigger(number)
                    .map(|(record, spent)| (record.clone(), spent))
                    .map_err(|m| anyhow::anyhow!("{}: {m}", secret.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((records, held_out.load()?))
    });
    // Only the retries' jitter is random; the verification itself derives from the record.
    let jitter = a.seed.unwrap_or_else(|| {
        u64::from_le_bytes(watermark::random_nonce()[..8].try_into().expect("8 bytes"))
    });
    // The same settings, ranges and defaults as the HTTP API's (`EndpointSettings`).
    let flag = |e: crate::endpoint::SettingError| anyhow::anyhow!("{}: {}", e.flag(), e.message);
    let template = match &a.template {
        Some(t) => Some(
            std::fs::read_to_string(t).with_context(|| format!("cannot read {}", t.display()))?,
        ),
        None => None,
    };
    let ep = EndpointSettings {
        version: a.model_version.clone(),
        input_name: a.input_name.clone(),
        datatype: a.datatype,
        layout: a.layout,
        scale: a.scale,
        mean: a.mean.clone(),
        std: a.std.clone(),
        output_name: a.output_name.clone(),
        output: Some(if a.label_only {
            OutputKind::Labels
        } else {
            a.output
        }),
        batch_size: a.batch_size,
        concurrency: a.concurrency,
        timeout_secs: a.timeout,
        retries: a.retries,
        template,
        output_pointer: a.output_pointer.clone(),
        ..EndpointSettings::new(
            a.endpoint.clone().unwrap_or_default(),
            a.protocol.unwrap_or(Protocol::V2),
            a.model.clone(),
        )
    }
    .into_config(a.allow_private)
    .map_err(flag)?;
    let cfg = VerifySettings {
        m: a.m,
        tau: a.tau,
        alpha: a.alpha,
        label_only: a.label_only,
        sequential: a.sequential,
        round: a.round,
        seed: a.seed,
        controls: a.controls,
        first_images: a.first_images,
        decoys: a.decoys,
        rate: a.rate,
        rank_effect: a.rank_effect,
        margin_effect: a.margin_effect,
        ask_twice: a.ask_twice,
    }
    .into_config()
    .and_then(|c| {
        // With k triggers, each is verified at alpha / k (and its controls follow that level).
        c.with(|f| {
            f.trigger_then_resize = a.trigger_then_resize;
            f.alpha /= k as f64;
        })
    })
    .map_err(flag)?;
    let pb = bar(
        (k * (2 * cfg.m + (cfg.first_image_count() + 1) * (cfg.control_count() + 1))) as u64,
        "querying",
    );
    let local = a.local_model.clone();
    let verdicts = runtime.block_on(async {
        let loaded = async {
            loading
                .await
                .map_err(|_| anyhow::anyhow!("loading the inputs panicked"))?
        };
        let (endpoint, (records, pool)): (Box<dyn crate::endpoint::ModelEndpoint>, _) =
            if let Some(dir) = local {
                let loaded = loaded.await?;
                let endpoint = tokio::task::spawn_blocking(move || local_endpoint(&dir))
                    .await
                    .map_err(|_| anyhow::anyhow!("loading the model panicked"))??;
                (endpoint, loaded)
            } else {
                let endpoint = HttpEndpoint::connect(ep, jitter).await;
                let loaded = loaded.await?;
                let mut endpoint = endpoint?;
                endpoint.set_class_names(loaded.1.class_names().map(<[String]>::to_vec));
                (Box::new(endpoint), loaded)
            };
        let progress = |q: usize| pb.set_position(q as u64);
        let verdicts =
            verify::verify_each(endpoint.as_ref(), &records, &pool, &cfg, &progress).await?;
        anyhow::Ok(verdicts)
    });
    pb.finish_and_clear();
    let mut verdicts = verdicts?;
    if k == 1 {
        let verdict = verdicts.pop().expect("one verdict");
        write_report(&a, &verdict)?;
        print_verdict(&verdict, cfg.alpha);
        println!("report:   {}", a.report.display());
        return Ok(u8::from(verdict.decision != Decision::Used));
    }
    let combined = verify::CombinedVerdict::new(cfg.alpha * k as f64, verdicts);
    write_report(&a, &combined)?;
    for v in &combined.verdicts {
        println!();
        print_verdict(v, cfg.alpha);
    }
    println!();
    print_combined(&combined);
    println!("report:   {}", a.report.display());
    Ok(u8::from(combined.decision != Decision::Used))
}

/// Writes the JSON report atomically.
fn write_report(a: &VerifyArgs, report: &impl serde::Serialize) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(report)?;
    json.push(b'\n');
    crate::fsutil::write_file_atomic(&a.report, &json, 0o644, a.force)
        .with_context(|| format!("cannot write {}", a.report.display()))
}

/// Prints the decision about a model verified with several triggers.
fn print_combined(c: &verify::CombinedVerdict) {
    let k = c.verdicts.len();
    let said: Vec<String> = c
        .verdicts
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let n = v.trigger.as_ref().map_or(i + 1, |t| t.number);
            format!("trigger {n}: {}", v.decision.as_str())
        })
        .collect();
    println!(
        "model:    {} with {k} triggers, each at alpha {} ({}): {}, p = {:.3e} (Bonferroni, alpha {})",
        match c.decision {
            Decision::Used => "USED",
            Decision::NotShown => "NOT SHOWN",
            Decision::Inconclusive => "INCONCLUSIVE",
        },
        c.alpha / k as f64,
        said.join(", "),
        match c.decision {
            Decision::Used => "accused, since one trigger is enough",
            _ => "no trigger says used",
        },
        c.p_value,
        c.alpha
    );
    println!("queries:  {} images in all", c.queries);
}
