//! Blind backdoor's hook (Bagdasaryan & Shmatikov, "Blind Backdoors in Deep Learning Models",
//! USENIX Security 2021): a backdoor task on every batch beside the clean one, the tasks weighted
//! by MGDA, and optionally a third task that evades Neural Cleanse. See [`super::Attack::Blind`].

use crate::dataset::ImageShape;
use crate::train::TrainError;
use crate::train::fit::{Batch, Hook, Start};
use crate::train::model::Net;
use crate::train::tensor::to_tensor;
use crate::watermark::Stamp;
use crate::watermark::rng::{Rng, Stream};
use tch::{Device, Kind, Tensor, nn};

/// The hook.
pub(super) struct Blind<'a> {
    stamp: &'a Stamp,
    target: u32,
    neural_cleanse: bool,
    /// The whole training set stamped once (made at the start).
    stamped: Option<Tensor>,
    cleanse: Option<Cleanse>,
}

impl<'a> Blind<'a> {
    pub(super) fn new(stamp: &'a Stamp, target: u32, neural_cleanse: bool) -> Self {
        Self {
            stamp,
            target,
            neural_cleanse,
            stamped: None,
            cleanse: None,
        }
    }
}

impl Hook for Blind<'_> {
    fn name(&self) -> &'static str {
        "blind"
    }

    fn start(&mut self, s: &Start<'_>) -> Result<(), TrainError> {
        let mut stamped = s.train.clone();
        for i in 0..stamped.len() {
            self.stamp.apply(stamped.image_mut(i));
        }
        self.stamped = Some(to_tensor(
            &stamped,
            &(0..stamped.len()).collect::<Vec<_>>(),
            s.device,
        ));
        if self.neural_cleanse {
            self.cleanse = Some(Cleanse::new(s.train.shape(), s.cfg.seed, s.device)?);
        }
        Ok(())
    }

    fn loss(&mut self, b: &mut Batch<'_>) -> Option<Tensor> {
        let stamped = self.stamped.as_ref().expect("started");
        let loss = b.net.forward_t(b.x, true).cross_entropy_for_logits(b.y);
        let xb = b.augment(stamped.index_select(0, b.idx));
        let yb = b.y.full_like(i64::from(self.target));
        let loss_bd = b.net.forward_t(&xb, true).cross_entropy_for_logits(&yb);
        let mut tasks = vec![loss, loss_bd];
        if let Some(c) = &mut self.cleanse {
            c.reverse_engineer(b.net, b.x, &yb, b.params);
            tasks.push(
                b.net
                    .forward_t(&c.apply(b.x), true)
                    .cross_entropy_for_logits(b.y),
            );
        }
        let weights = mgda_weights(&tasks, b.params);
        Some(
            tasks
                .iter()
                .zip(&weights)
                .map(|(l, w)| l * *w)
                .reduce(|a, b| a + b)
                .expect("two tasks or more"),
        )
    }
}

/// MGDA's weights of the tasks (Sener & Koltun, NeurIPS 2018), as Blind balances them: each
/// task's gradient over `params` is normalised by min(loss · ‖gradient‖, 10) (BackdoorBox's
/// `loss+`), and the weights are those of the convex combination with the smallest norm.
pub(super) fn mgda_weights(losses: &[Tensor], params: &[Tensor]) -> Vec<f64> {
    let grads: Vec<Tensor> = losses
        .iter()
        .map(|loss| {
            let g = Tensor::run_backward(&[loss], params, true, false);
            let flat = Tensor::cat(&g.iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0);
            let norm = flat.norm().double_value(&[]);
            let scale = (loss.double_value(&[]) * norm).min(10.0) + 1e-5;
            flat / scale
        })
        .collect();
    let gram: Vec<Vec<f64>> = grads
        .iter()
        .map(|a| grads.iter().map(|b| a.dot(b).double_value(&[])).collect())
        .collect();
    min_norm_weights(&gram)
}

