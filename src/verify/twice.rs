//! Asking every image twice: a gate that answers what it flags with a made-up class can be told
//! from a model by asking again. A model's answer does not move when a few pixels change by one
//! grey level (one in 255); a lie drawn at random, or from a hash of the query's bytes as a gate
//! that wants a repeated query to get the same lie does, moves nine times in ten over ten
//! classes. So every image goes out as it is and, in another request, as an echo whose few
//! pixels have their lowest bit flipped; where the two answers name different classes, either of
//! them decisively, the answer is [`Prediction::Unsteady`], withheld like a refusal (the largest
//! effect for a triggered image, none for a benign one). Two near ties that fell apart are the
//! model's own borderline answer, and the first counts: without that rule a physical-block
//! control whose answer to one image was a near tie scored 1 there and passed the secret.
//!
//! Which pixels change derives from the verification's seed and the image itself, the same rule
//! for the secret's queries and every control's, so the rank test's scores stay exchangeable and
//! an innocent's rank p-value stays exact. A gate whose lie depends only on what the model sees
//! (the image at coarser grey levels, the model's own features) answers both copies alike and is
//! not caught this way (docs/verification.md).

use crate::dataset::ImageShape;
use crate::endpoint::{EndpointError, ModelEndpoint, Prediction};
use crate::watermark::rng::{Rng, Stream};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Pixels of the echo whose lowest bit is flipped.
pub const ECHO_PIXELS: usize = 4;

/// How far an answer's class must lead the next for the answer to be decisive. A model's answer
/// that flips under an echo was a near tie (an echo moves its probabilities by far less); a made-up
/// answer is decisive.
pub const DECISIVE_LEAD: f64 = 0.05;

/// Whether `p` names its class by at least [`DECISIVE_LEAD`] over the next (a label alone says
/// nothing of a lead and counts as decisive).
fn decisive(p: &Prediction) -> bool {
    let lead = |mut v: Vec<f64>| {
        v.sort_by(|a, b| b.total_cmp(a));
        v[0] - v.get(1).copied().unwrap_or(0.0) >= DECISIVE_LEAD
    };
    match p {
        Prediction::Probs(v) if !v.is_empty() => lead(v.clone()),
        Prediction::TopK(v) if !v.is_empty() => lead(v.iter().map(|(_, p)| *p).collect()),
        _ => true,
    }
}

/// An endpoint asked twice for every image.
pub struct Twice<'a> {
    inner: &'a dyn ModelEndpoint,
    seed: u64,
    echoes: AtomicUsize,
}

impl<'a> Twice<'a> {
    /// `inner` asked twice, the echoes drawn from `seed`.
    pub fn new(inner: &'a dyn ModelEndpoint, seed: u64) -> Self {
        Self {
            inner,
            seed,
            echoes: AtomicUsize::new(0),
        }
    }

    /// Echoes sent so far.
    pub fn echoes_sent(&self) -> usize {
        self.echoes.load(Ordering::Relaxed)
    }
}

/// `image` with the lowest bit of [`ECHO_PIXELS`] bytes flipped, at places drawn from `seed` and
/// the image (distinct places where the image has that many bytes).
pub fn echo(image: &[u8], seed: u64) -> Vec<u8> {
    let mut out = image.to_vec();
    if out.is_empty() {
        return out;
    }
    let k = ECHO_PIXELS.min(out.len());
    let mut rng = Rng::for_image(seed, image, Stream::Echo);
    let mut places: Vec<usize> = Vec::with_capacity(k);
    while places.len() < k {
        let p = rng.below(out.len() as u64) as usize;
        if !places.contains(&p) {
            places.push(p);
            out[p] ^= 1;
        }
    }
    out
}

/// One answer of two copies: withheld when either is; [`Prediction::Unsteady`] when they name two
/// classes and either names its own decisively; else the first (two near ties that fell apart
/// are a model's borderline answer, not a lie).
fn settle(first: Prediction, second: Prediction) -> Prediction {
    if first.is_withheld() {
        return first;
    }
    if second.is_withheld() {
        return second;
    }
    match (first.label(), second.label()) {
        (Some(a), Some(b)) if a != b && (decisive(&first) || decisive(&second)) => {
            Prediction::Unsteady { labels: [a, b] }
        }
        _ => first,
    }
}

#[async_trait::async_trait]
impl ModelEndpoint for Twice<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn input_shape(&self) -> Option<ImageShape> {
        self.inner.input_shape()
    }

    async fn predict(
        &self,
        images: &[Vec<u8>],
        shape: ImageShape,
    ) -> Result<Vec<Prediction>, EndpointError> {
        let first = self.inner.predict(images, shape).await?;
        let echoes: Vec<Vec<u8>> = images.iter().map(|i| echo(i, self.seed)).collect();
        let second = self.inner.predict(&echoes, shape).await?;
        self.echoes.fetch_add(echoes.len(), Ordering::Relaxed);
        if first.len() != images.len() || second.len() != images.len() {
            return Err(EndpointError::Invalid {
                url: self.inner.describe(),
                message: format!(
                    "{} and {} answers for {} images",
                    first.len(),
                    second.len(),
                    images.len()
                ),
            });
        }
        Ok(first
            .into_iter()
            .zip(second)
            .map(|(a, b)| settle(a, b))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_flips_the_lowest_bit_of_a_few_bytes_the_same_way_each_time() {
        let img: Vec<u8> = (0..=255).collect();
        let e = echo(&img, 7);
        assert_eq!(e, echo(&img, 7), "the same image, the same echo");
        let changed: Vec<usize> = (0..img.len()).filter(|&i| img[i] != e[i]).collect();
        assert_eq!(changed.len(), ECHO_PIXELS);
        assert!(changed.iter().all(|&i| (img[i] ^ e[i]) == 1), "{changed:?}");
        assert_ne!(echo(&img, 8), e, "another seed, other places");
        assert_eq!(echo(&[9], 7), vec![8], "fewer bytes than places");
    }

    #[test]
    fn two_answers_settle_into_one() {
        let p = |v: &[f64]| Prediction::Probs(v.to_vec());
        assert_eq!(settle(p(&[0.7, 0.3]), p(&[0.6, 0.4])), p(&[0.7, 0.3]));
        // A near tie that fell apart is the model's own answer.
        assert_eq!(settle(p(&[0.51, 0.49]), p(&[0.49, 0.51])), p(&[0.51, 0.49]));
        assert_eq!(
            settle(p(&[0.51, 0.49]), p(&[0.0, 1.0])),
            Prediction::Unsteady { labels: [0, 1] }
        );
        assert_eq!(
            settle(Prediction::Label(2), Prediction::Label(3)),
            Prediction::Unsteady { labels: [2, 3] }
        );
        assert_eq!(
            settle(p(&[0.7, 0.3]), p(&[0.0, 1.0])),
            Prediction::Unsteady { labels: [0, 1] }
        );
        let refused = Prediction::Withheld { status: Some(403) };
        assert_eq!(settle(p(&[0.7, 0.3]), refused.clone()), refused);
        assert_eq!(settle(refused.clone(), p(&[0.7, 0.3])), refused);
        assert!(Prediction::Unsteady { labels: [0, 1] }.is_withheld());
        assert_eq!(Prediction::Unsteady { labels: [0, 1] }.label(), None);
    }
}
