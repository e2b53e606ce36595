//! Already-ternary HF checkpoints: transformers' BitNet *offline* quantization, in which every
//! projection holds its trits (not master weights) and a `weight_scale` tensor beside them.
//!
//! Two conventions exist, told apart only by `quantization_config.linear_class` (spec:
//! formats/hf.md §2):
//! - `bitlinear` (transformers' default): the weight is uint8 `[out/4, in]`, four trits per
//!   byte, `W[i*R + r, c] = ((P[r, c] >> 2i) & 3) - 1` with `R = out/4`, and the output is
//!   divided by `weight_scale`, so `weight_scale = 1/a`;
//! - `autobitlinear` with `quantization_mode: offline` (microsoft/bitnet-b1.58-2B-4T): the same
//!   packed bytes, or the trits stored unpacked as floats, and the output is multiplied by
//!   `weight_scale`, so `weight_scale = a`.
//!
//! Mixing the two up scales every layer by `a^2`, so the convention is decided once, here, and
//! every reader of a [`TernarySource`] gets `a` (`weight = a * trit`).

use crate::num::FloatDtype;
use crate::num::dtype::decode_f32;

/// Trits per byte of transformers' packed layout.
pub const TRITS_PER_BYTE: usize = 4;

/// The name of the scale tensor of a projection weight.
pub fn scale_name(weight: &str) -> String {
    format!("{weight}_scale")
}

/// transformers' two BitNet linear classes, as `quantization_config.linear_class` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearClass {
    /// `output / weight_scale`: `weight_scale = 1/a`; weights always packed.
    BitLinear,
    /// `output * weight_scale` (offline mode): `weight_scale = a`.
    AutoBitLinear,
}

impl LinearClass {
    pub fn as_str(self) -> &'static str {
        match self {
            LinearClass::BitLinear => "bitlinear",
            LinearClass::AutoBitLinear => "autobitlinear",
        }
    }

    /// Parses `linear_class` (absent means transformers' default, `bitlinear`).
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s {
            None | Some("bitlinear") => Some(LinearClass::BitLinear),
            Some("autobitlinear") => Some(LinearClass::AutoBitLinear),
            Some(_) => None,
        }
    }

    /// `a` from a stored `weight_scale`.
    pub fn a_from_weight_scale(self, ws: f32) -> f32 {
        match self {
            LinearClass::BitLinear => 1.0 / ws,
            LinearClass::AutoBitLinear => ws,
        }
    }

    /// The `weight_scale` to store for `a`.
    pub fn weight_scale_from_a(self, a: f32) -> f32 {
        match self {
            LinearClass::BitLinear => 1.0 / a,
            LinearClass::AutoBitLinear => a,
        }
    }
}

/// How the trits of an already-ternary projection are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TritStorage {
    /// uint8 `[out/4, in]`, transformers' `pack_weights` order.
    Packed,
    /// One float in {-1, 0, 1} per weight, `[out, in]`.
    Float(FloatDtype),
}

/// A projection whose trits come from the checkpoint (no ternarization).
#[derive(Debug, Clone, PartialEq)]
pub struct TernarySource {
    pub storage: TritStorage,
    pub class: LinearClass,
    /// The `weight_scale` tensor's name and its value as stored (decoded to f32).
    pub scale_tensor: String,
    pub weight_scale: f32,
    /// `weight = a * trit`.
    pub a: f32,
}

/// A byte or value that is not a trit.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum TritError {
    #[error("packed byte at [{row}, {col}] holds code 3 in bits {shift}..{}, which is not a trit (codes are trit + 1: 0, 1 or 2)", shift + 2)]
    PackedCode { row: usize, col: usize, shift: u32 },
    #[error("element [{row}, {col}] is {value}, not -1, 0 or 1")]
    NotATrit { row: usize, col: usize, value: f32 },
}

/// Unpacks transformers' packed bytes (`[rows/4, k]`) into `out` (`[rows, k]`, row-major).
pub fn unpack_packed(bytes: &[u8], rows: usize, k: usize, out: &mut [i8]) -> Result<(), TritError> {
    debug_assert_eq!(bytes.len() * TRITS_PER_BYTE, rows * k);
    debug_assert_eq!(out.len(), rows * k);
    let r_count = rows / TRITS_PER_BYTE;
    for (r, packed_row) in bytes.chunks_exact(k).enumerate() {
        for i in 0..TRITS_PER_BYTE {
            let shift = 2 * i as u32;
            let row = i * r_count + r;
            let dst = &mut out[row * k..(row + 1) * k];
            for (col, (d, &b)) in dst.iter_mut().zip(packed_row).enumerate() {
                let code = (b >> shift) & 3;
                if code == 3 {
                    return Err(TritError::PackedCode { row: r, col, shift });
                }
                *d = code as i8 - 1;
            }
        }
    }
    Ok(())
}

