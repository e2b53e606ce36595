//! One model assembly for both paths: which tensors a model of a given config needs, in which
//! block, with which quantizer. Each path only says how to fetch a float vector, a float
//! matrix, and a projection.

use super::RunError;
use super::model::{Block, FloatMatrix, Linear, Transformer};
use super::plan::QuantPlan;
use crate::model::{ModelConfig, Role};
use crate::quant::ActQuant;

/// What a path supplies to build a model.
pub trait Parts<'a> {
    type Linear: Linear;
    /// A norm gain (or another float vector).
    fn floats(&self, role: Role, layer: Option<usize>) -> Result<Vec<f32>, RunError>;
    /// The embedding or the head.
    fn matrix(&self, role: Role) -> Result<FloatMatrix<'a>, RunError>;
    /// A projection whose input is quantized with `act`.
    fn linear(&self, role: Role, layer: usize, act: ActQuant) -> Result<Self::Linear, RunError>;
}

/// Builds the model of `cfg` from `parts`, with `plan`'s quantizers and transforms.
pub fn assemble<'a, P: Parts<'a>>(
    cfg: ModelConfig,
    plan: QuantPlan,
    parts: &P,
) -> Result<Transformer<'a, P::Linear>, RunError> {
    let sub = cfg.family.has_sub_norms();
    let linear = |role: Role, l| parts.linear(role, l, plan.act_of(role));
    let sub_norm = |role, l| -> Result<Option<Vec<f32>>, RunError> {
        Ok(if sub {
            Some(parts.floats(role, Some(l))?)
        } else {
            None
        })
    };
    let mut blocks = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        blocks.push(Block {
            attn_norm: parts.floats(Role::AttnNorm, Some(l))?,
            q: linear(Role::QProj, l)?,
            k: linear(Role::KProj, l)?,
            v: linear(Role::VProj, l)?,
            attn_sub_norm: sub_norm(Role::AttnSubNorm, l)?,
            o: linear(Role::OProj, l)?,
            ffn_norm: parts.floats(Role::FfnNorm, Some(l))?,
            gate: linear(Role::GateProj, l)?,
            up: linear(Role::UpProj, l)?,
            ffn_sub_norm: sub_norm(Role::FfnSubNorm, l)?,
            down: linear(Role::DownProj, l)?,
        });
    }
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(parts.matrix(Role::LmHead)?)
    };
    Ok(Transformer {
        embed: parts.matrix(Role::Embedding)?,
        final_norm: parts.floats(Role::FinalNorm, None)?,
        blocks,
        lm_head,
        config: cfg,
        plan,
    })
}
