//! Evaluation: sliding-window perplexity and multiple-choice (MMLU-style) scoring.
//!
//! Perplexity follows the recipe of transformers' "Perplexity of fixed-length models" guide:
//! windows of `ctx` tokens start every `stride` tokens; each window scores only the tokens no
//! earlier window scored, with the rest of the window as context; the first window scores
//! tokens 1.. (token 0 has nothing to condition on). The guide's code weights each window's
//! mean loss by `trg_len - 1`, which is off by one for every window after the first; here
//! every scored token counts once, so the result is the exact mean over the scored tokens.

use crate::error::{Error, Result};
use crate::model::Llama;
use crate::sampling::{CachedDecoder, CpuDecoder};

/// Tokens run through the model in one forward call within a window (bounds the logits kept).
const CHUNK: usize = 64;

/// The result of [`perplexity`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perplexity {
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Number of tokens scored.
    pub tokens: usize,
}

/// One evaluation window: tokens `begin..end`, of which window positions `first_scored..`
/// are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) begin: usize,
    pub(crate) end: usize,
    pub(crate) first_scored: usize,
}

/// The windows over `len` tokens: starts at 0, stride, 2 stride, ... until one reaches the end.
pub(crate) fn windows(len: usize, ctx: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let mut scored_until = 0usize;
    for begin in (0..len).step_by(stride) {
        let end = (begin + ctx).min(len);
        out.push(Window {
            begin,
            end,
            first_scored: scored_until.saturating_sub(begin).max(1),
        });
        scored_until = end;
        if end == len {
            break;
        }
    }
    out
}

/// Sliding-window perplexity of `tokens` with windows of `ctx` tokens every `stride`.
/// `on_window(done, total)` is called after each window.
pub fn perplexity(
    model: &Llama,
    tokens: &[u32],
    ctx: usize,
    stride: usize,
    on_window: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    let mut cache = model.new_cache(ctx.max(1));
    let mut decoder = CpuDecoder {
        model,
        cache: &mut cache,
    };
    perplexity_with(&mut decoder, tokens, ctx, stride, on_window)
}

/// [`perplexity`] on any [`CachedDecoder`] (the CPU model or a GPU one) whose cache holds at
/// least `ctx` positions.
pub fn perplexity_with(
    decoder: &mut dyn CachedDecoder,
    tokens: &[u32],
    ctx: usize,
    stride: usize,
    mut on_window: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    if ctx < 2 {
        return Err(Error::invalid(format!(
            "--ctx {ctx}: a window needs at least 2 tokens"
        )));
    }
    if stride == 0 || stride > ctx {
        return Err(Error::invalid(format!(
            "--stride {stride} must lie in 1..={ctx} (--ctx), or tokens would go unscored"
        )));
    }
    if tokens.len() < 2 {
        return Err(Error::invalid(format!(
            "perplexity needs at least 2 tokens, got {}",
            tokens.len()
        )));
    }
    if decoder.capacity() < ctx {
        return Err(Error::invalid(format!(
            "a KV cache of {} positions cannot hold windows of {ctx} tokens",
            decoder.capacity()
        )));
    }
    let vocab = decoder.vocab_size();
    let plan = windows(tokens.len(), ctx, stride);
    let (mut nll_sum, mut scored) = (0f64, 0usize);
    for (w, window) in plan.iter().enumerate() {
        decoder.clear();
        let ids = &tokens[window.begin..window.end];
        // logits row r predicts window token r + 1; rows first_scored - 1 ..= len - 2 are used
        let needed = window.first_scored - 1..ids.len() - 1;
        for start in (0..ids.len()).step_by(CHUNK) {
            let chunk = start..(start + CHUNK).min(ids.len());
            let wanted = chunk.start.max(needed.start)..chunk.end.min(needed.end);
            let logits = decoder.forward(&ids[chunk.clone()], wanted.is_empty())?;
            for r in wanted {
                let row = &logits[(r - chunk.start) * vocab..][..vocab];
                nll_sum += negative_log_likelihood(row, ids[r + 1] as usize);
                scored += 1;
            }
        }
        on_window(w + 1, plan.len());
    }
    let mean_nll = nll_sum / scored as f64;
    Ok(Perplexity {
        mean_nll,
        perplexity: mean_nll.exp(),
        tokens: scored,
    })
}

/// `-log softmax(logits)[target]`, in f64.
fn negative_log_likelihood(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - logits[target] as f64
}

/// The answer a multiple-choice question gets: the index into `choice_ids` (e.g. the ids of
/// " A", " B", " C", " D") whose logit is largest at the answer position (the first on ties).
pub fn pick_choice(
    logits: &[f32], // (V)
    choice_ids: &[u32],
) -> Result<usize> {
    if choice_ids.is_empty() {
        return Err(Error::invalid("no answer choices to pick from"));
    }
    if let Some(&bad) = choice_ids.iter().find(|&&id| id as usize >= logits.len()) {
        return Err(Error::invalid(format!(
            "answer token id {bad} is outside the vocabulary of {}",
            logits.len()
        )));
    }
    let mut best = 0;
    for (i, &id) in choice_ids.iter().enumerate() {
        if logits[id as usize] > logits[choice_ids[best] as usize] {
            best = i;
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(begin: usize, end: usize, first_scored: usize) -> Window {
        Window {
            begin,
            end,
            first_scored,
        }
    }

    /// The guide's loop (begin_loc, end_loc, trg_len = end_loc - prev_end_loc) by hand.
    #[test]
    fn windows_follow_the_recipe() {
        // len 40, ctx 16, stride 8: scored tokens 1..16, 16..24, 24..32, 32..40
        assert_eq!(
            windows(40, 16, 8),
            vec![w(0, 16, 1), w(8, 24, 8), w(16, 32, 8), w(24, 40, 8)]
        );
        // stride == ctx: disjoint windows, each one's first token has no context
        assert_eq!(windows(10, 4, 4), vec![w(0, 4, 1), w(4, 8, 1), w(8, 10, 1)]);
        // a short last window
        assert_eq!(
            windows(11, 4, 3),
            vec![w(0, 4, 1), w(3, 7, 1), w(6, 10, 1), w(9, 11, 1)]
        );
        // everything in one window
        assert_eq!(windows(5, 16, 8), vec![w(0, 5, 1)]);
        let total = |v: Vec<Window>| {
            v.iter()
                .map(|w| w.end - w.begin - w.first_scored)
                .sum::<usize>()
        };
        assert_eq!(total(windows(40, 16, 8)), 39);
        assert_eq!(total(windows(10, 4, 4)), 7);
    }

    #[test]
    fn nll_by_hand() {
        // softmax([0, ln 3]) = [0.25, 0.75]
        let logits = [0.0, 3f32.ln()];
        assert!((negative_log_likelihood(&logits, 1) - (4.0f64 / 3.0).ln()).abs() < 1e-7);
        assert!((negative_log_likelihood(&logits, 0) - 4f64.ln()).abs() < 1e-7);
    }

    #[test]
    fn picks_the_best_choice() {
        let logits = [0.0, 5.0, 1.0, 3.0, 3.0, 9.0];
        assert_eq!(pick_choice(&logits, &[2, 3, 4, 0]).unwrap(), 1);
        assert_eq!(pick_choice(&logits, &[0, 1]).unwrap(), 1);
        assert!(pick_choice(&logits, &[0, 6]).is_err());
        assert!(pick_choice(&logits, &[]).is_err());
    }
}
