//! Inference on the GPU: a KV cache in device memory ([`GpuKvCache`]) and the forward over a
//! chunk of tokens that extends it (prefill with the tensor-core matmuls, decode steps with the
//! 4-bit GEMV and attention's decode variant), the lm_head on the GPU and the logits back on
//! the host for sampling. [`GpuDecoder`] pairs a model with its cache for
//! [`crate::sampling::generate_with`] and [`crate::eval::perplexity_with`].

use super::decode::{layer_decode, layer_decode_fits, DecodeCache};
use super::layer::{layer_forward, KvTarget, LayerMasks, Rope};
use super::workspace::{Scratch, Workspace};
use super::GpuLlama;
use crate::backend::cuda::attention::DECODE_CHUNK;
use crate::backend::cuda::elementwise::{gather_rows, to_bf16, upload_into, RowIndex};
use crate::backend::cuda::gemv::matmul_nt_bf16_by_rows;
use crate::backend::cuda::graph::GpuGraph;
use crate::backend::cuda::matmul::GemmShape;
use crate::backend::cuda::norm::rmsnorm_forward;
use crate::backend::cuda::profile::{host_span, span};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::{Error, Result};
use crate::sampling::CachedDecoder;
use half::bf16;
use std::rc::Rc;

/// What a recorded decode step depends on besides the buffers it was recorded with: the number
/// of key chunks of its attention (its grid), the workspace's pools (their buffers), and the
/// adapters' device buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GraphKey {
    chunks: usize,
    workspace: u64,
    adapters: u64,
}

/// The fixed buffers a recorded decode step reads and writes: the token's embedding row, its
/// position, and the logits.
struct StepIo {
    x: GpuBuffer<f32>,      // (C)
    step: GpuBuffer<i64>,   // (1) the position
    logits: GpuBuffer<u16>, // (V) bf16
}

/// A recorded decode step and what it was recorded for.
struct DecodeGraph {
    key: GraphKey,
    graph: GpuGraph,
}

/// Rotated keys and values of up to `max_len` positions for every layer, in device memory (each
/// layer's on its GPU), and the RoPE angles of those positions on every GPU.
///
/// On one GPU, decode steps (one token) are replayed from a CUDA graph held here: the first step
/// of a kind runs its ~1,000 kernels one by one (so every buffer it needs exists), the next
/// records them, and the steps after replay the recording with one launch, the position read
/// from device memory. A new kind (another count of attention key chunks, every 256 positions;
/// pools freed by a pass of another length; adapters re-uploaded) starts over.
/// `SUN_NO_CUDA_GRAPHS=1` turns this off.
pub struct GpuKvCache {
    keys: Vec<GpuBuffer<u16>>,   // per layer (max_len, KV * D) bf16
    values: Vec<GpuBuffer<u16>>, // per layer (max_len, KV * D) bf16
    /// The angles of positions 0..max_len, made once per GPU (indexed by stage): a step reads
    /// its positions' rows.
    rope: Vec<Rope>, // per stage (max_len, D/2) cos and sin
    len: usize,
    max_len: usize,
    /// The recorded decode step's inputs and output, once a step was recorded.
    step_io: Option<StepIo>,
    graph: Option<DecodeGraph>,
    /// The kind of the last step run one kernel at a time (recorded at the next of its kind).
    warm: Option<GraphKey>,
    /// Decode steps run by launching a recorded graph (recording included).
    graph_steps: usize,
}

