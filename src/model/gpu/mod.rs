//! The decoder on the GPU (feature `cuda`): [`GpuLlama`] wraps a loaded CPU [`Llama`] and runs
//! its forward and training passes with the CUDA kernels, bf16 activations with f32
//! accumulation and an f32 residual stream.
//!
//! The layers may be split over several GPUs (`--devices`, [`crate::model::device_map`]): each
//! GPU is a *stage* holding a contiguous run of layers with their adapters, its own activation
//! pools and its own AdamW moments; the embedding rows go to the first stage, the final norm and
//! lm_head live on the last, and the hidden states (forward) and their gradients (backward)
//! are copied from one stage to the next at the boundaries, through the host. With one GPU there
//! is one stage.
//!
//! The host model stays the owner of everything that is not arithmetic: configuration, the
//! embedding table (rows are gathered on the host and uploaded per sequence), and the adapters'
//! host copy, which checkpoints are written from. The GPU holds the frozen weights (4-bit
//! linears, f32 norms, a bf16 lm_head) and, while training, the adapters' f32 master weights,
//! gradients and AdamW moments, with bf16 copies refreshed after each optimizer step. Either
//! side may be the current one: the host after it was edited (`adapters_stale`: uploaded before
//! the next pass), the device after an optimizer step (`host_current` false: copied back by
//! `sync_host`). Dropout masks are keyed from the caller's generator in the CPU's order and made
//! on the device with the same counter-based draw, so a GPU run sees the CPU run's masks.
//!
//! - `weights`: uploading the frozen weights; `adapters`: the adapters' device state;
//! - `linear`: a 4-bit linear with its adapter, forward and backward;
//! - `layer`: one decoder layer, forward with a tape and backward;
//! - `loss`: the final norm, lm_head and cross-entropy;
//! - `optimizer`: clipping and AdamW on the device, and copying the result to the host;
//! - `reduce`: summing the gradients across the ranks of a data-parallel run;
//! - `train`: whole training and evaluation passes; `checkpoints`: where a checkpointed pass
//!   keeps the layer inputs (GPU or pinned host memory); `forward`: inference with a KV cache
//!   on the GPU.

mod adapters;
mod checkpoints;
mod decode;
mod tiled_decode;
pub use tiled_decode::NO_TILED_DECODE_VARIABLE;
mod forward;
mod layer;
mod linear;
mod loss;
mod optimizer;
mod reduce;
mod train;
mod weights;
mod workspace;

pub use forward::{GpuDecoder, GpuKvCache};
pub(crate) use layer::attention_shape;
pub(crate) use loss::loss_rows;

use self::adapters::GpuAdapter;
use self::layer::{LayerAdapters, LayerMasks, Rope};
use self::linear::DropoutMask;
use self::optimizer::OptimizerTables;
use self::weights::{layer_linears_mut, upload_head, upload_layers, GpuHead, GpuLayer, LINEARS};
use self::workspace::Pool;
use self::workspace::{Scratch, Workspace};
use crate::backend::cpu::{embedding_forward, rope_cos_sin};
use crate::backend::cuda::adamw::MomentArena;
use crate::backend::cuda::elementwise::{
    dropout_mask_from_keys, embedding_rows, upload_into, TokenIds,
};
use crate::backend::cuda::profile::span;
use crate::backend::cuda::{CudaDevice, GpuBuffer, HostStash};
use crate::error::{Error, Result};
use crate::model::device_map::{
    dequant_scratch_bytes, head_bytes, layer_bytes, place_layers, DeviceMap, WEIGHT_SHARE_PERCENT,
};
use crate::model::linear::Linear;
use crate::model::llama::Llama;
use crate::model::tape_budget::TapeUse;
use crate::rng::Rng;
use cust::memory::DeviceCopy;
use std::cell::OnceCell;
use std::rc::Rc;

