//! The source path: the original checkpoint executed in f32, projections on candle tensors.
//!
//! `qat` mode is the training forward of BitNet b1.58: the weights fake-quantized with the
//! absmean rule (`T / s`) and the inputs fake-quantized per token (`round(x * s_x) / s_x`),
//! then a float matmul. This is the semantics the packed model must reproduce. `fp` mode runs
//! the weights as they are, with no quantization, to measure what quantization costs.

use std::borrow::Cow;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::RunError;
use super::kernels::ACT_QMAX;
use super::model::{Block, FloatMatrix, Linear, Transformer};
use crate::model::Role;
use crate::num::dtype::{decode_f32, first_non_finite};
use crate::quant::{ACTIVATION_EPS, AbsmeanScale, abs_sum_f64, round_clamp};
use crate::source::{Checkpoint, SourceTensor};

/// How the source checkpoint is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceMode {
    /// Training forward: absmean fake-quant weights, per-token int8 fake-quant activations.
    Qat,
    /// Full precision, no quantization.
    Fp,
}

/// A projection of the source checkpoint; the weights are decoded (and fake-quantized) when
/// the projection runs, so the model is never held in f32 as a whole.
pub struct SourceLinear<'a> {
    ckpt: &'a Checkpoint,
    tensor: &'a SourceTensor,
    mode: SourceMode,
}

impl SourceLinear<'_> {
    fn weights(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.tensor.numel()];
        decode_f32(self.tensor.dtype, self.ckpt.bytes(self.tensor), &mut w);
        if self.mode == SourceMode::Qat {
            let k = self.tensor.spec.shape[1];
            let sum: f64 = w
                .par_chunks(k)
                .map(abs_sum_f64)
                .collect::<Vec<f64>>()
                .iter()
                .sum();
            let sc = AbsmeanScale::from_abs_sum(sum, w.len());
            // The training forward's `round(W * s).clamp(-1, 1) / s`.
            w.par_iter_mut()
                .for_each(|v| *v = f32::from(sc.trit(*v)) / sc.inv_scale);
        }
        w
    }
}

/// The training forward's activation fake-quant, per token (row of `x`).
pub fn fake_quant_activations(x: &mut [f32], k: usize) {
    for row in x.chunks_exact_mut(k) {
        let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = ACT_QMAX / absmax.max(ACTIVATION_EPS);
        for v in row.iter_mut() {
            *v = round_clamp(*v * s, -128.0, 127.0) / s;
        }
    }
}

impl Linear for SourceLinear<'_> {
    fn in_dim(&self) -> usize {
        self.tensor.spec.shape[1]
    }
    fn out_dim(&self) -> usize {
        self.tensor.spec.shape[0]
    }
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (rows, k) = (self.out_dim(), self.in_dim());
        let mut xin = x.to_vec();
        if self.mode == SourceMode::Qat {
            fake_quant_activations(&mut xin, k);
        }
        let result = (|| -> candle_core::Result<Vec<f32>> {
            let xt = Tensor::from_vec(xin, (n, k), &Device::Cpu)?;
            let wt = Tensor::from_vec(self.weights(), (rows, k), &Device::Cpu)?;
            xt.matmul(&wt.t()?)?.flatten_all()?.to_vec1::<f32>()
        })();
        // Shapes are consistent by construction; candle's CPU matmul has no other failure mode.
        y.copy_from_slice(&result.expect("f32 CPU matmul of consistent shapes"));
    }
}

/// Builds the source model of an opened checkpoint. Every weight is checked to be finite first,
/// as convert does: a NaN would otherwise run silently into all-NaN logits.
pub fn load(
    ckpt: &Checkpoint,
    mode: SourceMode,
) -> Result<Transformer<'_, SourceLinear<'_>>, RunError> {
    for t in &ckpt.tensors {
        if let Some((index, value)) = first_non_finite(t.dtype, ckpt.bytes(t)) {
            return Err(RunError::NonFinite {
                path: ckpt.shards[t.shard].path.clone(),
                tensor: t.spec.name.clone(),
                index,
                value,
            });
        }
    }
    let cfg = ckpt.config.clone();
    let find = |role: Role, layer: Option<usize>| -> Result<&SourceTensor, RunError> {
        ckpt.tensors
            .iter()
            .find(|t| t.spec.role == role && t.spec.layer == layer)
            .ok_or_else(|| RunError::Missing {
                what: super::describe_site(role, layer),
            })
    };
    let floats = |role, layer| -> Result<Vec<f32>, RunError> {
        let t = find(role, layer)?;
        let mut v = vec![0f32; t.numel()];
        decode_f32(t.dtype, ckpt.bytes(t), &mut v);
        Ok(v)
    };
    let matrix = |t: &SourceTensor| FloatMatrix {
        dtype: t.dtype,
        bytes: Cow::Borrowed(ckpt.bytes(t)),
        rows: t.spec.shape[0],
        cols: t.spec.shape[1],
    };
    let linear = |role, l| -> Result<SourceLinear<'_>, RunError> {
        Ok(SourceLinear {
            ckpt,
            tensor: find(role, Some(l))?,
            mode,
        })
    };
    let sub = cfg.family.has_sub_norms();
    let mut blocks = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        blocks.push(Block {
            attn_norm: floats(Role::AttnNorm, Some(l))?,
            q: linear(Role::QProj, l)?,
            k: linear(Role::KProj, l)?,
            v: linear(Role::VProj, l)?,
            attn_sub_norm: if sub {
                Some(floats(Role::AttnSubNorm, Some(l))?)
            } else {
                None
            },
            o: linear(Role::OProj, l)?,
            ffn_norm: floats(Role::FfnNorm, Some(l))?,
            gate: linear(Role::GateProj, l)?,
            up: linear(Role::UpProj, l)?,
            ffn_sub_norm: if sub {
                Some(floats(Role::FfnSubNorm, Some(l))?)
            } else {
                None
            },
            down: linear(Role::DownProj, l)?,
        });
    }
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(matrix(find(Role::LmHead, None)?))
    };
    Ok(Transformer {
        embed: matrix(find(Role::Embedding, None)?),
        final_norm: floats(Role::FinalNorm, None)?,
        blocks,
        lm_head,
        config: cfg,
    })
}