impl GpuKvCache {
    /// An empty cache of `max_len` positions for `model`.
    pub fn new(model: &GpuLlama<'_>, max_len: usize) -> Result<Self> {
        if max_len == 0 {
            return Err(Error::invalid("a KV cache needs at least one position"));
        }
        let c = &model.host.config;
        let size = max_len * c.kv_dim();
        let mut keys = Vec::with_capacity(c.num_hidden_layers);
        let mut values = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let device = model.device_of(l);
            keys.push(GpuBuffer::zeroed(device, "KV cache keys", size)?);
            values.push(GpuBuffer::zeroed(device, "KV cache values", size)?);
        }
        Ok(GpuKvCache {
            keys,
            values,
            rope: model.rope(0, max_len, 1)?,
            len: 0,
            max_len,
            step_io: None,
            graph: None,
            warm: None,
            graph_steps: 0,
        })
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions it holds.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Decode steps so far that ran as a recorded CUDA graph (see [`GpuKvCache`]).
    pub fn graph_steps(&self) -> usize {
        self.graph_steps
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps the first `len` positions (the rows past them are overwritten by later steps).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl GpuLlama<'_> {
    /// As [`crate::model::Llama::forward`], on the GPU: runs `tokens` at positions
    /// `cache.len()..`, extends the cache and returns the logits, (T, V) or only the last row
    /// when `last_only`. Fails, leaving the cache untouched, on an empty chunk, an id outside
    /// the vocabulary, or tokens that do not fit.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        cache: &mut GpuKvCache,
        last_only: bool,
    ) -> Result<Vec<f32>> {
        let c = self.host.config.clone();
        if tokens.is_empty() {
            return Err(Error::invalid("forward: no tokens to run"));
        }
        if cache.keys.len() != c.num_hidden_layers
            || cache.keys.first().map(|k| k.len()) != Some(cache.max_len * c.kv_dim())
            || cache.rope.len() != self.stages.len()
            || cache
                .rope
                .iter()
                .any(|r| r.cos.len() != cache.max_len * (c.head_dim / 2))
        {
            return Err(Error::invalid(
                "the KV cache was made for a model of another shape",
            ));
        }
        if tokens.len() > cache.max_len - cache.len {
            return Err(Error::invalid(format!(
                "{} new tokens do not fit the context: {} of its {} positions are used",
                tokens.len(),
                cache.len,
                cache.max_len
            )));
        }
        self.sync_adapters()?;
        if let ([token], 1, true) = (tokens, self.stages.len(), self.decode_graphs) {
            return self.decode_with_graph(*token, cache);
        }
        let (t, pos0) = (tokens.len(), cache.len);
        let wss = self.begin_pass(t);
        let mut stage = self.first_stage();
        let (mut x, _token_ids) = self.embed(&wss[stage], tokens)?;
        // (T, C) bf16 copy of the residual stream; each layer's residual add writes the next,
        // and a GPU boundary remakes it from the f32 stream carried across.
        let device = self.stages[stage].device;
        let mut xb = wss[stage].bf16.take(device, "hidden states", x.len())?;
        to_bf16(device, &x, &mut xb)?;
        for l in 0..self.layers.len() {
            let (s, device) = (self.layer_stage[l], self.device_of(l));
            let ws = &wss[s];
            if let Some(moved) = self.carry(&ws.f32, &x, (stage, s), "hidden states")? {
                (x, stage) = (moved, s);
                xb = ws.bf16.take(device, "hidden states", x.len())?;
                to_bf16(device, &x, &mut xb)?;
            }
            let slot = (&mut cache.keys[l], &mut cache.values[l], pos0, None);
            (x, xb) = self.layer_step(device, ws, l, &x, xb, &cache.rope[s], slot)?;
        }
        cache.len += t;

        let hidden = c.hidden_size;
        let (ws, device) = (&wss[stage], self.stages[self.head_stage()].device);
        let mut normed = ws.bf16.take(device, "final norm", x.len())?;
        rmsnorm_forward(device, &mut normed, &xb, &self.head.norm, c.rms_norm_eps)?;
        let (rows, n) = if last_only && t > 1 {
            let index = RowIndex::upload(device, &[t - 1], t)?;
            let mut last = ws.bf16.take(device, "last row", hidden)?;
            gather_rows(device, &normed, &index, hidden, &mut last)?;
            (last, 1)
        } else {
            (normed, t)
        };
        let mut logits = ws.bf16.take(device, "logits", n * c.vocab_size)?;
        self.lm_head(device, &rows, n, &mut logits)?;
        logits_to_host(device, &logits)
    }

