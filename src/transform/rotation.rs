//! Folding a rotation of the residual stream into the weights (QuaRot-style), plus online
//! Hadamard transforms at the inputs of `o_proj` and `down_proj` whose transpose is folded into
//! those projections. With `y = x W^T` (`W` is `[out, in]`) and row vectors:
//!
//! - the residual stream `r` becomes `r Q` with `Q = diag(s) H_h^T / sqrt(h)` (`s` = +-1 signs
//!   drawn from a seed, formats/bpk.md §9.3), so `v Q = T_h(s * v)` where `T_n(x) = H_n x /
//!   sqrt(n)` is [`Hadamard::apply`]: [`Rotation::rotate`];
//! - the RMSNorm gains in front of the readers are folded first (`W <- W diag(g)`, then the
//!   gain is 1), since `RMSNorm(r Q) = RMSNorm(r) Q` holds only without a gain;
//! - embeddings: every row rotated; readers (q, k, v, gate, up, head): every row `w <- (w * g) Q`;
//!   writers (o, down): every column `c <- Q^T c`, which is the same `T_h(s * c)`;
//! - an online transform `x <- T_n(x)` at the input of o_proj or down_proj pairs with every row
//!   of that projection transformed the same way (`W <- W H_n^T / sqrt(n)`).
//!
//! In full precision the rotated model computes the same function. Under BitNet's quantizers it
//! does not: a folded norm gain, or the rotation, changes what an activation quantizer sees,
//! and rotated weights are no longer ternary (they are ternarized again, lossily).

use super::hadamard::{Hadamard, UnsupportedSize};
use crate::model::{ModelConfig, Role};
use crate::num::SplitMix64;

/// What rotating a model needs that the model may not have.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("cannot rotate the residual stream of width {n}: {source}")]
    Hidden { n: usize, source: UnsupportedSize },
    #[error("cannot put an online Hadamard transform at the input of {role} (width {n}): {source}")]
    Online {
        role: &'static str,
        n: usize,
        source: UnsupportedSize,
    },
}

/// A residual rotation, and the online transforms it added.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub seed: u64,
    signs: Vec<f32>,
    residual: Hadamard,
    /// The online transforms folded into o_proj and down_proj (`None` where the source already
    /// had one: its weights are in that basis already).
    pub online_o: Option<Hadamard>,
    pub online_down: Option<Hadamard>,
}

/// The +-1 signs of the randomized Hadamard rotation: element `i` is +1 when bit 0 of the
/// `(i + 1)`-th SplitMix64 output from `seed` is 0, else -1 (formats/bpk.md §9.3).
pub fn signs(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n)
        .map(|_| if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 })
        .collect()
}

impl Rotation {
    /// The rotation of `cfg`'s residual stream from `seed`, with online transforms folded at
    /// the inputs of the projections in `add_online` (o_proj and/or down_proj; a source that has
    /// one there already keeps its own, and its weights are in that basis).
    pub fn new(cfg: &ModelConfig, seed: u64, add_online: &[Role]) -> Result<Self, RotationError> {
        let h = cfg.hidden_size;
        let residual = Hadamard::new(h).map_err(|source| RotationError::Hidden { n: h, source })?;
        let online = |role: Role| -> Result<Option<Hadamard>, RotationError> {
            if !add_online.contains(&role) {
                return Ok(None);
            }
            let n = cfg.projection_in_dim(role).expect("a projection");
            Hadamard::new(n)
                .map(Some)
                .map_err(|source| RotationError::Online {
                    role: role.as_str(),
                    n,
                    source,
                })
        };
        Ok(Rotation {
            seed,
            signs: signs(seed, h),
            residual,
            online_o: online(Role::OProj)?,
            online_down: online(Role::DownProj)?,
        })
    }

    /// The online transforms this rotation adds (their roles).
    pub fn added_online(&self) -> Vec<Role> {
        let mut out = Vec::new();
        if self.online_o.is_some() {
            out.push(Role::OProj);
        }
        if self.online_down.is_some() {
            out.push(Role::DownProj);
        }
        out
    }

    /// `v <- v Q = T_h(s * v)` for one residual-width vector.
    pub fn rotate(&self, v: &mut [f32]) {
        self.rotate_with(v, &mut Vec::new());
    }

    /// [`Rotation::rotate`] with a reusable scratch buffer.
    fn rotate_with(&self, v: &mut [f32], scratch: &mut Vec<f32>) {
        for (x, s) in v.iter_mut().zip(&self.signs) {
            *x *= s;
        }
        self.residual.apply_with(v, scratch);
    }

    /// Rotates every `len`-row of `values` (after multiplying it by `gain`), rows spread over
    /// the worker threads; each row on its own, so the result does not depend on their number.
    fn rotate_rows(&self, values: &mut [f32], len: usize, gain: Option<&[f32]>) {
        use rayon::prelude::*;
        values
            .par_chunks_exact_mut(len)
            .for_each_init(Vec::new, |scratch, row| {
                if let Some(g) = gain {
                    row.iter_mut().zip(g).for_each(|(w, g)| *w *= g);
                }
                self.rotate_with(row, scratch);
            });
    }

