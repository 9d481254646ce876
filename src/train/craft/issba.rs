//! ISSBA (Li et al., "Invisible Backdoor Attack with Sample-Specific Triggers", ICCV 2021): a
//! StegaStamp-style encoder hides a secret bit string in a bounded residual and a decoder reads it
//! back; once trained, the encoder with the release's secret fixed is the trigger.

use crate::Invalid;
use crate::dataset::Dataset;
use crate::spec::network::{Layer, encode_f32};
use crate::spec::{Encoder, Generated, Message, Trigger, WatermarkSpec};
use crate::train::generator::{Plan, TorchNet, body, floats, quantise, seeded};
use crate::train::model::{conv, linear};
use crate::watermark::rng::{Rng, Stream};
use crate::watermark::{self, WatermarkError, Watermarked};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Channels of ISSBA's encoder at full resolution.
const ENCODER_WIDTH: i64 = 16;

/// Encoders a family's release trains at most before it gives up (one in six collapsed in
/// calibration at the shipped settings).
const ENCODER_ATTEMPTS: usize = 3;

fn bits_tensor(bits: &[f32], n: i64, k: i64, device: Device) -> Tensor {
    Tensor::from_slice(bits).view([n, k]).to_device(device)
}

/// What ISSBA's encoder training reached.
#[derive(Debug, Clone, Copy)]
pub struct IssbaReport {
    /// Fraction of the bits the decoder reads back from held-in images encoded with random
    /// strings.
    pub bit_accuracy: f64,
    /// Mean absolute residual, 0–255 scale.
    pub mean_abs_residual: f64,
}

