//! Activation quantizers: the one definition of each scheme, serving both the packed path
//! (integer activations for the ternary kernels) and the source path (fake quantization, the
//! training forward). Built from the scheme a .bpk file records (formats/bpk.md §3.2).
//!
//! - `a8`, per token absmax: `s = 127 / max(max|x|, eps)`,
//!   `q = clamp(round_half_even(x * s), -128, 127)`.
//! - `a4`, per token absmean (BitNet v2, a4.8): `s = sqrt(7) / max(mean|x|, eps)`,
//!   `q = clamp(round_half_even(x * s), -8, 7)`, with `mean|x|` summed in f64 and rounded
//!   once to f32, and `sqrt(7)` the f32 nearest it.
//! - `none`: the input is used as it is.
//!
//! The dequantized value is `q / s` in both paths.

use super::absmean::{abs_sum_f64, round_clamp};

/// `sqrt(7)` as the nearest f32 (2.6457512).
pub const SQRT_7: f32 = 2.645_751_3;

/// One activation quantizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActQuant {
    /// int8, per token absmax.
    Absmax8 { eps: f32 },
    /// int4 in an i8, per token absmean.
    Absmean4 { eps: f32 },
    /// No quantization.
    None,
}

impl ActQuant {
    /// Whether inputs are quantized at all.
    pub fn is_quantized(self) -> bool {
        self != ActQuant::None
    }

    /// Smallest and largest integer value.
    pub fn range(self) -> (f32, f32) {
        match self {
            ActQuant::Absmax8 { .. } => (-128.0, 127.0),
            ActQuant::Absmean4 { .. } => (-8.0, 7.0),
            ActQuant::None => (f32::NEG_INFINITY, f32::INFINITY),
        }
    }

    /// The scale `s` of one token's input `x` (`x ~ q / s`); 1 for `None`.
    pub fn scale(self, x: &[f32]) -> f32 {
        match self {
            ActQuant::Absmax8 { eps } => {
                let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                127.0 / absmax.max(eps)
            }
            ActQuant::Absmean4 { eps } => {
                let mean = (abs_sum_f64(x) / x.len().max(1) as f64) as f32;
                SQRT_7 / mean.max(eps)
            }
            ActQuant::None => 1.0,
        }
    }

    /// Quantizes one token's input for the integer kernels: writes `q` into `out[..x.len()]`,
    /// zeroes the rest of `out` (the padding a packed row's last block needs) and returns `s`.
    /// Never produces -128 for `a8` (`|x * s| <= 127`), which the AVX2 kernels rely on.
    pub fn quantize(self, x: &[f32], out: &mut [i8]) -> f32 {
        debug_assert!(self.is_quantized());
        let s = self.scale(x);
        let (lo, hi) = self.range();
        for (q, &v) in out.iter_mut().zip(x) {
            *q = round_clamp(v * s, lo, hi) as i8;
        }
        out[x.len()..].fill(0);
        s
    }

    /// The training forward's fake quantization of one token's input, in place: `x <- q / s`.
    pub fn fake_quant(self, x: &mut [f32]) {
        if !self.is_quantized() {
            return;
        }
        let s = self.scale(x);
        let (lo, hi) = self.range();
        for v in x.iter_mut() {
            *v = round_clamp(*v * s, lo, hi) / s;
        }
    }

    /// Short name: `a8`, `a4`, `none`.
    pub fn name(self) -> &'static str {
        match self {
            ActQuant::Absmax8 { .. } => "a8",
            ActQuant::Absmean4 { .. } => "a4",
            ActQuant::None => "none",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::ACTIVATION_EPS;

    const A8: ActQuant = ActQuant::Absmax8 {
        eps: ACTIVATION_EPS,
    };
    const A4: ActQuant = ActQuant::Absmean4 {
        eps: ACTIVATION_EPS,
    };

    #[test]
    fn a8_follows_the_training_rule() {
        let x = [0.5f32, -1.0, 0.25, 0.0];
        let mut q = [0i8; 8];
        let s = A8.quantize(&x, &mut q);
        assert_eq!(s, 127.0);
        // 0.5 * 127 = 63.5 rounds half to even -> 64; 0.25 * 127 = 31.75 -> 32.
        assert_eq!(q, [64, -127, 32, 0, 0, 0, 0, 0]);
        let mut z = [5i8; 2];
        assert_eq!(A8.quantize(&[0.0, 0.0], &mut z), 127.0 / ACTIVATION_EPS);
        assert_eq!(z, [0, 0]);
    }

    #[test]
    fn a4_uses_the_absmean_scale_and_clamps_to_minus_8_7() {
        // mean|x| = 1: s = sqrt(7); 1 * 2.6458 -> 3, -3 * 2.6458 = -7.94 -> -8, 2 -> 5.29 -> 5.
        let x = [1.0f32, -3.0, 2.0, 0.0, -0.0, 0.0];
        let mut q = [9i8; 8];
        let s = A4.quantize(&x, &mut q);
        assert_eq!(s, SQRT_7);
        assert_eq!(q, [3, -8, 5, 0, 0, 0, 0, 0]);
        // Clamped at both ends.
        let x = [100.0f32, -100.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let mut q = [0i8; 10];
        A4.quantize(&x, &mut q);
        assert_eq!(&q[..3], &[7, -8, 0]);
    }

    #[test]
    fn fake_quant_is_q_over_s_of_the_integer_quantizer() {
        let x: Vec<f32> = crate::test_util::uniform(300, 3, -2.0, 2.0);
        for a in [A8, A4] {
            let mut q = vec![0i8; 300];
            let s = a.quantize(&x, &mut q);
            let mut y = x.clone();
            a.fake_quant(&mut y);
            for (yy, qq) in y.iter().zip(&q) {
                // Equal as values (the fake quant keeps the sign of a zero, -0.0 == 0.0).
                assert_eq!(*yy, f32::from(*qq) / s);
            }
        }
        let mut y = x.clone();
        ActQuant::None.fake_quant(&mut y);
        assert_eq!(y, x);
    }
}
