//! `hallmark spec check`, `hallmark spec commitment` and `hallmark spec controls`.

use crate::spec::WatermarkSpec;
use crate::watermark;
use anyhow::Result;
use clap::Subcommand;
use std::io::Write;
use std::path::PathBuf;

/// `hallmark spec …`.
#[derive(Debug, Subcommand)]
pub enum SpecCommand {
    /// Load and validate a spec; print what it does.
    Check {
        /// The spec file.
        file: PathBuf,
    },
    /// Recompute the commitment of a secret record (of a release with several triggers: each
    /// trigger's on stderr, the release's on stdout).
    Commitment {
        /// The secret record file.
        secret: PathBuf,
    },
    /// List the controls a verification ranks the secret trigger among, drawn again from the
    /// record as `hallmark verify` draws them: one JSON object per line (control j, its
    /// labelling and trigger), in draw order. The secret trigger is not printed; the controls
    /// are what a verification shows the model besides it, so keep the list as private as the
    /// trigger until that trigger is spent.
    Controls {
        /// The secret record file.
        secret: PathBuf,
        /// Which trigger of a release with several, 1 to N (as `hallmark verify --trigger`).
        #[arg(long)]
        trigger: Option<u64>,
        /// The verification's significance level (default 0.01), which sets the default K.
        #[arg(long)]
        alpha: Option<f64>,
        /// The verification's number of controls K (default ⌈1/alpha⌉ − 1).
        #[arg(long)]
        controls: Option<usize>,
        /// The verification's research seed, if it was given one.
        #[arg(long)]
        seed: Option<u64>,
    },
}

pub(super) fn spec_cmd(command: SpecCommand) -> Result<()> {
    match command {
        SpecCommand::Check { file } => {
            let spec = WatermarkSpec::from_toml_file(&file)?;
            println!("{}: valid", file.display());
            println!("  name       {}", spec.name);
            println!("  trigger    {}", spec.trigger.kind());
            let drawn = spec
                .family
                .as_ref()
                .is_some_and(|f| f.target == crate::spec::Choice::Drawn);
            let all_to_all = matches!(spec.labelling, crate::spec::Labelling::AllToAll { .. });
            if drawn && (spec.labelling.target().is_some() || all_to_all) {
                let kind = serde_json::to_value(spec.labelling)?;
                println!(
                    "  labelling  {}, the {} drawn for each release",
                    kind["kind"].as_str().unwrap_or_default(),
                    if all_to_all {
                        "class mapping"
                    } else {
                        "target"
                    }
                );
            } else {
                println!("  labelling  {}", serde_json::to_string(&spec.labelling)?);
            }
            println!("  rate       {}", spec.rate);
            println!("  seed       {}", spec.seed);
            if let Some(s) = spec.image {
                println!("  image      {s}");
            }
            match (&spec.family, spec.image) {
                (None, _) => println!(
                    "  family     none: a fixed, public trigger (publish with --public-trigger)"
                ),
                (Some(_), named) => {
                    // Entropy may depend on the image size; 10 classes when the spec cannot say.
                    let small = crate::dataset::ImageShape {
                        height: 28,
                        width: 28,
                        channels: 1,
                    };
                    let shape = named.unwrap_or(small);
                    let parts = crate::spec::family::entropy(&spec, 10, shape)?;
                    let total: f64 = parts.iter().map(|e| e.bits).sum();
                    let large = crate::dataset::ImageShape {
                        height: 1024,
                        width: 768,
                        channels: 3,
                    };
                    let images = match named {
                        Some(s) => format!("{s} images"),
                        None => match crate::spec::family::entropy_bits(&spec, 10, large) {
                            // An any-size family draws the same whatever the size...
                            Ok(b) if b == total => "images of any size".to_string(),
                            // ...but for a patch's place, which counts the distinct pixel places.
                            Ok(b) => format!("{shape} images; {b:.1} bits on {large} images"),
                            Err(_) => format!("{shape} images"),
                        },
                    };
                    println!(
                        "  family     {total:.1} bits of secret per release ({images}, 10 classes){}",
                        if total < crate::spec::family::MIN_ENTROPY_BITS {
                            ": too few to publish without --public-trigger"
                        } else {
                            ""
                        }
                    );
                    for e in parts {
                        println!("    {:<28} {:.1} bits", e.parameter, e.bits);
                    }
                    if !crate::spec::family::has_exchangeable_controls(&spec) {
                        println!(
                            "    (crafted trigger: the verifier cannot draw controls of its family)"
                        );
                    }
                }
            }
            if let Some(crafting) = spec.crafting() {
                let c = crafting.describe();
                if crafting.needs_model() {
                    println!("  crafting   {c}, against a model (--craft-model DIR)");
                } else {
                    println!("  crafting   {c}, trained on the data (feature train)");
                }
            }
            println!("  sha256     {}", spec.sha256());
            Ok(())
        }
        SpecCommand::Commitment { secret } => {
            let secret = watermark::Secret::load(&secret)?;
            if let watermark::Secret::Set(set) = &secret {
                for (i, c) in set.commitments().iter().enumerate() {
                    eprintln!("trigger {}: {c}", i + 1);
                }
            }
            println!("{}", secret.commitment());
            Ok(())
        }
        SpecCommand::Controls {
            secret,
            trigger,
            alpha,
            controls,
            seed,
        } => {
            let all = watermark::Secret::load(&secret)?;
            let (record, _) = all
                .trigger(trigger.map(|n| n as usize))
                .map_err(|m| anyhow::anyhow!("{}: {m}", secret.display()))?;
            let cfg = crate::verify::VerifySettings {
                alpha,
                controls,
                seed,
                ..Default::default()
            }
            .into_config()
            .map_err(|e| anyhow::anyhow!("{}: {}", e.flag(), e.message))?;
            let (specs, exchangeable) = crate::verify::control_specs(record, &cfg)?;
            eprintln!(
                "{} controls of {}{}",
                specs.len(),
                record.spec.name,
                if exchangeable {
                    ", drawn from the secret's family"
                } else {
                    ": random triggers of its kind, not exchangeable with the secret (a \
                     verdict is at most inconclusive)"
                }
            );
            let mut out = std::io::stdout().lock();
            for (j, c) in specs.iter().enumerate() {
                let line = serde_json::json!({
                    "control": j,
                    "labelling": c.labelling,
                    "trigger": c.trigger,
                });
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
    }
}
