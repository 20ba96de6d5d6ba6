//! The training pass: forward with a tape, cross-entropy over the vocabulary, and the
//! hand-written backward through every decoder layer into the LoRA adapters.
//!
//! Only LoRA factors are trained. Through a frozen linear layer only the input gradient flows
//! (`dX = dY W`, W dequantized on the fly by [`Linear::backward_input`]); norms and embeddings
//! stay frozen. With gradient checkpointing each layer keeps only its input during the forward
//! pass and is run again (with the same dropout masks: its random state is saved) just before
//! its backward.

use crate::backend::cpu::{
    add_in_place, attention_forward, embedding_forward, rmsnorm_forward, rope_cos_sin,
    rope_forward, swiglu_forward,
};
use crate::backend::cpu_backward::{
    attention_backward, rmsnorm_backward, rope_backward, swiglu_backward,
};
use crate::data::IGNORE_INDEX;
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::linear::Linear;
use crate::model::llama::{DecoderLayer, Llama};
use crate::model::lora::LoraActivations;
use crate::rng::Rng;
use rayon::prelude::*;

/// Rows of logits formed at once in the loss (bounds memory at `LOSS_CHUNK x V` floats).
const LOSS_CHUNK: usize = 32;

/// Options of one training pass.
#[derive(Clone, Copy, Debug)]
pub struct PassOptions {
    /// Dropout on the adapters' inputs (0 at evaluation).
    pub lora_dropout: f32,
    /// Keep only each layer's input and recompute the layer before its backward.
    pub gradient_checkpointing: bool,
    /// Where a GPU pass keeps those inputs (the CPU keeps everything in host memory).
    pub checkpoints: CheckpointPlace,
    /// With checkpointing, bytes of each GPU's memory a GPU pass may spend keeping the tapes of
    /// its last layers from the forward, so that their recompute is skipped (see
    /// [`crate::model::tape_budget`]); 0 keeps none. The result is the same bit for bit; the
    /// CPU ignores it.
    pub tape_budget: usize,
}

/// Where a checkpointed GPU pass keeps each layer's f32 input until the layer's backward
/// (`--checkpoints`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckpointPlace {
    /// In GPU memory, every layer's input at once.
    Gpu,
    /// In pinned host memory, copied out after the layer's forward and back one layer ahead of
    /// its backward, on a second stream that overlaps the copies with the kernels.
    #[default]
    Host,
}

impl std::str::FromStr for CheckpointPlace {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gpu" => Ok(CheckpointPlace::Gpu),
            "host" => Ok(CheckpointPlace::Host),
            _ => Err(Error::invalid(format!(
                "--checkpoints: expected gpu or host, got {s:?}"
            ))),
        }
    }
}

impl std::fmt::Display for CheckpointPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckpointPlace::Gpu => "gpu",
            CheckpointPlace::Host => "host",
        })
    }
}

/// The loss of one sequence: the sum of the scored tokens' negative log-likelihoods and how
/// many tokens were scored.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSum {
    /// Σ -log p(label).
    pub nll: f64,
    /// Scored tokens.
    pub tokens: usize,
}

/// What a layer's forward pass keeps for its backward pass.
struct LayerTape {
    x: Vec<f32>,      // (T, C) the layer's input
    n1: Vec<f32>,     // (T, C)
    q: Vec<f32>,      // (T, H * D) after RoPE
    k: Vec<f32>,      // (T, KV * D) after RoPE
    v: Vec<f32>,      // (T, KV * D)
    attn: Vec<f32>,   // (T, H * D)
    x2: Vec<f32>,     // (T, C) after the attention residual
    n2: Vec<f32>,     // (T, C)
    gate: Vec<f32>,   // (T, F)
    up: Vec<f32>,     // (T, F)
    hidden: Vec<f32>, // (T, F)
    /// LoRA activations of q, k, v, o, gate, up, down.
    lora: [Option<LoraActivations>; 7],
}

/// RoPE angles of positions 0..T.
struct Angles {
    cos: Vec<f32>, // (T, D/2)
    sin: Vec<f32>, // (T, D/2)
}

/// `out = lin(x)` with the adapter's dropout; returns the adapter's activations.
fn linear_forward(
    lin: &Linear,
    x: &[f32],
    out: &mut [f32],
    n: usize,
    dropout: f32,
    rng: &mut Rng,
) -> Option<LoraActivations> {
    lin.forward_base(x, out);
    lin.lora
        .as_ref()
        .map(|l| l.forward(x, out, n, dropout, rng))
}