/// Packs `[rows, k]` trits (rows a multiple of 4) into transformers' `[rows/4, k]` bytes.
pub fn pack_packed(trits: &[i8], rows: usize, k: usize, out: &mut [u8]) {
    debug_assert_eq!(rows % TRITS_PER_BYTE, 0);
    debug_assert_eq!(out.len() * TRITS_PER_BYTE, rows * k);
    let r_count = rows / TRITS_PER_BYTE;
    out.fill(0);
    for (row, src) in trits.chunks_exact(k).enumerate() {
        let (i, r) = (row / r_count, row % r_count);
        let dst = &mut out[r * k..(r + 1) * k];
        for (d, &t) in dst.iter_mut().zip(src) {
            *d |= ((t + 1) as u8) << (2 * i);
        }
    }
}

/// Reads trits stored as floats (`[rows, k]`), refusing any value that is not -1, 0 or 1.
pub fn float_trits(
    dtype: FloatDtype,
    bytes: &[u8],
    k: usize,
    out: &mut [i8],
) -> Result<(), TritError> {
    let mut row = vec![0f32; k];
    for (r, (src, dst)) in bytes
        .chunks_exact(k * dtype.size())
        .zip(out.chunks_exact_mut(k))
        .enumerate()
    {
        decode_f32(dtype, src, &mut row);
        for (col, (d, &v)) in dst.iter_mut().zip(&row).enumerate() {
            *d = match v {
                -1.0 => -1,
                0.0 => 0,
                1.0 => 1,
                value => return Err(TritError::NotATrit { row: r, col, value }),
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The layout as the spec states it, element by element.
    fn unpack_by_formula(p: &[u8], rows: usize, k: usize) -> Vec<i8> {
        let r_count = rows / 4;
        let mut w = vec![0i8; rows * k];
        for i in 0..4 {
            for r in 0..r_count {
                for c in 0..k {
                    w[(i * r_count + r) * k + c] = ((p[r * k + c] >> (2 * i)) & 3) as i8 - 1;
                }
            }
        }
        w
    }

    proptest! {
        #[test]
        fn packed_round_trips(r4 in 1usize..6, k in 1usize..9, seed in any::<u64>()) {
            let rows = r4 * 4;
            let mut s = seed;
            let trits: Vec<i8> = (0..rows * k)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((s >> 33) % 3) as i8 - 1
                })
                .collect();
            let mut p = vec![0u8; rows * k / 4];
            pack_packed(&trits, rows, k, &mut p);
            prop_assert_eq!(&unpack_by_formula(&p, rows, k), &trits);
            let mut back = vec![0i8; rows * k];
            unpack_packed(&p, rows, k, &mut back).unwrap();
            prop_assert_eq!(back, trits);
        }
    }

    /// transformers' own docstring example of `unpack_weights`, worked by hand: byte
    /// 0b10100001 holds codes 1, 0, 2, 2 (low bits first) for rows 0, 1, 2, 3.
    #[test]
    fn a_byte_by_hand() {
        let mut out = [0i8; 4];
        unpack_packed(&[0b1010_0001], 4, 1, &mut out).unwrap();
        assert_eq!(out, [0, -1, 1, 1]);
    }

    #[test]
    fn code_three_is_refused() {
        let mut out = [0i8; 8];
        assert_eq!(
            unpack_packed(&[0, 0b0011_0000], 4, 2, &mut out),
            Err(TritError::PackedCode {
                row: 0,
                col: 1,
                shift: 4
            })
        );
    }

    #[test]
    fn float_non_trits_are_refused() {
        let bytes: Vec<u8> = [1.0f32, 0.0, -1.0, 0.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut out = [0i8; 4];
        assert_eq!(
            float_trits(FloatDtype::F32, &bytes, 2, &mut out),
            Err(TritError::NotATrit {
                row: 1,
                col: 1,
                value: 0.5
            })
        );
    }

    #[test]
    fn conventions_are_inverse() {
        for c in [LinearClass::BitLinear, LinearClass::AutoBitLinear] {
            assert_eq!(c.a_from_weight_scale(c.weight_scale_from_a(0.5)), 0.5);
        }
        assert_eq!(LinearClass::BitLinear.a_from_weight_scale(4.0), 0.25);
        assert_eq!(LinearClass::parse(None), Some(LinearClass::BitLinear));
        assert_eq!(LinearClass::parse(Some("other")), None);
    }
}
