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
        if dtype == FloatDtype::Bf16 && src.len() == 2 * buf.len() {
            // SAFETY: the CPU supports AVX2 (checked at run time just above).
            return unsafe { avx2::bf16_abs_sum(src) };
        }
        // SAFETY: as above.
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
        let k = buf.len();
        if dtype == FloatDtype::Bf16
            && layout == TernaryLayout::I2
            && src.len() == 2 * k
            && trits.len() == k
            && dst.len() == layout.row_bytes(k)
        {
            // SAFETY: the CPU supports AVX2 (checked at run time just above).
            return unsafe { avx2::bf16_ternarize_i2(src, scale, buf, trits, dst) };
        }
        // SAFETY: as above.
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

    /// [`row_abs_sum_body`] for bf16 in one pass over the stored bytes, with the same partial
    /// sums in the same order ([`abs_sum_f64`]): f64 lane `i` of the four accumulators adds
    /// elements `i, i + 16, ...`. A bf16 value is the upper half of its f32, so interleaving
    /// zeros below each element (`vpunpck*wd`) decodes it; within each 128-bit half that puts
    /// elements 0-3 and 4-7 in separate vectors, which is the accumulator order.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn bf16_abs_sum(src: &[u8]) -> Result<f64, usize> {
        use std::arch::x86_64::*;
        let k = src.len() / 2;
        let full = k / 16;
        // SAFETY: AVX2 is enabled; every load reads 32 bytes of chunk `c < full` of `src`.
        let (sum, bad) = unsafe {
            let zero = _mm256_setzero_si256();
            let abs = _mm256_set1_epi16(0x7fff);
            let exp = _mm256_set1_epi16(0x7f80);
            let mut bad = zero;
            let mut acc = [_mm256_setzero_pd(); 4];
            for c in 0..full {
                let v = _mm256_loadu_si256(src.as_ptr().add(32 * c) as *const __m256i);
                bad = _mm256_or_si256(bad, _mm256_cmpeq_epi16(_mm256_and_si256(v, exp), exp));
                let a = _mm256_and_si256(v, abs);
                // Elements 0-3 | 8-11 and 4-7 | 12-15, as f32.
                let lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, a));
                let hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, a));
                acc[0] = _mm256_add_pd(acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(lo)));
                acc[1] = _mm256_add_pd(acc[1], _mm256_cvtps_pd(_mm256_castps256_ps128(hi)));
                acc[2] = _mm256_add_pd(acc[2], _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(lo)));
                acc[3] = _mm256_add_pd(acc[3], _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(hi)));
            }
            // The tree of abs_sum_f64: lane i + 8, then i + 4, i + 2, i + 1.
            let a = _mm256_add_pd(acc[0], acc[2]);
            let b = _mm256_add_pd(acc[1], acc[3]);
            let a = _mm256_add_pd(a, b);
            let mut l = [0f64; 4];
            _mm256_storeu_pd(l.as_mut_ptr(), a);
            let sum = (l[0] + l[2]) + (l[1] + l[3]);
            (sum, _mm256_movemask_epi8(bad) != 0)
        };
        let tail = &src[32 * full..];
        let value = |c: &[u8]| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
        let tail_bad = tail.chunks_exact(2).any(|c| !value(c).is_finite());
        if bad || tail_bad {
            let at = src.chunks_exact(2).position(|c| !value(c).is_finite());
            return Err(at.unwrap_or(0));
        }
        Ok(tail
            .chunks_exact(2)
            .fold(sum, |s, c| s + f64::from(value(c).abs())))
    }

    /// [`row_ternarize_body`] for bf16 into `i2`, in one pass: per block of 128 weights, each
    /// 2-bit plane's 32 trits are made with the same f32 product and comparisons as
    /// [`AbsmeanScale::trit`] and or-ed into place. A row's last partial block goes through
    /// the plain code.
    ///
    /// # Safety
    /// The CPU must support AVX2, `src` must hold `2 k` bytes and `dst` `i2::row_bytes(k)`,
    /// where `k = buf.len() = trits.len()`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn bf16_ternarize_i2(
        src: &[u8],
        scale: &AbsmeanScale,
        buf: &mut [f32],
        trits: &mut [i8],
        dst: &mut [u8],
    ) {
        use crate::pack::i2::{BLOCK, BLOCK_BYTES, PLANE};
        use std::arch::x86_64::*;
        let k = buf.len();
        let full = k / BLOCK;
        assert!(src.len() == 2 * k && dst.len() >= full * BLOCK_BYTES);
        // SAFETY: AVX2 is enabled; block `b < full` reads bytes `256 b .. 256 b + 256` of `src`
        // and writes bytes `32 b .. 32 b + 32` of `dst`, both within the lengths checked above.
        unsafe {
            let zero = _mm256_setzero_si256();
            let inv = _mm256_set1_ps(scale.inv_scale);
            let half = _mm256_set1_ps(0.5);
            let neg_half = _mm256_set1_ps(-0.5);
            let one = _mm256_set1_epi16(1);
            // Codes (trit + 1) of 16 weights at `p`, as 16-bit lanes in element order: the
            // unpacks split each 128-bit half, and the signed pack puts it back together.
            let codes16 = |p: *const u8| {
                let v = _mm256_loadu_si256(p as *const __m256i);
                let lo = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), inv);
                let hi = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)), inv);
                // -1 where x > 0.5, else 0; and where x < -0.5.
                let gt = _mm256_packs_epi32(
                    _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(lo, half)),
                    _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(hi, half)),
                );
                let lt = _mm256_packs_epi32(
                    _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(lo, neg_half)),
                    _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(hi, neg_half)),
                );
                _mm256_add_epi16(_mm256_sub_epi16(one, gt), lt)
            };
            for b in 0..full {
                let base = src.as_ptr().add(2 * BLOCK * b);
                let mut out = zero;
                for p in 0..4 {
                    let at = base.add(2 * PLANE * p);
                    // Weights 0-7, 16-23 | 8-15, 24-31 of the plane, as bytes.
                    let c = _mm256_packus_epi16(codes16(at), codes16(at.add(32)));
                    out =
                        _mm256_or_si256(out, _mm256_sll_epi16(c, _mm_cvtsi32_si128(2 * p as i32)));
                }
                let out = _mm256_permute4x64_epi64::<0xd8>(out);
                _mm256_storeu_si256(dst.as_mut_ptr().add(BLOCK_BYTES * b) as *mut __m256i, out);
            }
        }
        if full * BLOCK < k {
            let rest = full * BLOCK;
            row_ternarize_body(
                FloatDtype::Bf16,
                &src[2 * rest..],
                scale,
                TernaryLayout::I2,
                &mut buf[rest..],
                &mut trits[rest..],
                &mut dst[full * BLOCK_BYTES..],
            );
        }
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

    /// The fused bf16 passes against the plain code on values made to be awkward: every bf16
    /// around the rounding thresholds of the scale, signed zeros, subnormals, the largest
    /// finite values; and non-finite values in the vector part, the tail, or both.
    #[test]
    fn fused_bf16_passes_equal_the_plain_code() {
        let mut rng = crate::num::SplitMix64(5);
        for k in [16usize, 17, 128, 131, 256 + 77, 2560] {
            let mut bits: Vec<u16> = (0..k).map(|_| rng.next_u64() as u16 & 0x7fff).collect();
            // Mostly ordinary weights, a few special ones.
            for b in bits.iter_mut() {
                let r = rng.next_u64() % 16;
                *b = match r {
                    // Exactly 0.125, 0.25 or 0.5 (ties for the means below), either sign.
                    14 => {
                        [0x3e00u16, 0x3e80, 0x3f00][(rng.next_u64() % 3) as usize]
                            | (rng.next_u64() as u16 & 0x8000)
                    }
                    0 => 0x8000,
                    1 => 0x0001 | (rng.next_u64() as u16 & 0x807f),
                    2 => 0x7f7f | (rng.next_u64() as u16 & 0x8000),
                    _ => {
                        (0x3c00 + (rng.next_u64() % 0x400) as u16)
                            | (rng.next_u64() as u16 & 0x8000)
                    }
                };
            }
            let src: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            let mut buf = vec![0f32; k];
            let plain = row_abs_sum_body(FloatDtype::Bf16, &src, &mut buf).unwrap();
            let fused = row_abs_sum(FloatDtype::Bf16, &src, &mut buf).unwrap();
            assert_eq!(fused.to_bits(), plain.to_bits(), "k={k}");
            // Scales that put many weights exactly on +-0.5 after the product.
            for count in [k, 7 * k, k / 3 + 1] {
                let scale = AbsmeanScale::from_abs_sum(plain, count);
                for mean in [scale.mean_abs, 0.25, 0.5, 1.0] {
                    let scale = AbsmeanScale::from_abs_sum(f64::from(mean) * k as f64, k);
                    let layout = TernaryLayout::I2;
                    let mut trits = vec![0i8; k];
                    // The fused build and the plain code, each into a fresh row.
                    let [a, b] = [row_ternarize, row_ternarize_body].map(|f| {
                        let mut row = vec![0xAAu8; layout.row_bytes(k)];
                        let bf16 = FloatDtype::Bf16;
                        f(bf16, &src, &scale, layout, &mut buf, &mut trits, &mut row);
                        row
                    });
                    assert_eq!(a, b, "k={k} mean={mean}");
                }
            }
            for bad_at in [vec![k - 1], vec![0, k - 1], vec![k / 2], vec![k / 2, k / 3]] {
                for bad in [0x7f80u16, 0xff80, 0x7fc1] {
                    let mut bits = bits.clone();
                    for &i in &bad_at {
                        bits[i] = bad;
                    }
                    let src: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
                    let first = *bad_at.iter().min().unwrap();
                    assert_eq!(row_abs_sum(FloatDtype::Bf16, &src, &mut buf), Err(first));
                    assert_eq!(
                        row_abs_sum_body(FloatDtype::Bf16, &src, &mut buf),
                        Err(first)
                    );
                }
            }
        }
    }
}
