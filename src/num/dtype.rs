//! Element types of source checkpoints and their decoding to f32.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// A floating-point element type that a source tensor may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatDtype {
    F32,
    F16,
    Bf16,
}

impl FloatDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::F16 | FloatDtype::Bf16 => 2,
        }
    }

    /// Lower-case name, as used on the command line and in .bpk headers.
    pub fn as_str(self) -> &'static str {
        match self {
            FloatDtype::F32 => "f32",
            FloatDtype::F16 => "f16",
            FloatDtype::Bf16 => "bf16",
        }
    }

    /// Maps a safetensors dtype; `None` for every non-float or exotic type.
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(FloatDtype::F32),
            safetensors::Dtype::F16 => Some(FloatDtype::F16),
            safetensors::Dtype::BF16 => Some(FloatDtype::Bf16),
            _ => None,
        }
    }

    /// The matching safetensors dtype.
    /// The dtype's name in a safetensors header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "F32",
            FloatDtype::F16 => "F16",
            FloatDtype::Bf16 => "BF16",
        }
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            FloatDtype::F32 => safetensors::Dtype::F32,
            FloatDtype::F16 => safetensors::Dtype::F16,
            FloatDtype::Bf16 => safetensors::Dtype::BF16,
        }
    }
}

/// Decodes little-endian elements of `dtype` from `bytes` into `out` (exact: every f16 and bf16
/// value is representable in f32). `bytes.len()` must be `out.len() * dtype.size()`.
// Always inlined, so that the AVX2 builds of its callers (quant::rows, run::model) vectorize it too.
#[inline(always)]
pub fn decode_f32(dtype: FloatDtype, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    match dtype {
        FloatDtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        FloatDtype::Bf16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        FloatDtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
    }
}

/// Encodes f32 values as little-endian `dtype` elements, rounding to nearest even.
pub fn encode_f32(dtype: FloatDtype, values: &[f32], out: &mut Vec<u8>) {
    out.reserve(values.len() * dtype.size());
    match dtype {
        FloatDtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        FloatDtype::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        FloatDtype::Bf16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
    }
}

/// Elements per chunk when tensors are streamed through f32.
pub const STREAM_CHUNK: usize = 1 << 20;

/// The flat index and value of the first NaN or infinity, scanning chunks in parallel.
pub fn first_non_finite(dtype: FloatDtype, bytes: &[u8]) -> Option<(usize, f32)> {
    let chunk = STREAM_CHUNK * dtype.size();
    bytes
        .par_chunks(chunk)
        .enumerate()
        .map(|(c, src)| first_non_finite_serial(dtype, src).map(|(i, v)| (c * STREAM_CHUNK + i, v)))
        .find_first(Option::is_some)
        .flatten()
}

