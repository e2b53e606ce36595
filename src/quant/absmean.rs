//! Absmean ternarization, bit-exact to the BitNet b1.58 training forward.
//!
//! Training (HF `WeightQuant`, Microsoft's reference) computes, in f32:
//! `s = 1 / max(mean(|W|), 1e-5)`, `T = clamp(round(W * s), -1, 1)` with round half to even, and
//! the fake-quantized weight `W~ = T / s`. We follow that to the bit, with one documented choice:
//! the mean is accumulated in f64 over rows in a fixed order and rounded once to f32, so that it
//! cannot depend on the thread count (torch's own f32 reduction order is an implementation
//! detail). The per-tensor dequantization scale we store is `1 / s` in f32, so that
//! `scale * T == T / s` bit for bit for every trit.

/// Lower bound on the mean absolute weight (the `clamp(min=1e-5)` of the training code).
pub const ABSMEAN_EPS: f32 = 1e-5;
/// Lower bound on the per-token absolute maximum of an activation (training's `clamp(min=1e-5)`).
pub const ACTIVATION_EPS: f32 = 1e-5;

/// The per-tensor quantization parameters derived from the mean absolute value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AbsmeanScale {
    /// `a = max(mean|W|, eps)` rounded to f32.
    pub mean_abs: f32,
    /// `s = 1 / a` in f32: the factor weights are multiplied by before rounding.
    pub inv_scale: f32,
    /// `1 / s` in f32: multiply a trit by this to dequantize (equals `T / s` exactly).
    pub scale: f32,
}

impl AbsmeanScale {
    /// Derives the scale from the sum of absolute values (accumulated in f64) of `count` weights.
    pub fn from_abs_sum(abs_sum: f64, count: usize) -> Self {
        let mean = (abs_sum / count.max(1) as f64) as f32;
        let mean_abs = mean.max(ABSMEAN_EPS);
        let inv_scale = 1.0f32 / mean_abs;
        AbsmeanScale {
            mean_abs,
            inv_scale,
            scale: 1.0f32 / inv_scale,
        }
    }

    /// Ternarizes one weight: `clamp(round_half_even(w * s), -1, 1)`.
    #[inline]
    pub fn trit(&self, w: f32) -> i8 {
        (w * self.inv_scale).round_ties_even().clamp(-1.0, 1.0) as i8
    }
}

/// Sum of absolute values of one row in f64, in a fixed order (four interleaved partial sums,
/// combined at the end) so that the compiler can vectorize it and the result never depends on
/// how rows are spread over threads.
pub fn abs_sum_f64(row: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let mut chunks = row.chunks_exact(4);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += f64::from(v.abs());
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|v| f64::from(v.abs())).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_round_to_even() {
        // mean |w| = 1, so s = 1 and w * s = w exactly.
        let sc = AbsmeanScale::from_abs_sum(4.0, 4);
        assert_eq!(sc.trit(0.5), 0);
        assert_eq!(sc.trit(-0.5), 0);
        assert_eq!(sc.trit(1.5), 1);
        assert_eq!(sc.trit(0.5000001), 1);
        assert_eq!(sc.trit(-7.0), -1);
    }

    #[test]
    fn eps_floor_applies_to_all_zero_tensors() {
        let sc = AbsmeanScale::from_abs_sum(0.0, 16);
        assert_eq!(sc.mean_abs, ABSMEAN_EPS);
        assert_eq!(sc.trit(0.0), 0);
    }

    #[test]
    fn dequantization_matches_the_training_division() {
        for sum in [0.3f64, 1.7, 123.456, 9.99e-4] {
            let sc = AbsmeanScale::from_abs_sum(sum, 3);
            for t in [-1.0f32, 1.0] {
                assert_eq!((t * sc.scale).to_bits(), (t / sc.inv_scale).to_bits());
            }
        }
    }

    #[test]
    fn abs_sum_handles_tails() {
        let row: Vec<f32> = (0..7).map(|i| i as f32 - 3.0).collect();
        assert_eq!(abs_sum_f64(&row), 12.0);
        assert_eq!(abs_sum_f64(&[]), 0.0);
    }
}
