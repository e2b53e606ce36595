//! The packed path: a model executed from a .bpk file with integer arithmetic. Each projection
//! quantizes its input per token to int8, takes ternary x int8 dot products straight from the
//! packed bytes with exact i32 accumulation, and applies `scale / s_x` once per output.

use rayon::prelude::*;

use super::RunError;
use super::kernels::{dot, dot_trits_f32, padded_len, quantize_activation};
use super::model::{Block, FloatMatrix, Linear, Transformer};
use crate::format::header::{ActivationRule, WeightRule};
use crate::format::{BpkFile, TensorEntry, validate_bytes_into};
use crate::model::Role;
use crate::pack::TernaryLayout;

/// A ternary projection read in place from the file.
pub struct TernaryLinear<'a> {
    pub layout: TernaryLayout,
    pub rows: usize,
    pub k: usize,
    pub row_bytes: usize,
    pub data: &'a [u8],
    pub scale: f32,
    /// Whether inputs are quantized to int8 per token (the BitNet b1.58 scheme) or taken as
    /// they are (the `none` scheme).
    pub quantize_input: bool,
}

impl TernaryLinear<'_> {
    /// One output for one quantized token: the scalar-free inner loop of [`Linear::forward`].
    #[inline]
    fn output(&self, r: usize, q: &[i8], q_sum: i32, factor: f32) -> f32 {
        let row = &self.data[r * self.row_bytes..(r + 1) * self.row_bytes];
        dot(self.layout, row, q, q_sum, self.k) as f32 * factor
    }
}

impl Linear for TernaryLinear<'_> {
    fn in_dim(&self) -> usize {
        self.k
    }
    fn out_dim(&self) -> usize {
        self.rows
    }
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (k, rows) = (self.k, self.rows);
        if !self.quantize_input {
            y.par_chunks_mut(rows)
                .zip(x.par_chunks(k))
                .for_each(|(yt, xt)| {
                    for (r, o) in yt.iter_mut().enumerate() {
                        let row = &self.data[r * self.row_bytes..(r + 1) * self.row_bytes];
                        *o = dot_trits_f32(self.layout, row, xt) * self.scale;
                    }
                });
            return;
        }
        let padded = padded_len(self.layout, k);
        let mut q = vec![0i8; n * padded];
        let mut factors = Vec::with_capacity(n);
        let mut sums = Vec::with_capacity(n);
        for (xt, qt) in x.chunks_exact(k).zip(q.chunks_exact_mut(padded)) {
            let s = quantize_activation(xt, qt);
            factors.push(self.scale / s);
            sums.push(qt.iter().map(|&v| i32::from(v)).sum::<i32>());
        }
        if n == 1 {
            y.par_iter_mut()
                .enumerate()
                .for_each(|(r, o)| *o = self.output(r, &q, sums[0], factors[0]));
            return;
        }
        // Several tokens: each worker takes a row and runs every token through it, so a row's
        // bytes are read once per call.
        let mut yt = vec![0f32; rows * n];
        yt.par_chunks_mut(n).enumerate().for_each(|(r, out)| {
            for (t, o) in out.iter_mut().enumerate() {
                *o = self.output(r, &q[t * padded..(t + 1) * padded], sums[t], factors[t]);
            }
        });
        for t in 0..n {
            for r in 0..rows {
                y[t * rows + r] = yt[r * n + t];
            }
        }
    }
}

/// Loads a model from a .bpk file. The whole file is validated first (checksums, codes, finite
/// values), so a damaged file is refused rather than run.
pub fn load(file: &BpkFile) -> Result<Transformer<'_, TernaryLinear<'_>>, RunError> {
    let q = &file.header.quantization;
    let act = &q.activations;
    let quantize_input = act.rule == ActivationRule::AbsmaxPerToken;
    if (quantize_input && act.bits != 8) || !q.online_rotations.is_empty() {
        return Err(RunError::UnsupportedScheme {
            reason: format!(
                "activations {:?} int{} with {} online rotation site(s); this runner executes per-token absmax int8 (or unquantized) activations without rotations",
                act.rule,
                act.bits,
                q.online_rotations.len()
            ),
        });
    }
    if q.weights.rule != WeightRule::AbsmeanPerTensor {
        return Err(RunError::UnsupportedScheme {
            reason: format!("weight rule {:?}", q.weights.rule),
        });
    }
    let mut first_finding = None;
    validate_bytes_into(file.bytes(), &mut |f| {
        first_finding.get_or_insert(f);
    });
    if let Some(first) = first_finding {
        return Err(RunError::Invalid {
            path: file.path.clone(),
            first: first.message.clone(),
        });
    }
    let cfg = file.header.model.clone();
    let find = |role: Role, layer: Option<usize>| -> Result<&TensorEntry, RunError> {
        file.header
            .tensors
            .iter()
            .find(|t| t.role == role && t.layer.map(|l| l as usize) == layer)
            .ok_or_else(|| RunError::Missing {
                what: super::describe_site(role, layer),
            })
    };
    let floats = |role, layer| -> Result<Vec<f32>, RunError> {
        Ok(file.dequantize_f32(find(role, layer)?)?)
    };
    let matrix = |e: &TensorEntry| -> Result<FloatMatrix<'_>, RunError> {
        let dtype = e.encoding.float().ok_or_else(|| RunError::Missing {
            what: format!("float data for {}", e.name),
        })?;
        let bytes = file.raw(e)?;
        Ok(FloatMatrix {
            dtype,
            bytes,
            rows: e.shape[0] as usize,
            cols: e.shape[1] as usize,
        })
    };
    let ternary = |role, layer| -> Result<TernaryLinear<'_>, RunError> {
        let e = find(role, Some(layer))?;
        let layout = e.encoding.ternary().ok_or_else(|| RunError::Missing {
            what: format!("ternary data for {}", e.name),
        })?;
        let (rows, k) = (e.shape[0] as usize, e.shape[1] as usize);
        Ok(TernaryLinear {
            layout,
            rows,
            k,
            row_bytes: layout.row_bytes(k),
            data: file.stored(e),
            scale: e
                .scale_f32()
                .expect("validated: ternary tensors have an f32 scale"),
            quantize_input,
        })
    };
    let mut blocks = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let sub = cfg.family.has_sub_norms();
        blocks.push(Block {
            attn_norm: floats(Role::AttnNorm, Some(l))?,
            q: ternary(Role::QProj, l)?,
            k: ternary(Role::KProj, l)?,
            v: ternary(Role::VProj, l)?,
            attn_sub_norm: if sub {
                Some(floats(Role::AttnSubNorm, Some(l))?)
            } else {
                None
            },
            o: ternary(Role::OProj, l)?,
            ffn_norm: floats(Role::FfnNorm, Some(l))?,
            gate: ternary(Role::GateProj, l)?,
            up: ternary(Role::UpProj, l)?,
            ffn_sub_norm: if sub {
                Some(floats(Role::FfnSubNorm, Some(l))?)
            } else {
                None
            },
            down: ternary(Role::DownProj, l)?,
        });
    }
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(matrix(find(Role::LmHead, None)?)?)
    };
    Ok(Transformer {
        embed: matrix(find(Role::Embedding, None)?)?,
        final_norm: floats(Role::FinalNorm, None)?,
        blocks,
        lm_head,
        config: cfg,
    })
}
