//! Control triggers: drawn from the secret's family (exchangeable with it) or, for a fixed spec,
//! random triggers of its kind; the rank test of the secret among them.

use super::*;
use crate::spec::family::control_seed;

/// The controls' specs: drawn from the record's family when it has one, otherwise (version 1
/// records, public triggers, crafted kinds) random triggers of the same kind and target.
fn controls(
    record: &SecretRecord,
    nonce: &[u8],
    cfg: &VerifyConfig,
    k: usize,
) -> Result<(Vec<WatermarkSpec>, bool), VerifyError> {
    let shape = record.dataset.shape;
    let seed = |j: usize| match cfg.seed {
        Some(s) => control_seed(&s.to_le_bytes(), j),
        None => control_seed(nonce, j),
    };
    match &record.family {
        Some(f) if draws_trigger(f) => {
            let drawn = (0..k)
                .map(|j| {
                    crate::spec::family::draw(f, record.dataset.num_classes, shape, seed(j))
                        .map_err(|e| VerifyError::Watermark(e.into()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((drawn, true))
        }
        Some(f) if has_exchangeable_controls(f) && carries_controls(&record.spec.trigger) => {
            if let Trigger::Perturbation(p) = &record.spec.trigger
                && p.controls.len() < k
            {
                return Err(VerifyError::Invalid(format!(
                    "this TUAP release was crafted with {} controls and the rank test asks for \
                     {k}: set controls to at most {0}, or alpha to at least 1/{}",
                    p.controls.len(),
                    p.controls.len() + 1
                )));
            }
            let drawn = (0..k)
                .map(|j| crafted_control(f, record, j, seed(j)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((drawn, true))
        }
        _ => {
            let drawn = (0..k)
                .map(|j| {
                    let mut c = record.spec.clone();
                    c.trigger = random_trigger(&record.spec.trigger, shape, seed(j))?;
                    Ok(c)
                })
                .collect::<Result<Vec<_>, VerifyError>>()?;
            Ok((drawn, false))
        }
    }
}

/// The K controls a verification of `record` under `cfg` ranks the secret among, in draw order
/// (control j is drawn with the j-th control seed of the record's nonce, or of the research
/// seed), and whether they are exchangeable with the secret: what `hallmark spec controls`
/// lists, so that an auditor can show which triggers a verdict compared the secret with.
pub fn control_specs(
    record: &SecretRecord,
    cfg: &VerifyConfig,
) -> Result<(Vec<WatermarkSpec>, bool), VerifyError> {
    controls(record, &record_nonce(record)?, cfg, cfg.control_count())
}

/// The record's nonce as bytes, which the verification's seeds derive from.
pub(super) fn record_nonce(record: &SecretRecord) -> Result<Vec<u8>, VerifyError> {
    hex::decode(&record.nonce)
        .map_err(|_| VerifyError::Invalid("the record's nonce is not hex".into()))
}

/// Whether a crafted trigger's record carries what its controls need: ISSBA's message input,
/// TUAP's controls crafted with the release.
fn carries_controls(t: &Trigger) -> bool {
    match t {
        Trigger::Generated(g) => g.message.is_some(),
        Trigger::Perturbation(p) => !p.controls.is_empty(),
        _ => false,
    }
}

/// Control `j` of a crafted family, exchangeable with the secret: ISSBA's encoder hiding a
/// uniformly drawn string (the secret string was drawn the same way, after the encoder was
/// trained on random strings), towards the target the family draws for the control; TUAP's
/// control j, crafted with the release for the member the family draws for control seed j
/// (the secret is the member drawn for the release's trigger seed, crafted the same way).
fn crafted_control(
    family: &WatermarkSpec,
    record: &SecretRecord,
    j: usize,
    seed: u64,
) -> Result<WatermarkSpec, VerifyError> {
    let spec_err = |e: crate::spec::SpecError| VerifyError::Watermark(e.into());
    let mut c = crate::spec::family::draw(
        family,
        record.dataset.num_classes,
        record.dataset.shape,
        seed,
    )
    .map_err(spec_err)?;
    match &record.spec.trigger {
        Trigger::Generated(g) => {
            let k = g.message.as_ref().map_or(0, |m| m.bits.len());
            let mut rng = Rng::new(seed, Stream::Pattern);
            let bits: Vec<bool> = (0..k).map(|_| rng.below(2) == 1).collect();
            c.trigger = Trigger::Generated(g.with_message(&bits).map_err(spec_err)?);
        }
        Trigger::Perturbation(p) => {
            let ctl = &p.controls[j];
            c.labelling = Labelling::CleanLabel { target: ctl.target };
            c.trigger = Trigger::Perturbation(crate::spec::Perturbation {
                values: ctl.perturbation().map_err(spec_err)?,
                controls: Vec::new(),
            });
        }
        _ => unreachable!("only crafted triggers that carry their controls"),
    }
    Ok(c)
}

/// Stamps each image with the stamp it names (an index into `stamps`). Costly stamps run on
/// tokio's blocking pool: some triggers run a network for every image (ISSBA's encoder, IAD's
/// and LIRA's generators), which must not hold up the runtime's other tasks (the service's
/// requests, a job's heartbeats); a patch, blend or warp takes microseconds and is done here.
pub(super) async fn stamp_all(
    stamps: &Arc<Vec<Stamp>>,
    work: Vec<(usize, Vec<u8>)>,
) -> Result<Vec<Vec<u8>>, VerifyError> {
    let run = |stamps: &[Stamp], work: Vec<(usize, Vec<u8>)>| -> Vec<Vec<u8>> {
        work.into_iter()
            .map(|(j, mut img)| {
                stamps[j].apply(&mut img);
                img
            })
            .collect()
    };
    if !work.iter().any(|(j, _)| stamps[*j].is_costly()) {
        return Ok(run(stamps, work));
    }
    let stamps = stamps.clone();
    tokio::task::spawn_blocking(move || run(&stamps, work))
        .await
        .map_err(|e| VerifyError::Invalid(format!("stamping failed: {e}")))
}

/// Scores the secret and the K controls by successive elimination and ranks the secret.
#[allow(clippy::too_many_arguments)]
pub(super) async fn rank_test(
    endpoint: &dyn ModelEndpoint,
    record: &SecretRecord,
    nonce: &[u8],
    base: u64,
    cfg: &VerifyConfig,
    order: &[usize],
    benign: &mut Benign<'_>,
    secret_stamp: &Stamp,
    secret_answers: &HashMap<usize, (String, Prediction)>,
    queries: &mut usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<RankTest, VerifyError> {
    let shape = benign.pool.shape();
    let k = cfg.control_count();
    let (specs, exchangeable) = controls(record, nonce, cfg, k)?;
    // Trigger 0 is the secret; the procedure below never treats it apart from the others (its
    // answers already asked by the margin test are reused, which changes no score).
    let classes = record.dataset.num_classes;
    let mut kinds = vec![kind_of(&record.spec, classes)];
    for c in &specs {
        kinds.push(kind_of(c, classes));
    }
    let secret = secret_stamp.clone();
    let stamps = tokio::task::spawn_blocking(move || {
        let mut stamps = vec![secret];
        for c in &specs {
            stamps.push(Stamp::new(&c.trigger, c.seed, shape)?);
        }
        Ok::<_, WatermarkError>(stamps)
    })
    .await
    .map_err(|e| VerifyError::Invalid(format!("making the controls failed: {e}")))??;
    let total = k + 1;
    let mut ties = Rng::new(base, Stream::Ties);
    let tie: Vec<u64> = (0..total).map(|_| ties.u64()).collect();
    let mut s = Scoring {
        endpoint,
        order,
        secret_answers,
        label_only: cfg.label_only,
        scattered: cfg.rank_effect == RankEffect::Scattered,
        moves: vec![vec![0; classes]; total],
        kinds,
        stamps: Arc::new(stamps),
        next: vec![0; total],
        sums: vec![0.0; total],
        counts: vec![0; total],
        reached: vec![0; total],
        own_queries: 0,
    };
    let mut alive: Vec<usize> = (0..total).collect();
    let mut round = 0usize;
    let first = cfg.first_image_count();
    let reduction = cfg.reduction_factor();
    loop {
        // More images for every remaining trigger: `first` in the first round, then one.
        let wanted = alive
            .iter()
            .map(|&j| (j, if round == 0 { first } else { 1 }))
            .collect();
        if !s.score(benign, wanted, round, queries, progress).await? {
            break;
        }
        if alive.len() <= 1 {
            break;
        }
        // Keep the better 1/reduction: by mean effect, then by the drawn tie-break.
        let sort = |alive: &mut Vec<usize>, s: &Scoring<'_>| {
            alive.sort_by(|&a, &b| {
                s.mean(b)
                    .total_cmp(&s.mean(a))
                    .then_with(|| tie[b].cmp(&tie[a]))
            });
        };
        sort(&mut alive, &s);
        let keep = alive.len().div_ceil(reduction);
        // Where the cut falls inside the group of triggers that share the lead with an effect
        // above tau (a gate that refuses the triggered queries of the secret and of some
        // controls scores them all 1; labels give equal hits), every trigger of the group is
        // asked one more image, until the cut falls between two different effects or
        // TIE_IMAGES more have been asked; only then does the drawn tie-break decide. Ties below
        // the lead cannot decide whether the secret ranks first, and a lead at most tau moves
        // the model too little for a `used` verdict: both are left to the tie-break. Whether a
        // group is asked more depends on the scores alone, never on which trigger is the
        // secret, so the triggers stay exchangeable.
        for _ in 0..TIE_IMAGES {
            let at = s.mean(alive[keep - 1]);
            let tied = |j: usize| s.mean(j).total_cmp(&at).is_eq();
            if at <= cfg.tau || !tied(alive[0]) || !tied(alive[keep]) {
                break;
            }
            let group: Vec<(usize, usize)> = alive
                .iter()
                .filter(|&&j| tied(j))
                .map(|&j| (j, 1))
                .collect();
            if !s.score(benign, group, round, queries, progress).await? {
                break;
            }
            sort(&mut alive, &s);
        }
        alive.truncate(keep);
        round += 1;
    }
    let score = |j: usize| TriggerScore {
        round: s.reached[j],
        effect: s.mean(j),
        images: s.counts[j],
    };
    // A control ranks above the secret when it reached a later round, or the same round with a
    // higher mean effect, or the same effect with a higher tie-break.
    let key = |j: usize| (s.reached[j], s.mean(j), tie[j]);
    let order = |i: usize, j: usize| {
        let (a, b) = (key(i), key(j));
        a.0.cmp(&b.0)
            .then_with(|| a.1.total_cmp(&b.1))
            .then_with(|| a.2.cmp(&b.2))
    };
    let mut ahead: Vec<usize> = (1..total).filter(|&j| order(j, 0).is_ge()).collect();
    ahead.sort_by(|&i, &j| order(j, i));
    let above = ahead.len();
    let p_value = (1 + above) as f64 / total as f64;
    Ok(RankTest {
        kind: record.spec.trigger.kind().to_string(),
        exchangeable,
        controls: k,
        secret: score(0),
        control_scores: (1..total).map(score).collect(),
        rank: 1 + above,
        above: ahead.iter().map(|j| j - 1).collect(),
        p_value,
        rejected: p_value <= cfg.alpha + 1e-12,
        queries: s.own_queries,
    })
}

/// The most images each trigger tied for the lead at a cut of the rank test is asked to break
/// the tie.
const TIE_IMAGES: usize = 4;

/// The rank test's running scores of the K + 1 triggers (index 0 is the secret).
struct Scoring<'a> {
    endpoint: &'a dyn ModelEndpoint,
    /// The shared image order: each trigger takes the next image of it that its target allows.
    order: &'a [usize],
    /// The secret's triggered answers that the margin test already asked for.
    secret_answers: &'a HashMap<usize, (String, Prediction)>,
    label_only: bool,
    /// Whether a trigger's scattered answers count (`RankEffect::Scattered`).
    scattered: bool,
    /// Per trigger and class: the rightly answered images whose triggered answer went to this
    /// class, neither the true class nor the trigger's target.
    moves: Vec<Vec<usize>>,
    kinds: Vec<Kind>,
    stamps: Arc<Vec<Stamp>>,
    /// Each trigger's next position in `order`.
    next: Vec<usize>,
    sums: Vec<f64>,
    counts: Vec<usize>,
    /// The last round each trigger was scored in.
    reached: Vec<usize>,
    own_queries: usize,
}

impl Scoring<'_> {
    fn mean(&self, j: usize) -> f64 {
        (self.sums[j] + self.scattered_moves(j) as f64) / self.counts[j].max(1) as f64
    }

    /// The trigger's answers sent elsewhere, all but those to their most frequent class (0
    /// unless scattered answers count): a gate's random answers spread over the classes and
    /// count; a model that sends the trigger to one other class (another trigger's target, as a
    /// model that learnt the secret sends the controls near it) gains nothing. Counting the
    /// first answer to that class too would give every such control a whole point for one
    /// image and cut the secret (whose hits score its target's gain, just below 1) in the
    /// first round: physical-block draws where the model generalises over the family lost
    /// their secret even without a gate.
    fn scattered_moves(&self, j: usize) -> usize {
        let m = &self.moves[j];
        m.iter().sum::<usize>() - m.iter().copied().max().unwrap_or(0)
    }

    /// Scores trigger j on its next n images for each (j, n) of `wanted`, in round `round`;
    /// returns whether any image was left to score.
    async fn score(
        &mut self,
        benign: &mut Benign<'_>,
        mut wanted: Vec<(usize, usize)>,
        round: usize,
        queries: &mut usize,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<bool, VerifyError> {
        let pool = benign.pool;
        let shape = pool.shape();
        // An image whose benign answer was withheld (a gate refused or flattened it) is passed
        // over for the next one its target allows: its pair would say nothing about any trigger,
        // and where every trigger's first image is the same (untargeted kinds) one refused
        // benign answer would tie them all. Which images are passed over depends on the benign
        // answers alone, the same for every trigger, so the triggers stay exchangeable.
        let mut picks: Vec<(usize, usize)> = Vec::with_capacity(wanted.len());
        while !wanted.is_empty() {
            let mut candidates = Vec::new();
            for &(j, n) in &wanted {
                let kind = &self.kinds[j];
                for _ in 0..n {
                    let pos = (self.next[j]..self.order.len())
                        .find(|&p| kind.allows(pool.label(self.order[p])));
                    if let Some(p) = pos {
                        self.next[j] = p + 1;
                        candidates.push((j, self.order[p]));
                    }
                }
            }
            let needed: Vec<usize> = candidates.iter().map(|&(_, i)| i).collect();
            let sent = benign.fetch(self.endpoint, &needed).await?;
            *queries += sent;
            self.own_queries += sent;
            wanted.clear();
            for (j, i) in candidates {
                if benign.answers[&i].is_withheld() {
                    wanted.push((j, 1));
                } else {
                    picks.push((j, i));
                }
            }
        }
        if picks.is_empty() {
            return Ok(false);
        }
        let to_ask: Vec<(usize, usize)> = picks
            .iter()
            .copied()
            .filter(|&(j, i)| !(j == 0 && self.secret_answers.contains_key(&i)))
            .collect();
        let work = to_ask
            .iter()
            .map(|&(j, i)| (j, pool.image(i).to_vec()))
            .collect();
        let images = stamp_all(&self.stamps, work).await?;
        let mut answers: HashMap<(usize, usize), Prediction> = HashMap::new();
        for (chunk_pairs, chunk_images) in to_ask.chunks(256).zip(images.chunks(256)) {
            let a = self.endpoint.predict(chunk_images, shape).await?;
            check_count(&a, chunk_images.len())?;
            self.own_queries += chunk_images.len();
            *queries += chunk_images.len();
            progress(*queries);
            for (&(j, i), w) in chunk_pairs.iter().zip(a) {
                answers.insert((j, i), w);
            }
        }
        for &(j, i) in &picks {
            let w = match answers.get(&(j, i)) {
                Some(w) => w,
                None => &self.secret_answers[&i].1,
            };
            let d = difference(
                &self.kinds[j],
                pool.label(i),
                &benign.answers[&i],
                w,
                self.label_only,
            )?;
            if self.scattered
                && let Some(t) = self.kinds[j].sends(pool.label(i))
                && let (Some(b), Some(w)) = (benign.answers[&i].label(), w.label())
                && b == pool.label(i)
                && w != b
                && w != t
                && let Some(m) = self.moves[j].get_mut(w as usize)
            {
                *m += 1;
            }
            self.sums[j] += d;
            self.counts[j] += 1;
            self.reached[j] = round;
        }
        Ok(true)
    }
}

/// UBW's prediction dispersibility (Li et al., NeurIPS 2022) over the secret's pairs: the entropy
/// of the labels that triggered answers moved to, among pairs whose label moved.
pub(super) fn dispersion(
    benign: &[Prediction],
    triggered: &[Prediction],
    classes: usize,
) -> Dispersion {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    let mut moved = 0usize;
    for (b, w) in benign.iter().zip(triggered) {
        if let (Some(lb), Some(lw)) = (b.label(), w.label())
            && lb != lw
        {
            moved += 1;
            *counts.entry(lw).or_default() += 1;
        }
    }
    let entropy = if moved == 0 {
        0.0
    } else {
        counts
            .values()
            .map(|&c| {
                let p = c as f64 / moved as f64;
                -p * p.ln()
            })
            .sum()
    };
    let threshold = 0.5 * ((classes.max(2) - 1) as f64).ln();
    Dispersion {
        moved,
        entropy,
        threshold,
        passed: moved >= 2 && entropy >= threshold,
    }
}

/// A fresh random trigger of the same kind as `t`, for the independent-trigger control: a random
/// pattern of the same size at a random position (patches), fresh noise of the same alpha and
/// region (blends), a freshly drawn field (warps).
pub fn random_trigger(t: &Trigger, shape: ImageShape, seed: u64) -> Result<Trigger, VerifyError> {
    let mut rng = Rng::new(seed, Stream::Pattern);
    Ok(match t {
        Trigger::Patch(p) => {
            let rows = p.rows(shape.width).map_err(WatermarkError::from)?;
            let (ph, pw) = (rows.len(), rows[0].len());
            let matrix: Vec<Vec<u8>> = (0..ph)
                .map(|_| (0..pw).map(|_| rng.byte()).collect())
                .collect();
            // An any-size patch keeps its scale and goes to a random share of the free room.
            let position = if p.scale.is_some() {
                let mut share = || rng.below(65) as f64 / 64.0;
                Position::Relative(crate::spec::RelativePosition {
                    row: share(),
                    col: share(),
                })
            } else {
                let r = rng.below((shape.height - ph + 1) as u64) as i64;
                let c = rng.below((shape.width - pw + 1) as u64) as i64;
                Position::At([r, c])
            };
            Trigger::Patch(Patch {
                pattern: PatchPattern::Matrix(matrix),
                size: None,
                thickness: None,
                value: None,
                position,
                alpha: p.alpha,
                scale: p.scale,
            })
        }
        Trigger::Blend(b) => {
            let mut c = b.clone();
            c.source = BlendSource::Noise;
            c.image = None;
            c.pattern = None;
            Trigger::Blend(c)
        }
        Trigger::Warp(w) => Trigger::Warp(w.clone()),
        Trigger::Adaptive(a) => {
            let mut c = a.clone();
            for (k, p) in c.pieces.iter_mut().enumerate() {
                *p = random_trigger(p, shape, seed.wrapping_add(k as u64 + 1))?;
            }
            Trigger::Adaptive(c)
        }
        // A random inner trigger under the same transformations.
        Trigger::Physical(p) => {
            let mut c = p.clone();
            c.inner = Box::new(random_trigger(&p.inner, shape, seed.wrapping_add(1))?);
            Trigger::Physical(c)
        }
        // The same networks' outputs turned by 180°.
        Trigger::Generated(g) => {
            let mut c = g.clone();
            c.turned = !g.turned;
            Trigger::Generated(c)
        }
        // Random signs at the same magnitudes.
        Trigger::Perturbation(p) => Trigger::Perturbation(crate::spec::Perturbation {
            controls: Vec::new(),
            values: p
                .values
                .iter()
                .map(|&v| if rng.below(2) == 0 { v } else { -v })
                .collect(),
        }),
        // The same images turned by 180°, drawn with the control's own seed.
        Trigger::Reflection(r) => {
            let mut c = r.clone();
            for e in &mut c.candidates {
                let px = e.pixels().map_err(WatermarkError::from)?;
                let turned: Vec<u8> = px
                    .chunks(e.shape.channels)
                    .rev()
                    .flatten()
                    .copied()
                    .collect();
                *e = crate::spec::EmbeddedImage::from_pixels(e.shape, &turned);
            }
            Trigger::Reflection(c)
        }
        // The other direction, at a random magnitude around the secret one.
        Trigger::Rotate(r) => {
            let scale = 0.5 + rng.below(1001) as f64 / 1000.0;
            let magnitude = (r.angle.abs() * scale).clamp(1.0, 180.0);
            Trigger::Rotate(Rotate {
                angle: -r.angle.signum() * magnitude,
            })
        }
    })
}