/// The flat index and value of the first NaN or infinity, scanning on the current thread a
/// few thousand elements at a time. A value is NaN or infinite exactly when its exponent bits
/// are all ones, so the scan tests the stored bits (a branch-free loop that vectorizes) and
/// decodes only the value it reports.
pub fn first_non_finite_serial(dtype: FloatDtype, bytes: &[u8]) -> Option<(usize, f32)> {
    const BLOCK: usize = 4096;
    fn scan<const N: usize>(
        bytes: &[u8],
        exp: u32,
        decode: impl Fn(&[u8]) -> f32,
    ) -> Option<(usize, f32)> {
        let word = |c: &[u8]| {
            let mut w = [0u8; 4];
            w[..N].copy_from_slice(c);
            u32::from_le_bytes(w)
        };
        for (b, src) in bytes.chunks(BLOCK * N).enumerate() {
            let bad = src
                .chunks_exact(N)
                .fold(false, |bad, c| bad | (word(c) & exp == exp));
            if bad {
                let i = src.chunks_exact(N).position(|c| word(c) & exp == exp)?;
                return Some((b * BLOCK + i, decode(&src[i * N..(i + 1) * N])));
            }
        }
        None
    }
    match dtype {
        FloatDtype::F32 => scan::<4>(bytes, 0x7f80_0000, |c| {
            f32::from_le_bytes([c[0], c[1], c[2], c[3]])
        }),
        FloatDtype::Bf16 => scan::<2>(bytes, 0x7f80, |c| {
            f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)
        }),
        FloatDtype::F16 => scan::<2>(bytes, 0x7c00, |c| {
            half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scanned in blocks, in parallel or not, the first non-finite value is the one a plain
    /// scan finds, at block boundaries too.
    #[test]
    fn the_first_non_finite_value_is_found_across_blocks() {
        let n = 3 * STREAM_CHUNK / 2 + 4097;
        for dtype in [FloatDtype::F32, FloatDtype::F16, FloatDtype::Bf16] {
            for bad in [
                &[][..],
                &[0][..],
                &[4095, 4096][..],
                &[4096][..],
                &[n - 1][..],
                &[STREAM_CHUNK + 1, 5][..],
            ] {
                let mut vals = vec![1.5f32; n];
                for (j, &i) in bad.iter().enumerate() {
                    vals[i] = if j % 2 == 0 { f32::INFINITY } else { f32::NAN };
                }
                let mut bytes = Vec::new();
                encode_f32(dtype, &vals, &mut bytes);
                let want = bad.iter().min().copied();
                let got = first_non_finite(dtype, &bytes).map(|(i, _)| i);
                let serial = first_non_finite_serial(dtype, &bytes).map(|(i, _)| i);
                assert_eq!(got, want, "{dtype:?} {bad:?}");
                assert_eq!(serial, want, "{dtype:?} {bad:?}");
            }
        }
    }

    /// The bit test flags exactly the values that decode to NaN or an infinity: every 16-bit
    /// pattern, and f32 patterns around the exponent's edges, with the value reported.
    #[test]
    fn the_bit_test_flags_exactly_the_non_finite_values() {
        for dtype in [FloatDtype::F16, FloatDtype::Bf16] {
            for bits in 0..=u16::MAX {
                let b = bits.to_le_bytes();
                let mut v = [0f32];
                decode_f32(dtype, &b, &mut v);
                let got = first_non_finite_serial(dtype, &b);
                assert_eq!(got.is_some(), !v[0].is_finite(), "{dtype:?} {bits:#06x}");
                if let Some((i, x)) = got {
                    assert_eq!((i, x.to_bits()), (0, v[0].to_bits()));
                }
            }
        }
        for exp in [0u32, 1, 0xfe, 0xff] {
            for mantissa in [0u32, 1, 0x40_0000, 0x7f_ffff] {
                for sign in [0u32, 1] {
                    let bits = sign << 31 | exp << 23 | mantissa;
                    let v = f32::from_bits(bits);
                    let got = first_non_finite_serial(FloatDtype::F32, &bits.to_le_bytes());
                    assert_eq!(got.is_some(), !v.is_finite(), "{bits:#010x}");
                }
            }
        }
    }

    #[test]
    fn decode_encode_round_trip_is_exact_for_representable_values() {
        let values = [0.0f32, -1.5, 3.0e-3, 65504.0, -0.25];
        for dtype in [FloatDtype::F32, FloatDtype::F16, FloatDtype::Bf16] {
            let mut bytes = Vec::new();
            // Values first rounded to the dtype, so decoding gives them back exactly.
            let mut rounded = vec![0f32; values.len()];
            encode_f32(dtype, &values, &mut bytes);
            decode_f32(dtype, &bytes, &mut rounded);
            let mut again = Vec::new();
            encode_f32(dtype, &rounded, &mut again);
            assert_eq!(bytes, again, "{dtype:?}");
        }
    }

    #[test]
    fn bf16_decoding_is_a_shift() {
        let mut out = [0f32; 1];
        decode_f32(FloatDtype::Bf16, &0x3F80u16.to_le_bytes(), &mut out);
        assert_eq!(out[0], 1.0);
    }
}