    /// Runs layer `l` over the rows `x (T, C)` (with `xb`, their bf16 copy) at `pos0..` of its
    /// cache `(keys, values, pos0, step)` (see [`KvTarget::Cache`]): one row goes through the
    /// fused decode layer where its shapes fit (unless turned off), else the training forward's
    /// kernels. Returns the output, f32 and bf16.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn layer_step<'w>(
        &self,
        device: &CudaDevice,
        ws: &'w Workspace,
        l: usize,
        x: &GpuBuffer<f32>,
        xb: Scratch<'w, u16>,
        rope: &Rope,
        (keys, values, pos0, step): (
            &mut GpuBuffer<u16>,
            &mut GpuBuffer<u16>,
            usize,
            Option<&GpuBuffer<i64>>,
        ),
    ) -> Result<(Scratch<'w, f32>, Scratch<'w, u16>)> {
        let (c, layer, adapters) = (&self.host.config, &self.layers[l], &self.adapters[l]);
        let one_row = x.len() == c.hidden_size;
        if one_row && self.fused_decode && layer_decode_fits(device, c, layer) {
            let cache = DecodeCache {
                keys,
                values,
                pos0,
                step,
            };
            let tiled = layer.tiled.as_ref().filter(|_| self.tiled_decode);
            return layer_decode(device, ws, c, (layer, tiled), adapters, x, xb, rope, cache);
        }
        let kv = KvTarget::Cache {
            keys,
            values,
            pos0,
            step,
        };
        let no_masks: LayerMasks = [(); 7].map(|_| None);
        let (y, yb, _tape) =
            layer_forward(device, ws, c, layer, adapters, &no_masks, x, xb, rope, kv)?;
        Ok((y, yb))
    }

    /// Queues `logits (n, V) = rows (n, C) · lm_headᵀ` on the head's GPU.
    fn lm_head(
        &self,
        device: &CudaDevice,
        rows: &GpuBuffer<u16>,
        n: usize,
        logits: &mut GpuBuffer<u16>,
    ) -> Result<()> {
        let c = &self.host.config;
        let shape = GemmShape {
            m: n,
            n: c.vocab_size,
            k: c.hidden_size,
        };
        matmul_nt_bf16_by_rows(device, rows, &self.head.weight, logits, shape, 1.0, 0.0)
    }

    /// One decode step (`token` at position `cache.len()`) on a one-GPU model, through the
    /// cache's recorded graph (see [`GpuKvCache`]); the logits of the one row.
    fn decode_with_graph(&mut self, token: u32, cache: &mut GpuKvCache) -> Result<Vec<f32>> {
        let _host = host_span("decode host: the whole step");
        let uploads = host_span("decode host: inputs up");
        let c = &self.host.config;
        let device = self.stages[0].device;
        let ws = Rc::clone(&self.stages[0].workspace);
        ws.begin(1);
        let pos0 = cache.len;
        let key = GraphKey {
            chunks: (pos0 + 1).div_ceil(DECODE_CHUNK),
            workspace: ws.generation(),
            adapters: self.adapters_version,
        };
        let io = match &mut cache.step_io {
            Some(io) => io,
            empty => empty.insert(StepIo {
                x: GpuBuffer::zeroed(device, "decode step input", c.hidden_size)?,
                step: GpuBuffer::zeroed(device, "decode step position", 1)?,
                logits: GpuBuffer::zeroed(device, "decode step logits", c.vocab_size)?,
            }),
        };
        upload_into(&mut io.x, &self.embedding_rows(&[token])?, "embeddings")?;
        upload_into(&mut io.step, &[pos0 as i64], "decode position")?;
        let (keys, values, rope) = (&mut cache.keys, &mut cache.values, &cache.rope[0]);
        drop(uploads);
        let step_span = span(device, "decode step (GPU)");
        match &cache.graph {
            Some(recorded) if recorded.key == key => {
                let _launch = host_span("decode host: graph launch call");
                recorded.graph.launch(device)?;
                cache.graph_steps += 1;
            }
            _ if cache.warm == Some(key) => {
                let ((), graph) = GpuGraph::capture(device, || {
                    self.decode_kernels(&ws, io, (keys, values), rope, pos0)
                })
                .map_err(|e| {
                    Error::Device(format!(
                        "recording a decode step as a CUDA graph: {e} (SUN_NO_CUDA_GRAPHS=1 \
                         decodes without graphs)"
                    ))
                })?;
                graph.launch(device)?;
                cache.graph = Some(DecodeGraph { key, graph });
                cache.graph_steps += 1;
            }
            _ => {
                self.decode_kernels(&ws, io, (keys, values), rope, pos0)?;
                cache.warm = Some(key);
            }
        }
        drop(step_span);
        cache.len += 1;
        let _download = host_span("decode host: logits down (waits)");
        logits_to_host(device, &io.logits)
    }

    /// Queues a decode step's kernels, launches only (what a graph records): `io.x` through
    /// every layer, its keys and values into row `*io.step` of the cache, the logits into
    /// `io.logits`. `pos0` is the position `io.step` will hold (it sets the attention's grid).
    /// With PDL on ([`GpuLlama::pdl_status`]) the kernels that support it are launched with
    /// programmatic dependent launch (`backend::cuda::pdl`), which a capture records.
    fn decode_kernels(
        &self,
        ws: &Workspace,
        io: &mut StepIo,
        cache: (&mut [GpuBuffer<u16>], &mut [GpuBuffer<u16>]),
        rope: &Rope,
        pos0: usize,
    ) -> Result<()> {
        let device = self.stages[0].device;
        let pdl = self.pdl_status().is_ok();
        device.with_programmatic_launches(pdl, || {
            self.decode_step_launches(ws, io, cache, rope, pos0)
        })
    }

    /// The launches of [`GpuLlama::decode_kernels`].
    fn decode_step_launches(
        &self,
        ws: &Workspace,
        io: &mut StepIo,
        (keys, values): (&mut [GpuBuffer<u16>], &mut [GpuBuffer<u16>]),
        rope: &Rope,
        pos0: usize,
    ) -> Result<()> {
        let (c, device) = (&self.host.config, self.stages[0].device);
        let mut xb = ws.bf16.take(device, "hidden states", c.hidden_size)?;
        to_bf16(device, &io.x, &mut xb)?;
        let mut x = None;
        for (l, (keys, values)) in keys.iter_mut().zip(values.iter_mut()).enumerate() {
            let input = x.as_deref().unwrap_or(&io.x);
            let slot = (keys, values, pos0, Some(&io.step));
            let (y, yb) = self.layer_step(device, ws, l, input, xb, rope, slot)?;
            (x, xb) = (Some(y), yb);
        }
        let mut normed = ws.bf16.take(device, "final norm", c.hidden_size)?;
        rmsnorm_forward(device, &mut normed, &xb, &self.head.norm, c.rms_norm_eps)?;
        self.lm_head(device, &normed, 1, &mut io.logits)
    }
}