/// `dx (+)= dy W + adapter share`, accumulating the adapter's gradients.
fn linear_backward(
    lin: &mut Linear,
    x: &[f32],
    act: &Option<LoraActivations>,
    dy: &[f32],
    dx: &mut [f32],
    n: usize,
    accumulate: bool,
) {
    if accumulate {
        let mut tmp = vec![0.0f32; dx.len()];
        lin.backward_input(dy, &mut tmp);
        add_in_place(dx, &tmp);
    } else {
        lin.backward_input(dy, dx);
    }
    if let (Some(lora), Some(act)) = (lin.lora.as_mut(), act.as_ref()) {
        lora.backward(x, act, dy, dx, n);
    }
}

fn layer_forward(
    layer: &DecoderLayer,
    c: &LlamaConfig,
    x: &[f32],
    angles: &Angles,
    dropout: f32,
    rng: &mut Rng,
) -> (Vec<f32>, LayerTape) {
    let t = x.len() / c.hidden_size;
    let zeros = |w: usize| vec![0.0f32; t * w];
    let (hd, eps) = (c.head_dim, c.rms_norm_eps);
    let mut n1 = zeros(c.hidden_size);
    rmsnorm_forward(&mut n1, x, &layer.input_layernorm, eps);
    let (mut q, mut k, mut v) = (zeros(c.q_dim()), zeros(c.kv_dim()), zeros(c.kv_dim()));
    let lq = linear_forward(&layer.q_proj, &n1, &mut q, t, dropout, rng);
    let lk = linear_forward(&layer.k_proj, &n1, &mut k, t, dropout, rng);
    let lv = linear_forward(&layer.v_proj, &n1, &mut v, t, dropout, rng);
    rope_forward(&mut q, &angles.cos, &angles.sin, hd);
    rope_forward(&mut k, &angles.cos, &angles.sin, hd);
    let mut attn = zeros(c.q_dim());
    attention_forward(
        &mut attn,
        &q,
        &k,
        &v,
        0,
        c.num_attention_heads,
        c.num_key_value_heads,
        hd,
    );
    let mut x2 = x.to_vec();
    let mut proj = zeros(c.hidden_size);
    let lo = linear_forward(&layer.o_proj, &attn, &mut proj, t, dropout, rng);
    add_in_place(&mut x2, &proj);
    let mut n2 = zeros(c.hidden_size);
    rmsnorm_forward(&mut n2, &x2, &layer.post_attention_layernorm, eps);
    let (mut gate, mut up, mut hidden) = (
        zeros(c.intermediate_size),
        zeros(c.intermediate_size),
        zeros(c.intermediate_size),
    );
    let lg = linear_forward(&layer.gate_proj, &n2, &mut gate, t, dropout, rng);
    let lu = linear_forward(&layer.up_proj, &n2, &mut up, t, dropout, rng);
    swiglu_forward(&mut hidden, &gate, &up);
    let ld = linear_forward(&layer.down_proj, &hidden, &mut proj, t, dropout, rng);
    let mut y = x2.clone();
    add_in_place(&mut y, &proj);
    let tape = LayerTape {
        x: x.to_vec(),
        n1,
        q,
        k,
        v,
        attn,
        x2,
        n2,
        gate,
        up,
        hidden,
        lora: [lq, lk, lv, lo, lg, lu, ld],
    };
    (y, tape)
}

