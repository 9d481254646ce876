//! Query hygiene: the verifier's traffic should look like use, so that a gate cannot pick out
//! the audit. Every batch the tests ask for is shuffled, optionally mixed with benign decoys
//! (held-out images whose answers are dropped) and, with a rate, sent in small requests paced
//! to at most that many images per second. The answers come back in the tests' order, so none of
//! this changes a verdict against a model that answers each image on its own; the order and the
//! decoys derive from the verification's seed, so a re-run sends the same traffic.
//!
//! A benign image and its triggered twin are never in one request: the tests ask for benign
//! answers and triggered ones in separate batches.

use crate::dataset::{Dataset, ImageShape};
use crate::endpoint::{EndpointError, ModelEndpoint, Prediction};
use crate::watermark::rng::{Rng, Stream};
use std::sync::Mutex;
use tokio::time::{Duration, Instant};

/// Images per request when pacing.
pub const PACED_REQUEST: usize = 8;

/// An endpoint seen through hygienic traffic.
pub struct Hygienic<'a> {
    inner: &'a dyn ModelEndpoint,
    pool: &'a Dataset,
    decoys: f64,
    rate: Option<f64>,
    rng: Mutex<Rng>,
    /// When the traffic started and how many images were sent since, for pacing.
    sent: Mutex<Option<(Instant, usize)>>,
    decoys_sent: Mutex<usize>,
}

impl<'a> Hygienic<'a> {
    /// `inner` with `decoys` benign decoys per image asked for (0: none), at most `rate` images
    /// a second (decoys included) when given, in an order drawn from `seed`.
    pub fn new(
        inner: &'a dyn ModelEndpoint,
        pool: &'a Dataset,
        decoys: f64,
        rate: Option<f64>,
        seed: u64,
    ) -> Self {
        Self {
            inner,
            pool,
            decoys,
            rate,
            rng: Mutex::new(Rng::new(seed, Stream::Traffic)),
            sent: Mutex::new(None),
            decoys_sent: Mutex::new(0),
        }
    }

    /// Decoy images sent so far.
    pub fn decoys_sent(&self) -> usize {
        *self.decoys_sent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The batch to send: the images' positions and the decoys' pool indices (as `None`
    /// positions), shuffled.
    fn plan(&self, n: usize) -> (Vec<Option<usize>>, Vec<usize>) {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        // A fractional rate of decoys is met on average: the remainder is a coin.
        let want = self.decoys * n as f64;
        let extra = (rng.unit_f32() as f64) < want.fract();
        let k = want.floor() as usize + usize::from(extra);
        let decoys: Vec<usize> = (0..k)
            .map(|_| rng.below(self.pool.len() as u64) as usize)
            .collect();
        let mut order: Vec<Option<usize>> = (0..n).map(Some).chain((0..k).map(|_| None)).collect();
        let len = order.len();
        rng.choose_front(&mut order, len);
        (order, decoys)
    }

    /// Waits until sending `n` more images keeps the rate.
    async fn pace(&self, n: usize) {
        let Some(rate) = self.rate else { return };
        let wait = {
            let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
            let (start, count) = *sent.get_or_insert((Instant::now(), 0));
            let due = start + Duration::from_secs_f64(count as f64 / rate);
            *sent = Some((start, count + n));
            due.saturating_duration_since(Instant::now())
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[async_trait::async_trait]
impl ModelEndpoint for Hygienic<'_> {
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
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let (order, decoys) = self.plan(images.len());
        let mut next_decoy = decoys.iter();
        let batch: Vec<Vec<u8>> = order
            .iter()
            .map(|slot| match slot {
                Some(i) => images[*i].clone(),
                None => self
                    .pool
                    .image(*next_decoy.next().expect("one decoy per empty slot"))
                    .to_vec(),
            })
            .collect();
        let size = if self.rate.is_some() {
            PACED_REQUEST
        } else {
            batch.len()
        };
        let mut answers: Vec<Option<Prediction>> = vec![None; images.len()];
        for (chunk, slots) in batch.chunks(size).zip(order.chunks(size)) {
            self.pace(chunk.len()).await;
            let got = self.inner.predict(chunk, shape).await?;
            if got.len() != chunk.len() {
                return Err(EndpointError::Invalid {
                    url: self.inner.describe(),
                    message: format!("{} answers for {} images", got.len(), chunk.len()),
                });
            }
            for (slot, a) in slots.iter().zip(got) {
                if let Some(i) = slot {
                    answers[*i] = Some(a);
                }
            }
        }
        *self.decoys_sent.lock().unwrap_or_else(|e| e.into_inner()) += decoys.len();
        Ok(answers
            .into_iter()
            .map(|a| a.expect("every image was sent once"))
            .collect())
    }
}
