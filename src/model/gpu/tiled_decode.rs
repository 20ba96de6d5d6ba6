//! A layer's weights in the tiled decode layout (`backend::cuda::gemv_tiled`), for generation:
//! [`TiledDecode`] holds q|k|v as one row space, o, gate/up as pairs and down, and
//! [`GpuLlama::prepare_tiled_decode`] makes one for every layer whose shapes tile, so that the
//! decode step's fused GEMVs (`backend::cuda::decode_tiled`) read the tiled records instead of
//! the bitsandbytes layout.
//!
//! The copy costs about the 4-bit weights' size again in device memory: the code bytes again,
//! plus an f32 scale per 64 weights (the double quant decoded; 1/16 of a byte a weight more than
//! bitsandbytes' 8-bit codes at blocksize 64). It is made only when asked for (generation),
//! layer by layer while the GPU keeps room for a prefill's scratch; the layers it leaves out
//! keep the row-major kernels. `SUN_NO_TILED_DECODE=1` makes none (today's kernels throughout).

use super::weights::{GpuLayer, DOWN, GATE, K, O, Q, UP, V};
use super::GpuLlama;
use crate::backend::cuda::gemv_tiled::{row_space_units, tiled_gemv_fits, Tiled4bit, TiledLayout};
use crate::backend::cuda::CudaDevice;
use crate::error::Result;
use crate::model::device_map::dequant_scratch_bytes;

/// The environment variable that keeps the row-major fused kernels (`SUN_NO_TILED_DECODE=1`).
pub const NO_TILED_DECODE_VARIABLE: &str = "SUN_NO_TILED_DECODE";

/// Free device memory a tiled copy leaves besides the prefill's dequantize scratch.
const HEADROOM_BYTES: usize = 512 << 20;

/// One layer's linears in the tiled layout.
pub(crate) struct TiledDecode {
    /// q, k and v as one row space.
    pub(crate) qkv: Tiled4bit,
    pub(crate) o: Tiled4bit,
    /// gate (half 0) and up (half 1) of the same rows.
    pub(crate) gate_up: Tiled4bit,
    pub(crate) down: Tiled4bit,
}

impl TiledDecode {
    /// Whether every linear of `layer` tiles (64-column halves, power-of-two blocks of 64 or
    /// more, one code table for q, k, v and for gate, up; gate and up of one shape).
    pub(crate) fn fits(layer: &GpuLayer) -> bool {
        let lin = &layer.linears;
        let tiles =
            |i: usize| tiled_gemv_fits(&lin[i].weight, (lin[i].out_features, lin[i].in_features));
        let same_table = |a: usize, b: usize| {
            lin[a].weight.code_table_values() == lin[b].weight.code_table_values()
        };
        (0..lin.len()).all(tiles)
            && lin[K].in_features == lin[Q].in_features
            && lin[V].in_features == lin[Q].in_features
            && same_table(Q, K)
            && same_table(Q, V)
            && (lin[GATE].out_features, lin[GATE].in_features)
                == (lin[UP].out_features, lin[UP].in_features)
            && same_table(GATE, UP)
    }

    /// The device bytes [`TiledDecode::pack`] allocates for `layer` (which must fit).
    pub(crate) fn planned_bytes(layer: &GpuLayer) -> usize {
        let lin = &layer.linears;
        let units = |linears: &[usize]| {
            let rows: Vec<usize> = linears.iter().map(|&i| lin[i].out_features).collect();
            row_space_units(&rows).pop().unwrap_or(0)
        };
        let split = |linears: &[usize]| {
            TiledLayout::Split.bytes(units(linears), lin[linears[0]].in_features)
        };
        split(&[Q, K, V])
            + split(&[O])
            + TiledLayout::Pair.bytes(units(&[GATE]), lin[GATE].in_features)
            + split(&[DOWN])
    }

    /// Packs `layer` on `device` (its GPU), on the device's stream.
    pub(crate) fn pack(device: &CudaDevice, layer: &GpuLayer) -> Result<Self> {
        let lin = &layer.linears;
        let shape = |i: usize| (lin[i].out_features, lin[i].in_features);
        let qkv = [Q, K, V].map(|i| (&lin[i].weight, lin[i].out_features));
        Ok(TiledDecode {
            qkv: Tiled4bit::pack_rows(device, &qkv, lin[Q].in_features)?,
            o: Tiled4bit::pack(device, &lin[O].weight, shape(O))?,
            gate_up: Tiled4bit::pack_pair(
                device,
                (&lin[GATE].weight, &lin[UP].weight),
                shape(GATE),
            )?,
            down: Tiled4bit::pack(device, &lin[DOWN].weight, shape(DOWN))?,
        })
    }

    /// Device bytes of the four copies.
    pub(crate) fn bytes(&self) -> usize {
        [&self.qkv, &self.o, &self.gate_up, &self.down]
            .iter()
            .map(|t| t.bytes())
            .sum()
    }
}

impl GpuLlama<'_> {
    /// Makes the tiled copy of every layer that has none yet, where its shapes tile and its
    /// GPU keeps a prefill's scratch free after it (layers past that keep the row-major decode
    /// kernels), unless `SUN_NO_TILED_DECODE` is set or [`GpuLlama::set_tiled_decode`] turned it
    /// off. Returns the device bytes the layers' copies take in all: about the 4-bit weights'
    /// size again (see the module doc). For generation: decode steps then read the copies.
    pub fn prepare_tiled_decode(&mut self) -> Result<usize> {
        if self.tiled_decode {
            let headroom = dequant_scratch_bytes(&self.host) + HEADROOM_BYTES;
            for l in 0..self.layers.len() {
                let device = self.device_of(l);
                let layer = &self.layers[l];
                if layer.tiled.is_some() || !TiledDecode::fits(layer) {
                    continue;
                }
                let (free, _) = device.memory_info()?;
                if free < TiledDecode::planned_bytes(layer) + headroom {
                    continue;
                }
                let tiled = TiledDecode::pack(device, layer)?;
                self.layers[l].tiled = Some(tiled);
            }
        }
        Ok(self.tiled_decode_bytes())
    }

    /// Device bytes the layers' tiled copies take (0 before [`GpuLlama::prepare_tiled_decode`]).
    pub fn tiled_decode_bytes(&self) -> usize {
        self.layers
            .iter()
            .filter_map(|l| l.tiled.as_ref())
            .map(TiledDecode::bytes)
            .sum()
    }

    /// Whether decode steps read the tiled copies where [`GpuLlama::prepare_tiled_decode`] made
    /// them (the default; `SUN_NO_TILED_DECODE=1` turns it off), or the row-major kernels. Off,
    /// prepare makes none; copies already made stay, unused. A GpuKvCache made after the change
    /// records its steps anew.
    pub fn set_tiled_decode(&mut self, on: bool) {
        self.tiled_decode = on;
    }
}