/// Backward through one layer: `dy` (T, C) in, the input gradient (T, C) out.
fn layer_backward(
    layer: &mut DecoderLayer,
    c: &LlamaConfig,
    tape: &LayerTape,
    angles: &Angles,
    dy: &[f32],
) -> Vec<f32> {
    let t = dy.len() / c.hidden_size;
    let zeros = |w: usize| vec![0.0f32; t * w];
    let (hd, eps) = (c.head_dim, c.rms_norm_eps);
    let [lq, lk, lv, lo, lg, lu, ld] = &tape.lora;
    // MLP block: y = x2 + down(swiglu(gate(n2), up(n2))).
    let mut dhidden = zeros(c.intermediate_size);
    linear_backward(
        &mut layer.down_proj,
        &tape.hidden,
        ld,
        dy,
        &mut dhidden,
        t,
        false,
    );
    let (mut dgate, mut dup) = (zeros(c.intermediate_size), zeros(c.intermediate_size));
    swiglu_backward(&mut dgate, &mut dup, &dhidden, &tape.gate, &tape.up);
    let mut dn2 = zeros(c.hidden_size);
    linear_backward(
        &mut layer.gate_proj,
        &tape.n2,
        lg,
        &dgate,
        &mut dn2,
        t,
        false,
    );
    linear_backward(&mut layer.up_proj, &tape.n2, lu, &dup, &mut dn2, t, true);
    let mut dx2 = dy.to_vec();
    rmsnorm_backward(
        &mut dx2,
        &dn2,
        &tape.x2,
        &layer.post_attention_layernorm,
        eps,
        true,
    );
    // Attention block: x2 = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1))).
    let mut dattn = zeros(c.q_dim());
    linear_backward(
        &mut layer.o_proj,
        &tape.attn,
        lo,
        &dx2,
        &mut dattn,
        t,
        false,
    );
    let (mut dq, mut dk, mut dv) = (zeros(c.q_dim()), zeros(c.kv_dim()), zeros(c.kv_dim()));
    attention_backward(
        &mut dq,
        &mut dk,
        &mut dv,
        &dattn,
        &tape.q,
        &tape.k,
        &tape.v,
        c.num_attention_heads,
        c.num_key_value_heads,
        hd,
    );
    rope_backward(&mut dq, &angles.cos, &angles.sin, hd);
    rope_backward(&mut dk, &angles.cos, &angles.sin, hd);
    let mut dn1 = zeros(c.hidden_size);
    linear_backward(&mut layer.q_proj, &tape.n1, lq, &dq, &mut dn1, t, false);
    linear_backward(&mut layer.k_proj, &tape.n1, lk, &dk, &mut dn1, t, true);
    linear_backward(&mut layer.v_proj, &tape.n1, lv, &dv, &mut dn1, t, true);
    let mut dx = dx2;
    rmsnorm_backward(&mut dx, &dn1, &tape.x, &layer.input_layernorm, eps, true);
    dx
}

/// Positions whose next token is scored: `(position, label)` with position t predicting
/// `labels[t + 1]`.
fn scored_positions(labels: &[i64]) -> Vec<(usize, u32)> {
    labels
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, &l)| l != IGNORE_INDEX)
        .map(|(i, &l)| (i - 1, l as u32))
        .collect()
}

impl Llama {
    /// Fails unless `ids` and `labels` are one non-empty length within the model's positions,
    /// every id and scored label inside the vocabulary.
    pub(crate) fn check_sequence(&self, ids: &[u32], labels: &[i64]) -> Result<()> {
        let c = &self.config;
        if ids.is_empty() || ids.len() != labels.len() {
            return Err(Error::invalid(format!(
                "a training sequence needs ids and labels of one length (got {} and {})",
                ids.len(),
                labels.len()
            )));
        }
        if ids.len() > c.max_position_embeddings {
            return Err(Error::invalid(format!(
                "a sequence of {} tokens exceeds the model's {} positions",
                ids.len(),
                c.max_position_embeddings
            )));
        }
        let bad_id = ids
            .iter()
            .map(|&i| i as i64)
            .chain(labels.iter().copied().filter(|&l| l != IGNORE_INDEX))
            .find(|&i| i < 0 || i as usize >= c.vocab_size);
        match bad_id {
            Some(id) => Err(Error::invalid(format!(
                "token id {id} is outside the vocabulary of {} (wrong tokenizer?)",
                c.vocab_size
            ))),
            None => Ok(()),
        }
    }

    fn angles(&self, t: usize) -> Angles {
        let half = self.config.head_dim / 2;
        let mut a = Angles {
            cos: vec![0.0; t * half],
            sin: vec![0.0; t * half],
        };
        rope_cos_sin(&mut a.cos, &mut a.sin, &self.inv_freq, 0);
        a
    }

    /// The summed loss of one sequence, without gradients (evaluation: no dropout).
    pub fn sequence_loss(&self, ids: &[u32], labels: &[i64]) -> Result<LossSum> {
        self.check_sequence(ids, labels)?;
        let c = &self.config;
        let angles = self.angles(ids.len());
        let mut x = vec![0.0f32; ids.len() * c.hidden_size];
        embedding_forward(&mut x, &self.embed_tokens, ids);
        let mut rng = Rng::new(0);
        for layer in &self.layers {
            x = layer_forward(layer, c, &x, &angles, 0.0, &mut rng).0;
        }
        Ok(self.loss_head(&x, labels, None))
    }

