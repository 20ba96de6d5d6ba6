//! Choosing the next token, and the generation loop.
//!
//! Sampling follows transformers' logits processors, in their order: temperature, then top-k
//! (keep every token scoring at least the k-th best), then top-p (keep the smallest most-likely
//! set whose probability reaches p, at least one token), then a draw from what is left.
//! Temperature 0 is greedy (argmax, first index on ties). Draws come from the crate's seeded
//! [`Rng`], so a seed makes a run reproducible.

use crate::error::{Error, Result};
use crate::model::{KvCache, Llama};
use crate::rng::Rng;

/// How to pick the next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits; 0 means greedy.
    pub temperature: f32,
    /// Keep only the k best tokens (ties with the k-th kept); 0 turns it off.
    pub top_k: usize,
    /// Keep the smallest most-likely set with probability >= top_p; 1 turns it off.
    pub top_p: f32,
    /// Seed of the random draws.
    pub seed: u64,
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks tokens from logits as [`SamplingParams`] say, reusing its buffers between calls.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// (token id, scaled logit, then probability), most likely first.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler; fails on a negative or non-finite temperature or a top_p outside (0, 1].
    pub fn new(params: SamplingParams) -> Result<Self> {
        if !(params.temperature.is_finite() && params.temperature >= 0.0) {
            return Err(Error::invalid(format!(
                "--temperature {} must be a number >= 0 (0 is greedy)",
                params.temperature
            )));
        }
        if !(params.top_p > 0.0 && params.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "--top-p {} must lie in (0, 1] (1 turns it off)",
                params.top_p
            )));
        }
        Ok(Sampler {
            params,
            rng: Rng::new(params.seed),
            candidates: Vec::new(),
        })
    }

    /// The tokens that may be drawn from `logits` (V), most likely first, with their
    /// probabilities renormalised over the kept set. Greedy keeps just the argmax.
    pub fn candidates(&mut self, logits: &[f32]) -> &[(u32, f32)] {
        let p = self.params;
        self.candidates.clear();
        if p.temperature == 0.0 {
            self.candidates.push((argmax(logits), 1.0));
            return &self.candidates;
        }
        // temperature; a NaN logit can never be chosen
        self.candidates
            .extend(logits.iter().enumerate().map(|(id, &x)| {
                let x = if x.is_nan() { f32::NEG_INFINITY } else { x };
                (id as u32, x / p.temperature)
            }));
        let best_first = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // top-k: keep every score >= the k-th best
        if p.top_k > 0 && p.top_k < self.candidates.len() {
            let (_, kth, _) = self
                .candidates
                .select_nth_unstable_by(p.top_k - 1, best_first);
            let threshold = kth.1;
            self.candidates.retain(|c| c.1 >= threshold);
        }
        self.candidates.sort_unstable_by(best_first);
        // softmax over what is left
        let max = self.candidates[0].1;
        if max == f32::NEG_INFINITY {
            self.candidates.truncate(1);
            self.candidates[0].1 = 1.0;
            return &self.candidates;
        }
        let mut sum = 0f64;
        for c in self.candidates.iter_mut() {
            c.1 = (c.1 - max).exp();
            sum += c.1 as f64;
        }
        // top-p: a token stays while the mass before it is below p
        let mut before = 0f64;
        let keep = self
            .candidates
            .iter()
            .take_while(|c| {
                let stays = before < p.top_p as f64;
                before += c.1 as f64 / sum;
                stays
            })
            .count()
            .max(1);
        self.candidates.truncate(keep);
        let kept: f64 = self.candidates.iter().map(|c| c.1 as f64).sum();
        for c in self.candidates.iter_mut() {
            c.1 = (c.1 as f64 / kept) as f32;
        }
        &self.candidates
    }

    /// Picks the next token from `logits` (V).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let u = self.rng.next_f64();
        let candidates = self.candidates(logits);
        let mut cumulative = 0f64;
        for &(id, prob) in candidates {
            cumulative += prob as f64;
            if u < cumulative {
                return id;
            }
        }
        candidates[candidates.len() - 1].0
    }
}

