//! Which layers of a checkpointed GPU training pass keep their tapes (`--tape-budget`): with
//! gradient checkpointing every layer's forward runs twice, once in the forward and again just
//! before its backward; a layer whose tape (every activation its backward reads) is kept from
//! the forward skips the second run. The tapes take device memory from the forward until the
//! layer's backward, so each GPU spends a byte budget on them.
//!
//! The last layers are preferred: the backward runs them first, so their tapes are freed (and
//! their buffers back in the pools for the recomputes that follow) earliest. The plan is made
//! from shapes alone, so it is computed, and tested, without a GPU.
//!
//! A tape is kept whole, or slim: without the three activations the backward remakes bit for bit
//! from what stays, at the cost of two RMSNorms and a SwiGLU (n1 = RMSNorm(xb), n2 = RMSNorm(x2b),
//! the SwiGLU output from gate and up; ~0.46 ms a layer at the 7B shape and 8,192 rows, where a
//! recompute costs ~6.4 ms). Slim tapes are ~30% smaller at the 7B shape, so a budget buys more
//! of them; they are used when they buy more layers than whole ones ([`plan_tapes`]).

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;

/// What a kept tape holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TapeForm {
    /// Every activation the backward reads.
    #[default]
    Whole,
    /// Without both norms' outputs and the SwiGLU output, which the backward remakes.
    Slim,
}

/// Bytes of device memory a GPU layer tape of `form` holds for a pass over `rows` rows (batch x
/// padded length): the bf16 activations (the input, q and k after RoPE, v, the attention
/// output, the input of the MLP block, gate and up; a whole tape also both norms' outputs and
/// the SwiGLU output), the attention's f32 log-sum-exp per head and row, and each adapter's
/// bf16 `z` of `rank` values per row (`adapter_ranks`: one rank per attached adapter).
pub fn layer_tape_bytes(
    config: &LlamaConfig,
    rows: usize,
    adapter_ranks: &[usize],
    form: TapeForm,
) -> usize {
    const BF16: usize = 2;
    const F32: usize = 4;
    let (hidden, ffn) = (config.hidden_size, config.intermediate_size);
    // xb, x2b: (T, C) each; q and the attention output: (T, H * D); k, v: (T, KV * D); gate, up:
    // (T, F); whole: n1, n2 (T, C) and hidden (T, F) too.
    let slim = 2 * hidden + 2 * config.q_dim() + 2 * config.kv_dim() + 2 * ffn;
    let bf16_per_row = match form {
        TapeForm::Whole => slim + 2 * hidden + ffn,
        TapeForm::Slim => slim,
    };
    let lse_per_row = config.num_attention_heads; // (H, T)
    let z_per_row: usize = adapter_ranks.iter().sum(); // (T, r) per adapter
    rows * (BF16 * bf16_per_row + F32 * lse_per_row + BF16 * z_per_row)
}

/// Per layer, whether its tape is kept: on each stage (`layer_stage`: each layer's stage,
/// non-decreasing), its layers from the last one down while their `tape_bytes` (per layer) sum
/// to at most `budget`; the first layer that does not fit ends the stage's run, so the kept
/// layers of a stage are its last ones.
pub fn kept_tapes(tape_bytes: &[usize], layer_stage: &[usize], budget: usize) -> Vec<bool> {
    let mut kept = vec![false; tape_bytes.len()];
    let mut spent = 0usize;
    // False once a layer of the current stage did not fit.
    let mut stage_open = true;
    let mut current_stage = None;
    for l in (0..tape_bytes.len().min(layer_stage.len())).rev() {
        if current_stage != Some(layer_stage[l]) {
            current_stage = Some(layer_stage[l]);
            spent = 0;
            stage_open = true;
        }
        if !stage_open {
            continue;
        }
        match spent.checked_add(tape_bytes[l]) {
            Some(total) if total <= budget => {
                spent = total;
                kept[l] = true;
            }
            _ => stage_open = false,
        }
    }
    kept
}

