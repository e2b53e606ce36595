//! bitnet.cpp's I2_S tensor layout (x86 build; its ggml type 36): 2-bit codes in blocks of 128
//! weights, then one f32 scale for the whole tensor in a 32-byte tail.
//!
//! The weights of the tensor, taken row after row, are cut into blocks of [`BLOCK`] = 128 and
//! each block fills [`BLOCK_BYTES`] = 32 bytes: byte `j` holds weights `j`, `j + 32`, `j + 64`,
//! `j + 96` in bits 7:6, 5:4, 3:2, 1:0 (most significant first; the opposite of our `.bpk` i2
//! layout). `code = trit + 1`; code 3 is refused on decode. Rows must be a multiple of 128
//! weights, so no block spans two rows. After the last block comes a [`TAIL_BYTES`]-byte tail:
//! the little-endian f32 scale in its first 4 bytes, zeros after it when we write (bitnet.cpp
//! does not define them, so they are not checked on read). The ARM build of bitnet.cpp uses
//! 64-weight blocks in 16 bytes, a different layout this module does not produce.
//! Spec: formats/gguf.md §6.4.
//!
//! The API works on whole tensors, because the scale sits after all the rows:
//! [`tensor_bytes`], [`encode_tensor`] / [`decode_tensor`], and for streaming
//! [`encode_row`] / [`decode_row`] plus [`encode_tail`] / [`decode_tail`].

/// Weights per block.
pub const BLOCK: usize = 128;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 32;
/// Weights per 2-bit plane (byte stride between the weights of one byte).
const PLANE: usize = 32;
/// Bytes after the last block; the f32 scale is in the first four.
pub const TAIL_BYTES: usize = 32;

const _: () = assert!(BLOCK == 4 * PLANE && BLOCK_BYTES == PLANE);

/// A tensor that cannot be encoded, or bytes that do not decode to trits.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum I2sError {
    #[error("rows of {k} weights are not a whole number of {BLOCK}-weight I2_S blocks")]
    RowLength { k: usize },
    #[error("a {rows} x {k} tensor is too large to address")]
    TooLarge { rows: usize, k: usize },
    #[error("buffer of {found} {what} given where {expected} are needed")]
    BufferLength {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("weight {element} is {value}, not a trit in {{-1, 0, 1}}")]
    BadTrit { element: usize, value: i8 },
    #[error("weight {element} has 2-bit code 3; only 0, 1 and 2 (trit + 1) are valid")]
    InvalidCode { element: usize },
    #[error("the tensor scale {scale} is negative or not finite")]
    BadScale { scale: f32 },
}

fn check_len(what: &'static str, expected: usize, found: usize) -> Result<(), I2sError> {
    if expected == found {
        Ok(())
    } else {
        Err(I2sError::BufferLength {
            what,
            expected,
            found,
        })
    }
}

/// Bytes of one row of `k` weights (`k` a multiple of 128), without the tail.
pub fn row_bytes(k: usize) -> Result<usize, I2sError> {
    if k % BLOCK == 0 {
        Ok(k / BLOCK * BLOCK_BYTES)
    } else {
        Err(I2sError::RowLength { k })
    }
}

/// Bytes of a whole `rows x k` tensor: `rows * k / 4` bytes of codes plus the tail.
pub fn tensor_bytes(rows: usize, k: usize) -> Result<usize, I2sError> {
    row_bytes(k)?
        .checked_mul(rows)
        .and_then(|b| b.checked_add(TAIL_BYTES))
        .ok_or(I2sError::TooLarge { rows, k })
}

/// Bits per weight of a `rows x k` tensor, the tail included.
pub fn bits_per_weight(rows: usize, k: usize) -> Result<f64, I2sError> {
    let bytes = tensor_bytes(rows, k)?;
    Ok(bytes as f64 * 8.0 / (rows as f64 * k as f64))
}

/// Byte index within its block and bit shift of the code of weight `e` (0..128) of a block.
#[inline]
pub fn position(e: usize) -> (usize, u32) {
    (e % PLANE, 6 - 2 * (e / PLANE) as u32)
}

