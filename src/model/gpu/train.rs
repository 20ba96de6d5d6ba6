//! Whole-sequence passes on the GPU: the training pass (forward with per-layer checkpoints or
//! tapes, the loss head, backward into the adapters) and the evaluation loss, and
//! [`TrainModel`] for [`GpuLlama`].

use super::layer::{layer_backward, layer_forward, KvTarget, LayerMasks, LayerTape, Rope};
use super::loss::loss_head;
use super::workspace::{Scratch, Workspace};
use super::GpuLlama;
use crate::backend::cuda::elementwise::to_bf16;
use crate::backend::cuda::GpuBuffer;
use crate::error::{Error, Result};
use crate::formats::peft::AdapterConfig;
use crate::model::lora::LoraPair;
use crate::model::train_model::TrainModel;
use crate::model::train_pass::{LossSum, PassOptions};
use crate::model::Llama;
use crate::optim::OptimizerStep;
use crate::rng::Rng;
use std::path::Path;
use std::rc::Rc;

impl GpuLlama<'_> {
    /// Runs layer `l` over `x` with `masks`, returning its output (f32 and bf16) and tape.
    fn run_layer<'w>(
        &self,
        ws: &'w Workspace,
        l: usize,
        x: &GpuBuffer<f32>,
        masks: &LayerMasks<'_>,
        rope: &Rope,
    ) -> Result<(Scratch<'w, f32>, Scratch<'w, u16>, LayerTape<'w>)> {
        let mut xb = ws.bf16.take(self.device, "hidden states", x.len())?;
        to_bf16(self.device, x, &mut xb)?;
        layer_forward(
            self.device,
            ws,
            &self.host.config,
            &self.layers[l],
            &self.adapters[l],
            masks,
            x,
            xb,
            rope,
            KvTarget::Sequence,
        )
    }

    /// As [`Llama::train_sequence`], on the GPU: the summed loss, and `grad_scale x
    /// d(loss)/d(adapter)` added to the adapters' gradients (collected by
    /// [`TrainModel::adapters_mut`]).
    pub fn train_sequence(
        &mut self,
        ids: &[u32],
        labels: &[i64],
        grad_scale: f32,
        opts: PassOptions,
        rng: &mut Rng,
    ) -> Result<LossSum> {
        self.host.check_sequence(ids, labels)?;
        self.sync_adapters()?;
        let t = ids.len();
        let ws = Rc::clone(&self.workspace);
        ws.begin(t);
        let rope = self.rope(0, t)?;
        let mut x = self.embed(&ws, ids)?;
        // Forward: every layer's input (f32) and masks are kept; the tapes only without
        // checkpointing.
        let n_layers = self.layers.len();
        let mut inputs = Vec::with_capacity(n_layers);
        let mut masks = Vec::with_capacity(n_layers);
        let mut tapes = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let layer_masks = self.draw_masks(&ws, l, t, opts.lora_dropout, rng)?;
            let (y, _, tape) = self.run_layer(&ws, l, &x, &layer_masks, &rope)?;
            if !opts.gradient_checkpointing {
                tapes.push(tape);
            }
            inputs.push(std::mem::replace(&mut x, y));
            masks.push(layer_masks);
        }
        let (loss, grad) = loss_head(
            self.device,
            &ws,
            &self.host.config,
            &self.head,
            &x,
            labels,
            Some(grad_scale),
        )?;
        drop(x);
        let mut grad = grad.ok_or_else(|| {
            Error::invalid("the loss head returned no gradient for a training pass")
        })?;
        let mut dyb = grad.dxb;
        self.grads_pending = true;
        for l in (0..n_layers).rev() {
            let tape = match tapes.pop() {
                Some(tape) => tape,
                None => self.run_layer(&ws, l, &inputs[l], &masks[l], &rope)?.2,
            };
            dyb = layer_backward(
                self.device,
                &ws,
                &self.host.config,
                &self.layers[l],
                &mut self.adapters[l],
                &masks[l],
                &tape,
                &rope,
                &mut grad.dres,
                &dyb,
            )?;
        }
        Ok(loss)
    }

    /// As [`Llama::sequence_loss`], on the GPU: the summed loss without gradients or dropout.
    pub fn sequence_loss(&mut self, ids: &[u32], labels: &[i64]) -> Result<LossSum> {
        self.host.check_sequence(ids, labels)?;
        self.sync_adapters()?;
        let ws = Rc::clone(&self.workspace);
        ws.begin(ids.len());
        let rope = self.rope(0, ids.len())?;
        let mut x = self.embed(&ws, ids)?;
        let no_masks: LayerMasks = [(); 7].map(|_| None);
        for l in 0..self.layers.len() {
            x = self.run_layer(&ws, l, &x, &no_masks, &rope)?.0;
        }
        let (loss, _) = loss_head(
            self.device,
            &ws,
            &self.host.config,
            &self.head,
            &x,
            labels,
            None,
        )?;
        Ok(loss)
    }
}

impl TrainModel for GpuLlama<'_> {
    fn llama(&self) -> &Llama {
        &self.host
    }

    fn adapters_mut(&mut self) -> Result<Vec<&mut LoraPair>> {
        self.sync_host()?;
        self.flush_grads()?;
        self.adapters_stale = true;
        Ok(self.host.adapters_mut())
    }

    fn attach_adapter(&mut self, dir: &Path) -> Result<AdapterConfig> {
        self.sync_host()?;
        self.flush_grads()?;
        self.adapters_stale = true;
        self.host.attach_adapter(dir)
    }

    fn train_sequence(
        &mut self,
        ids: &[u32],
        labels: &[i64],
        grad_scale: f32,
        opts: PassOptions,
        rng: &mut Rng,
    ) -> Result<LossSum> {
        GpuLlama::train_sequence(self, ids, labels, grad_scale, opts, rng)
    }

    fn sequence_loss(&mut self, ids: &[u32], labels: &[i64]) -> Result<LossSum> {
        GpuLlama::sequence_loss(self, ids, labels)
    }

    fn optimizer_step(&mut self, opt: &OptimizerStep) -> Result<f32> {
        GpuLlama::optimizer_step(self, opt)
    }

    fn sync_host(&mut self) -> Result<()> {
        GpuLlama::sync_host(self)
    }

    fn device_name(&self) -> String {
        format!("cuda ({})", self.device.name())
    }

    fn device_memory_in_use(&self) -> Result<Option<usize>> {
        self.memory_in_use().map(Some)
    }
}
