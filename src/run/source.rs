//! The source path: the original checkpoint executed in f32, projections on candle tensors.
//!
//! `qat` mode is the training forward: the weights fake-quantized with the absmean rule
//! (`T / s`) and the inputs fake-quantized per token with the scheme's quantizer (`q / s_x`),
//! then a float matmul, with the scheme's online transforms and attention-state quantizers.
//! This is the semantics the packed model must reproduce. `fp` mode runs the weights as they
//! are (rotated, if the scheme says so), with no quantization, to measure what quantization
//! costs.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::RunError;
use super::assemble::{Parts, assemble};
use super::model::{FloatMatrix, Linear, MatrixType, Transformer};
use super::plan::QuantPlan;
use crate::format::header::QuantScheme;
use crate::model::Role;
use crate::num::FloatDtype;
use crate::num::dtype::{decode_f32, encode_f32, first_non_finite};
use crate::quant::{AbsmeanScale, ActQuant, abs_sum_f64};
use crate::source::{Checkpoint, SourceTensor};
use crate::transform::Rotation;

/// How the source checkpoint is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceMode {
    /// Training forward: absmean fake-quant weights, per-token int8 fake-quant activations.
    Qat,
    /// Full precision, no quantization.
    Fp,
}

/// A projection of the source checkpoint; the weights are decoded (rotated, fake-quantized)
/// when the projection runs, so the model is never held in f32 as a whole.
pub struct SourceLinear<'a> {
    ckpt: &'a Checkpoint,
    tensor: &'a SourceTensor,
    mode: SourceMode,
    /// The quantizer of the input (`None` in `fp` mode).
    act: ActQuant,
    /// A rotation folded into the weights before they are ternarized, and the norm gain that
    /// goes with it for a reader.
    fold: Option<(Arc<Rotation>, Option<Vec<f32>>)>,
}

impl SourceLinear<'_> {
    fn weights(&self) -> Vec<f32> {
        if let Some(ts) = &self.tensor.ternary {
            // Already ternary: `a * trit` in both modes (there are no other weights to run).
            // The trits were checked when the model was loaded.
            let trits = self
                .ckpt
                .trits(self.tensor)
                .expect("trits checked by source::load");
            return trits.iter().map(|&t| ts.a * f32::from(t)).collect();
        }
        let mut w = vec![0f32; self.tensor.numel()];
        decode_f32(self.tensor.dtype, self.ckpt.bytes(self.tensor), &mut w);
        let k = self.tensor.spec.shape[1];
        if let Some((rotation, gain)) = &self.fold {
            rotation.fold(self.tensor.spec.role, &mut w, k, gain.as_deref());
        }
        if self.mode == SourceMode::Qat {
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
        xin.chunks_exact_mut(k)
            .for_each(|token| self.act.fake_quant(token));
        let result = (|| -> candle_core::Result<Vec<f32>> {
            let xt = Tensor::from_vec(xin, (n, k), &Device::Cpu)?;
            let wt = Tensor::from_vec(self.weights(), (rows, k), &Device::Cpu)?;
            xt.matmul(&wt.t()?)?.flatten_all()?.to_vec1::<f32>()
        })();
        // Shapes are consistent by construction; candle's CPU matmul has no other failure mode.
        y.copy_from_slice(&result.expect("f32 CPU matmul of consistent shapes"));
    }
}

