//! LoRA adapters: a trainable low-rank update beside each frozen linear layer.
//!
//! For a frozen `y = x Wᵀ` with W (out, in), the adapter adds `scale · B (A · drop(x))`, with
//! A (r, in), B (out, r), `scale = alpha / r` (or `alpha / sqrt(r)` with rsLoRA) and dropout on
//! the adapter's input only, as PEFT does. PEFT's initialisation: A uniform in ±1/sqrt(in)
//! (`kaiming_uniform_(a=sqrt(5))`), B zero, so a fresh adapter changes nothing.
//!
//! The backward pass is written out by hand:
//! ```text
//! u  = drop(x)            (N, in)       z  = u Aᵀ              (N, r)
//! y += scale · z Bᵀ       (N, out)
//! dz = scale · dy B       (N, r)        dB = scale · dyᵀ z     (out, r)
//! dA = dzᵀ u              (r, in)       dx += drop'(dz A)      (N, in)
//! ```

use crate::backend::gemm::{matmul_nt, transpose};
use crate::optim::AdamState;
use crate::rng::{dropout_mask, Rng};

/// The modules LoRA can adapt, in PEFT's names.
pub const TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// One adapter's factors, gradients and optimizer moments.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    /// A, (r, in) row-major.
    pub a: Vec<f32>,
    /// B, (out, r) row-major.
    pub b: Vec<f32>,
    /// Gradient of A.
    pub grad_a: Vec<f32>,
    /// Gradient of B.
    pub grad_b: Vec<f32>,
    /// AdamW moments of A and B: empty before the first step (and, while a GPU trains, current
    /// only after `TrainModel::sync_host`).
    pub moments: [AdamState; 2],
    /// Input width.
    pub in_features: usize,
    /// Output width.
    pub out_features: usize,
    /// Rank.
    pub rank: usize,
    /// Multiplier of `B A x`.
    pub scale: f32,
}

/// What the forward pass keeps for the backward pass.
#[derive(Clone, Debug, Default)]
pub struct LoraActivations {
    /// The adapter's input after dropout, (N, in); empty when there was no dropout (then the
    /// caller's x is the input).
    pub dropped: Vec<f32>,
    /// The dropout mask scaled by 1/(1-p), (N, in); empty without dropout.
    pub mask: Vec<f32>,
    /// z = u Aᵀ, (N, r).
    pub z: Vec<f32>,
}

impl LoraPair {
    /// A fresh adapter with PEFT's initialisation.
    pub fn init(
        in_features: usize,
        out_features: usize,
        rank: usize,
        scale: f32,
        rng: &mut Rng,
    ) -> Self {
        let bound = 1.0 / (in_features as f32).sqrt();
        let a = (0..rank * in_features)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
            .collect();
        Self::from_factors(
            a,
            vec![0.0; out_features * rank],
            in_features,
            out_features,
            rank,
            scale,
        )
    }

    /// An adapter from given factors (A (r, in), B (out, r)).
    pub fn from_factors(
        a: Vec<f32>,
        b: Vec<f32>,
        in_features: usize,
        out_features: usize,
        rank: usize,
        scale: f32,
    ) -> Self {
        assert_eq!(a.len(), rank * in_features, "LoRA A has the wrong size");
        assert_eq!(b.len(), out_features * rank, "LoRA B has the wrong size");
        LoraPair {
            grad_a: vec![0.0; a.len()],
            grad_b: vec![0.0; b.len()],
            moments: Default::default(),
            a,
            b,
            in_features,
            out_features,
            rank,
            scale,
        }
    }

    /// Adds the adapter's output to `y` (N, out) for input `x` (N, in). With `dropout > 0` a
    /// fresh mask is made from one key drawn from `rng` ([`dropout_mask`]). Returns what the
    /// backward pass needs.
    pub fn forward(
        &self,
        x: &[f32],
        y: &mut [f32],
        n: usize,
        dropout: f32,
        rng: &mut Rng,
    ) -> LoraActivations {
        let mut act = LoraActivations::default();
        if dropout > 0.0 {
            // One key per call; every element's draw is a function of (key, index), so the
            // GPU path can make the same mask on the device.
            let keep = 1.0 / (1.0 - dropout);
            let key = rng.next_u64();
            act.mask = vec![0.0; x.len()];
            dropout_mask(key, dropout, keep, &mut act.mask);
            act.dropped = x.iter().zip(&act.mask).map(|(x, m)| x * m).collect();
        }
        let u = if act.dropped.is_empty() {
            x
        } else {
            &act.dropped
        };
        act.z = vec![0.0; n * self.rank];
        matmul_nt(
            u,
            &self.a,
            n,
            self.rank,
            self.in_features,
            &mut act.z,
            false,
        ); // (N, r)
        let zs: Vec<f32> = act.z.iter().map(|v| v * self.scale).collect();
        matmul_nt(&zs, &self.b, n, self.out_features, self.rank, y, true); // (N, out)
        act
    }