/// The index of the largest value, the first one on ties; NaN is never chosen (0 if all are).
///
/// Two passes without a loop-carried load: the largest non-NaN value over 8 running maxima
/// (`f32::max` skips NaN), then the first index holding it. A single pass comparing each value
/// with `values[best]` makes every step wait on a load addressed by the step before (~100 us
/// over a 32,000-token vocabulary, a decode step's share of a greedy generation).
pub fn argmax(values: &[f32]) -> u32 {
    const LANES: usize = 8;
    let mut lanes = [f32::NAN; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    let max = lanes.iter().chain(tail).copied().fold(f32::NAN, f32::max);
    // No match only when every value is NaN (NaN equals nothing).
    values.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced this end-of-sequence id.
    Eos(u32),
    /// `max_new_tokens` tokens were produced.
    MaxNewTokens,
    /// The KV cache has no room for another token.
    ContextFull,
}

/// The result of [`generate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// The new tokens, without the end-of-sequence id that stopped generation.
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub stop: StopReason,
}

/// A decoder with its KV cache, as generation and evaluation drive it: the CPU model
/// ([`CpuDecoder`]) or a GPU one.
pub trait CachedDecoder {
    /// Runs `tokens` at positions `positions()..`, extends the cache, and returns the logits,
    /// (T, V), or only the last row, (1, V), when `last_only`. Fails, leaving the cache
    /// untouched, on an empty chunk, an id outside the vocabulary, or tokens that do not fit.
    fn forward(&mut self, tokens: &[u32], last_only: bool) -> Result<Vec<f32>>;
    /// Positions filled so far.
    fn positions(&self) -> usize;
    /// The most positions the cache holds.
    fn capacity(&self) -> usize;
    /// Forgets every position.
    fn clear(&mut self);
    /// The width of a row of logits.
    fn vocab_size(&self) -> usize;
}

/// The CPU model with a KV cache.
#[derive(Debug)]
pub struct CpuDecoder<'a> {
    /// The model.
    pub model: &'a Llama,
    /// Its cache.
    pub cache: &'a mut KvCache,
}

impl CachedDecoder for CpuDecoder<'_> {
    fn forward(&mut self, tokens: &[u32], last_only: bool) -> Result<Vec<f32>> {
        self.model.forward(tokens, self.cache, last_only)
    }

    fn positions(&self) -> usize {
        self.cache.len()
    }

    fn capacity(&self) -> usize {
        self.cache.max_len()
    }

    fn clear(&mut self) {
        self.cache.clear();
    }

    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }
}

/// Continues `prompt` after what `cache` already holds: prefill, then sample one token at a
/// time, handing each new id to `on_token` (which may fail, e.g. on a closed stdout), until an
/// id of `eos_ids`, `max_new_tokens`, or a full cache.
///
/// Afterwards the cache holds the prompt and every new token but the last, which was never
/// run through the model. With `max_new_tokens` 0 nothing runs. Fails when the prompt is
/// empty or does not fit the cache.
pub fn generate(
    model: &Llama,
    cache: &mut KvCache,
    prompt: &[u32],
    max_new_tokens: usize,
    eos_ids: &[u32],
    sampler: &mut Sampler,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let mut decoder = CpuDecoder { model, cache };
    generate_with(
        &mut decoder,
        prompt,
        max_new_tokens,
        eos_ids,
        sampler,
        on_token,
    )
}