/// One GPU of a model: the device and the activation buffers of the passes run on it.
struct Stage<'d> {
    device: &'d CudaDevice,
    /// Activation buffers reused from pass to pass (shared with the passes' locals).
    workspace: Rc<Workspace>,
    /// The AdamW moments of the stage's adapter factors; `None` before the first optimizer
    /// step, and on a stage without adapters.
    moments: Option<MomentArena>,
    /// The device tables of the optimizer step's multi-tensor launches, rebuilt whenever what
    /// they describe (adapters, moments) changed.
    optimizer_tables: OptimizerTables,
    /// Pinned host slots the stage's layer inputs are parked in (`--checkpoints host`); made
    /// by the first pass that parks them, kept for the next.
    stash: Option<HostStash<'d>>,
}

/// A [`Llama`] with its frozen weights and adapters on one GPU or split over several.
pub struct GpuLlama<'d> {
    /// Each layer on its stage's GPU.
    layers: Vec<GpuLayer>,
    /// On the last layer's stage.
    head: GpuHead,
    /// Per layer, the adapters of q, k, v, o, gate, up, down.
    adapters: Vec<LayerAdapters>,
    /// The host's adapters changed since they were last uploaded.
    adapters_stale: bool,
    /// The host's factors and moments equal the device's.
    host_current: bool,
    /// The device holds gradients the host has not collected.
    grads_pending: bool,
    /// Bumped whenever the adapters' device buffers are rebuilt (a recorded decode step that
    /// read them is then stale).
    adapters_version: u64,
    /// Decode steps replay recorded CUDA graphs (see [`GpuKvCache`]); off with
    /// `SUN_NO_CUDA_GRAPHS=1`.
    decode_graphs: bool,
    /// Rows run one at a time (decode steps) go through the fused layer (`decode`) where the
    /// shapes fit; off with `SUN_NO_FUSED_DECODE=1`.
    fused_decode: bool,
    /// The fused decode layer reads the layers' tiled copies where generation made them
    /// (`tiled_decode`); off with `SUN_NO_TILED_DECODE=1`.
    tiled_decode: bool,
    /// A recorded or eager decode step's kernels go with programmatic dependent launch where
    /// the GPU allows it (`backend::cuda::pdl`); off with `SUN_NO_PDL=1`.
    pdl: bool,
    /// Whether the stages' AdamW moments are paged; `None` until the first optimizer step
    /// builds them (and again after the adapters change).
    moments_paged: Option<bool>,
    /// The GPUs, in layer order.
    stages: Vec<Stage<'d>>,
    /// The stage of each decoder layer (non-decreasing).
    layer_stage: Vec<usize>,
    /// The layers whose tapes the last training pass kept, and their bytes.
    tapes_kept: TapeUse,
    /// The token embeddings (V, C) f32 on the first stage's GPU, for the passes' gathers;
    /// uploaded by the first pass that embeds a batch.
    embed_table: OnceCell<GpuBuffer<f32>>,
    host: Llama,
}

