//! llama.cpp's TQ1_0 block (ggml type 34): 256 weights in 54 bytes, 1.6875 bits per weight.
//!
//! Codes (`trit + 1`, a base-3 digit) are packed five to a byte as a base-3 number `q` (first
//! weight most significant), and the byte stores `ceil(q * 256 / 243)` so that digit `n` can be
//! read back with a wrapping multiply by `3^n` and a shift: `((byte * 3^n mod 256) * 3) >> 8`.
//! A block is `qs[48]`, `qh[4]`, then the fp16 scale `d`:
//! - `qs[m]`, m in 0..32: weights `m + 32n`, n = 0..5 (weights 0..160);
//! - `qs[32 + m]`, m in 0..16: weights `160 + m + 16n`, n = 0..5 (weights 160..240);
//! - `qh[j]`, j in 0..4: weights `240 + j + 4n`, n = 0..4, as four digits followed by a fifth,
//!   least significant digit 0 (weights 240..256).
//!
//! Of the 256 byte values only the 243 that the encoder writes are accepted on decode (in `qh`,
//! only the 81 whose fifth digit is 0): any other byte would decode to digits that re-encode to
//! a different byte, so accepting it would let two files mean the same weights and hide damage.
//! Spec: formats/gguf.md §6.3.

use super::tq::{self, BLOCK, SCALE_BYTES, TqError};

pub use super::tq::BLOCK as BLOCK_WEIGHTS;
/// Bytes holding five codes each (weights 0..240).
pub const QS_BYTES: usize = 48;
/// Bytes holding four codes each (weights 240..256).
pub const QH_BYTES: usize = 4;
/// Bytes per block: `qs`, `qh`, then the fp16 scale.
pub const BLOCK_BYTES: usize = QS_BYTES + QH_BYTES + SCALE_BYTES;
/// Codes per byte (3^5 = 243 <= 256).
const DIGITS: usize = 5;
/// Powers of three by which a byte is multiplied to bring digit `n` to the top.
const POW3: [u8; DIGITS] = [1, 3, 9, 27, 81];

const _: () = assert!(BLOCK_BYTES == 54 && 32 * 5 + 16 * 5 + 4 * 4 == BLOCK);

/// Where the codes of a block live: (first byte, bytes in the run, weights per digit step).
/// Byte `first + m` holds weights `base + m + stride * n` for digit `n`.
struct Run {
    first_byte: usize,
    bytes: usize,
    base: usize,
    digits: usize,
}

const RUNS: [Run; 3] = [
    Run {
        first_byte: 0,
        bytes: 32,
        base: 0,
        digits: 5,
    },
    Run {
        first_byte: 32,
        bytes: 16,
        base: 160,
        digits: 5,
    },
    Run {
        first_byte: QS_BYTES,
        bytes: QH_BYTES,
        base: 240,
        digits: 4,
    },
];

/// Bytes of a row of `k` weights (`k` a multiple of 256).
pub fn row_bytes(k: usize) -> Result<usize, TqError> {
    tq::blocks_in(k)?
        .checked_mul(BLOCK_BYTES)
        .ok_or(TqError::RowLength { len: k })
}

/// Bits per weight: 54 * 8 / 256.
pub fn bits_per_weight() -> f64 {
    (BLOCK_BYTES * 8) as f64 / BLOCK as f64
}

/// The stored byte for the base-3 number `q` (0..243): `ceil(q * 256 / 243)`.
#[inline]
pub fn byte_of(q: u8) -> u8 {
    (u16::from(q) * 256).div_ceil(243) as u8
}

/// Digit `n` (0 = most significant) of a stored byte.
#[inline]
pub fn digit(byte: u8, n: usize) -> u8 {
    let p = byte.wrapping_mul(POW3.get(n).copied().unwrap_or(1));
    ((u16::from(p) * 3) >> 8) as u8
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
        for run in &RUNS {
            let stride = run.bytes;
            for m in 0..run.bytes {
                let mut q = 0u8;
                for n in 0..DIGITS {
                    // The fifth digit of a qh byte is the padding digit 0.
                    let c = if n < run.digits {
                        codes.get(run.base + m + stride * n).copied().unwrap_or(1)
                    } else {
                        0
                    };
                    q = q * 3 + c;
                }
                if let Some(o) = dst.get_mut(run.first_byte + m) {
                    *o = byte_of(q);
                }
            }
        }
        if let Some(o) = dst.get_mut(QS_BYTES + QH_BYTES..) {
            o.copy_from_slice(&d);
        }
    }
    Ok(())
}

/// Decodes a row: writes its trits to `trits_out` (256 per block) and each block's scale (the
/// stored fp16 `d` as f32) to `scales_out` (one per block). Refuses a byte the encoder never
/// writes and a non-finite scale, naming the byte, the first weight it holds, or the block.
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
        for run in &RUNS {
            let stride = run.bytes;
            for m in 0..run.bytes {
                let byte = src.get(run.first_byte + m).copied().unwrap_or(0);
                let mut q = 0u8;
                for n in 0..DIGITS {
                    let c = digit(byte, n);
                    // A canonical byte's digits are those of q, so re-encoding gives it back;
                    // a qh byte's fifth digit is 0.
                    q = q.wrapping_mul(3).wrapping_add(c);
                    if n < run.digits {
                        if let Some(t) = dst.get_mut(run.base + m + stride * n) {
                            *t = c as i8 - 1;
                        }
                    } else if c != 0 {
                        q = u8::MAX; // forces the mismatch below
                    }
                }
                if q > 242 || byte_of(q) != byte {
                    return Err(TqError::NonCanonical {
                        byte_index: b * BLOCK_BYTES + run.first_byte + m,
                        element: b * BLOCK + run.base + m,
                        value: byte,
                    });
                }
            }
        }
        let d: [u8; SCALE_BYTES] = src
            .get(QS_BYTES + QH_BYTES..)
            .and_then(|d| d.try_into().ok())
            .unwrap_or([0, 0]);
        *scale = tq::read_scale(d, b)?;
    }
    Ok(())
}

