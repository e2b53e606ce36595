//! What llama.cpp's two ternary block types, TQ1_0 ([`super::tq1_0`]) and TQ2_0
//! ([`super::tq2_0`]), share: blocks of [`BLOCK`] = 256 weights, an fp16 scale `d` stored last in
//! each block, `code = trit + 1`, and the same rule for choosing `d` and the codes from f32
//! input. Spec: formats/gguf.md §6.

/// Weights per block (llama.cpp's `QK_K`).
pub const BLOCK: usize = 256;
/// Bytes of the fp16 scale at the end of each block.
pub const SCALE_BYTES: usize = 2;

/// A row that cannot be encoded or bytes that do not decode to trits.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum TqError {
    #[error("a row of {len} weights is not a whole number of {BLOCK}-weight blocks")]
    RowLength { len: usize },
    #[error("buffer of {found} {what} given where {expected} are needed")]
    BufferLength {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("weight {element} is {value}, not a trit in {{-1, 0, 1}}")]
    BadTrit { element: usize, value: i8 },
    #[error(
        "scale {scale} is negative, not finite or above the fp16 range (65504); a ternary scale is a finite magnitude"
    )]
    BadScale { scale: f32 },
    #[error("weight {element} has 2-bit code {code}; only 0, 1 and 2 (trit + 1) are valid")]
    InvalidCode { element: usize, code: u8 },
    #[error(
        "byte {byte_index} of the row ({value:#04x}, holding weight {element} onwards) is not a value the TQ1_0 encoder writes"
    )]
    NonCanonical {
        byte_index: usize,
        element: usize,
        value: u8,
    },
    #[error("block {block} has scale {scale}, which is not finite")]
    NonFiniteScale { block: usize, scale: f32 },
}

/// Number of blocks in a row of `len` weights, if `len` is a whole number of blocks.
pub fn blocks_in(len: usize) -> Result<usize, TqError> {
    if len % BLOCK == 0 {
        Ok(len / BLOCK)
    } else {
        Err(TqError::RowLength { len })
    }
}

/// Checks that `found` equals `expected` for the buffer named `what`.
pub(crate) fn check_len(what: &'static str, expected: usize, found: usize) -> Result<(), TqError> {
    if expected == found {
        Ok(())
    } else {
        Err(TqError::BufferLength {
            what,
            expected,
            found,
        })
    }
}

/// Checks a scale before encoding: finite, not negative, representable in fp16.
pub(crate) fn check_scale(scale: f32) -> Result<(), TqError> {
    if scale.is_finite() && scale >= 0.0 && half::f16::from_f32(scale).is_finite() {
        Ok(())
    } else {
        Err(TqError::BadScale { scale })
    }
}

/// The codes (trit + 1) and fp16 scale bits llama.cpp's reference quantizer
/// (`quantize_row_tq{1,2}_0_ref`) produces for the block of f32 values `scale * trit`:
/// `d = max |x|` over the block (0 for an all-zero block), `q = round_half_away(x / d)`
/// computed as `x * (1 / d)`, then `d` rounded to fp16 (nearest, ties to even). `trits` is one
/// block; `first` is its first element's index in the row, for errors.
pub(crate) fn block_codes(
    trits: &[i8],
    scale: f32,
    first: usize,
    codes: &mut [u8; BLOCK],
) -> Result<[u8; SCALE_BYTES], TqError> {
    let mut amax = 0.0f32;
    for (i, &t) in trits.iter().enumerate() {
        if !(-1..=1).contains(&t) {
            return Err(TqError::BadTrit {
                element: first + i,
                value: t,
            });
        }
        amax = amax.max((scale * f32::from(t)).abs());
    }
    let id = if amax != 0.0 { 1.0 / amax } else { 0.0 };
    for (c, &t) in codes.iter_mut().zip(trits) {
        // f32::round rounds half away from zero, as C's lroundf. The result is -1, 0 or 1:
        // |x * id| <= 1 up to one rounding step.
        let q = (scale * f32::from(t) * id).round();
        *c = (q as i8 + 1) as u8;
    }
    Ok(half::f16::from_f32(amax).to_le_bytes())
}

/// The f32 scale stored in the two bytes `d` of block `block`; errors if it is not finite.
pub(crate) fn read_scale(d: [u8; SCALE_BYTES], block: usize) -> Result<f32, TqError> {
    let scale = half::f16::from_le_bytes(d).to_f32();
    if scale.is_finite() {
        Ok(scale)
    } else {
        Err(TqError::NonFiniteScale { block, scale })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{tq1_0, tq2_0};
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    type Encode = fn(&[i8], f32, &mut [u8]) -> Result<(), TqError>;
    type Decode = fn(&[u8], &mut [i8], &mut [f32]) -> Result<(), TqError>;
    type Dequantize = fn(&[u8], &mut [f32]) -> Result<(), TqError>;

    /// Our bytes equal gguf-py's `quantize` of `scale * trit`, and our dequantization equals
    /// gguf-py's `dequantize` bit for bit (fixtures/make_gguf_goldens.py, gguf 0.19.0).
    #[test]
    fn bytes_and_values_match_gguf_py() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/goldens/gguf/tq_rows.json"
        );
        let golden: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let cases = golden["cases"].as_array().unwrap();
        assert!(cases.len() >= 8);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let scale = case["scale"].as_f64().unwrap() as f32;
            let trits: Vec<i8> = case["trits"]
                .as_str()
                .unwrap()
                .bytes()
                .map(|c| match c {
                    b'-' => -1,
                    b'0' => 0,
                    _ => 1,
                })
                .collect();
            let codecs: [(&str, usize, Encode, Decode, Dequantize); 2] = [
                (
                    "tq1_0",
                    tq1_0::BLOCK_BYTES,
                    tq1_0::encode_row,
                    tq1_0::decode_row,
                    tq1_0::dequantize_row,
                ),
                (
                    "tq2_0",
                    tq2_0::BLOCK_BYTES,
                    tq2_0::encode_row,
                    tq2_0::decode_row,
                    tq2_0::dequantize_row,
                ),
            ];
            for (ty, block_bytes, encode, decode, dequantize) in codecs {
                let want = unhex(case[ty]["bytes_hex"].as_str().unwrap());
                let mut ours = vec![0u8; trits.len() / BLOCK * block_bytes];
                encode(&trits, scale, &mut ours).unwrap();
                assert_eq!(ours, want, "{name} {ty}: bytes differ from gguf-py");
                let want_deq: Vec<u32> = unhex(case[ty]["dequantized_f32le_hex"].as_str().unwrap())
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let mut deq = vec![0f32; trits.len()];
                dequantize(&want, &mut deq).unwrap();
                let deq: Vec<u32> = deq.iter().map(|v| v.to_bits()).collect();
                assert_eq!(deq, want_deq, "{name} {ty}: dequantized values differ");
                let mut back = vec![0i8; trits.len()];
                let mut scales = vec![0f32; trits.len() / BLOCK];
                decode(&want, &mut back, &mut scales).unwrap();
                if scale > 0.0 {
                    assert_eq!(back, trits, "{name} {ty}");
                } else {
                    assert!(back.iter().all(|&t| t == 0), "{name} {ty}");
                }
            }
        }
    }
}
