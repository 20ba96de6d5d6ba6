//! Fused decode-step checks: `cuda::attention::attention_decode` (RoPE of the new row, its
//! cache write and the split-key attention with the combine folded in, one kernel) at both
//! position kinds against the CPU oracle (`cpu::rope_forward` then `cpu::attention_forward`),
//! its cache against `rope_qk_into_cache`'s bit for bit, and two runs against each other.

use super::attention::reference_lse;
use super::harness::{bf16_to_f32, relative_error, Row, SplitMix64, BF16_BOUND, F32_BOUND};
use crate::backend::cpu::{attention_forward, rope_cos_sin, rope_forward};
use crate::backend::cuda::attention::{
    attention_decode, decode_scratch_len, AttentionShape, DecodeCache, DecodePosition, DecodeRow,
    DecodeScratch, DECODE_CHUNK,
};
use crate::backend::cuda::rope::{rope_qk_into_cache, QkvRows};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::Result;

/// (position, H, KV, D) of the new row (S = position + 1 keys): one key; one 32-key split
/// exactly; a split and the new row alone in a second; one recorded chunk (256 positions)
/// exactly; a chunk and the new row alone in a second; 26 splits (two a CTA, the new row in
/// the last CTA's second); three chunks and a remainder (27 splits, the last CTA one); eight
/// chunks exactly (four splits a CTA). SmolLM2's heads (9 / 3 of 64), grouped and ungrouped
/// heads of 128, MHA of 64.
const CASES: [(usize, usize, usize, usize); 11] = [
    (0, 9, 3, 64),
    (0, 8, 2, 128),
    (31, 8, 2, 128),
    (32, 9, 3, 64),
    (DECODE_CHUNK - 1, 9, 3, 64),
    (DECODE_CHUNK - 1, 8, 8, 128),
    (DECODE_CHUNK, 4, 4, 64),
    (800, 9, 3, 64),
    (3 * DECODE_CHUNK + 76, 9, 3, 64),
    (3 * DECODE_CHUNK + 76, 32, 8, 128),
    (8 * DECODE_CHUNK - 1, 32, 32, 128),
];
/// Cache rows past the new one, holding data the kernel must neither read nor write.
const CACHE_SLACK: usize = 3;
const THETA: f32 = 1e5;
/// A bf16 NaN: what the outputs hold before a run, so a run that skips a write shows.
const BF16_NAN: u16 = 0x7FC0;

/// Every case at both position kinds.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(pos, heads, kv_heads, head_dim) in &CASES {
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim,
        };
        let case = Case::random(rng, pos, shape);
        let want = case.reference();
        let separate = case.separate(gpu)?;
        for recorded in [false, true] {
            let kind = if recorded { "step" } else { "host" };
            let label = format!("S{} H{heads}/{kv_heads} D{head_dim} {kind}", pos + 1);
            rows.extend(case.fused_rows(gpu, recorded, &want, &separate, &label)?);
        }
    }
    Ok(rows)
}

/// One decode step's inputs on the host: the new row (before RoPE), the caches (rows before
/// the new one as earlier steps left them, the rest random) and the angle tables.
struct Case {
    pos: usize,
    shape: AttentionShape,
    q: (Vec<u16>, Vec<f32>),
    k: (Vec<u16>, Vec<f32>),
    v: (Vec<u16>, Vec<f32>),
    keys: (Vec<u16>, Vec<f32>),
    values: (Vec<u16>, Vec<f32>),
    cos: Vec<f32>, // (positions, D/2)
    sin: Vec<f32>, // (positions, D/2)
}

/// `rope_qk_into_cache`'s results on a case (the kernel a chunk of rows still runs): the caches
/// after it, and the f64 log-sum-exp (H) of its rotated q against the keys it leaves.
struct Separate {
    keys: Vec<u16>,
    values: Vec<u16>,
    lse: Vec<f32>,
}

/// A case's buffers on the GPU.
struct Device {
    q: GpuBuffer<u16>,
    k: GpuBuffer<u16>,
    v: GpuBuffer<u16>,
    keys: GpuBuffer<u16>,
    values: GpuBuffer<u16>,
    cos: GpuBuffer<f32>,
    sin: GpuBuffer<f32>,
}