/// bf16 logits copied to the host as f32 (waits for the GPU).
fn logits_to_host(device: &CudaDevice, logits: &GpuBuffer<u16>) -> Result<Vec<f32>> {
    let bits = logits.to_host(device, "logits")?;
    Ok(bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect())
}

/// A GPU model with its KV cache: what generation and perplexity run on.
pub struct GpuDecoder<'m, 'd> {
    model: &'m mut GpuLlama<'d>,
    cache: GpuKvCache,
}

impl<'m, 'd> GpuDecoder<'m, 'd> {
    /// `model` with a fresh cache of `max_len` positions.
    pub fn new(model: &'m mut GpuLlama<'d>, max_len: usize) -> Result<Self> {
        let cache = GpuKvCache::new(model, max_len)?;
        Ok(GpuDecoder { model, cache })
    }

    /// [`GpuDecoder::new`] for generation: the layers' tiled decode copies are made after the
    /// cache ([`GpuLlama::prepare_tiled_decode`]: about the 4-bit weights' size again in
    /// device memory), so that decode steps read them.
    pub fn for_generation(model: &'m mut GpuLlama<'d>, max_len: usize) -> Result<Self> {
        let cache = GpuKvCache::new(model, max_len)?;
        model.prepare_tiled_decode()?;
        Ok(GpuDecoder { model, cache })
    }

    /// Keeps the first `len` cached positions.
    pub fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
    }
}

impl CachedDecoder for GpuDecoder<'_, '_> {
    fn forward(&mut self, tokens: &[u32], last_only: bool) -> Result<Vec<f32>> {
        let _host = host_span("decoder forward call (host)");
        self.model.forward(tokens, &mut self.cache, last_only)
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
        self.model.host.config.vocab_size
    }
}
