//! llama.cpp's TQ2_0 block (ggml type 35): 256 weights in 66 bytes, 2.0625 bits per weight.
//!
//! A block is 64 bytes of 2-bit codes (`code = trit + 1`) followed by the fp16 scale `d`. The
//! codes come in two groups of 128 weights, 32 bytes each; weight `e` of the block sits in byte
//! `32 * (e / 128) + e % 32` at bit shift `2 * ((e % 128) / 32)`. Code 3 never occurs in an
//! encoded block and is refused on decode. Spec: formats/gguf.md §6.2.

use super::tq::{self, BLOCK, SCALE_BYTES, TqError};

pub use super::tq::BLOCK as BLOCK_WEIGHTS;
/// Bytes of code per block.
pub const CODE_BYTES: usize = BLOCK / 4;
/// Bytes per block: codes, then the fp16 scale.
pub const BLOCK_BYTES: usize = CODE_BYTES + SCALE_BYTES;
/// Weights per 128-weight group (a group fills 32 bytes, one 2-bit plane per 32 weights).
const GROUP: usize = 128;
/// Weights per plane (the byte stride within a group).
const PLANE: usize = 32;

const _: () = assert!(BLOCK_BYTES == 66 && BLOCK == 2 * GROUP && GROUP == 4 * PLANE);

/// Bytes of a row of `k` weights (`k` a multiple of 256).
pub fn row_bytes(k: usize) -> Result<usize, TqError> {
    tq::blocks_in(k)?
        .checked_mul(BLOCK_BYTES)
        .ok_or(TqError::RowLength { len: k })
}

/// Bits per weight: 66 * 8 / 256.
pub fn bits_per_weight() -> f64 {
    (BLOCK_BYTES * 8) as f64 / BLOCK as f64
}

/// Byte index within its block and bit shift of the code of weight `e` (0..256) of a block.
#[inline]
pub fn position(e: usize) -> (usize, u32) {
    (
        PLANE * (e / GROUP) + e % PLANE,
        2 * ((e % GROUP) / PLANE) as u32,
    )
}

/// Encodes a row of trits with the scale `scale` into `out` (`row_bytes(trits.len())` bytes),
/// giving the bytes llama.cpp and gguf-py write for the f32 row `scale * trits`: each block's
/// `d` is `max |scale * t|` in fp16, so an all-zero block gets `d = 0`. The row length must be
/// a multiple of 256; `scale` must be finite, non-negative and within the fp16 range.
pub fn encode_row(trits: &[i8], scale: f32, out: &mut [u8]) -> Result<(), TqError> {
    tq::check_len("bytes", row_bytes(trits.len())?, out.len())?;
    tq::check_scale(scale)?;
    let mut codes = [0u8; BLOCK];
    for (b, (src, dst)) in trits
        .chunks_exact(BLOCK)
        .zip(out.chunks_exact_mut(BLOCK_BYTES))
        .enumerate()
    {
        let d = tq::block_codes(src, scale, b * BLOCK, &mut codes)?;
        let (qs, dst_d) = dst.split_at_mut(CODE_BYTES);
        qs.fill(0);
        for (e, &c) in codes.iter().enumerate() {
            let (byte, shift) = position(e);
            if let Some(q) = qs.get_mut(byte) {
                *q |= c << shift;
            }
        }
        dst_d.copy_from_slice(&d);
    }
    Ok(())
}

/// Decodes a row: writes its trits to `trits_out` (256 per block) and each block's scale (the
/// stored fp16 `d` as f32) to `scales_out` (one per block). Refuses code 3 and a non-finite
/// scale, naming the weight or block.
pub fn decode_row(
    bytes: &[u8],
    trits_out: &mut [i8],
    scales_out: &mut [f32],
) -> Result<(), TqError> {
    let blocks = tq::blocks_in(trits_out.len())?;
    tq::check_len("bytes", row_bytes(trits_out.len())?, bytes.len())?;
    tq::check_len("scales", blocks, scales_out.len())?;
    for (b, ((src, dst), scale)) in bytes
        .chunks_exact(BLOCK_BYTES)
        .zip(trits_out.chunks_exact_mut(BLOCK))
        .zip(scales_out.iter_mut())
        .enumerate()
    {
        let (qs, d) = src.split_at(CODE_BYTES);
        for (e, t) in dst.iter_mut().enumerate() {
            let (byte, shift) = position(e);
            let code = qs.get(byte).map_or(0, |q| (q >> shift) & 3);
            if code == 3 {
                return Err(TqError::InvalidCode {
                    element: b * BLOCK + e,
                    code,
                });
            }
            *t = code as i8 - 1;
        }
        let d: [u8; SCALE_BYTES] = d
            .try_into()
            .expect("a chunk of BLOCK_BYTES split at CODE_BYTES leaves SCALE_BYTES");
        *scale = tq::read_scale(d, b)?;
    }
    Ok(())
}

