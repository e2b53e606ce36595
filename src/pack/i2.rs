//! The `i2` layout: 2 bits per weight, `code = trit + 1` (0 = -1, 1 = 0, 2 = +1; 3 is invalid).
//!
//! Each row is cut into blocks of [`BLOCK`] = 128 weights stored in [`BLOCK_BYTES`] = 32 bytes.
//! Within a block, byte `j` (0..32) holds weights `j`, `j + 32`, `j + 64`, `j + 96` in bits
//! 1:0, 3:2, 5:4, 7:6. A SIMD kernel loads 32 bytes and gets four runs of 32 consecutive weights
//! with `(v >> 2p) & 3`, each lining up with 32 consecutive int8 activations. The last block of a
//! row whose length is not a multiple of 128 is padded with code 1 (a zero weight), so every row
//! is a whole number of blocks: `row_bytes = ceil(k / 128) * 32`. Spec: formats/bpk.md §5.1.

/// Weights per block.
pub const BLOCK: usize = 128;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 32;
/// Weights per 2-bit plane of a block (the byte stride between planes' elements).
pub const PLANE: usize = 32;
/// Code stored in the padding slots of a row's last block (trit 0).
pub const PAD_CODE: u8 = 1;

const _: () = assert!(BLOCK == 4 * PLANE && BLOCK_BYTES == PLANE);

/// Bytes of one packed row of `k` weights.
pub fn row_bytes(k: usize) -> usize {
    k.div_ceil(BLOCK) * BLOCK_BYTES
}

/// Byte index within the row and bit shift of weight `e`.
#[inline]
pub fn position(e: usize) -> (usize, u32) {
    let (block, j) = (e / BLOCK, e % BLOCK);
    (block * BLOCK_BYTES + j % PLANE, 2 * (j / PLANE) as u32)
}

#[inline(always)]
fn code(t: i8) -> u8 {
    (t + 1) as u8
}

/// Packs one row of trits (values in -1..=1) into `out` (`row_bytes(trits.len())` bytes).
// Always inlined, so that the AVX2 builds of its callers (quant::rows, run::model) vectorize it too.
#[inline(always)]
pub fn pack_row(trits: &[i8], out: &mut [u8]) {
    debug_assert_eq!(out.len(), row_bytes(trits.len()));
    let full = trits.len() / BLOCK;
    for (src, dst) in trits
        .chunks_exact(BLOCK)
        .zip(out.chunks_exact_mut(BLOCK_BYTES))
    {
        for j in 0..PLANE {
            dst[j] = code(src[j])
                | code(src[j + PLANE]) << 2
                | code(src[j + 2 * PLANE]) << 4
                | code(src[j + 3 * PLANE]) << 6;
        }
    }
    let tail = &trits[full * BLOCK..];
    if !tail.is_empty() {
        let dst = &mut out[full * BLOCK_BYTES..];
        dst.fill(PAD_CODE * 0x55);
        for (j, &t) in tail.iter().enumerate() {
            let (byte, shift) = (j % PLANE, 2 * (j / PLANE) as u32);
            dst[byte] = (dst[byte] & !(3 << shift)) | code(t) << shift;
        }
    }
}

/// A packed code that is not a valid trit, or padding that is not [`PAD_CODE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum I2Error {
    #[error("weight {element} has invalid 2-bit code 3")]
    InvalidCode { element: usize },
    #[error("padding slot {slot} of the last block holds code {code}, expected {PAD_CODE}")]
    BadPadding { slot: usize, code: u8 },
}

/// Mask of the low bit of each 2-bit code in a byte.
const LOW_BITS: u8 = 0x55;

/// True if any of the four codes in `b` is 3 (both bits set).
#[inline]
fn has_code3(b: u8) -> bool {
    b & (b >> 1) & LOW_BITS != 0
}

/// Unpacks one row of `out.len()` weights, checking every code and the padding.
pub fn unpack_row(bytes: &[u8], out: &mut [i8]) -> Result<(), I2Error> {
    let k = out.len();
    debug_assert_eq!(bytes.len(), row_bytes(k));
    let full = k / BLOCK;
    for (src, dst) in bytes
        .chunks_exact(BLOCK_BYTES)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        for (j, &b) in src.iter().enumerate() {
            for p in 0..4 {
                dst[p * PLANE + j] = ((b >> (2 * p)) & 3) as i8 - 1;
            }
        }
    }
    // Rare path: locate the first bad code precisely. A code 3 decodes to 2 above, so scanning
    // the decoded values finds it.
    if bytes[..full * BLOCK_BYTES].iter().any(|&b| has_code3(b)) {
        let element = out
            .iter()
            .position(|&t| t == 2)
            .expect("a code 3 decodes to 2");
        return Err(I2Error::InvalidCode { element });
    }
    let tail = k - full * BLOCK;
    if tail > 0 {
        let src = &bytes[full * BLOCK_BYTES..];
        for slot in 0..BLOCK {
            let (byte, shift) = (slot % PLANE, 2 * (slot / PLANE) as u32);
            let c = (src[byte] >> shift) & 3;
            if slot < tail {
                if c == 3 {
                    return Err(I2Error::InvalidCode {
                        element: full * BLOCK + slot,
                    });
                }
                out[full * BLOCK + slot] = c as i8 - 1;
            } else if c != PAD_CODE {
                return Err(I2Error::BadPadding {
                    slot: full * BLOCK + slot,
                    code: c,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_of_the_first_block() {
        let mut trits = vec![0i8; 130];
        trits[0] = 1; // byte 0 bits 1:0 -> code 2
        trits[33] = -1; // byte 1 bits 3:2 -> code 0
        trits[127] = 1; // byte 31 bits 7:6 -> code 2
        trits[129] = -1; // block 1, byte 1 bits 1:0 -> code 0
        let mut out = vec![0u8; row_bytes(130)];
        pack_row(&trits, &mut out);
        assert_eq!(out.len(), 64);
        assert_eq!(out[0], 0b01_01_01_10);
        assert_eq!(out[1], 0b01_01_00_01);
        assert_eq!(out[31], 0b10_01_01_01);
        assert_eq!(out[32], 0x55);
        assert_eq!(out[33], 0b01_01_01_00);
        assert!(out[34..].iter().all(|&b| b == 0x55));
    }

    #[test]
    fn invalid_codes_and_padding_are_reported() {
        let mut out = vec![0u8; row_bytes(5)];
        pack_row(&[1, 0, -1, 0, 1], &mut out);
        let mut back = [0i8; 5];
        let mut bad = out.clone();
        bad[2] |= 3;
        assert_eq!(
            unpack_row(&bad, &mut back),
            Err(I2Error::InvalidCode { element: 2 })
        );
        let mut bad = out.clone();
        bad[7] = 0x54; // slot 7 of the padding: code 0
        assert_eq!(
            unpack_row(&bad, &mut back),
            Err(I2Error::BadPadding { slot: 7, code: 0 })
        );
    }

    proptest! {
        #[test]
        fn pack_unpack_round_trip(trits in prop::collection::vec(-1i8..=1, 1..700)) {
            let mut packed = vec![0u8; row_bytes(trits.len())];
            pack_row(&trits, &mut packed);
            let mut back = vec![0i8; trits.len()];
            unpack_row(&packed, &mut back).unwrap();
            prop_assert_eq!(back, trits);
        }
    }
}