/// Dequantizes a row to f32 as llama.cpp and gguf-py do: `(digit - 1) * d`.
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
        assert_eq!(BLOCK_BYTES, 54);
        assert_eq!(bits_per_weight(), 1.6875);
        assert_eq!(row_bytes(256), Ok(54));
        assert_eq!(row_bytes(255), Err(TqError::RowLength { len: 255 }));
    }

    #[test]
    fn every_q_round_trips_and_exactly_243_bytes_are_canonical() {
        let mut canonical = [false; 256];
        for q in 0..243u8 {
            let byte = byte_of(q);
            let mut back = 0u8;
            for n in 0..DIGITS {
                back = back * 3 + digit(byte, n);
            }
            assert_eq!(back, q);
            canonical[usize::from(byte)] = true;
        }
        assert_eq!(canonical.iter().filter(|&&c| c).count(), 243);
    }

    #[test]
    fn all_zero_block_bytes() {
        // q = 11111 in base 3 = 121 -> ceil(121 * 256 / 243) = 128; qh: 1111 then 0 = 120 -> 127.
        let mut out = [0u8; BLOCK_BYTES];
        encode_row(&[0; BLOCK], 3.0, &mut out).unwrap();
        assert!(out[..QS_BYTES].iter().all(|&b| b == 128));
        assert!(out[QS_BYTES..QS_BYTES + QH_BYTES].iter().all(|&b| b == 127));
        assert_eq!(&out[QS_BYTES + QH_BYTES..], &[0, 0]);
    }

    #[test]
    fn hand_checked_block() {
        // Weights 0, 32, 64, 96, 128 = +1, -1, 0, 0, +1: digits 2,0,1,1,2 -> q = 2*81 + 9 + 3
        // + 2 = 176 -> ceil(176*256/243) = 186 in byte 0. Weight 243 = -1: qh[3] digits
        // 0,1,1,1,(0) -> q = 27 + 9 + 3 = 39 -> ceil(39*256/243) = 42 (41.09 rounds up).
        let mut t = [0i8; BLOCK];
        t[0] = 1;
        t[32] = -1;
        t[128] = 1;
        t[243] = -1;
        let mut out = [0u8; BLOCK_BYTES];
        encode_row(&t, 2.0, &mut out).unwrap();
        assert_eq!(out[0], 186);
        assert_eq!(out[QS_BYTES + 3], 42);
        assert_eq!(&out[52..], &half::f16::from_f32(2.0).to_le_bytes());
    }

    #[test]
    fn non_canonical_bytes_are_refused() {
        let mut zero = [0u8; BLOCK_BYTES];
        encode_row(&[0; BLOCK], 1.0, &mut zero).unwrap();
        let mut trits = [0i8; BLOCK];
        let mut scales = [0f32; 1];
        let canonical: std::collections::HashSet<u8> = (0..243).map(byte_of).collect();
        let bad = (0..=255u8).find(|b| !canonical.contains(b)).unwrap();
        let mut bytes = zero;
        bytes[40] = bad;
        assert_eq!(
            decode_row(&bytes, &mut trits, &mut scales),
            Err(TqError::NonCanonical {
                byte_index: 40,
                element: 168,
                value: bad
            })
        );
        // A qh byte with a non-zero fifth digit: q = 1 is canonical in qs but not in qh.
        let mut bytes = zero;
        bytes[QS_BYTES + 1] = byte_of(1);
        assert!(matches!(
            decode_row(&bytes, &mut trits, &mut scales),
            Err(TqError::NonCanonical {
                byte_index: 49,
                element: 241,
                ..
            })
        ));
        // Every byte value: accepted iff canonical, never a panic.
        for v in 0..=255u8 {
            let mut bytes = zero;
            bytes[5] = v;
            let ok = decode_row(&bytes, &mut trits, &mut scales).is_ok();
            assert_eq!(ok, canonical.contains(&v), "byte {v}");
        }
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
                // Map each code byte to one the encoder writes.
                for (i, b) in bytes.iter_mut().enumerate().take(QS_BYTES + QH_BYTES) {
                    *b = if i < QS_BYTES { byte_of(*b % 243) } else { byte_of(*b % 81 * 3) };
                }
                bytes[52..].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
            }
            let ok = decode_row(&bytes, &mut trits, &mut scales).is_ok();
            prop_assert!(ok || !valid);
            if ok {
                let mut again = [0u8; BLOCK_BYTES];
                encode_row(&trits, 1.0, &mut again).unwrap();
                prop_assert_eq!(&again[..QS_BYTES + QH_BYTES], &bytes[..QS_BYTES + QH_BYTES]);
            }
        }
    }
}
