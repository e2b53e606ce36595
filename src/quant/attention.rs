//! Quantizers of the attention states (formats/bpk.md §3.2), one definition for both paths.
//!
//! - **Queries** (`q_bits` 8 or 4), after RoPE: each head vector symmetric absmax,
//!   `s = (2^(b-1) - 1) / max(max|x|, eps)`, `x <- clamp(round_half_even(x * s), -(2^(b-1) - 1),
//!   2^(b-1) - 1) / s`. Queries are used once and never stored, so they are fake-quantized.
//! - **Keys and values** (`kv_bits` 8, 4 or 3), keys after RoPE: each head vector stored as
//!   unsigned `b`-bit codes with its own minimum and step (asymmetric min-max):
//!   `lo = min x`, `step = (max x - lo) / (2^b - 1)`, `code = clamp(round_half_even((x - lo) /
//!   step), 0, 2^b - 1)` (all codes 0 when `step` is 0), value `lo + code * step`; in f32.
//!
//! Why asymmetric min-max per head vector: a key or value head vector after RoPE is not
//! centred on zero, and at 3 bits a symmetric grid wastes one of its seven levels on a side the
//! vector may barely use; per head vector (not per channel) keeps the state appendable one
//! token at a time, with two f32 per vector (8 bytes against 4 bytes per element unquantized).
//! Codes are packed into a little-endian bit stream, `ceil(head_dim * b / 8)` bytes per vector:
//! a 128-wide head is 128, 64 or 48 bytes plus 8, against 512 in f32.

use super::absmean::round_clamp;

/// Lower bound on a query head vector's absolute maximum.
pub const QUERY_EPS: f32 = 1e-5;

/// Fake-quantizes one query head vector to `bits` (8 or 4), symmetric absmax.
pub fn fake_quant_query(x: &mut [f32], bits: u8) {
    let qmax = ((1u32 << (bits - 1)) - 1) as f32;
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = qmax / absmax.max(QUERY_EPS);
    for v in x.iter_mut() {
        *v = round_clamp(*v * s, -qmax, qmax) / s;
    }
}

/// Encoder and decoder of key/value head vectors of `head_dim` elements at `bits` per code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCodec {
    bits: u8,
    head_dim: usize,
}

impl KvCodec {
    pub fn new(bits: u8, head_dim: usize) -> Self {
        debug_assert!(matches!(bits, 3 | 4 | 8));
        KvCodec { bits, head_dim }
    }

    /// Bytes of codes per head vector.
    pub fn bytes_per_vector(&self) -> usize {
        (self.head_dim * usize::from(self.bits)).div_ceil(8)
    }

    /// Encodes `x` into `out` (`bytes_per_vector` bytes); returns `(lo, step)`.
    pub fn encode(&self, x: &[f32], out: &mut [u8]) -> (f32, f32) {
        let levels = ((1u32 << self.bits) - 1) as f32;
        let (lo, hi) = x
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let step = (hi - lo) / levels;
        out.fill(0);
        if step > 0.0 && step.is_finite() {
            for (i, &v) in x.iter().enumerate() {
                let code = round_clamp((v - lo) / step, 0.0, levels) as u32;
                put_bits(out, i * usize::from(self.bits), self.bits, code);
            }
            (lo, step)
        } else {
            // A constant vector (or no finite spread): every code 0, the value is `lo`.
            (if lo.is_finite() { lo } else { 0.0 }, 0.0)
        }
    }

    /// Decodes a vector: `out[i] = lo + code_i * step`.
    pub fn decode(&self, codes: &[u8], lo: f32, step: f32, out: &mut [f32]) {
        let out = &mut out[..self.head_dim];
        match self.bits {
            8 => out
                .iter_mut()
                .zip(codes)
                .for_each(|(o, &c)| *o = lo + f32::from(c) * step),
            4 => out.iter_mut().enumerate().for_each(|(i, o)| {
                let c = (codes[i / 2] >> (4 * (i % 2))) & 0xF;
                *o = lo + f32::from(c) * step;
            }),
            bits => {
                // A code of at most 7 bits spans at most two bytes.
                let mask = (1u16 << bits) - 1;
                out.iter_mut().enumerate().for_each(|(i, o)| {
                    let at = i * usize::from(bits);
                    let lo_byte = u16::from(codes[at / 8]);
                    let hi_byte = u16::from(codes.get(at / 8 + 1).copied().unwrap_or(0));
                    let c = ((lo_byte | hi_byte << 8) >> (at % 8)) & mask;
                    *o = lo + f32::from(c) * step;
                });
            }
        }
    }