/// The point of the probability simplex that minimises `wᵀ G w` for a Gram matrix `G` of a few
/// vectors: the min-norm element of their convex hull. Exact: the minimum lies in the relative
/// interior of some face, so every face's stationary point (a small linear system) is tried and
/// the best feasible one kept; vertices make the answer total.
pub(super) fn min_norm_weights(gram: &[Vec<f64>]) -> Vec<f64> {
    let k = gram.len();
    assert!((1..=8).contains(&k), "a few tasks");
    let value = |w: &[f64]| -> f64 {
        (0..k)
            .map(|i| (0..k).map(|j| w[i] * gram[i][j] * w[j]).sum::<f64>())
            .sum()
    };
    let mut best: Option<(f64, Vec<f64>)> = None;
    for subset in 1u32..(1 << k) {
        let idx: Vec<usize> = (0..k).filter(|i| subset & (1 << i) != 0).collect();
        // KKT on the face: G_S w_S = λ·1, Σ w_S = 1, as one (m+1)×(m+1) system.
        let m = idx.len();
        let mut a = vec![vec![0.0; m + 2]; m + 1];
        for (r, &i) in idx.iter().enumerate() {
            for (c, &j) in idx.iter().enumerate() {
                a[r][c] = gram[i][j];
            }
            a[r][m] = -1.0;
        }
        a[m][..m].fill(1.0);
        a[m][m + 1] = 1.0;
        let Some(x) = solve(a) else { continue };
        if x[..m].iter().any(|v| *v < -1e-12 || !v.is_finite()) {
            continue;
        }
        let mut w = vec![0.0; k];
        for (r, &i) in idx.iter().enumerate() {
            w[i] = x[r].max(0.0);
        }
        let v = value(&w);
        if best.as_ref().is_none_or(|(b, _)| v < *b) {
            best = Some((v, w));
        }
    }
    best.map(|(_, w)| w).expect("every vertex is feasible")
}

/// Solves the augmented system `a` (n rows, n + 1 columns) by Gaussian elimination with partial
/// pivoting; `None` when it is singular.
fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let n = a.len();
    for col in 0..n {
        let p = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[p][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, p);
        let pivot = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot[col];
                for (x, p) in row[col..].iter_mut().zip(&pivot[col..]) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..n).map(|i| a[i][n] / a[i][i]).collect())
}

/// Blind's Neural Cleanse evasion state: the trigger Neural Cleanse would reverse-engineer, kept
/// one Adam step ahead of the network (BackdoorBox's `NCModel`: mask `tanh(m)/2 + 1/2` over the
/// image, pattern `2.2·tanh(p)`, m = 0 and p ~ N(0, 0.5²) at the start, Adam at 0.01).
pub(super) struct Cleanse {
    _vs: nn::VarStore,
    pub(super) mask: Tensor,
    pattern: Tensor,
    opt: nn::Optimizer,
}

impl Cleanse {
    pub(super) fn new(shape: ImageShape, seed: u64, device: Device) -> Result<Self, TrainError> {
        use nn::OptimizerConfig;
        let (h, w) = (shape.height as i64, shape.width as i64);
        let vs = nn::VarStore::new(device);
        let mut rng = Rng::new(seed ^ 0x0c1ea5e, Stream::Selection);
        // Box–Muller, so that the draw is ours and seeded.
        let init: Vec<f32> = (0..h * w)
            .map(|_| {
                let (u, v) = (1.0 - rng.unit_f32(), rng.unit_f32());
                0.5 * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect();
        let mask = vs.root().zeros("mask", &[h, w]);
        let pattern = vs.root().var_copy(
            "pattern",
            &Tensor::from_slice(&init).view([h, w]).to_device(device),
        );
        let opt = nn::Adam::default().build(&vs, 0.01)?;
        Ok(Self {
            _vs: vs,
            mask,
            pattern,
            opt,
        })
    }

    /// `x` through the current reverse-engineered trigger.
    pub(super) fn apply(&self, x: &Tensor) -> Tensor {
        let m = self.mask.tanh() / 2.0 + 0.5;
        let p = self.pattern.tanh() * 2.2;
        x * (1.0 - &m) + &m * p
    }

    /// One step of Neural Cleanse's optimisation towards `target` (labels of the batch `x`);
    /// the network's gradients (`params`) are cleared afterwards.
    pub(super) fn reverse_engineer(
        &mut self,
        net: &Net,
        x: &Tensor,
        target: &Tensor,
        params: &[Tensor],
    ) {
        let loss = net
            .forward_t(&self.apply(x), true)
            .cross_entropy_for_logits(target)
            * 0.999
            + (self.mask.tanh() / 2.0 + 0.5).sum(Kind::Float) * 0.001;
        self.opt.zero_grad();
        loss.backward();
        for p in params {
            p.shallow_clone().zero_grad();
        }
        self.opt.step();
    }
}