    /// Folds the rotation into a tensor of `role` (`values` row-major `[rows, cols]`, f32).
    /// `gain` is the norm gain in front of a reader (attn_norm for q/k/v, ffn_norm for
    /// gate/up, the final norm for the head), ignored for other roles. Norm gains in front of
    /// readers become ones; sub-norms are untouched.
    pub fn fold(&self, role: Role, values: &mut [f32], cols: usize, gain: Option<&[f32]>) {
        use Role::*;
        match role {
            Embedding => self.rotate_rows(values, cols, None),
            QProj | KProj | VProj | GateProj | UpProj | LmHead => {
                self.rotate_rows(values, cols, gain)
            }
            OProj | DownProj => {
                // Every column: transposed, rotated as rows, transposed back.
                let rows = values.len() / cols;
                let mut t = vec![0f32; values.len()];
                for (r, row) in values.chunks_exact(cols).enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        t[c * rows + r] = v;
                    }
                }
                self.rotate_rows(&mut t, rows, None);
                for (c, col) in t.chunks_exact(rows).enumerate() {
                    for (r, &v) in col.iter().enumerate() {
                        values[r * cols + c] = v;
                    }
                }
                let online = if role == OProj {
                    &self.online_o
                } else {
                    &self.online_down
                };
                if let Some(h) = online {
                    h.apply_rows(values);
                }
            }
            AttnNorm | FfnNorm | FinalNorm => values.fill(1.0),
            AttnSubNorm | FfnSubNorm => {}
        }
    }

    /// The norm whose gain is folded into a reader of `role` (`None` for other roles).
    pub fn gain_role(role: Role) -> Option<Role> {
        use Role::*;
        match role {
            QProj | KProj | VProj => Some(AttnNorm),
            GateProj | UpProj => Some(FfnNorm),
            LmHead => Some(FinalNorm),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig::from_json(
            br#"{"architectures":["BitNetForCausalLM"],"model_type":"bitnet","hidden_size":40,
            "intermediate_size":96,"num_hidden_layers":1,"num_attention_heads":4,
            "num_key_value_heads":2,"vocab_size":10}"#,
        )
        .unwrap()
    }

    /// `(r Q)(W_reader')^T = RMS-free r W^T` and a writer's output rotates with the stream.
    #[test]
    fn folded_readers_and_writers_preserve_the_function() {
        let c = cfg();
        let rot = Rotation::new(&c, 7, &[Role::OProj, Role::DownProj]).unwrap();
        let h = 40;
        let r = crate::test_util::uniform(h, 1, -1.0, 1.0);
        let g = crate::test_util::uniform(h, 2, 0.5, 1.5);
        let w = crate::test_util::uniform(3 * h, 3, -1.0, 1.0);
        let dot =
            |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| f64::from(x * y)).sum::<f64>();
        // Reader: y = (r * g) W^T.
        let rg: Vec<f32> = r.iter().zip(&g).map(|(a, b)| a * b).collect();
        let mut wf = w.clone();
        rot.fold(Role::QProj, &mut wf, h, Some(&g));
        let mut rq = r.clone();
        rot.rotate(&mut rq);
        for row in 0..3 {
            let want = dot(&rg, &w[row * h..(row + 1) * h]);
            let got = dot(&rq, &wf[row * h..(row + 1) * h]);
            assert!((want - got).abs() < 1e-4, "{want} vs {got}");
        }
        // Writer o_proj [h, q_dim=40] with the online transform at its input:
        // T(z) W_o'^T = (z W_o^T) Q.
        let z = crate::test_util::uniform(h, 4, -1.0, 1.0);
        let wo = crate::test_util::uniform(h * h, 5, -1.0, 1.0);
        let mut wof = wo.clone();
        rot.fold(Role::OProj, &mut wof, h, None);
        let mut y: Vec<f32> = (0..h)
            .map(|o| dot(&z, &wo[o * h..(o + 1) * h]) as f32)
            .collect();
        rot.rotate(&mut y);
        let mut tz = z.clone();
        rot.online_o.as_ref().unwrap().apply(&mut tz);
        for o in 0..h {
            let got = dot(&tz, &wof[o * h..(o + 1) * h]);
            assert!((f64::from(y[o]) - got).abs() < 1e-4, "{} vs {got}", y[o]);
        }
    }

    #[test]
    fn signs_are_reproducible_and_mixed() {
        let s = signs(42, 1000);
        assert_eq!(s, signs(42, 1000));
        let plus = s.iter().filter(|&&v| v > 0.0).count();
        assert!((400..600).contains(&plus), "{plus}");
        assert_ne!(s, signs(43, 1000));
    }

    #[test]
    fn unsupported_widths_are_named() {
        let c = ModelConfig::from_json(
            br#"{"architectures":["BitNetForCausalLM"],"model_type":"bitnet","hidden_size":40,
            "intermediate_size":90,"num_hidden_layers":1,"num_attention_heads":4,
            "num_key_value_heads":2,"vocab_size":10}"#,
        )
        .unwrap();
        let e = Rotation::new(&c, 1, &[Role::OProj, Role::DownProj]).unwrap_err();
        assert!(
            e.to_string().contains("down_proj") && e.to_string().contains("90"),
            "{e}"
        );
        assert!(Rotation::new(&c, 1, &[Role::OProj]).is_ok());
    }
}