/// Which layers keep their tapes, and in which form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapePlan {
    /// Per layer, whether its tape is kept.
    pub kept: Vec<bool>,
    /// The form of every kept tape.
    pub form: TapeForm,
    /// What the kept tapes hold.
    pub used: TapeUse,
}

/// The tapes a `budget` buys (per GPU, [`kept_tapes`]) with each layer's tape taking
/// `whole[l]` or `slim[l]` bytes: slim tapes when they keep more layers than whole ones, else
/// whole ones (remaking the slim tape's activations is then pure cost).
pub fn plan_tapes(
    whole: &[usize],
    slim: &[usize],
    layer_stage: &[usize],
    budget: usize,
) -> TapePlan {
    let plan = |bytes: &[usize], form| {
        let kept = kept_tapes(bytes, layer_stage, budget);
        let used = TapeUse::of(&kept, bytes);
        TapePlan { kept, form, used }
    };
    let whole = plan(whole, TapeForm::Whole);
    let slim = plan(slim, TapeForm::Slim);
    if slim.used.layers > whole.used.layers {
        slim
    } else {
        whole
    }
}

/// What a pass spent on tapes: how many layers kept theirs and the bytes those tapes held
/// (summed over the GPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapeUse {
    /// Layers whose recompute was skipped.
    pub layers: usize,
    /// Bytes their tapes held, by [`layer_tape_bytes`].
    pub bytes: usize,
}

impl TapeUse {
    /// The layers `kept` marks and the sum of their `tape_bytes`.
    pub fn of(kept: &[bool], tape_bytes: &[usize]) -> Self {
        kept.iter().zip(tape_bytes).filter(|(&k, _)| k).fold(
            TapeUse::default(),
            |used, (_, &bytes)| TapeUse {
                layers: used.layers + 1,
                bytes: used.bytes + bytes,
            },
        )
    }
}

