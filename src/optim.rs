//! The optimizer side of training: AdamW with bitsandbytes' 32-bit update, the learning-rate
//! schedules of Hugging Face's Trainer, and global-norm gradient clipping.
//!
//! This is the CPU reference; on the GPU the same update runs in a kernel over states that live
//! in managed (paged) memory.

use crate::error::{Error, Result};

/// AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// Hugging Face Trainer's defaults (as qlora.py uses them): betas (0.9, 0.999), eps 1e-8, no
    /// weight decay.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One parameter tensor's AdamW state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdamState {
    /// First moment.
    pub m: Vec<f32>,
    /// Second moment.
    pub v: Vec<f32>,
}

/// One AdamW step over a parameter tensor, exactly as bitsandbytes' 32-bit two-state kernel
/// (`kOptimizer32bit2State`, ADAM) computes it: bias-corrected step size, epsilon scaled by the
/// second-moment correction, decoupled weight decay after the update, and elements whose
/// gradient is NaN or infinite left untouched. `step` counts from 1.
pub fn adamw_step(
    cfg: &AdamWConfig,
    lr: f32,
    step: u64,
    params: &mut [f32],
    grads: &[f32],
    state: &mut AdamState,
) {
    assert!(step >= 1, "AdamW steps count from 1");
    assert_eq!(
        params.len(),
        grads.len(),
        "adamw_step: params and grads differ in length"
    );
    if state.m.len() != params.len() {
        state.m = vec![0.0; params.len()];
        state.v = vec![0.0; params.len()];
    }
    let correction1 = 1.0 - cfg.beta1.powf(step as f32);
    let correction2 = (1.0 - cfg.beta2.powf(step as f32)).sqrt();
    let step_size = -lr * correction2 / correction1;
    let decay = 1.0 - lr * cfg.weight_decay;
    for (((p, &g), m), v) in params
        .iter_mut()
        .zip(grads)
        .zip(&mut state.m)
        .zip(&mut state.v)
    {
        if !g.is_finite() {
            continue;
        }
        *m = *m * cfg.beta1 + (1.0 - cfg.beta1) * g;
        *v = *v * cfg.beta2 + (1.0 - cfg.beta2) * (g * g);
        *p += step_size * (*m / (v.sqrt() + cfg.eps * correction2));
        if cfg.weight_decay > 0.0 {
            *p *= decay;
        }
    }
}

/// Learning-rate schedules, as `transformers.get_scheduler` defines them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// The base rate throughout (no warmup, as Hugging Face's "constant"; qlora.py's default).
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
    /// Linear warmup, then linear decay to zero.
    Linear,
    /// Linear warmup, then half a cosine down to zero.
    Cosine,
}

impl Schedule {
    /// Parses a `--lr-scheduler-type` name.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "constant" => Ok(Schedule::Constant),
            "constant_with_warmup" => Ok(Schedule::ConstantWithWarmup),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(Error::invalid(format!(
                "--lr-scheduler-type: {other:?} is not constant, constant_with_warmup, linear or cosine"
            ))),
        }
    }

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::ConstantWithWarmup => "constant_with_warmup",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        }
    }

    /// The multiplier of the base rate at optimizer step `step` (counting from 0) of `total`,
    /// with `warmup` warmup steps.
    pub fn factor(self, step: u64, total: u64, warmup: u64) -> f32 {
        let (step, total, warmup) = (step as f64, total as f64, warmup as f64);
        if self != Schedule::Constant && step < warmup {
            return (step / warmup.max(1.0)) as f32;
        }
        let progress = (step - warmup) / (total - warmup).max(1.0);
        let f = match self {
            Schedule::Constant | Schedule::ConstantWithWarmup => 1.0,
            Schedule::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        };
        f as f32
    }
}

/// Warmup steps for a warmup ratio, as Hugging Face computes them (`ceil(ratio * total)`).
pub fn warmup_steps(ratio: f32, total: u64) -> u64 {
    (ratio as f64 * total as f64).ceil() as u64
}

/// The L2 norm of all gradients together, accumulated in f64.
pub fn global_norm(grads: &[&[f32]]) -> f32 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt() as f32
}

