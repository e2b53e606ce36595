//! The quantization plan of a run: the activation quantizer of each projection's input, the
//! online transforms, and the attention-state quantizers. Built from a scheme (a .bpk header's,
//! or the one a source checkpoint implies) and shared by the packed and the source paths, so
//! that both apply the same rules at the same places.

use std::sync::Arc;

use super::RunError;
use crate::format::header::QuantScheme;
use crate::model::{ModelConfig, Role};
use crate::quant::ActQuant;
use crate::transform::Hadamard;

/// How the attention states are quantized (formats/bpk.md §3.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttentionQuant {
    /// Queries after RoPE: symmetric absmax per head vector, 8 or 4 bits.
    pub q_bits: Option<u8>,
    /// Keys after RoPE and values, as stored in the cache: asymmetric min-max per head vector,
    /// 8, 4 or 3 bits.
    pub kv_bits: Option<u8>,
}

/// The plan.
#[derive(Debug, Clone)]
pub struct QuantPlan {
    /// Per projection, in [`Role::PROJECTIONS`] order.
    pub act: [ActQuant; 7],
    /// Per block, per projection: the transform applied to the input before it is quantized.
    pub online: Vec<[Option<Arc<Hadamard>>; 7]>,
    pub attention: AttentionQuant,
}

impl QuantPlan {
    /// The plan a scheme describes for a model, or why it cannot run.
    pub fn new(scheme: &QuantScheme, cfg: &ModelConfig) -> Result<Self, RunError> {
        scheme
            .check(cfg)
            .map_err(|reason| RunError::UnsupportedScheme { reason })?;
        let mut act = [ActQuant::None; 7];
        for (slot, role) in act.iter_mut().zip(Role::PROJECTIONS) {
            *slot = scheme
                .activation_of(role)
                .quantizer()
                .map_err(|reason| RunError::UnsupportedScheme { reason })?;
        }
        let mut online: Vec<[Option<Arc<Hadamard>>; 7]> =
            (0..cfg.num_layers).map(|_| Default::default()).collect();
        for site in &scheme.online_rotations {
            let index = site
                .role
                .projection_index()
                .expect("checked: online transforms sit on projections");
            let h = Arc::new(Hadamard::new(site.dim as usize).map_err(|e| {
                RunError::UnsupportedScheme {
                    reason: e.to_string(),
                }
            })?);
            match site.layer {
                Some(l) => online[l as usize][index] = Some(h),
                None => online.iter_mut().for_each(|b| b[index] = Some(h.clone())),
            }
        }
        let attention = scheme
            .attention
            .map(|a| AttentionQuant {
                q_bits: a.q_bits,
                kv_bits: a.kv_bits,
            })
            .unwrap_or_default();
        Ok(QuantPlan {
            act,
            online,
            attention,
        })
    }

    /// The same transforms with no quantization anywhere (the `fp` source mode).
    pub fn unquantized(&self) -> Self {
        QuantPlan {
            act: [ActQuant::None; 7],
            online: self.online.clone(),
            attention: AttentionQuant::default(),
        }
    }

    /// The activation quantizer of a projection.
    pub fn act_of(&self, role: Role) -> ActQuant {
        role.projection_index()
            .map(|i| self.act[i])
            .unwrap_or(ActQuant::None)
    }

    /// The online transform of a projection's input in block `layer`, if any.
    pub fn online_of(&self, layer: usize, role: Role) -> Option<&Hadamard> {
        let i = role.projection_index()?;
        self.online.get(layer)?[i].as_deref()
    }
}
