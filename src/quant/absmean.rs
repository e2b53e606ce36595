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
    ///
    /// Written as two comparisons, which is the same function (a tie at ±0.5 rounds to even,
    /// that is to 0; NaN gives 0 as the float-to-int cast of NaN does) but compiles to
    /// vector compares instead of a library call to `rintf` per weight.
    #[inline(always)]
    pub fn trit(&self, w: f32) -> i8 {
        let x = w * self.inv_scale;
        (x > 0.5) as i8 - (x < -0.5) as i8
    }
}

/// `clamp(round_half_even(y), lo, hi)` for bounds within ±2^22, without a library call.
///
/// After the clamp, adding and subtracting `1.5 * 2^23` leaves the value rounded to an integer
/// by the FPU's round-to-nearest-even mode, as `f32::round_ties_even` does, for any
/// `|y| <= 2^22`; the sign is then copied back so that values in `[-0.5, -0.0]` give `-0.0`
/// as the reference does (the trick alone gives `+0.0`). Bit for bit equal to
/// `y.round_ties_even().clamp(lo, hi)`; NaN stays NaN (and casts to 0, as before).
#[inline(always)]
pub fn round_clamp(y: f32, lo: f32, hi: f32) -> f32 {
    debug_assert!(lo >= -4_194_304.0 && hi <= 4_194_304.0);
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    ((y.clamp(lo, hi) + MAGIC) - MAGIC).copysign(y)
}

/// Partial sums in [`abs_sum_f64`]: enough independent f64 additions in flight to keep the
/// adder busy (four AVX2 vectors of four).
const ABS_SUM_LANES: usize = 16;

/// Sum of absolute values of one row in f64, in a fixed order so that the compiler can
/// vectorize it and the result never depends on how rows are spread over threads: lane `i`
/// sums elements `i, i + 16, i + 32, ...`; the lanes are then added pairwise (lane `i` plus
/// lane `i + 8`, then `i + 4`, `i + 2`, `i + 1`), and the elements after the last full group of
/// 16 are added last, in order.
// Always inlined, so that the AVX2 builds of its callers (quant::rows) vectorize it too.
#[inline(always)]
pub fn abs_sum_f64(row: &[f32]) -> f64 {
    let mut acc = [0f64; ABS_SUM_LANES];
    let mut chunks = row.chunks_exact(ABS_SUM_LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += f64::from(v.abs());
        }
    }
    let mut width = ABS_SUM_LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    chunks
        .remainder()
        .iter()
        .fold(acc[0], |s, v| s + f64::from(v.abs()))
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

    fn trit_reference(sc: &AbsmeanScale, w: f32) -> i8 {
        (w * sc.inv_scale).round_ties_even().clamp(-1.0, 1.0) as i8
    }

    #[test]
    fn trit_equals_the_rounding_definition() {
        let sc = AbsmeanScale::from_abs_sum(4.0, 4);
        let mut specials = vec![0.0f32, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, f32::NAN];
        specials.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            f32::MAX,
        ]);
        specials.extend([0.5f32.next_up(), 0.5f32.next_down(), (-0.5f32).next_down()]);
        for w in specials {
            assert_eq!(sc.trit(w), trit_reference(&sc, w), "{w}");
        }
        // A sweep of bit patterns, with a scale that is not a power of two.
        let sc = AbsmeanScale::from_abs_sum(0.7351, 3);
        for bits in crate::test_util::lcg(0x1234_5678).take(200_000) {
            let w = f32::from_bits(bits >> 3) * if bits & 1 == 0 { 1.0 } else { -1.0 };
            assert_eq!(sc.trit(w), trit_reference(&sc, w), "{w}");
        }
    }

    #[test]
    fn round_clamp_equals_round_ties_even() {
        let reference = |y: f32| y.round_ties_even().clamp(-128.0, 127.0);
        let mut ys = vec![
            0.5f32, -0.5, 1.5, -1.5, 2.5, 126.5, 127.5, -127.5, -128.5, 1e9, -1e9,
        ];
        // Negative values that round to zero must give -0.0, as the reference does.
        ys.extend([-0.3f32, -0.0, -1e-30, -0.49999997]);
        ys.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.49999997,
            3.5000002,
        ]);
        for i in -600..=600 {
            ys.push(i as f32 * 0.25);
        }
        ys.extend(
            crate::test_util::lcg(0x9e37_79b9)
                .take(200_000)
                .map(f32::from_bits),
        );
        for y in ys {
            let (a, b) = (round_clamp(y, -128.0, 127.0), reference(y));
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{y}: {a} vs {b}"
            );
            assert_eq!(a as i8, b as i8, "{y}");
        }
        assert!(round_clamp(f32::NAN, -128.0, 127.0).is_nan());
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
        // Integers are summed exactly in f64, whatever the order: full groups plus a tail.
        for n in [15usize, 16, 17, 33, 2567] {
            let row: Vec<f32> = (0..n).map(|i| (i % 11) as f32 - 5.0).collect();
            let exact: i64 = (0..n).map(|i| ((i % 11) as i64 - 5).abs()).sum();
            assert_eq!(abs_sum_f64(&row), exact as f64, "{n}");
        }
    }

    #[test]
    fn abs_sum_follows_its_documented_order() {
        let row: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919 % 1013) as f32).sqrt() * 1e-3)
            .collect();
        let mut lanes = [0f64; 16];
        let full = row.len() / 16 * 16;
        for (i, v) in row[..full].iter().enumerate() {
            lanes[i % 16] += f64::from(v.abs());
        }
        for width in [8, 4, 2, 1] {
            for i in 0..width {
                lanes[i] += lanes[i + width];
            }
        }
        let mut expected = lanes[0];
        for v in &row[full..] {
            expected += f64::from(v.abs());
        }
        assert_eq!(abs_sum_f64(&row).to_bits(), expected.to_bits());
    }
}