/// Dequantizes a row to f32 as llama.cpp and gguf-py do: `(code - 1) * d`.
pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) -> Result<(), TqError> {
    let mut trits = vec![0i8; out.len()];
    let mut scales = vec![0f32; tq::blocks_in(out.len())?];
    decode_row(bytes, &mut trits, &mut scales)?;
    for ((o, &t), e) in out.iter_mut().zip(&trits).zip(0..) {
        let d = scales.get(e / BLOCK).copied().unwrap_or(0.0);
        *o = d * f32::from(t);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_constants() {
        assert_eq!(BLOCK_BYTES, 66);
        assert_eq!(bits_per_weight(), 2.0625);
        assert_eq!(row_bytes(512), Ok(132));
        assert_eq!(row_bytes(100), Err(TqError::RowLength { len: 100 }));
        assert_eq!(position(0), (0, 0));
        assert_eq!(position(33), (1, 2));
        assert_eq!(position(127), (31, 6));
        assert_eq!(position(128), (32, 0));
        assert_eq!(position(255), (63, 6));
    }

    #[test]
    fn all_zero_block_is_0x55_with_zero_scale() {
        let mut out = [0u8; BLOCK_BYTES];
        encode_row(&[0; BLOCK], 0.5, &mut out).unwrap();
        assert!(out[..CODE_BYTES].iter().all(|&b| b == 0x55));
        assert_eq!(&out[CODE_BYTES..], &[0, 0]);
    }

    #[test]
    fn hand_checked_block() {
        // Weight 0 = +1 (code 2 in byte 0 bits 1:0), weight 32 = -1 (code 0 in byte 0 bits
        // 3:2), weight 130 = +1 (code 2 in byte 34 bits 1:0); scale 1.0 = fp16 0x3c00.
        let mut t = [0i8; BLOCK];
        t[0] = 1;
        t[32] = -1;
        t[130] = 1;
        let mut out = [0u8; BLOCK_BYTES];
        encode_row(&t, 1.0, &mut out).unwrap();
        assert_eq!(out[0], 0b0101_0010);
        assert_eq!(out[34], 0b0101_0110);
        assert_eq!(&out[64..], &[0x00, 0x3c]);
    }

    #[test]
    fn bad_input_is_refused() {
        let mut out = [0u8; BLOCK_BYTES];
        let mut t = [0i8; BLOCK];
        t[7] = 2;
        assert_eq!(
            encode_row(&t, 1.0, &mut out),
            Err(TqError::BadTrit {
                element: 7,
                value: 2
            })
        );
        assert!(matches!(
            encode_row(&[0; BLOCK], f32::NAN, &mut out),
            Err(TqError::BadScale { .. })
        ));
        assert!(matches!(
            encode_row(&[0; BLOCK], 1e6, &mut out),
            Err(TqError::BadScale { .. })
        ));
        assert!(matches!(
            encode_row(&[0; BLOCK], 1.0, &mut out[1..]),
            Err(TqError::BufferLength { .. })
        ));
        let mut bytes = [0x55u8; BLOCK_BYTES];
        bytes[33] = 0b0111_0101; // weight 128 + 64 + 1 = 193 has code 3
        let mut trits = [0i8; BLOCK];
        let mut scales = [0f32; 1];
        assert_eq!(
            decode_row(&bytes, &mut trits, &mut scales),
            Err(TqError::InvalidCode {
                element: 193,
                code: 3
            })
        );
        let mut bytes = [0x55u8; BLOCK_BYTES];
        bytes[64..].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
        assert!(matches!(
            decode_row(&bytes, &mut trits, &mut scales),
            Err(TqError::NonFiniteScale { block: 0, .. })
        ));
    }

    proptest! {
        #[test]
        fn round_trip(blocks in 1usize..4, seed in any::<u64>(), scale in 1e-4f32..60000.0) {
            let mut rng = crate::num::SplitMix64(seed);
            let trits: Vec<i8> = (0..blocks * BLOCK).map(|_| (rng.next_u64() % 3) as i8 - 1).collect();
            let mut bytes = vec![0u8; row_bytes(trits.len()).unwrap()];
            encode_row(&trits, scale, &mut bytes).unwrap();
            let mut back = vec![0i8; trits.len()];
            let mut scales = vec![0f32; blocks];
            decode_row(&bytes, &mut back, &mut scales).unwrap();
            prop_assert_eq!(&back, &trits);
            for (b, s) in scales.iter().enumerate() {
                let any = trits[b * BLOCK..(b + 1) * BLOCK].iter().any(|&t| t != 0);
                let want = if any { half::f16::from_f32(scale).to_f32() } else { 0.0 };
                prop_assert_eq!(*s, want);
            }
        }
        /// Any bytes: decoding never panics, accepts every code the encoder writes, and
        /// what it accepts re-encodes to the same code bytes.
        #[test]
        fn accepted_bytes_re_encode_to_themselves(
            bytes in proptest::collection::vec(any::<u8>(), BLOCK_BYTES..=BLOCK_BYTES),
            valid in any::<bool>(),
        ) {
            let mut trits = [0i8; BLOCK];
            let mut scales = [0f32; 1];
            let mut bytes = bytes;
            if valid {
                // Replace each code 3 by 2, so every code is one the encoder writes.
                for b in bytes.iter_mut().take(CODE_BYTES) {
                    *b &= !((*b >> 1) & *b & 0x55);
                }
                bytes[64..].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
            }
            let ok = decode_row(&bytes, &mut trits, &mut scales).is_ok();
            prop_assert!(ok || !valid);
            if ok {
                let mut again = [0u8; BLOCK_BYTES];
                encode_row(&trits, 1.0, &mut again).unwrap();
                prop_assert_eq!(&again[..CODE_BYTES], &bytes[..CODE_BYTES]);
            }
        }
    }
}
