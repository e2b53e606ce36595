//! The `q8_0` encoding of the embedding and the head (`convert --keep q8`): rows cut into
//! blocks of [`BLOCK`] = 32 values, each stored as a little-endian f16 scale `d` followed by 32
//! signed bytes `q`, the value being `d * q`. Byte for byte GGML's `Q8_0` block, and quantized
//! as GGML's reference does: `d = max|x| / 127`, `q = round(x / d)` (computed as `x * (1 / d)`
//! in f32, halves away from zero; all zero when `d` is zero), `d` then stored as f16.
//! Spec: formats/bpk.md §5.5.

use half::f16;

/// Values per block.
pub const BLOCK: usize = 32;
/// Bytes per block: the f16 scale and 32 bytes.
pub const BLOCK_BYTES: usize = 2 + BLOCK;

/// Bytes of one row of `k` values (`k` a multiple of [`BLOCK`]).
pub fn row_bytes(k: usize) -> usize {
    debug_assert!(k % BLOCK == 0);
    k / BLOCK * BLOCK_BYTES
}

/// The scale of a block, as f32.
#[inline(always)]
pub fn scale(block: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32()
}

/// Whether a block whose largest magnitude is `amax` gets a finite f16 scale `amax / 127`
/// (false from about 8.3e6 up, and for NaN).
pub fn scale_fits(amax: f32) -> bool {
    f16::from_f32(amax / 127.0).is_finite()
}

/// Quantizes one row (`x.len()` a multiple of [`BLOCK`]) into `out` ([`row_bytes`] long).
/// A non-finite value gives a non-finite or zero scale; callers check their input first.
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(BLOCK).zip(out.chunks_exact_mut(BLOCK_BYTES)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        ob[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (o, &v) in ob[2..].iter_mut().zip(xb) {
            *o = round_half_away(v * id) as u8;
        }
    }
}

/// `v.round() as i8` (halves away from zero, saturating) for `|v| <= 128`, without the library call that
/// `f32::round` becomes on baseline x86-64: truncate, then step away from zero when the
/// dropped fraction (exact in f32 at these magnitudes) is at least a half.
#[inline(always)]
fn round_half_away(v: f32) -> i8 {
    let t = v as i32;
    let frac = v - t as f32;
    let step = i32::from(frac >= 0.5) - i32::from(frac <= -0.5);
    // Saturating: `v` is infinite when a block's scale underflows to zero (its values are
    // then stored as zeros times a zero scale, whatever the codes).
    t.saturating_add(step).clamp(-128, 127) as i8
}

/// The values of one row.
pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    for (b, ob) in bytes
        .chunks_exact(BLOCK_BYTES)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let d = scale(b);
        for (o, &q) in ob.iter_mut().zip(&b[2..]) {
            *o = d * f32::from(q as i8);
        }
    }
}

/// The first block (index) of a row whose scale is not a finite non-negative number, if any.
pub fn check_row(bytes: &[u8]) -> Option<(usize, f32)> {
    bytes
        .chunks_exact(BLOCK_BYTES)
        .map(scale)
        .enumerate()
        .find(|(_, d)| !(d.is_finite() && *d >= 0.0))
}

/// Lanes of the dot product's partial sums.
const LANES: usize = 8;

/// `sum_i value_i * x_i` over one row, in a fixed order that every build follows exactly:
/// per block, lane `l` (0..8) forms `t = q[l] x[l]`, then `t = fma(q[l+8], x[l+8], t)`,
/// `fma(q[l+16], x[l+16], t)`, `fma(q[l+24], x[l+24], t)` (fused multiply-adds, one rounding
/// each), and its running sum becomes `fma(d, t, s_l)`; the eight running sums are added as
/// `((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))`.
pub fn dot(bytes: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_simd() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
            return unsafe { avx2::dot(bytes, x) };
        }
    }
    dot_scalar(bytes, x)
}