    /// [`KvCodec::decode`] one bit at a time: the definition the fast paths are tested against.
    #[cfg(test)]
    fn decode_reference(&self, codes: &[u8], lo: f32, step: f32, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate().take(self.head_dim) {
            let code = get_bits(codes, i * usize::from(self.bits), self.bits);
            *o = lo + code as f32 * step;
        }
    }
}

/// Writes the `bits` low bits of `v` at bit offset `at` (little-endian bit order).
fn put_bits(out: &mut [u8], at: usize, bits: u8, v: u32) {
    for b in 0..usize::from(bits) {
        if (v >> b) & 1 == 1 {
            let pos = at + b;
            out[pos / 8] |= 1 << (pos % 8);
        }
    }
}

/// Reads `bits` bits at bit offset `at`.
#[cfg(test)]
fn get_bits(codes: &[u8], at: usize, bits: u8) -> u32 {
    (0..usize::from(bits)).fold(0u32, |acc, b| {
        let pos = at + b;
        acc | (u32::from((codes[pos / 8] >> (pos % 8)) & 1) << b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_decode_equals_the_bitwise_definition() {
        for bits in [3u8, 4, 8] {
            for dim in [1usize, 3, 8, 26, 127, 128] {
                let c = KvCodec::new(bits, dim);
                let x = crate::test_util::uniform(dim, 7 * dim as u32 + u32::from(bits), -2.0, 3.0);
                let mut codes = vec![0u8; c.bytes_per_vector()];
                let (lo, step) = c.encode(&x, &mut codes);
                let (mut fast, mut slow) = (vec![0f32; dim], vec![0f32; dim]);
                c.decode(&codes, lo, step, &mut fast);
                c.decode_reference(&codes, lo, step, &mut slow);
                let b = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(b(&fast), b(&slow), "bits {bits} dim {dim}");
                // Every code pattern, not only those an encoding produces.
                let all: Vec<u8> = (0..codes.len()).map(|i| (i * 37 + 11) as u8).collect();
                c.decode(&all, lo, step, &mut fast);
                c.decode_reference(&all, lo, step, &mut slow);
                assert_eq!(b(&fast), b(&slow), "patterns, bits {bits} dim {dim}");
            }
        }
    }

    #[test]
    fn codes_round_trip_and_reconstruction_is_within_half_a_step() {
        for bits in [3u8, 4, 8] {
            for dim in [1usize, 5, 16, 127, 128] {
                let c = KvCodec::new(bits, dim);
                let x = crate::test_util::uniform(dim, dim as u32 + u32::from(bits), -3.0, 5.0);
                let mut codes = vec![0u8; c.bytes_per_vector()];
                let (lo, step) = c.encode(&x, &mut codes);
                let mut y = vec![0f32; dim];
                c.decode(&codes, lo, step, &mut y);
                for (a, b) in x.iter().zip(&y) {
                    assert!(
                        (a - b).abs() <= step * 0.5 + 1e-5,
                        "{bits} bits, {a} vs {b}"
                    );
                }
                // The extremes are represented exactly (up to float rounding of lo + L * step).
                let min = x.iter().cloned().fold(f32::INFINITY, f32::min);
                assert!(y.contains(&min));
            }
        }
        assert_eq!(KvCodec::new(3, 128).bytes_per_vector(), 48);
        assert_eq!(KvCodec::new(4, 128).bytes_per_vector(), 64);
    }

    #[test]
    fn a_constant_vector_decodes_to_itself() {
        let c = KvCodec::new(3, 4);
        let mut codes = vec![0xFFu8; c.bytes_per_vector()];
        let (lo, step) = c.encode(&[2.5; 4], &mut codes);
        assert_eq!((lo, step), (2.5, 0.0));
        let mut y = [0f32; 4];
        c.decode(&codes, lo, step, &mut y);
        assert_eq!(y, [2.5; 4]);
    }

    #[test]
    fn queries_are_quantized_symmetrically() {
        let mut x = [1.0f32, -0.5, 0.26, 0.0];
        fake_quant_query(&mut x, 4);
        // s = 7: 1 -> 7/7, -0.5 -> -3.5 -> -4 (half to even) / 7, 0.26 -> 1.82 -> 2 / 7.
        assert_eq!(x, [1.0, -4.0 / 7.0, 2.0 / 7.0, 0.0]);
    }
}