impl IssbaReport {
    /// Refuses an encoder that did not learn: one whose decoder reads fewer than 75% of the
    /// bits, or whose residual is under half a grey level, would publish a release without a
    /// watermark. (In calibration, 1 of 6 encoders trained at the shipped settings collapsed to
    /// a zero residual, its decoder reading 25% of the bits.)
    pub fn check(&self) -> Result<(), Invalid> {
        if self.bit_accuracy < 0.75 || self.mean_abs_residual < 0.5 {
            return Err(Invalid(format!(
                "the ISSBA encoder did not learn to hide the secret ({self}): the release would \
                 carry no watermark; watermark again (a family's release draws another \
                 encoder), change a fixed spec's seed, or raise [encoder] epochs"
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for IssbaReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ISSBA encoder: the decoder reads {:.1}% of the bits of random strings; mean |residual| {:.2}/255",
            self.bit_accuracy * 100.0,
            self.mean_abs_residual
        )
    }
}

/// Trains ISSBA's encoder and decoder on `dataset` (seeded by the spec) and returns the trigger:
/// the encoder with the release's secret (drawn from the seed) projected into a fixed plane.
pub fn train_encoder(
    dataset: &Dataset,
    spec: &WatermarkSpec,
    e: Encoder,
    device: Device,
    progress: &super::Progress<'_>,
) -> Result<(Generated, IssbaReport), WatermarkError> {
    let Trigger::Generated(g) = &spec.trigger else {
        return Err(WatermarkError::Craft(
            "an [encoder] spec's trigger must be kind = \"generated\"".into(),
        ));
    };
    let scale = f64::from(g.scale.unwrap_or(0.0)) / 255.0;
    let shape = dataset.shape();
    let (c, h, w) = (
        shape.channels as i64,
        shape.height as i64,
        shape.width as i64,
    );
    let k = e.secret_size as i64;
    let mut rng = Rng::new(spec.seed, Stream::Craft);
    let mut idx: Vec<usize> = (0..dataset.len()).collect();
    let m = e.samples.min(idx.len());
    rng.choose_front(&mut idx, m);
    idx.truncate(m);
    let x_all = crate::train::tensor::to_tensor(dataset, &idx, device);

    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let flat = ((h + 1) / 2 + 1) / 2 * (((w + 1) / 2 + 1) / 2) * 32;
    let (dense, enc, d1, d2, d3, d4) = seeded(spec.seed, || {
        (
            linear(&root / "secret", k, h * w),
            TorchNet::new(
                &root / "enc",
                c + 1,
                &body(shape, c, ENCODER_WIDTH, &[Plan::Tanh]),
                shape,
            ),
            conv(&root / "d1", c, 16, 3, 2, 1, true),
            conv(&root / "d2", 16, 32, 3, 2, 1, true),
            linear(&root / "d3", flat, 128),
            linear(&root / "d4", 128, k),
        )
    });
    let decode = |x: &Tensor| {
        x.apply(&d1)
            .relu()
            .apply(&d2)
            .relu()
            .flatten(1, -1)
            .apply(&d3)
            .relu()
            .apply(&d4)
    };
    let encode = |x: &Tensor, s: &Tensor| {
        let plane = s.apply(&dense).view([-1, 1, h, w]);
        let r = enc.forward(&Tensor::cat(&[x, &plane], 1)) * scale;
        (quantise(&(x + &r)), r)
    };
    let mut opt = nn::Adam::default()
        .build(&vs, e.lr)
        .map_err(|err| WatermarkError::Craft(format!("libtorch: {err}")))?;
    let batch = 64usize;
    let steps = m.div_ceil(batch);
    for epoch in 0..e.epochs {
        let mut order: Vec<i64> = (0..m as i64).collect();
        rng.choose_front(&mut order, m);
        let mut last = 0.0;
        for (step, chunk) in order.chunks(batch).enumerate() {
            let n = chunk.len() as i64;
            let x = x_all.index_select(0, &Tensor::from_slice(chunk).to_device(device));
            let bits: Vec<f32> = (0..n * k).map(|_| rng.below(2) as f32).collect();
            let s = bits_tensor(&bits, n, k, device);
            let (xe, r) = encode(&x, &s);
            let mut loss = decode(&xe).binary_cross_entropy_with_logits::<Tensor>(
                &s,
                None,
                None,
                tch::Reduction::Mean,
            );
            if epoch >= e.secret_only_epochs {
                loss += r.square().mean(Kind::Float) * e.image_weight;
            }
            opt.backward_step(&loss);
            last = loss.double_value(&[]);
            progress(epoch * steps + step + 1, e.epochs * steps, last);
        }
        if !last.is_finite() {
            return Err(WatermarkError::Craft(
                "the encoder's loss is not finite; lower encoder.lr".into(),
            ));
        }
    }
    // The release's secret, and what the decoder reads from images encoded with random strings
    // (not the secret: whether an encoder is kept must not depend on which string it hides, or
    // the secret would not be one more draw among the verifier's controls).
    let secret: Vec<bool> = (0..k).map(|_| rng.below(2) == 1).collect();
    let report = tch::no_grad(|| {
        let n = m.min(1000) as i64;
        let x = x_all.narrow(0, 0, n);
        let mut check = Rng::new(spec.seed, Stream::Noise);
        let bits: Vec<f32> = (0..n * k).map(|_| check.below(2) as f32).collect();
        let s = bits_tensor(&bits, n, k, device);
        let (xe, _) = encode(&x, &s);
        let read = decode(&xe).gt(0.0).to_kind(Kind::Float);
        IssbaReport {
            bit_accuracy: read
                .eq_tensor(&s)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]),
            mean_abs_residual: (&xe - &x).abs().mean(Kind::Float).double_value(&[]) * 255.0,
        }
    });
    // The message input: the dense layer's weights ([H·W, k], row-major) and bias, with the
    // secret string; the stored plane is computed from them in plain Rust, as every control's is.
    let message = Message::new(
        &secret,
        &floats(&dense.ws),
        &floats(dense.bs.as_ref().expect("the dense layer has a bias")),
    );
    let plane = message
        .plane(&secret, (h * w) as usize)
        .map_err(|e| WatermarkError::Craft(e.to_string()))?;
    let mut out = g.clone();
    out.pattern = Some(enc.export(vec![Layer::Plane {
        channels: 1,
        values: encode_f32(&plane),
    }]));
    out.message = Some(message);
    Ok((out, report))
}

/// Watermarks `dataset` with an ISSBA spec: trains the encoder, then stamps the poisons with it.
pub fn issba(
    dataset: &mut Dataset,
    spec: &WatermarkSpec,
    nonce: [u8; 32],
    device: Device,
    progress: &super::Progress<'_>,
) -> Result<(Watermarked, IssbaReport), WatermarkError> {
    let Some(e) = spec.encoder else {
        return Err(WatermarkError::Craft(
            "the spec has no [encoder] section".into(),
        ));
    };
    // A family's member is drawn first: its target, and the seed its encoder and secret string
    // are drawn from. An encoder that does not learn is trained again from a seed derived from
    // the first (at most ENCODER_ATTEMPTS in all); the check reads random strings, not the
    // secret, so keeping an encoder says nothing of the string it hides.
    if spec.family.is_some() {
        let mut drawn =
            watermark::draw_release(spec, dataset.num_classes(), dataset.shape(), &nonce)?;
        let first = drawn.seed;
        let mut attempt = 0;
        let (mut marked, report) = loop {
            match issba(dataset, &drawn, nonce, device, progress) {
                Err(WatermarkError::Craft(_)) if attempt + 1 < ENCODER_ATTEMPTS => {
                    attempt += 1;
                    drawn.seed = crate::spec::family::derived_seed(
                        &first.to_le_bytes(),
                        "encoder",
                        attempt as u64,
                    );
                }
                done => break done?,
            }
        };
        marked.record.family = Some(spec.clone());
        return Ok((marked, report));
    }
    let (g, report) = train_encoder(dataset, spec, e, device, progress)?;
    report.check().map_err(|e| WatermarkError::Craft(e.0))?;
    let mut crafted = spec.clone();
    crafted.trigger = Trigger::Generated(g);
    let marked = watermark::apply_crafted(dataset, &crafted, nonce, &mut |_, _| Ok(()))?;
    Ok((marked, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Split;
    use crate::watermark::Stamp;

    #[test]
    fn an_encoder_that_hides_nothing_is_refused() {
        let report = |bit_accuracy, mean_abs_residual| IssbaReport {
            bit_accuracy,
            mean_abs_residual,
        };
        assert!(report(0.995, 8.1).check().is_ok());
        // The collapsed encoder met in calibration: zero residual, 25% of the bits.
        let e = report(0.251, 0.0).check().unwrap_err();
        assert!(
            e.contains("25.1% of the bits") && e.contains("no watermark"),
            "{e}"
        );
        assert!(
            report(0.99, 0.2).check().is_err(),
            "no residual, no watermark"
        );
        assert!(
            report(0.6, 9.0).check().is_err(),
            "a secret the decoder cannot read"
        );
    }

    /// A release of the ISSBA family trains its own encoder and hides its own string (the
    /// crafting seed is drawn from the nonce), and its record carries the message input.
    #[test]
    fn a_family_release_trains_its_own_encoder() {
        let _one = crate::train::exclusive_torch();
        let ds = crate::train::fashion(Split::Test, 256);
        let mut family = WatermarkSpec::from_toml_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("watermark_specs/issba-28x28-grey.toml"),
        )
        .unwrap();
        family.encoder = Some(Encoder {
            epochs: 1,
            secret_only_epochs: 1,
            samples: 256,
            ..family.encoder.unwrap()
        });
        // As `issba` does for a family (whose encoder check one epoch would not pass).
        let release = |nonce: [u8; 32]| {
            let mut d = ds.clone();
            let drawn = watermark::draw_release(&family, 10, ds.shape(), &nonce).unwrap();
            let e = drawn.encoder.unwrap();
            let (g, _) = train_encoder(&ds, &drawn, e, Device::Cpu, &|_, _, _| {}).unwrap();
            let mut crafted = drawn.clone();
            crafted.trigger = Trigger::Generated(g);
            let mut w =
                watermark::apply_crafted(&mut d, &crafted, nonce, &mut |_, _| Ok(())).unwrap();
            w.record.family = Some(family.clone());
            crate::watermark::SecretRecord::from_json(&serde_json::to_string(&w.record).unwrap())
                .unwrap()
        };
        let (a, b) = (release([1; 32]), release([2; 32]));
        assert_ne!(a.spec.seed, family.seed);
        assert_ne!(a.spec.seed, b.spec.seed);
        let (Trigger::Generated(ga), Trigger::Generated(gb)) = (&a.spec.trigger, &b.spec.trigger)
        else {
            panic!("generated triggers");
        };
        assert!(ga.message.is_some() && gb.message.is_some());
        assert_ne!(ga.pattern, gb.pattern, "each release its own encoder");
    }

    /// The encoder's export keeps the secret as a plane and bounds the residual by `scale`; the
    /// same seed trains the same encoder.
    #[test]
    fn issba_encoder_export_is_bounded_and_reproducible() {
        let _one = crate::train::exclusive_torch();
        let ds = crate::train::fashion(Split::Test, 256);
        let mut spec = WatermarkSpec::from_toml_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("watermark_specs/fixed/issba-28x28-grey.toml"),
        )
        .unwrap();
        let e = Encoder {
            epochs: 1,
            secret_only_epochs: 1,
            samples: 256,
            ..spec.encoder.unwrap()
        };
        spec.encoder = Some(e);
        let (g, _) = train_encoder(&ds, &spec, e, Device::Cpu, &|_, _, _| {}).unwrap();
        let (again, _) = train_encoder(&ds, &spec, e, Device::Cpu, &|_, _, _| {}).unwrap();
        assert_eq!(g, again);
        // The message input: the stored plane is the secret string's, and another string gives
        // the same encoder another plane (the verifier's controls), still within scale.
        let m = g.message.as_ref().expect("the encoder's message input");
        assert_eq!(m.bits.len(), 20);
        g.check_message().unwrap();
        let secret = m.secret().unwrap();
        assert_eq!(g.with_message(&secret).unwrap(), g);
        let flipped: Vec<bool> = secret.iter().map(|b| !b).collect();
        let control = g.with_message(&flipped).unwrap();
        assert_ne!(control.pattern, g.pattern);
        let mut edited = g.clone();
        let m = edited.message.as_mut().unwrap();
        m.bits = Message::new(&flipped, &[], &[]).bits;
        assert!(
            edited.check_message().is_err(),
            "a plane that is not the secret's"
        );
        let control_stamp = Stamp::new(&Trigger::Generated(control), 0, ds.shape()).unwrap();
        let net = g.pattern.as_ref().unwrap();
        assert!(matches!(net.layers[0], Layer::Plane { channels: 1, .. }));
        let stamp = Stamp::new(&Trigger::Generated(g.clone()), 0, ds.shape()).unwrap();
        let scale = g.scale.unwrap();
        let mut differ = 0;
        for i in 0..ds.len() {
            let mut img = ds.image(i).to_vec();
            stamp.apply(&mut img);
            let mut ctl = ds.image(i).to_vec();
            control_stamp.apply(&mut ctl);
            differ += usize::from(img != ctl);
            for (a, b) in img.iter().chain(&ctl).zip(ds.image(i).iter().cycle()) {
                assert!((f32::from(*a) - f32::from(*b)).abs() <= scale.ceil());
            }
        }
        assert!(
            differ * 10 >= ds.len() * 9,
            "only {differ} of {} images differ",
            ds.len()
        );
    }
}