    /// Accumulates dA and dB for upstream gradient `dy` (N, out) and adds the adapter's share of
    /// the input gradient to `dx` (N, in). `x` is the forward input.
    pub fn backward(
        &mut self,
        x: &[f32],
        act: &LoraActivations,
        dy: &[f32],
        dx: &mut [f32],
        n: usize,
    ) {
        let (r, din, dout) = (self.rank, self.in_features, self.out_features);
        let u = if act.dropped.is_empty() {
            x
        } else {
            &act.dropped
        };
        // dz = scale · dy B: (N, out) · (out, r), as dy · (Bᵀ)ᵀ.
        let mut bt = vec![0.0; r * dout];
        transpose(&self.b, dout, r, &mut bt); // (r, out)
        let mut dz = vec![0.0; n * r];
        matmul_nt(dy, &bt, n, r, dout, &mut dz, false);
        dz.iter_mut().for_each(|v| *v *= self.scale);
        // dB += scale · dyᵀ z: (out, N) · (N, r).
        let mut dyt = vec![0.0; dout * n];
        transpose(dy, n, dout, &mut dyt);
        let mut zt = vec![0.0; r * n];
        transpose(&act.z, n, r, &mut zt);
        zt.iter_mut().for_each(|v| *v *= self.scale);
        matmul_nt(&dyt, &zt, dout, r, n, &mut self.grad_b, true);
        // dA += dzᵀ u: (r, N) · (N, in).
        let mut dzt = vec![0.0; r * n];
        transpose(&dz, n, r, &mut dzt);
        let mut ut = vec![0.0; din * n];
        transpose(u, n, din, &mut ut);
        matmul_nt(&dzt, &ut, r, din, n, &mut self.grad_a, true);
        // dx += drop'(dz A): (N, r) · (r, in), as dz · (Aᵀ)ᵀ.
        let mut at = vec![0.0; din * r];
        transpose(&self.a, r, din, &mut at);
        if act.mask.is_empty() {
            matmul_nt(&dz, &at, n, din, r, dx, true);
        } else {
            let mut du = vec![0.0; n * din];
            matmul_nt(&dz, &at, n, din, r, &mut du, false);
            for ((d, g), m) in dx.iter_mut().zip(&du).zip(&act.mask) {
                *d += g * m;
            }
        }
    }

    /// Clears the gradients.
    pub fn zero_grad(&mut self) {
        self.grad_a.iter_mut().for_each(|g| *g = 0.0);
        self.grad_b.iter_mut().for_each(|g| *g = 0.0);
    }

    /// The merged update `scale · B A`, (out, in), to add to W.
    pub fn delta_weight(&self) -> Vec<f32> {
        let bs: Vec<f32> = self.b.iter().map(|v| v * self.scale).collect();
        let mut delta = vec![0.0; self.out_features * self.in_features];
        let mut at = vec![0.0; self.in_features * self.rank];
        transpose(&self.a, self.rank, self.in_features, &mut at);
        matmul_nt(
            &bs,
            &at,
            self.out_features,
            self.in_features,
            self.rank,
            &mut delta,
            false,
        );
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loss L = Σ y ⊙ g for a fixed random g, so dL/dy = g; gradients checked against central
    /// finite differences in f64 of the same function.
    fn loss(p: &LoraPair, x: &[f32], g: &[f32], n: usize) -> f64 {
        let mut y = vec![0.0f32; n * p.out_features];
        p.forward(x, &mut y, n, 0.0, &mut Rng::new(0));
        y.iter().zip(g).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = Rng::new(11);
        let (n, din, dout, r) = (5, 7, 6, 3);
        let mut p = LoraPair::init(din, dout, r, 2.0, &mut rng);
        p.b.iter_mut().for_each(|b| *b = rng.normal() * 0.5);
        let x: Vec<f32> = (0..n * din).map(|_| rng.normal()).collect();
        let g: Vec<f32> = (0..n * dout).map(|_| rng.normal()).collect();
        let mut y = vec![0.0; n * dout];
        let act = p.forward(&x, &mut y, n, 0.0, &mut rng);
        let mut dx = vec![0.0; n * din];
        p.backward(&x, &act, &g, &mut dx, n);
        let h = 1e-2f32;
        let check = |analytic: f32, plus: f64, minus: f64| {
            let numeric = (plus - minus) / (2.0 * h as f64);
            assert!(
                (analytic as f64 - numeric).abs() < 2e-3 * numeric.abs().max(1.0),
                "{analytic} vs {numeric}"
            );
        };
        for i in 0..p.a.len() {
            let mut q = p.clone();
            q.a[i] += h;
            let plus = loss(&q, &x, &g, n);
            q.a[i] -= 2.0 * h;
            check(p.grad_a[i], plus, loss(&q, &x, &g, n));
        }
        for i in 0..p.b.len() {
            let mut q = p.clone();
            q.b[i] += h;
            let plus = loss(&q, &x, &g, n);
            q.b[i] -= 2.0 * h;
            check(p.grad_b[i], plus, loss(&q, &x, &g, n));
        }
        for i in 0..x.len() {
            let mut xp = x.clone();
            xp[i] += h;
            let plus = loss(&p, &xp, &g, n);
            xp[i] -= 2.0 * h;
            check(dx[i], plus, loss(&p, &xp, &g, n));
        }
    }

    #[test]
    fn fresh_adapter_is_a_no_op_and_init_is_bounded() {
        let mut rng = Rng::new(1);
        let p = LoraPair::init(100, 8, 4, 4.0, &mut rng);
        assert!(p.a.iter().all(|a| a.abs() <= 0.1));
        let x: Vec<f32> = (0..200).map(|_| rng.normal()).collect();
        let mut y = vec![0.0; 16];
        p.forward(&x, &mut y, 2, 0.0, &mut rng);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn delta_weight_equals_the_adapter_output() {
        let mut rng = Rng::new(5);
        let mut p = LoraPair::init(6, 4, 2, 0.5, &mut rng);
        p.b.iter_mut().for_each(|b| *b = rng.normal());
        let x: Vec<f32> = (0..6).map(|_| rng.normal()).collect();
        let mut y = vec![0.0; 4];
        p.forward(&x, &mut y, 1, 0.0, &mut rng);
        let d = p.delta_weight();
        for o in 0..4 {
            let want: f32 = (0..6).map(|i| d[o * 6 + i] * x[i]).sum();
            assert!((want - y[o]).abs() < 1e-5);
        }
    }
}