/// Builds the source model of an opened checkpoint in `mode`, with the quantization `scheme`
/// it is compared under (the scheme its config implies, or the one a conversion recorded;
/// [`crate::convert::scheme`]). A residual rotation in the scheme is folded into the weights as
/// the conversion folded it. Every weight is checked to be finite first, as convert does: a NaN
/// would otherwise run silently into all-NaN logits.
pub fn load<'a>(
    ckpt: &'a Checkpoint,
    mode: SourceMode,
    scheme: &QuantScheme,
) -> Result<Transformer<'a, SourceLinear<'a>>, RunError> {
    for t in &ckpt.tensors {
        if t.ternary.is_some() {
            // Its scale was checked on opening; its codes are checked here, once.
            ckpt.trits(t).map_err(|e| RunError::Source(Box::new(e)))?;
            continue;
        }
        if let Some((index, value)) = first_non_finite(t.dtype, ckpt.bytes(t)) {
            return Err(RunError::NonFinite {
                path: ckpt.shards[t.shard].path.clone(),
                tensor: t.spec.name.clone(),
                index: crate::convert::unravel(index, &t.spec.shape),
                value,
            });
        }
    }
    let mut cfg = ckpt.config.clone();
    let rotation = match &scheme.residual_rotation {
        Some(r) => Some(Arc::new(Rotation::new(&cfg, r.seed, &r.online).map_err(
            |e| RunError::UnsupportedScheme {
                reason: e.to_string(),
            },
        )?)),
        None => None,
    };
    if rotation.is_some() {
        // The rotated head is no longer the embedding.
        cfg.tie_word_embeddings = false;
    }
    let plan = QuantPlan::new(scheme, &cfg)?;
    let plan = match mode {
        SourceMode::Qat => plan,
        SourceMode::Fp => plan.unquantized(),
    };
    let parts = SourceParts {
        ckpt,
        mode,
        rotation,
    };
    assemble(cfg, plan, &parts)
}

/// Tensors of a source checkpoint, rotated if the scheme says so.
struct SourceParts<'a> {
    ckpt: &'a Checkpoint,
    mode: SourceMode,
    rotation: Option<Arc<Rotation>>,
}

impl<'a> SourceParts<'a> {
    fn find(&self, role: Role, layer: Option<usize>) -> Result<&'a SourceTensor, RunError> {
        self.ckpt
            .tensors
            .iter()
            .find(|t| t.spec.role == role && t.spec.layer == layer)
            .ok_or_else(|| RunError::Missing {
                what: super::describe_site(role, layer),
            })
    }

    fn decoded(&self, t: &SourceTensor) -> Vec<f32> {
        let mut v = vec![0f32; t.numel()];
        decode_f32(t.dtype, self.ckpt.bytes(t), &mut v);
        v
    }

    /// The gain folded into a reader of `role` in block `layer` (with a rotation).
    fn gain_for(&self, role: Role, layer: Option<usize>) -> Result<Option<Vec<f32>>, RunError> {
        match Rotation::gain_role(role) {
            Some(norm) if self.rotation.is_some() => {
                let layer = if norm == Role::FinalNorm { None } else { layer };
                Ok(Some(self.decoded(self.find(norm, layer)?)))
            }
            _ => Ok(None),
        }
    }
}

impl<'a> Parts<'a> for SourceParts<'a> {
    type Linear = SourceLinear<'a>;

    fn floats(&self, role: Role, layer: Option<usize>) -> Result<Vec<f32>, RunError> {
        let t = self.find(role, layer)?;
        let mut v = self.decoded(t);
        if let Some(r) = &self.rotation {
            let len = v.len();
            r.fold(role, &mut v, len, None);
        }
        Ok(v)
    }

    fn matrix(&self, role: Role) -> Result<FloatMatrix<'a>, RunError> {
        // A tied head is the embedding's data.
        let t = match self.find(role, None) {
            Err(_) if role == Role::LmHead => self.find(Role::Embedding, None)?,
            other => other?,
        };
        let (rows, cols) = (t.spec.shape[0], t.spec.shape[1]);
        let Some(r) = &self.rotation else {
            return Ok(FloatMatrix {
                ty: MatrixType::Float(t.dtype),
                bytes: Cow::Borrowed(self.ckpt.bytes(t)),
                rows,
                cols,
            });
        };
        let mut v = self.decoded(t);
        r.fold(role, &mut v, cols, self.gain_for(role, None)?.as_deref());
        let mut bytes = Vec::with_capacity(v.len() * 4);
        encode_f32(FloatDtype::F32, &v, &mut bytes);
        Ok(FloatMatrix {
            ty: MatrixType::Float(FloatDtype::F32),
            bytes: Cow::Owned(bytes),
            rows,
            cols,
        })
    }

    fn linear(
        &self,
        role: Role,
        layer: usize,
        act: ActQuant,
    ) -> Result<SourceLinear<'a>, RunError> {
        let fold = match &self.rotation {
            Some(r) => Some((r.clone(), self.gain_for(role, Some(layer))?)),
            None => None,
        };
        Ok(SourceLinear {
            ckpt: self.ckpt,
            tensor: self.find(role, Some(layer))?,
            mode: self.mode,
            act,
            fold,
        })
    }
}