impl Case {
    fn random(rng: &mut SplitMix64, pos: usize, shape: AttentionShape) -> Self {
        let (q_dim, kv_dim) = (
            shape.heads * shape.head_dim,
            shape.kv_heads * shape.head_dim,
        );
        let positions = pos + 1 + CACHE_SLACK;
        let half = shape.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / THETA.powf(2.0 * i as f32 / shape.head_dim as f32))
            .collect();
        let (mut cos, mut sin) = (
            vec![0.0f32; positions * half],
            vec![0.0f32; positions * half],
        );
        rope_cos_sin(&mut cos, &mut sin, &inv_freq, 0);
        Case {
            pos,
            shape,
            q: rng.bf16s(q_dim, -2.0, 2.0),
            k: rng.bf16s(kv_dim, -2.0, 2.0),
            v: rng.bf16s(kv_dim, -1.0, 1.0),
            keys: rng.bf16s(positions * kv_dim, -2.0, 2.0),
            values: rng.bf16s(positions * kv_dim, -1.0, 1.0),
            cos,
            sin,
        }
    }

    /// The output (H·D): RoPE of q and k at `pos` then attention over the cache's rows before
    /// it and the new row, in f32 on the CPU.
    fn reference(&self) -> Vec<f32> {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim,
        } = self.shape;
        let half = head_dim / 2;
        let kv_dim = kv_heads * head_dim;
        let angles = self.pos * half..(self.pos + 1) * half;
        let (cos, sin) = (&self.cos[angles.clone()], &self.sin[angles]);
        let mut q = self.q.1.clone();
        let mut k = self.k.1.clone();
        rope_forward(&mut q, cos, sin, head_dim);
        rope_forward(&mut k, cos, sin, head_dim);
        let rows = self.pos + 1;
        let mut keys = self.keys.1[..rows * kv_dim].to_vec();
        let mut values = self.values.1[..rows * kv_dim].to_vec();
        keys[self.pos * kv_dim..].copy_from_slice(&k);
        values[self.pos * kv_dim..].copy_from_slice(&self.v.1);
        let mut out = vec![0.0f32; heads * head_dim];
        attention_forward(
            &mut out, &q, &keys, &values, self.pos, heads, kv_heads, head_dim,
        );
        out
    }

    fn upload(&self, gpu: &CudaDevice) -> Result<Device> {
        Ok(Device {
            q: GpuBuffer::from_host(gpu, "decode q", &self.q.0)?,
            k: GpuBuffer::from_host(gpu, "decode k", &self.k.0)?,
            v: GpuBuffer::from_host(gpu, "decode v", &self.v.0)?,
            keys: GpuBuffer::from_host(gpu, "decode key cache", &self.keys.0)?,
            values: GpuBuffer::from_host(gpu, "decode value cache", &self.values.0)?,
            cos: GpuBuffer::from_host(gpu, "decode cos table", &self.cos)?,
            sin: GpuBuffer::from_host(gpu, "decode sin table", &self.sin)?,
        })
    }

    /// `rope_qk_into_cache` at `pos` on the case's inputs, and the f64 log-sum-exp of its
    /// rotated q against the cache it leaves.
    fn separate(&self, gpu: &CudaDevice) -> Result<Separate> {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim,
        } = self.shape;
        let mut dev = self.upload(gpu)?;
        let rows = QkvRows {
            q: &mut dev.q,
            k: &mut dev.k,
            v: &dev.v,
        };
        let caches = (&mut dev.keys, &mut dev.values);
        let heads_of = (heads, kv_heads, head_dim);
        rope_qk_into_cache(gpu, rows, (&dev.cos, &dev.sin), caches, self.pos, heads_of)?;
        let keys = dev.keys.to_host(gpu, "decode key cache")?;
        let values = dev.values.to_host(gpu, "decode value cache")?;
        let q = bf16_to_f32(&dev.q.to_host(gpu, "decode q")?);
        let lse = reference_lse(&q, &bf16_to_f32(&keys), self.pos, self.shape);
        Ok(Separate { keys, values, lse })
    }

    /// The fused kernel at the host's position or one read from device memory: its output
    /// against the oracle, lse against the f64 one, the caches (and q, k left as they came)
    /// against `rope_qk_into_cache`'s bits, a second run against the first (bits, the outputs
    /// poisoned in between, the arrival counters back at zero), and, for the recorded kind, a
    /// position outside the cache doing nothing.
    fn fused_rows(
        &self,
        gpu: &CudaDevice,
        recorded: bool,
        want: &[f32],
        separate: &Separate,
        label: &str,
    ) -> Result<Vec<Row>> {
        let mut dev = self.upload(gpu)?;
        let heads = self.shape.heads;
        let mut scratch = Scratch {
            partials: GpuBuffer::zeroed(
                gpu,
                "decode partials",
                decode_scratch_len(self.pos + 1, self.shape),
            )?,
            arrivals: GpuBuffer::zeroed(gpu, "decode arrivals", heads)?,
        };
        let step = GpuBuffer::from_host(gpu, "decode position", &[self.pos as i64])?;
        let at = if recorded {
            DecodePosition::Step {
                step: &step,
                recorded: self.pos,
            }
        } else {
            DecodePosition::At(self.pos)
        };
        let (first_out, first_lse) = self.launch(gpu, &mut dev, at, &mut scratch)?;
        let mut rows = vec![
            Row::new(
                "attention decode fused bf16",
                label,
                relative_error(&bf16_to_f32(&first_out), want),
                BF16_BOUND,
            ),
            Row::new(
                "attention decode fused lse f32",
                label,
                relative_error(&first_lse, &separate.lse),
                F32_BOUND,
            ),
        ];
        let untouched = dev.q.to_host(gpu, "decode q")? == self.q.0
            && dev.k.to_host(gpu, "decode k")? == self.k.0;
        let cache_equal = dev.keys.to_host(gpu, "decode key cache")? == separate.keys
            && dev.values.to_host(gpu, "decode value cache")? == separate.values;
        rows.push(Row::new(
            "attention decode fused cache = rope_qk_into_cache (exact)",
            label,
            if cache_equal && untouched { 0.0 } else { 1.0 },
            0.0,
        ));

        let (again_out, again_lse) = self.launch(gpu, &mut dev, at, &mut scratch)?;
        let same = again_out == first_out && bits(&again_lse) == bits(&first_lse);
        rows.push(Row::new(
            "attention decode fused run twice, arrivals 0 (exact)",
            label,
            if same && scratch.arrivals_zero(gpu)? {
                0.0
            } else {
                1.0
            },
            0.0,
        ));

        if recorded {
            // The position in device memory past the cache's rows (the grid still that of the
            // recorded position): no CTA may write anything.
            let positions = self.keys.0.len() / (self.shape.kv_heads * self.shape.head_dim);
            let outside = GpuBuffer::from_host(gpu, "decode position", &[positions as i64])?;
            let at = DecodePosition::Step {
                step: &outside,
                recorded: self.pos,
            };
            let mut fresh = self.upload(gpu)?;
            let (idle_out, idle_lse) = self.launch(gpu, &mut fresh, at, &mut scratch)?;
            let idle = idle_out.iter().all(|&b| b == BF16_NAN)
                && idle_lse.iter().all(|x| x.is_nan())
                && fresh.keys.to_host(gpu, "decode key cache")? == self.keys.0
                && fresh.values.to_host(gpu, "decode value cache")? == self.values.0
                && scratch.arrivals_zero(gpu)?;
            rows.push(Row::new(
                "attention decode fused step outside the cache: no writes (exact)",
                label,
                if idle { 0.0 } else { 1.0 },
                0.0,
            ));
        }
        Ok(rows)
    }

    /// One fused launch on `dev` into outputs poisoned with NaN first: (out, lse) on the host.
    fn launch(
        &self,
        gpu: &CudaDevice,
        dev: &mut Device,
        at: DecodePosition<'_>,
        scratch: &mut Scratch,
    ) -> Result<(Vec<u16>, Vec<f32>)> {
        let heads = self.shape.heads;
        let q_len = heads * self.shape.head_dim;
        let mut out = GpuBuffer::from_host(gpu, "decode out", &vec![BF16_NAN; q_len])?;
        let mut lse = GpuBuffer::from_host(gpu, "decode lse", &vec![f32::NAN; heads])?;
        let row = DecodeRow {
            q: &dev.q,
            k: &dev.k,
            v: &dev.v,
        };
        let cache = DecodeCache {
            keys: &mut dev.keys,
            values: &mut dev.values,
            cos: &dev.cos,
            sin: &dev.sin,
        };
        let scratch = DecodeScratch {
            partials: &mut scratch.partials,
            arrivals: &mut scratch.arrivals,
        };
        let outs = (&mut out, &mut lse);
        attention_decode(gpu, row, cache, at, outs, self.shape, scratch)?;
        Ok((
            out.to_host(gpu, "decode out")?,
            lse.to_host(gpu, "decode lse")?,
        ))
    }
}

/// The partials and arrival counters one case's launches share.
struct Scratch {
    partials: GpuBuffer<f32>,
    arrivals: GpuBuffer<u32>,
}

impl Scratch {
    /// Whether every arrival counter is zero (as each launch must leave them).
    fn arrivals_zero(&self, gpu: &CudaDevice) -> Result<bool> {
        let counters = self.arrivals.to_host(gpu, "decode arrivals")?;
        Ok(counters.iter().all(|&c| c == 0))
    }
}

/// The bit patterns of f32 values (NaN-safe equality).
fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|x| x.to_bits()).collect()
}