    /// Forward and backward over one sequence: returns its summed loss and adds
    /// `grad_scale x d(summed loss)/d(adapter)` to every adapter's gradients. The trainer
    /// passes `grad_scale = 1 / (scored tokens of the whole accumulated batch)`.
    pub fn train_sequence(
        &mut self,
        ids: &[u32],
        labels: &[i64],
        grad_scale: f32,
        opts: PassOptions,
        rng: &mut Rng,
    ) -> Result<LossSum> {
        self.check_sequence(ids, labels)?;
        let c = self.config.clone();
        let angles = self.angles(ids.len());
        let mut x = vec![0.0f32; ids.len() * c.hidden_size];
        embedding_forward(&mut x, &self.embed_tokens, ids);
        // Forward: a full tape per layer, or only its input and random state.
        let mut tapes = Vec::with_capacity(self.layers.len());
        let mut replay = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            replay.push((x.clone(), rng.clone()));
            let (y, tape) = layer_forward(layer, &c, &x, &angles, opts.lora_dropout, rng);
            if !opts.gradient_checkpointing {
                tapes.push(tape);
            }
            x = y;
        }
        let mut dx = vec![0.0f32; x.len()];
        let loss = self.loss_head(&x, labels, Some((&mut dx, grad_scale)));
        for l in (0..self.layers.len()).rev() {
            let tape = match tapes.pop() {
                Some(tape) => tape,
                None => {
                    let (input, mut layer_rng) = replay[l].clone();
                    layer_forward(
                        &self.layers[l],
                        &c,
                        &input,
                        &angles,
                        opts.lora_dropout,
                        &mut layer_rng,
                    )
                    .1
                }
            };
            dx = layer_backward(&mut self.layers[l], &c, &tape, &angles, &dx);
        }
        Ok(loss)
    }

    /// Final norm, lm_head and cross-entropy over the scored positions, `LOSS_CHUNK` rows of
    /// logits at a time. With `grad`, writes `scale x dloss/dx` for the final hidden states.
    fn loss_head(&self, x: &[f32], labels: &[i64], grad: Option<(&mut Vec<f32>, f32)>) -> LossSum {
        let c = &self.config;
        let (hidden, vocab) = (c.hidden_size, c.vocab_size);
        let scored = scored_positions(labels);
        let mut normed = vec![0.0f32; x.len()];
        rmsnorm_forward(&mut normed, x, &self.norm, c.rms_norm_eps);
        let mut dnormed = grad.as_ref().map(|_| vec![0.0f32; x.len()]);
        let scale = grad.as_ref().map(|(_, s)| *s).unwrap_or(0.0);
        let mut nll = 0.0f64;
        for chunk in scored.chunks(LOSS_CHUNK) {
            let rows: Vec<f32> = chunk
                .iter()
                .flat_map(|&(t, _)| normed[t * hidden..(t + 1) * hidden].iter().copied())
                .collect();
            let mut logits = vec![0.0f32; chunk.len() * vocab]; // (chunk, V)
            self.lm_head.forward(&rows, &mut logits);
            let losses: Vec<f64> = logits
                .par_chunks_mut(vocab)
                .zip(chunk.par_iter())
                .map(|(row, &(_, label))| {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f64 = row.iter().map(|&z| ((z - max) as f64).exp()).sum();
                    let lse = max as f64 + sum.ln();
                    let loss = lse - row[label as usize] as f64;
                    // The row becomes d(loss)/d(logits) x scale = (softmax - onehot) x scale.
                    for z in row.iter_mut() {
                        *z = (((*z as f64) - lse).exp() as f32) * scale;
                    }
                    row[label as usize] -= scale;
                    loss
                })
                .collect();
            nll += losses.iter().sum::<f64>();
            if let Some(dn) = dnormed.as_mut() {
                let mut drows = vec![0.0f32; chunk.len() * hidden];
                self.lm_head.backward_input(&logits, &mut drows);
                for (&(t, _), d) in chunk.iter().zip(drows.chunks_exact(hidden)) {
                    dn[t * hidden..(t + 1) * hidden].copy_from_slice(d);
                }
            }
        }
        if let (Some((dx, _)), Some(dn)) = (grad, dnormed) {
            rmsnorm_backward(dx, &dn, x, &self.norm, c.rms_norm_eps, false);
        }
        LossSum {
            nll,
            tokens: scored.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_places_parse_and_print() {
        for place in [CheckpointPlace::Gpu, CheckpointPlace::Host] {
            assert_eq!(place.to_string().parse::<CheckpointPlace>().unwrap(), place);
        }
        assert_eq!(
            "HOST".parse::<CheckpointPlace>().unwrap(),
            CheckpointPlace::Host
        );
        assert_eq!(CheckpointPlace::default(), CheckpointPlace::Host);
        let msg = "disk".parse::<CheckpointPlace>().unwrap_err().to_string();
        assert!(
            msg.contains("--checkpoints") && msg.contains("disk"),
            "{msg}"
        );
    }
}