/// `--tape-budget GIB` in bytes: a finite, non-negative number of GiB (fractions allowed).
pub fn budget_bytes(gib: f64) -> Result<usize> {
    if !gib.is_finite() || gib < 0.0 {
        return Err(Error::invalid(format!(
            "--tape-budget: {gib} must be a non-negative number of GiB (0 keeps no tape)"
        )));
    }
    let bytes = gib * (1u64 << 30) as f64;
    if bytes >= usize::MAX as f64 {
        return Err(Error::invalid(format!(
            "--tape-budget: {gib} GiB is more bytes than this machine can address"
        )));
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::shape_config;

    const GIB: usize = 1 << 30;

    #[test]
    fn a_7b_tape_counts_every_buffer_by_hand() {
        let config = shape_config("7b").unwrap();
        // By hand, per row at C = 4096, F = 11008, 32 query and 32 key-value heads of 128
        // (H * D = KV * D = 4096): bf16 xb, n1, x2b, n2 (4 x 4096), q, attn (2 x 4096), k, v (2 x 4096), gate, up,
        // hidden (3 x 11008) = 65,792 values = 131,584 bytes; lse 32 f32 = 128 bytes; seven
        // adapters' z at r = 64: 448 bf16 = 896 bytes. 132,608 bytes a row.
        let ranks = [64; 7];
        let whole = |rows, ranks: &[usize]| layer_tape_bytes(&config, rows, ranks, TapeForm::Whole);
        assert_eq!(whole(1, &ranks), 132_608);
        // 2 x 2048 and 16 x 512: 4,096 and 8,192 rows.
        assert_eq!(whole(2 * 2048, &ranks), 543_162_368);
        assert_eq!(whole(16 * 512, &ranks), 1_086_324_736);
        // Without adapters only the activations remain.
        assert_eq!(whole(1, &[]), 131_584 + 128);
        // Slim: without n1, n2 (2 x 4096) and hidden (11008): 46,592 bf16 values = 93,184 bytes,
        // + 128 + 896 = 94,208 bytes a row.
        let slim = |rows| layer_tape_bytes(&config, rows, &ranks, TapeForm::Slim);
        assert_eq!(slim(1), 94_208);
        assert_eq!(slim(16 * 512), 771_751_936);
    }

    #[test]
    fn slim_tapes_are_planned_when_they_buy_more_layers() {
        let config = shape_config("7b").unwrap();
        let one_gpu = vec![0; 32];
        let bytes = |form| vec![layer_tape_bytes(&config, 16 * 512, &[64; 7], form); 32];
        let (whole, slim) = (bytes(TapeForm::Whole), bytes(TapeForm::Slim));
        // 6 GiB: 5 whole tapes (1.01 GiB each) or 8 slim ones (0.72 GiB each).
        let plan = plan_tapes(&whole, &slim, &one_gpu, 6 * GIB);
        assert_eq!(plan.form, TapeForm::Slim);
        assert_eq!(plan.used.layers, 8);
        assert_eq!(plan.used.bytes, 8 * slim[0]);
        assert!(plan.kept[24..].iter().all(|&k| k) && !plan.kept[..24].iter().any(|&k| k));
        // Room for every whole tape: whole ones (nothing to remake).
        let plan = plan_tapes(&whole, &slim, &one_gpu, 40 * GIB);
        assert_eq!((plan.form, plan.used.layers), (TapeForm::Whole, 32));
        // A budget that buys no more slim tapes than whole ones keeps them whole.
        let plan = plan_tapes(&whole, &slim, &one_gpu, whole[0] + slim[0] / 2);
        assert_eq!((plan.form, plan.used.layers), (TapeForm::Whole, 1));
        // No budget: nothing kept.
        assert_eq!(plan_tapes(&whole, &slim, &one_gpu, 0).used.layers, 0);
    }

    #[test]
    fn a_budget_keeps_the_last_layers_of_each_stage() {
        let config = shape_config("7b").unwrap();
        let per_layer = layer_tape_bytes(&config, 2 * 2048, &[64; 7], TapeForm::Whole);
        let bytes = vec![per_layer; 32];
        let one_gpu = vec![0; 32];
        let count = |budget| kept_tapes(&bytes, &one_gpu, budget);
        // 4 GiB holds 7 tapes of 0.506 GiB (8 would be 4.05 GiB); 8 GiB holds 15.
        let kept = count(4 * GIB);
        assert_eq!(kept.iter().filter(|&&k| k).count(), 7);
        assert!(kept[25..].iter().all(|&k| k) && !kept[..25].iter().any(|&k| k));
        assert_eq!(TapeUse::of(&kept, &bytes).layers, 7);
        assert_eq!(TapeUse::of(&kept, &bytes).bytes, 7 * per_layer);
        assert_eq!(count(8 * GIB).iter().filter(|&&k| k).count(), 15);
        // No budget keeps nothing; an exact fit is kept.
        assert!(!count(0).iter().any(|&k| k));
        assert_eq!(count(3 * per_layer).iter().filter(|&&k| k).count(), 3);
        assert_eq!(count(usize::MAX).iter().filter(|&&k| k).count(), 32);
        // Split 0 | 1, 2 | 3: each stage spends its own budget on its own last layers.
        let split = [0, 1, 1, 2];
        assert_eq!(kept_tapes(&[10; 4], &split, 10), [true, false, true, true]);
        assert_eq!(kept_tapes(&[10; 4], &split, 25), [true, true, true, true]);
        // A layer that does not fit ends its stage's run, even when a smaller one below would.
        assert_eq!(
            kept_tapes(&[1, 30, 10], &[0, 0, 0], 20),
            [false, false, true]
        );
        assert!(kept_tapes(&[], &[], GIB).is_empty());
    }

    #[test]
    fn budgets_are_gib_and_bad_ones_name_the_flag() {
        assert_eq!(budget_bytes(0.0).unwrap(), 0);
        assert_eq!(budget_bytes(4.0).unwrap(), 4 * GIB);
        assert_eq!(budget_bytes(0.5).unwrap(), GIB / 2);
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e30] {
            let msg = budget_bytes(bad).unwrap_err().to_string();
            assert!(msg.contains("--tape-budget"), "{msg}");
        }
    }
}
