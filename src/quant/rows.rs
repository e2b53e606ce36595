//! The two per-row passes of ternarization, written once and built twice: for the baseline
//! CPU and, chosen at run time, with AVX2 enabled (wider vectors for the same code).
//!
//! Both builds compute the same values: the f64 sum keeps [`abs_sum_f64`]'s partial sums and
//! combination order, there is no fused multiply-add, and the trit is a pair of
//! comparisons. The output is therefore the same on every CPU and at every thread count.

use super::absmean::{AbsmeanScale, abs_sum_f64};
use crate::num::FloatDtype;
use crate::num::dtype::decode_f32;
use crate::pack::TernaryLayout;

/// Pass 1 for one row of `k = buf.len()` stored weights: the sum of `|w|` in f64, or the index
/// within the row of the first NaN or infinity. `buf` is scratch space.
pub fn row_abs_sum(dtype: FloatDtype, src: &[u8], buf: &mut [f32]) -> Result<f64, usize> {
    #[cfg(target_arch = "x86_64")]
    if crate::num::cpu::has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time just above).
        return unsafe { avx2::row_abs_sum(dtype, src, buf) };
    }
    row_abs_sum_body(dtype, src, buf)
}

/// Pass 2 for one row: ternarizes `src` with `scale` and packs the trits into `dst`.
/// `buf` and `trits` are scratch space of the row's length.
pub fn row_ternarize(
    dtype: FloatDtype,
    src: &[u8],
    scale: &AbsmeanScale,
    layout: TernaryLayout,
    buf: &mut [f32],
    trits: &mut [i8],
    dst: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::num::cpu::has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time just above).
        return unsafe { avx2::row_ternarize(dtype, src, scale, layout, buf, trits, dst) };
    }
    row_ternarize_body(dtype, src, scale, layout, buf, trits, dst)
}

#[inline(always)]
fn row_abs_sum_body(dtype: FloatDtype, src: &[u8], buf: &mut [f32]) -> Result<f64, usize> {
    decode_f32(dtype, src, buf);
    // A branch-free scan first (it vectorizes); the position only when something was found.
    let any_bad = buf.iter().fold(false, |bad, v| bad | !v.is_finite());
    if any_bad {
        return Err(buf.iter().position(|v| !v.is_finite()).unwrap_or(0));
    }
    Ok(abs_sum_f64(buf))
}

#[inline(always)]
fn row_ternarize_body(
    dtype: FloatDtype,
    src: &[u8],
    scale: &AbsmeanScale,
    layout: TernaryLayout,
    buf: &mut [f32],
    trits: &mut [i8],
    dst: &mut [u8],
) {
    decode_f32(dtype, src, buf);
    for (t, &w) in trits.iter_mut().zip(buf.iter()) {
        *t = scale.trit(w);
    }
    layout.pack_row(trits, dst);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn row_abs_sum(
        dtype: FloatDtype,
        src: &[u8],
        buf: &mut [f32],
    ) -> Result<f64, usize> {
        row_abs_sum_body(dtype, src, buf)
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn row_ternarize(
        dtype: FloatDtype,
        src: &[u8],
        scale: &AbsmeanScale,
        layout: TernaryLayout,
        buf: &mut [f32],
        trits: &mut [i8],
        dst: &mut [u8],
    ) {
        row_ternarize_body(dtype, src, scale, layout, buf, trits, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::num::dtype::encode_f32;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        crate::test_util::uniform(n, seed, -0.05, 0.05)
    }

    /// The dispatched kernels (AVX2 on a machine that has it) equal the baseline build and a
    /// direct computation from the definitions, for every dtype, layout and awkward length.
    #[test]
    fn both_builds_agree_with_the_definition() {
        for dtype in [FloatDtype::Bf16, FloatDtype::F16, FloatDtype::F32] {
            for k in [1usize, 3, 4, 5, 127, 128, 129, 300, 2560] {
                let mut src = Vec::new();
                encode_f32(dtype, &values(k, k as u32), &mut src);
                let mut w = vec![0f32; k];
                decode_f32(dtype, &src, &mut w);
                let direct = abs_sum_f64(&w);
                let mut buf = vec![0f32; k];
                let sum = row_abs_sum(dtype, &src, &mut buf).unwrap();
                assert_eq!(sum.to_bits(), direct.to_bits());
                assert_eq!(row_abs_sum_body(dtype, &src, &mut buf), Ok(sum));

                let scale = AbsmeanScale::from_abs_sum(sum, k);
                for layout in TernaryLayout::ALL {
                    let expected_trits: Vec<i8> = w
                        .iter()
                        .map(|v| (v * scale.inv_scale).round_ties_even().clamp(-1.0, 1.0) as i8)
                        .collect();
                    let mut expected = vec![0u8; layout.row_bytes(k)];
                    layout.pack_row(&expected_trits, &mut expected);
                    let mut trits = vec![0i8; k];
                    let (mut a, mut b) = (expected.clone(), expected.clone());
                    a.fill(0xAA);
                    b.fill(0xAA);
                    row_ternarize(dtype, &src, &scale, layout, &mut buf, &mut trits, &mut a);
                    row_ternarize_body(dtype, &src, &scale, layout, &mut buf, &mut trits, &mut b);
                    assert_eq!(a, expected, "{dtype:?} k={k} {layout:?}");
                    assert_eq!(b, expected, "{dtype:?} k={k} {layout:?}");
                }
            }
        }
    }

    #[test]
    fn the_first_non_finite_value_is_located() {
        let mut v = values(300, 1);
        v[200] = f32::INFINITY;
        v[250] = f32::NAN;
        for dtype in [FloatDtype::Bf16, FloatDtype::F16, FloatDtype::F32] {
            let mut src = Vec::new();
            encode_f32(dtype, &v, &mut src);
            let mut buf = vec![0f32; v.len()];
            assert_eq!(row_abs_sum(dtype, &src, &mut buf), Err(200));
        }
    }
}