/// [`generate`] on any [`CachedDecoder`] (the CPU model or a GPU one).
pub fn generate_with(
    decoder: &mut dyn CachedDecoder,
    prompt: &[u32],
    max_new_tokens: usize,
    eos_ids: &[u32],
    sampler: &mut Sampler,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::invalid("the prompt is empty: nothing to continue"));
    }
    let remaining = decoder.capacity() - decoder.positions();
    if prompt.len() > remaining {
        return Err(Error::invalid(format!(
            "the prompt has {} tokens but the context has room for {} more (of {}); \
             shorten the prompt or enlarge the context",
            prompt.len(),
            remaining,
            decoder.capacity()
        )));
    }
    let mut tokens = Vec::new();
    if max_new_tokens == 0 {
        return Ok(Generation {
            tokens,
            stop: StopReason::MaxNewTokens,
        });
    }
    let mut logits = decoder.forward(prompt, true)?;
    loop {
        let id = sampler.sample(&logits);
        if eos_ids.contains(&id) {
            return Ok(Generation {
                tokens,
                stop: StopReason::Eos(id),
            });
        }
        on_token(id)?;
        tokens.push(id);
        let stop = if tokens.len() == max_new_tokens {
            StopReason::MaxNewTokens
        } else if decoder.positions() == decoder.capacity() {
            StopReason::ContextFull
        } else {
            logits = decoder.forward(&[id], true)?;
            continue;
        };
        return Ok(Generation { tokens, stop });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(sampler: &mut Sampler, logits: &[f32]) -> Vec<u32> {
        sampler.candidates(logits).iter().map(|c| c.0).collect()
    }

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: 1,
        }
    }

    /// probs of logits ln [1, 2, 3, 4] (ids 0..4) are [0.1, 0.2, 0.3, 0.4].
    #[test]
    fn top_k_and_top_p_masks() {
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect();
        let mut s = Sampler::new(params(1.0, 0, 1.0)).unwrap();
        let all = s.candidates(&logits).to_vec();
        assert_eq!(
            all.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![3, 2, 1, 0]
        );
        for (c, want) in all.iter().zip([0.4, 0.3, 0.2, 0.1]) {
            assert!((c.1 - want).abs() < 1e-6);
        }
        assert_eq!(
            kept(&mut Sampler::new(params(1.0, 2, 1.0)).unwrap(), &logits),
            vec![3, 2]
        );
        // top-p 0.5: 0.4 < 0.5 so id 2 is needed; 0.7 >= 0.5 so id 1 is not
        assert_eq!(
            kept(&mut Sampler::new(params(1.0, 0, 0.5)).unwrap(), &logits),
            vec![3, 2]
        );
        // p 0.69 needs the second token too (0.4 < 0.69 <= 0.7)
        assert_eq!(
            kept(&mut Sampler::new(params(1.0, 0, 0.69)).unwrap(), &logits),
            vec![3, 2]
        );
        // always at least one token
        assert_eq!(
            kept(&mut Sampler::new(params(1.0, 0, 0.01)).unwrap(), &logits),
            vec![3]
        );
        // top-k first, then top-p on the renormalised pair [4/7, 3/7]
        let mut both = Sampler::new(params(1.0, 2, 0.5)).unwrap();
        assert_eq!(kept(&mut both, &logits), vec![3]);
        // top-k keeps ties with the k-th score
        let tied = [0.0, 5.0, 5.0, 1.0];
        assert_eq!(
            kept(&mut Sampler::new(params(1.0, 1, 1.0)).unwrap(), &tied),
            vec![1, 2]
        );
        // temperature 2 flattens: probs ∝ sqrt([1, 2, 3, 4])
        let mut warm = Sampler::new(params(2.0, 0, 1.0)).unwrap();
        let p = warm.candidates(&logits)[0].1;
        let z: f32 = [1.0f32, 2.0, 3.0, 4.0].iter().map(|x| x.sqrt()).sum();
        assert!((p - 2.0 / z).abs() < 1e-6);
    }

    #[test]
    fn greedy_is_argmax_and_ignores_nan() {
        let mut g = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(g.sample(&[0.5, f32::NAN, 2.0, 2.0, -1.0]), 2);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
    }

    /// Against the plain first-best scan on lengths around the 8-value chunks, with ties,
    /// NaNs, infinities and all-NaN input.
    #[test]
    fn argmax_matches_a_scan() {
        let scan = |values: &[f32]| {
            let mut best: Option<usize> = None;
            for (i, &v) in values.iter().enumerate() {
                if !v.is_nan() && best.is_none_or(|b| v > values[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0) as u32
        };
        let mut rng = Rng::new(7);
        for len in [1usize, 7, 8, 9, 16, 31, 1000] {
            for trial in 0..50 {
                let values: Vec<f32> = (0..len)
                    .map(|_| match rng.below(10) {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        2 if trial % 5 == 0 => f32::INFINITY,
                        // few distinct values: ties are common
                        k => (k % 4) as f32 - 1.5,
                    })
                    .collect();
                assert_eq!(argmax(&values), scan(&values), "{values:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN; 11]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 9]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn seeds_reproduce_and_draws_follow_the_probabilities() {
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0, 0, 1.0)
            })
            .unwrap();
            (0..4000).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
        };
        let (a, b, c) = (draw(5), draw(5), draw(6));
        assert_eq!(a, b);
        assert_ne!(a, c);
        for id in 0..4u32 {
            let freq = a.iter().filter(|&&x| x == id).count() as f64 / a.len() as f64;
            let want = (id + 1) as f64 / 10.0;
            assert!((freq - want).abs() < 0.03, "id {id}: {freq} vs {want}");
        }
    }

    #[test]
    fn refuses_bad_parameters() {
        for bad in [
            params(-1.0, 0, 1.0),
            params(f32::NAN, 0, 1.0),
            params(1.0, 0, 0.0),
            params(1.0, 0, 1.5),
        ] {
            assert!(Sampler::new(bad).is_err(), "{bad:?}");
        }
    }
}