/// Packs one row of trits (length a multiple of 128) into `out` (`row_bytes(len)` bytes).
pub fn encode_row(trits: &[i8], out: &mut [u8]) -> Result<(), I2sError> {
    check_len("bytes", row_bytes(trits.len())?, out.len())?;
    for (b, (src, dst)) in trits
        .chunks_exact(BLOCK)
        .zip(out.chunks_exact_mut(BLOCK_BYTES))
        .enumerate()
    {
        dst.fill(0);
        for (e, &t) in src.iter().enumerate() {
            if !(-1..=1).contains(&t) {
                return Err(I2sError::BadTrit {
                    element: b * BLOCK + e,
                    value: t,
                });
            }
            let (byte, shift) = position(e);
            if let Some(o) = dst.get_mut(byte) {
                *o |= ((t + 1) as u8) << shift;
            }
        }
    }
    Ok(())
}

/// Unpacks one row (`row_bytes(trits_out.len())` bytes); refuses code 3, naming the weight.
pub fn decode_row(bytes: &[u8], trits_out: &mut [i8]) -> Result<(), I2sError> {
    check_len("bytes", row_bytes(trits_out.len())?, bytes.len())?;
    for (b, (src, dst)) in bytes
        .chunks_exact(BLOCK_BYTES)
        .zip(trits_out.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        for (e, t) in dst.iter_mut().enumerate() {
            let (byte, shift) = position(e);
            let code = src.get(byte).map_or(0, |v| (v >> shift) & 3);
            if code == 3 {
                return Err(I2sError::InvalidCode {
                    element: b * BLOCK + e,
                });
            }
            *t = code as i8 - 1;
        }
    }
    Ok(())
}

/// Writes the tail: the scale (finite, non-negative) as little-endian f32, then zeros.
pub fn encode_tail(scale: f32, out: &mut [u8; TAIL_BYTES]) -> Result<(), I2sError> {
    if !(scale.is_finite() && scale >= 0.0) {
        return Err(I2sError::BadScale { scale });
    }
    out.fill(0);
    out[..4].copy_from_slice(&scale.to_le_bytes());
    Ok(())
}

/// Reads the scale from a tail; refuses a negative or non-finite one.
pub fn decode_tail(tail: &[u8; TAIL_BYTES]) -> Result<f32, I2sError> {
    let scale = f32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    if scale.is_finite() && scale >= 0.0 {
        Ok(scale)
    } else {
        Err(I2sError::BadScale { scale })
    }
}

/// Encodes a whole tensor of `trits.len() / k` rows of `k` weights with the per-tensor
/// `scale` into `out` (`tensor_bytes(rows, k)` bytes).
pub fn encode_tensor(trits: &[i8], k: usize, scale: f32, out: &mut [u8]) -> Result<(), I2sError> {
    let row = row_bytes(k)?;
    let rows = trits.len().checked_div(k).unwrap_or(0);
    check_len("trits", rows.saturating_mul(k), trits.len())?;
    check_len("bytes", tensor_bytes(rows, k)?, out.len())?;
    let (codes, tail) = out.split_at_mut(out.len() - TAIL_BYTES);
    if row > 0 {
        for (r, (src, dst)) in trits
            .chunks_exact(k)
            .zip(codes.chunks_exact_mut(row))
            .enumerate()
        {
            encode_row(src, dst).map_err(|e| shift_error(e, r * k))?;
        }
    }
    let tail: &mut [u8; TAIL_BYTES] = tail.try_into().expect("split TAIL_BYTES from the end");
    encode_tail(scale, tail)
}

/// Decodes a whole tensor (`tensor_bytes(trits_out.len() / k, k)` bytes) into `trits_out`
/// and returns its scale. Errors name the weight's index in the flattened tensor.
pub fn decode_tensor(bytes: &[u8], k: usize, trits_out: &mut [i8]) -> Result<f32, I2sError> {
    let row = row_bytes(k)?;
    let rows = trits_out.len().checked_div(k).unwrap_or(0);
    check_len("trits", rows.saturating_mul(k), trits_out.len())?;
    check_len("bytes", tensor_bytes(rows, k)?, bytes.len())?;
    let (codes, tail) = bytes.split_at(bytes.len() - TAIL_BYTES);
    if row > 0 {
        for (r, (src, dst)) in codes
            .chunks_exact(row)
            .zip(trits_out.chunks_exact_mut(k))
            .enumerate()
        {
            decode_row(src, dst).map_err(|e| shift_error(e, r * k))?;
        }
    }
    decode_tail(tail.try_into().expect("split TAIL_BYTES from the end"))
}