impl std::fmt::Debug for GpuLlama<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuLlama")
            .field(
                "devices",
                &self
                    .stages
                    .iter()
                    .map(|s| s.device.name())
                    .collect::<Vec<_>>(),
            )
            .field("layer_stage", &self.layer_stage)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl<'d> GpuLlama<'d> {
    /// Uploads `host`'s frozen weights and adapters to `device`. Fails when a decoder linear is
    /// dense (the GPU path runs 4-bit base weights), when the head width is not one the
    /// attention kernels support (64 or 128), or when the GPU runs out of memory.
    pub fn new(device: &'d CudaDevice, host: Llama) -> Result<Self> {
        let layers = vec![0; host.layers.len()];
        Self::with_placement(&[device], layers, host)
    }

    /// As [`GpuLlama::new`] over `devices` (in order), the layers placed by `map` from each
    /// GPU's free memory (see [`crate::model::device_map`]). One device is [`GpuLlama::new`].
    pub fn split(devices: &[&'d CudaDevice], map: DeviceMap, host: Llama) -> Result<Self> {
        let mut budgets = Vec::with_capacity(devices.len());
        for device in devices {
            let (free, _) = device.memory_info()?;
            let budget = free / 100 * WEIGHT_SHARE_PERCENT;
            budgets.push(budget.saturating_sub(dequant_scratch_bytes(&host)));
        }
        let placement = place_layers(&layer_bytes(&host), head_bytes(&host), &budgets, map)?;
        Self::with_placement(devices, placement, host)
    }

    /// Uploads layer `l` to `devices[layer_stage[l]]` (non-decreasing), the head with the last
    /// layer. GPUs no layer is placed on are left out.
    pub fn with_placement(
        devices: &[&'d CudaDevice],
        layer_stage: Vec<usize>,
        host: Llama,
    ) -> Result<Self> {
        let head_dim = host.config.head_dim;
        if head_dim != 64 && head_dim != 128 {
            return Err(Error::unsupported(format!(
                "the GPU attention kernels support head_dim 64 and 128; this model has \
                 {head_dim} (use --device cpu)"
            )));
        }
        if layer_stage.len() != host.layers.len()
            || layer_stage.windows(2).any(|w| w[0] > w[1])
            || layer_stage.iter().any(|&s| s >= devices.len())
        {
            return Err(Error::invalid(format!(
                "a layer placement must give each of the {} layers one of the {} GPUs, in \
                 order; got {layer_stage:?}",
                host.layers.len(),
                devices.len()
            )));
        }
        // Keep the GPUs that hold layers (the first one when there are none), renumbered.
        let mut used: Vec<usize> = layer_stage.clone();
        used.dedup();
        if used.is_empty() {
            used.push(0);
        }
        let stages: Vec<Stage<'d>> = used
            .iter()
            .map(|&d| Stage {
                device: devices[d],
                workspace: Rc::new(Workspace::new()),
                moments: None,
                optimizer_tables: OptimizerTables::default(),
                stash: None,
            })
            .collect();
        let layer_stage: Vec<usize> = layer_stage
            .iter()
            .map(|d| used.iter().position(|u| u == d).unwrap_or(0))
            .collect();
        let layers = upload_layers(&|l| stages[layer_stage[l]].device, &host)?;
        let head_stage = layer_stage.last().copied().unwrap_or(0);
        let head = upload_head(stages[head_stage].device, &host)?;
        let mut model = GpuLlama {
            adapters: (0..layers.len()).map(|_| [(); 7].map(|_| None)).collect(),
            layers,
            head,
            adapters_stale: true,
            host_current: true,
            grads_pending: false,
            moments_paged: None,
            adapters_version: 0,
            decode_graphs: std::env::var_os("SUN_NO_CUDA_GRAPHS").is_none(),
            fused_decode: std::env::var_os("SUN_NO_FUSED_DECODE").is_none(),
            tiled_decode: std::env::var_os(tiled_decode::NO_TILED_DECODE_VARIABLE).is_none(),
            pdl: crate::backend::cuda::pdl::allowed_by_environment(),
            stages,
            layer_stage,
            tapes_kept: TapeUse::default(),
            embed_table: OnceCell::new(),
            host,
        };
        model.sync_adapters()?;
        Ok(model)
    }

    /// The host model (configuration, adapters' master weights).
    pub fn host(&self) -> &Llama {
        &self.host
    }

    /// The GPU of the first layers (the only one unless the layers are split).
    pub fn device(&self) -> &'d CudaDevice {
        self.stages[0].device
    }

    /// Turns the replay of recorded decode steps (CUDA graphs) on or off; on by default unless
    /// `SUN_NO_CUDA_GRAPHS` is set. The logits are the same either way.
    pub fn set_decode_graphs(&mut self, on: bool) {
        self.decode_graphs = on;
    }

    /// Whether one-row forwards (decode steps) run the fused layer kernels where the shapes
    /// fit (the default; `SUN_NO_FUSED_DECODE=1` turns them off), or the kernels of a
    /// training forward.
    pub fn set_fused_decode(&mut self, on: bool) {
        self.fused_decode = on;
    }

    /// Turns programmatic dependent launch of the decode step's kernels on or off; on by
    /// default unless `SUN_NO_PDL` is set. The logits are the same either way.
    pub fn set_pdl(&mut self, on: bool) {
        self.pdl = on;
    }

    /// Whether decode steps launch their kernels with programmatic dependent launch: asked for
    /// ([`GpuLlama::set_pdl`]) and available on the GPU (`Err` says why not: off, or the GPU).
    pub fn pdl_status(&self) -> std::result::Result<(), String> {
        if !self.pdl {
            return Err(format!(
                "turned off ({}=1 or set_pdl(false))",
                crate::backend::cuda::pdl::NO_PDL_VARIABLE
            ));
        }
        match crate::backend::cuda::pdl::unavailable(self.stages[0].device) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    /// Per GPU, the name and the decoder layers it holds (a range), in layer order.
    pub fn placement(&self) -> Vec<(String, std::ops::Range<usize>)> {
        (0..self.stages.len())
            .map(|s| {
                let first = self.layer_stage.iter().position(|&x| x == s).unwrap_or(0);
                let count = self.layer_stage.iter().filter(|&&x| x == s).count();
                (
                    self.stages[s].device.name().to_string(),
                    first..first + count,
                )
            })
            .collect()
    }

    /// Device memory in use on the GPUs (total minus free, summed over the distinct cards), in
    /// bytes.
    pub fn memory_in_use(&self) -> Result<usize> {
        let mut used = 0;
        for (s, stage) in self.stages.iter().enumerate() {
            let seen = self.stages[..s]
                .iter()
                .any(|earlier| std::ptr::eq(earlier.device, stage.device));
            if !seen {
                let (free, total) = stage.device.memory_info()?;
                used += total.saturating_sub(free);
            }
        }
        Ok(used)
    }

    /// The GPU layer `l` runs on.
    fn device_of(&self, l: usize) -> &'d CudaDevice {
        self.stages[self.layer_stage[l]].device
    }

    /// The stage of the first layer (where the embeddings go).
    fn first_stage(&self) -> usize {
        self.layer_stage.first().copied().unwrap_or(0)
    }

    /// The stage of the last layer (where the head is).
    fn head_stage(&self) -> usize {
        self.layer_stage.last().copied().unwrap_or(0)
    }

    /// Every stage's workspace, for a pass to take buffers from (cloned handles, so the pass
    /// may borrow the model mutably meanwhile); each is started for `rows`.
    fn begin_pass(&self, rows: usize) -> Vec<Rc<Workspace>> {
        self.stages
            .iter()
            .map(|s| {
                s.workspace.begin(rows);
                Rc::clone(&s.workspace)
            })
            .collect()
    }

    /// Every decoder linear of the host model with its device adapter slot and the stage it
    /// runs on (index and stage), in layer order (q, k, v, o, gate, up, down within a layer).
    fn linear_slots(
        &mut self,
    ) -> impl Iterator<Item = (usize, &Stage<'d>, &mut Linear, &mut Option<GpuAdapter>)> + '_ {
        let (stages, layer_stage) = (&self.stages, &self.layer_stage);
        self.host
            .layers
            .iter_mut()
            .zip(&mut self.adapters)
            .zip(layer_stage)
            .flat_map(move |((host_layer, gpu_layer), &s)| {
                layer_linears_mut(host_layer)
                    .into_iter()
                    .zip(gpu_layer.iter_mut())
                    .map(move |(linear, slot)| (s, &stages[s], linear, slot))
            })
    }

    /// Brings the device adapters in line with the host's (presence, shape, factors, pending
    /// gradients, which move to the device) when the host's may have changed. The moments are
    /// rebuilt from the host's at the next optimizer step.
    fn sync_adapters(&mut self) -> Result<()> {
        if !self.adapters_stale {
            return Ok(());
        }
        for (_, stage, linear, slot) in self.linear_slots() {
            let device = stage.device;
            match (&mut linear.lora, slot.as_mut()) {
                (None, _) => *slot = None,
                (Some(pair), Some(adapter)) if adapter.fits(pair) => {
                    adapter.upload_factors(device, pair)?;
                    pair.zero_grad();
                }
                (Some(pair), _) => {
                    *slot = Some(GpuAdapter::new(device, pair)?);
                    pair.zero_grad();
                }
            }
        }
        self.stages
            .iter_mut()
            .for_each(|stage| stage.moments = None);
        self.moments_paged = None;
        self.adapters_version += 1;
        self.adapters_stale = false;
        self.host_current = true;
        self.grads_pending = true;
        Ok(())
    }

    /// Adds the gradients accumulated on the device into the host adapters' gradients.
    fn flush_grads(&mut self) -> Result<()> {
        if !self.grads_pending {
            return Ok(());
        }
        for (_, stage, linear, slot) in self.linear_slots() {
            if let (Some(pair), Some(adapter)) = (linear.lora.as_mut(), slot.as_mut()) {
                adapter.flush_grads(stage.device, pair)?;
            }
        }
        self.grads_pending = false;
        Ok(())
    }

    /// The embedding rows of `ids` (checked to be in the vocabulary), (T, C) f32 on the first
    /// stage's GPU, taken from its workspace `ws` and gathered there from the embedding table
    /// (uploaded by the first call). The ids come back with the rows: they must outlive the
    /// gather, and freeing a device buffer waits for the GPU, so the caller drops them when the
    /// pass is over.
    fn embed<'w>(&self, ws: &'w Workspace, ids: &[u32]) -> Result<(Scratch<'w, f32>, TokenIds)> {
        let c = &self.host.config;
        let device = self.stages[self.first_stage()].device;
        let token_ids = TokenIds::upload(device, ids, c.vocab_size)?;
        let table = match self.embed_table.get() {
            Some(table) => table,
            None => {
                let table =
                    GpuBuffer::from_host(device, "embedding table", &self.host.embed_tokens)?;
                self.embed_table.get_or_init(|| table)
            }
        };
        let mut x = ws
            .f32
            .take(device, "embeddings", ids.len() * c.hidden_size)?;
        embedding_rows(device, table, &token_ids, c.hidden_size, &mut x)?;
        Ok((x, token_ids))
    }

    /// The embedding rows of `ids` (checked to be in the vocabulary), (T, C) f32 on the host
    /// (a decode step's one row, which its recorded graph reads from a fixed buffer).
    fn embedding_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let c = &self.host.config;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the model's vocabulary of {} (wrong tokenizer?)",
                c.vocab_size
            )));
        }
        let mut rows = vec![0.0f32; ids.len() * c.hidden_size];
        embedding_forward(&mut rows, &self.host.embed_tokens, ids);
        Ok(rows)
    }

    /// RoPE angles of positions `pos0..pos0 + t`, repeated for `batch` stacked sequences, on
    /// every stage's GPU (indexed by stage).
    fn rope(&self, pos0: usize, t: usize, batch: usize) -> Result<Vec<Rope>> {
        let half = self.host.config.head_dim / 2;
        let (mut cos, mut sin) = (vec![0.0f32; t * half], vec![0.0f32; t * half]);
        rope_cos_sin(&mut cos, &mut sin, &self.host.inv_freq, pos0);
        let (cos, sin) = (cos.repeat(batch), sin.repeat(batch));
        self.stages
            .iter()
            .map(|stage| {
                Ok(Rope {
                    cos: GpuBuffer::from_host(stage.device, "rope cos", &cos)?,
                    sin: GpuBuffer::from_host(stage.device, "rope sin", &sin)?,
                })
            })
            .collect()
    }

    /// `x`, on the GPU of stage `from`, copied to stage `to`'s (a buffer of `pool`, which is
    /// `to`'s) through the host; `None` when both are the same GPU (no copy is needed).
    fn carry<'w, T: DeviceCopy + bytemuck::Zeroable>(
        &self,
        pool: &'w Pool<T>,
        x: &GpuBuffer<T>,
        (from, to): (usize, usize),
        what: &str,
    ) -> Result<Option<Scratch<'w, T>>> {
        if from == to {
            return Ok(None);
        }
        let rows = x.to_host(self.stages[from].device, what)?;
        let mut moved = pool.take(self.stages[to].device, what, rows.len())?;
        // The synchronous copy runs on the legacy stream of the current context: `to`'s, so
        // that the work queued on `to`'s streams after it (kernels, checkpoint copies) waits
        // for it.
        self.stages[to].device.bind()?;
        upload_into(&mut moved, &rows, what)?;
        Ok(Some(moved))
    }

    /// The dropout keys of a training pass over `batch` sequences, drawn from `rng` exactly as
    /// the CPU pass draws them sequence by sequence (per sequence, per layer: q, k, v, o, gate,
    /// up, down where an adapter is attached, one `next_u64` each), laid out (layer, linear,
    /// sequence) on every stage's GPU (indexed by stage); `None` without dropout.
    fn dropout_keys(
        &self,
        batch: usize,
        dropout: f32,
        rng: &mut Rng,
    ) -> Result<Option<Vec<GpuBuffer<u64>>>> {
        if dropout <= 0.0 {
            return Ok(None);
        }
        let layers = &self.host.layers;
        let mut keys = vec![0u64; layers.len() * LINEARS * batch];
        for s in 0..batch {
            for (l, layer) in layers.iter().enumerate() {
                for (i, linear) in layer.linears().iter().enumerate() {
                    if linear.lora.is_some() {
                        keys[(l * LINEARS + i) * batch + s] = rng.next_u64();
                    }
                }
            }
        }
        self.stages
            .iter()
            .map(|stage| GpuBuffer::from_host(stage.device, "dropout keys", &keys))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Layer `l`'s dropout masks for `batch` stacked sequences of `t` rows, made on the
    /// layer's GPU (`ws` is its stage's workspace) from `keys` ([`GpuLlama::dropout_keys`])
    /// with the CPU's counter-based draw (`rng::dropout_keeps`): every sequence gets the masks
    /// the CPU draws for it.
    fn layer_masks<'w>(
        &self,
        ws: &'w Workspace,
        l: usize,
        keys: Option<&Vec<GpuBuffer<u64>>>,
        (batch, t): (usize, usize),
        dropout: f32,
    ) -> Result<LayerMasks<'w>> {
        let mut masks: LayerMasks = [(); LINEARS].map(|_| None);
        let Some(keys) = keys else {
            return Ok(masks);
        };
        let (device, keys) = (self.device_of(l), &keys[self.layer_stage[l]]);
        let _span = span(device, "pass: dropout masks");
        let keep = 1.0 / (1.0 - dropout);
        for (i, (linear, slot)) in self.host.layers[l]
            .linears()
            .iter()
            .zip(masks.iter_mut())
            .enumerate()
        {
            if linear.lora.is_none() {
                continue;
            }
            let per_sequence = t * linear.in_features();
            let mut buffer = ws.u8.take(device, "dropout mask", batch * per_sequence)?;
            let first_key = (l * LINEARS + i) * batch;
            dropout_mask_from_keys(device, &mut buffer, keys, first_key, per_sequence, dropout)?;
            *slot = Some(DropoutMask { mask: buffer, keep });
        }
        Ok(masks)
    }
}