/// PyTorch's `clip_grad_norm_` coefficient for gradients of global norm `norm`:
/// `max_norm / (norm + 1e-6)` when that is below 1, else `None` (no clipping). `max_norm <= 0`
/// disables clipping.
pub fn clip_coefficient(norm: f32, max_norm: f32) -> Option<f32> {
    let coef = max_norm / (norm + 1e-6);
    (max_norm > 0.0 && coef < 1.0).then_some(coef)
}

/// One optimizer step's settings, for [`crate::model::train_model::TrainModel::optimizer_step`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimizerStep {
    /// AdamW's hyper-parameters.
    pub adamw: AdamWConfig,
    /// Learning rate of this step (after the schedule).
    pub lr: f32,
    /// Step number, counting from 1.
    pub step: u64,
    /// Global gradient-norm clipping threshold (`<= 0`: no clipping).
    pub max_grad_norm: f32,
    /// Keep the moments in managed memory the driver may page to the host (on a GPU;
    /// bitsandbytes' paged optimizer). The arithmetic is the same either way.
    pub paged: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch.optim.AdamW (decoupled decay before the update) written out in f64, the
    /// independent reference; bitsandbytes differs only in decaying after the update and in
    /// scaling eps, both accounted for here.
    fn reference(lr: f64, wd: f64, steps: &[f64], p0: f64) -> f64 {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (i, &g) in steps.iter().enumerate() {
            let t = (i + 1) as f64;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let c1 = 1.0 - b1.powf(t);
            let c2 = (1.0 - b2.powf(t)).sqrt();
            p -= lr * (m / c1) / (v.sqrt() / c2 + eps);
            p *= 1.0 - lr * wd;
        }
        p
    }

    #[test]
    fn adamw_matches_the_textbook_update() {
        let grads = [0.3f64, -1.2, 0.05, 2.0, -0.7];
        for wd in [0.0, 0.1] {
            let cfg = AdamWConfig {
                weight_decay: wd as f32,
                ..AdamWConfig::default()
            };
            let mut p = [0.5f32];
            let mut state = AdamState::default();
            for (i, &g) in grads.iter().enumerate() {
                adamw_step(&cfg, 2e-2, i as u64 + 1, &mut p, &[g as f32], &mut state);
            }
            let want = reference(2e-2, wd, &grads, 0.5);
            assert!(
                (p[0] as f64 - want).abs() < 1e-6,
                "wd {wd}: {} vs {want}",
                p[0]
            );
        }
    }

    #[test]
    fn non_finite_gradients_leave_the_element_alone() {
        let mut p = [1.0f32, 1.0];
        let mut state = AdamState::default();
        adamw_step(
            &AdamWConfig::default(),
            0.1,
            1,
            &mut p,
            &[f32::NAN, 1.0],
            &mut state,
        );
        assert_eq!(p[0], 1.0);
        assert!(p[1] < 1.0);
    }

    #[test]
    fn schedules_match_transformers() {
        // transformers: linear with 10 warmup of 100 -> step 5: 0.5, step 55: 0.5;
        // cosine -> step 55: 0.5, step 10: 1.0.
        assert_eq!(Schedule::Linear.factor(5, 100, 10), 0.5);
        assert_eq!(Schedule::Linear.factor(55, 100, 10), 0.5);
        assert!((Schedule::Cosine.factor(55, 100, 10) - 0.5).abs() < 1e-6);
        assert_eq!(Schedule::Cosine.factor(10, 100, 10), 1.0);
        assert_eq!(Schedule::Constant.factor(0, 100, 10), 1.0);
        assert_eq!(Schedule::ConstantWithWarmup.factor(0, 100, 10), 0.0);
        assert_eq!(warmup_steps(0.03, 100), 3);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let (a, b) = ([3.0f32, 0.0], [4.0f32]);
        let norm = global_norm(&[&a, &b]);
        assert_eq!(norm, 5.0);
        let coef = clip_coefficient(norm, 1.0).expect("5 > 1 clips");
        let (a, b) = (a.map(|x| x * coef), b.map(|x| x * coef));
        let after = global_norm(&[&a, &b]);
        assert!((after - 1.0).abs() < 1e-5, "{after}");
        assert_eq!(clip_coefficient(norm, 10.0), None);
        assert_eq!(clip_coefficient(norm, 0.0), None);
    }
}