/// The same error for a row that starts `by` weights into the tensor.
fn shift_error(e: I2sError, by: usize) -> I2sError {
    match e {
        I2sError::BadTrit { element, value } => I2sError::BadTrit {
            element: element + by,
            value,
        },
        I2sError::InvalidCode { element } => I2sError::InvalidCode {
            element: element + by,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        assert_eq!(row_bytes(2560), Ok(640));
        assert_eq!(tensor_bytes(3, 256), Ok(3 * 64 + 32));
        assert_eq!(row_bytes(100), Err(I2sError::RowLength { k: 100 }));
        assert_eq!(
            tensor_bytes(usize::MAX, 128),
            Err(I2sError::TooLarge {
                rows: usize::MAX,
                k: 128
            })
        );
        assert_eq!(bits_per_weight(1, 128), Ok((32.0 + 32.0) * 8.0 / 128.0));
    }

    /// The example worked from the layout text alone: one 128-weight row with weight 0 = +1
    /// (code 2, bits 7:6 of byte 0), weight 32 = -1 (code 0, bits 5:4 of byte 0), weight 127 =
    /// +1 (code 2, bits 1:0 of byte 31), all others 0 (code 1); scale 0.5 = 0x3f000000.
    #[test]
    fn hand_checked_bytes() {
        let mut t = [0i8; 128];
        t[0] = 1;
        t[32] = -1;
        t[127] = 1;
        let mut out = vec![0u8; tensor_bytes(1, 128).unwrap()];
        encode_tensor(&t, 128, 0.5, &mut out).unwrap();
        assert_eq!(out[0], 0b10_00_01_01);
        assert!(out[1..31].iter().all(|&b| b == 0b01_01_01_01));
        assert_eq!(out[31], 0b01_01_01_10);
        assert_eq!(&out[32..36], &[0x00, 0x00, 0x00, 0x3f]);
        assert!(out[36..].iter().all(|&b| b == 0));
        let mut back = [9i8; 128];
        assert_eq!(decode_tensor(&out, 128, &mut back), Ok(0.5));
        assert_eq!(back, t);
    }

    #[test]
    fn bad_input_is_refused() {
        let mut out = vec![0u8; tensor_bytes(2, 128).unwrap()];
        let mut t = vec![0i8; 256];
        t[200] = -2;
        assert_eq!(
            encode_tensor(&t, 128, 1.0, &mut out),
            Err(I2sError::BadTrit {
                element: 200,
                value: -2
            })
        );
        t[200] = 0;
        assert!(matches!(
            encode_tensor(&t, 128, f32::INFINITY, &mut out),
            Err(I2sError::BadScale { .. })
        ));
        assert!(matches!(
            encode_tensor(&t[1..], 128, 1.0, &mut out),
            Err(I2sError::BufferLength { .. })
        ));
        encode_tensor(&t, 128, 1.0, &mut out).unwrap();
        out[32 + 5] |= 0b0000_1100; // row 1, weight 5 + 64
        assert_eq!(
            decode_tensor(&out, 128, &mut t),
            Err(I2sError::InvalidCode { element: 128 + 69 })
        );
        let mut tail = [0u8; TAIL_BYTES];
        tail[..4].copy_from_slice(&(-1.0f32).to_le_bytes());
        assert!(matches!(decode_tail(&tail), Err(I2sError::BadScale { .. })));
    }

    proptest! {
        #[test]
        fn round_trip(rows in 1usize..4, blocks in 1usize..4, seed in any::<u64>(), scale in 0f32..100.0) {
            let k = blocks * BLOCK;
            let mut rng = crate::num::SplitMix64(seed);
            let trits: Vec<i8> = (0..rows * k).map(|_| (rng.next_u64() % 3) as i8 - 1).collect();
            let mut bytes = vec![0u8; tensor_bytes(rows, k).unwrap()];
            encode_tensor(&trits, k, scale, &mut bytes).unwrap();
            let mut back = vec![0i8; trits.len()];
            prop_assert_eq!(decode_tensor(&bytes, k, &mut back), Ok(scale));
            prop_assert_eq!(back, trits);
        }
    }
}