/// Whether the SIMD build of [`dot`] runs on this CPU.
pub fn has_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::num::cpu::has_avx2()
            && std::is_x86_feature_detected!("f16c")
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Scalar reference of [`dot`], the same operations in the same order.
pub fn dot_scalar(bytes: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (b, xb) in bytes.chunks_exact(BLOCK_BYTES).zip(x.chunks_exact(BLOCK)) {
        let d = scale(b);
        let q = |i: usize| f32::from(b[2 + i] as i8);
        for (l, a) in acc.iter_mut().enumerate() {
            let mut t = q(l) * xb[l];
            for i in 1..BLOCK / LANES {
                t = q(l + LANES * i).mul_add(xb[l + LANES * i], t);
            }
            *a = d.mul_add(t, *a);
        }
    }
    let s = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (s[0] + s[2]) + (s[1] + s[3])
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BLOCK, BLOCK_BYTES, LANES};

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(bytes: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, xb) in bytes.chunks_exact(BLOCK_BYTES).zip(x.chunks_exact(BLOCK)) {
            let bits = i32::from(u16::from_le_bytes([b[0], b[1]]));
            let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
            // SAFETY: the block holds 2 + 32 bytes and `xb` 32 floats; unaligned loads of 8
            // bytes and 8 floats at offsets 2 + 8 i and 8 i, i < 4.
            let qx = |i: usize| unsafe {
                let q = _mm_loadl_epi64(b.as_ptr().add(2 + LANES * i).cast());
                let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                (q, _mm256_loadu_ps(xb.as_ptr().add(LANES * i)))
            };
            let (q0, x0) = qx(0);
            let mut t = _mm256_mul_ps(q0, x0);
            for i in 1..BLOCK / LANES {
                let (q, x) = qx(i);
                t = _mm256_fmadd_ps(q, x, t);
            }
            acc = _mm256_fmadd_ps(d, t, acc);
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    #[test]
    fn rounding_is_halves_away_from_zero() {
        let mut v = -127.5f32;
        while v <= 127.5 {
            for x in [
                v,
                f32::from_bits(v.to_bits() + 1),
                f32::from_bits(v.to_bits().saturating_sub(1)),
            ] {
                if x.abs() <= 127.5 {
                    assert_eq!(round_half_away(x), x.round() as i8, "{x}");
                }
            }
            v += 0.25;
        }
        for x in [
            0.49999997f32,
            -0.49999997,
            0.5,
            -0.5,
            1.5,
            -2.5,
            126.5,
            -126.5,
        ] {
            assert_eq!(round_half_away(x), x.round() as i8, "{x}");
        }
    }

    #[test]
    fn quantize_follows_the_reference_rule() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let mut b = vec![0u8; row_bytes(64)];
        quantize_row(&x, &mut b);
        for (blk, xb) in b.chunks_exact(BLOCK_BYTES).zip(x.chunks_exact(BLOCK)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(scale(blk), f16::from_f32(amax / 127.0).to_f32());
            // The largest magnitude lands on +-127, and every value within half a step.
            let d = amax / 127.0;
            for (&q, &v) in blk[2..].iter().zip(xb) {
                let q = f32::from(q as i8);
                assert!((q - v / d).abs() <= 0.5 + 1e-4, "{q} {v}");
            }
            assert!(blk[2..].iter().any(|&q| (q as i8).unsigned_abs() == 127));
        }
        // An all-zero block: scale 0, codes 0.
        let mut z = vec![1u8; BLOCK_BYTES];
        quantize_row(&[0f32; BLOCK], &mut z);
        assert!(z.iter().all(|&v| v == 0));
    }

    #[test]
    fn the_simd_dot_equals_the_scalar_reference_bit_for_bit() {
        let mut rng = Lcg(5);
        for k in [32usize, 64, 96, 2560, 4096] {
            for rows in 0..4 {
                let w: Vec<f32> = (0..k).map(|_| rng.next() * (1 + rows) as f32).collect();
                let x: Vec<f32> = (0..k).map(|_| rng.next() * 3.0).collect();
                let mut b = vec![0u8; row_bytes(k)];
                quantize_row(&w, &mut b);
                let want = dot_scalar(&b, &x);
                assert_eq!(dot(&b, &x).to_bits(), want.to_bits(), "k={k}");
                // And it is the dot of the dequantized row, to f32 rounding.
                let mut v = vec![0f32; k];
                dequantize_row(&b, &mut v);
                let exact: f64 = v
                    .iter()
                    .zip(&x)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let scale: f64 = v
                    .iter()
                    .zip(&x)
                    .map(|(&a, &b)| f64::from((a * b).abs()))
                    .sum();
                assert!(
                    (f64::from(want) - exact).abs() <= 1e-5 * scale.max(1e-30),
                    "k={k}"
                );
            }
        }
    }

    #[test]
    fn check_row_finds_a_bad_scale() {
        let mut b = vec![0u8; row_bytes(96)];
        quantize_row(&[1.0; 96], &mut b);
        assert_eq!(check_row(&b), None);
        b[BLOCK_BYTES..BLOCK_BYTES + 2].copy_from_slice(&f16::NAN.to_bits().to_le_bytes());
        assert_eq!(check_row(&b).map(|(i, _)| i), Some(1));
        b[BLOCK_BYTES..BLOCK_BYTES + 2]
            .copy_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        assert_eq!(check_row(&b).map(|(i, _)| i), Some(1));
    }
}
