//! How poisoned samples are labelled: to a target class, all to all, kept (clean label), or
//! dirty for untargeted watermarks.

use super::*;

/// How poisoned samples are labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Labelling {
    /// Poison-label, all-to-one (BadNets, Blended, DVBW): every poisoned sample gets `target`.
    Targeted {
        /// The target class.
        target: u32,
    },
    /// UBW-P (Li et al., NeurIPS 2022): each poisoned sample gets a label drawn uniformly from all
    /// classes (which may equal its own, as in the UBW code).
    Untargeted,
    /// Poison-label, all-to-all (the all-to-all attack of BadNets, Gu et al. 2017): a poisoned
    /// sample of class y gets π(y), where π moves every class. Without `mapping_seed`, π(y) =
    /// y + 1 mod C as in the paper; with it, π is the derangement of the C classes drawn from the
    /// seed (`Labelling::mapping`), which a family draws for each release. A model that learns
    /// it must send each class to its own image under π, so a control of the family (another
    /// trigger and another π) agrees with the secret on about one class in C − 1, even when the
    /// model answers every member's trigger alike.
    AllToAll {
        /// The seed of π (absent: y + 1 mod C).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mapping_seed: Option<u64>,
    },
    /// Clean-label: only samples of class `target` are triggered, labels are kept.
    CleanLabel {
        /// The target class.
        target: u32,
    },
    /// UBW-C (Li et al., NeurIPS 2022): samples of `poison_class` are perturbed by gradient
    /// matching and keep their labels; verification is untargeted, on the source classes.
    /// Without `poison_class` the poisons are drawn from every class but the source classes,
    /// so that the perturbations pull triggered source images towards many classes rather
    /// than towards one (the UBW code's single target class teaches a targeted backdoor on
    /// Fashion-MNIST: docs/calibration.md).
    UntargetedCleanLabel {
        /// The one class whose training images are perturbed (absent: every class but the
        /// source classes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        poison_class: Option<u32>,
    },
}

impl Labelling {
    /// The target class, for targeted kinds.
    pub fn target(&self) -> Option<u32> {
        match self {
            Self::Targeted { target } | Self::CleanLabel { target } => Some(*target),
            Self::AllToAll { .. } | Self::Untargeted | Self::UntargetedCleanLabel { .. } => None,
        }
    }

    /// π of an all-to-all labelling over `num_classes` classes (`None` for other kinds): entry y
    /// is the class samples of class y are sent to, never y itself.
    pub fn mapping(&self, num_classes: usize) -> Option<Vec<u32>> {
        let Self::AllToAll { mapping_seed } = self else {
            return None;
        };
        let n = num_classes;
        Some(match mapping_seed {
            None => (0..n).map(|y| ((y + 1) % n.max(1)) as u32).collect(),
            Some(seed) => derangement(n, *seed),
        })
    }

    /// The only class whose samples may be poisoned, for clean-label kinds that name one.
    pub fn poison_class(&self) -> Option<u32> {
        match self {
            Self::CleanLabel { target } => Some(*target),
            Self::UntargetedCleanLabel { poison_class } => *poison_class,
            Self::Targeted { .. } | Self::AllToAll { .. } | Self::Untargeted => None,
        }
    }

    /// Whether poisoned samples keep their labels (clean-label kinds).
    pub fn keeps_labels(&self) -> bool {
        matches!(
            self,
            Self::CleanLabel { .. } | Self::UntargetedCleanLabel { .. }
        )
    }

    /// Whether samples of `class` may be poisoned, given the spec's source classes: a
    /// clean-label kind's one class; for UBW-C without one, every class but the sources;
    /// otherwise the source classes, or every class.
    pub fn may_poison(&self, class: u32, source_classes: Option<&[u32]>) -> bool {
        match self {
            Self::CleanLabel { target: c }
            | Self::UntargetedCleanLabel {
                poison_class: Some(c),
            } => class == *c,
            Self::UntargetedCleanLabel { poison_class: None } => {
                !source_classes.is_some_and(|s| s.contains(&class))
            }
            Self::Targeted { .. } | Self::AllToAll { .. } | Self::Untargeted => {
                source_classes.is_none_or(|s| s.contains(&class))
            }
        }
    }

    /// Whether the test asks for a lower probability of the true label (UBW) rather than for
    /// the target class.
    pub fn is_untargeted(&self) -> bool {
        matches!(self, Self::Untargeted | Self::UntargetedCleanLabel { .. })
    }
}

/// A uniformly random derangement of `0..n` (a permutation that moves every element) drawn from
/// `seed`: uniform shuffles (Fisher–Yates) until one has no fixed point, e ≈ 2.7 tries on
/// average. `n` below 2 has none; the identity of that length is returned, and `check_fits`
/// refuses all-to-all labels on fewer than 2 classes.
fn derangement(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed, Stream::Mapping);
    let mut v: Vec<u32> = (0..n as u32).collect();
    if n < 2 {
        return v;
    }
    loop {
        v.iter_mut().enumerate().for_each(|(i, x)| *x = i as u32);
        rng.choose_front(&mut v, n);
        if v.iter().enumerate().all(|(i, &x)| x != i as u32) {
            return v;
        }
    }
}
