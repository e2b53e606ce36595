//! The `t5` layout: five trits per byte (1.6 bits per weight), `code = trit + 1` in {0, 1, 2}.
//!
//! Each row is cut into blocks of [`BLOCK`] = 160 weights stored in [`BLOCK_BYTES`] = 32 bytes.
//! Byte `b` of a block holds the elements `b + n*j` (j = 0..5) of the block, where `n` is the
//! number of bytes of the block: 32 for a whole block, `ceil(r / 5)` for a row's last block of
//! `r < 160` weights. Slots whose element index is `>= r` hold [`PAD_CODE`] (a zero weight).
//!
//! A byte's value is `v = c0*81 + c1*27 + c2*9 + c3*3 + c4` (c0, the code of the first of its
//! elements, is the most significant base-3 digit), stored as `ceil(v * 256 / 243)` as in
//! llama.cpp's `TQ1_0`, so that digit `j` comes out without a division:
//! `((stored * 3^j mod 256) * 3) >> 8`. Of the 256 byte values, 243 are such encodings; the other
//! 13 are invalid. A SIMD kernel loads 32 bytes and gets five runs of 32 consecutive weights,
//! each lining up with 32 consecutive int8 activations. Spec: formats/bpk.md §5.3.

/// Weights per block.
pub const BLOCK: usize = 160;
/// Bytes per (whole) block.
pub const BLOCK_BYTES: usize = 32;
/// Trits per byte.
pub const TRITS_PER_BYTE: usize = 5;
/// Code stored in the padding slots of a row's last block (trit 0).
pub const PAD_CODE: u8 = 1;
/// `3^j` for digit `j` of a byte (digit 0 is the most significant).
pub const POW3: [u8; TRITS_PER_BYTE] = [1, 3, 9, 27, 81];
/// Number of distinct byte values: `3^5`.
pub const VALUES: usize = 243;

const _: () = assert!(BLOCK == TRITS_PER_BYTE * BLOCK_BYTES);

/// Bytes of one packed row of `k` weights: `32 * (k / 160) + ceil((k % 160) / 5)`.
pub fn row_bytes(k: usize) -> usize {
    k / BLOCK * BLOCK_BYTES + (k % BLOCK).div_ceil(TRITS_PER_BYTE)
}

/// Bytes of a block of `r` (1..=160) weights, which is also its stride between digits.
#[inline(always)]
pub fn block_bytes(r: usize) -> usize {
    r.div_ceil(TRITS_PER_BYTE)
}

/// The stored byte of base-3 value `v` (0..243): `ceil(v * 256 / 243)`.
#[inline(always)]
pub const fn encode(v: u8) -> u8 {
    ((v as u16 * 256).div_ceil(VALUES as u16)) as u8
}

/// Digit `j` (0..5, 0 the most significant) of a stored byte: the code of its `j`-th element.
/// Exact for every valid byte (see the exhaustive test below).
#[inline(always)]
pub const fn digit(stored: u8, j: usize) -> u8 {
    ((stored.wrapping_mul(POW3[j]) as u16 * 3) >> 8) as u8
}

/// Whether `stored` is the encoding of some value in 0..243.
#[inline(always)]
pub fn is_valid(stored: u8) -> bool {
    DECODE[stored as usize].1
}

/// For each byte: its five codes, and whether it is a valid encoding.
const DECODE: [([u8; TRITS_PER_BYTE], bool); 256] = {
    let mut t = [([0u8; TRITS_PER_BYTE], false); 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < TRITS_PER_BYTE {
            t[b].0[j] = digit(b as u8, j);
            j += 1;
        }
        b += 1;
    }
    let mut v = 0;
    while v < VALUES {
        t[encode(v as u8) as usize].1 = true;
        v += 1;
    }
    t
};

/// The five codes of a stored byte (meaningful only if it [`is_valid`]).
#[inline(always)]
pub fn codes(stored: u8) -> [u8; TRITS_PER_BYTE] {
    DECODE[stored as usize].0
}

/// Byte index within the row and digit (0..5) of weight `e` of a row of `k` weights.
#[inline]
pub fn position(e: usize, k: usize) -> (usize, usize) {
    let (block, i) = (e / BLOCK, e % BLOCK);
    let n = block_bytes((k - block * BLOCK).min(BLOCK));
    (block * BLOCK_BYTES + i % n, i / n)
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
    let mut dst = out;
    for src in trits.chunks(BLOCK) {
        let r = src.len();
        let n = block_bytes(r);
        let (block, rest) = dst.split_at_mut(n);
        for (b, o) in block.iter_mut().enumerate() {
            let mut v = 0u8;
            for j in 0..TRITS_PER_BYTE {
                let c = src.get(b + n * j).map_or(PAD_CODE, |&t| code(t));
                v = v * 3 + c;
            }
            *o = encode(v);
        }
        dst = rest;
    }
}

/// A stored byte that encodes no five trits, or padding that is not [`PAD_CODE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum T5Error {
    #[error(
        "byte {byte} (holding weight {element} and four more) has value {value:#04x}, which encodes no five trits"
    )]
    InvalidByte {
        byte: usize,
        element: usize,
        value: u8,
    },
    #[error("padding slot {slot} of the last block holds code {code}, expected {PAD_CODE}")]
    BadPadding { slot: usize, code: u8 },
}

/// Unpacks one row of `out.len()` weights, checking every byte and the padding. Errors come
/// in byte order (the first bad byte or padding slot of the row).
pub fn unpack_row(bytes: &[u8], out: &mut [i8]) -> Result<(), T5Error> {
    let k = out.len();
    debug_assert_eq!(bytes.len(), row_bytes(k));
    let mut src = bytes;
    for (blk, dst) in out.chunks_mut(BLOCK).enumerate() {
        let r = dst.len();
        let n = block_bytes(r);
        let (block, rest) = src.split_at(n);
        for (b, &value) in block.iter().enumerate() {
            let (cs, valid) = DECODE[value as usize];
            if !valid {
                return Err(T5Error::InvalidByte {
                    byte: blk * BLOCK_BYTES + b,
                    element: blk * BLOCK + b,
                    value,
                });
            }
            for (j, &c) in cs.iter().enumerate() {
                let e = b + n * j;
                match dst.get_mut(e) {
                    Some(o) => *o = c as i8 - 1,
                    None if c != PAD_CODE => {
                        return Err(T5Error::BadPadding {
                            slot: blk * BLOCK + e,
                            code: c,
                        });
                    }
                    None => {}
                }
            }
        }
        src = rest;
    }
    Ok(())
}

/// [`is_valid`] by arithmetic, so that a loop over many bytes vectorizes: a byte is valid when
/// it is the encoding of `floor(stored * 243 / 256)`, the only value that can encode to it.
#[inline(always)]
fn is_valid_arith(stored: u8) -> bool {
    let v = (u32::from(stored) * VALUES as u32) >> 8;
    (v * 256).div_ceil(VALUES as u32) == u32::from(stored)
}

/// Bytes checked per step of [`check_row`]'s scan of whole blocks.
const SCAN_CHUNK: usize = 4096;

/// Checks one packed row of `k` weights without unpacking it: the same verdict and error as
/// [`unpack_row`]. Whole blocks have no padding, so their bytes need only be valid (a scan that
/// vectorizes); the short last block, if any, is unpacked into a 160-weight buffer. Memory does
/// not depend on `k`.
pub fn check_row(bytes: &[u8], k: usize) -> Result<(), T5Error> {
    debug_assert_eq!(bytes.len(), row_bytes(k));
    let whole = k / BLOCK;
    let (head, tail) = bytes.split_at(whole * BLOCK_BYTES);
    for (c, chunk) in head.chunks(SCAN_CHUNK).enumerate() {
        if chunk.iter().fold(false, |bad, &b| bad | !is_valid_arith(b)) {
            let at = chunk
                .iter()
                .position(|&b| !is_valid(b))
                .expect("the scan found an invalid byte");
            let byte = c * SCAN_CHUNK + at;
            return Err(T5Error::InvalidByte {
                byte,
                element: byte / BLOCK_BYTES * BLOCK + byte % BLOCK_BYTES,
                value: chunk[at],
            });
        }
    }
    let mut buf = [0i8; BLOCK];
    unpack_row(tail, &mut buf[..k % BLOCK]).map_err(|e| match e {
        T5Error::InvalidByte {
            byte,
            element,
            value,
        } => T5Error::InvalidByte {
            byte: byte + whole * BLOCK_BYTES,
            element: element + whole * BLOCK,
            value,
        },
        T5Error::BadPadding { slot, code } => T5Error::BadPadding {
            slot: slot + whole * BLOCK,
            code,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The division-free extraction recovers every digit of every one of the 243 values, and
    /// exactly 243 byte values are valid.
    #[test]
    fn digit_extraction_is_exact_for_all_243_values() {
        for v in 0..VALUES as u8 {
            let stored = encode(v);
            assert!(is_valid(stored));
            let mut rest = v;
            for j in (0..TRITS_PER_BYTE).rev() {
                assert_eq!(digit(stored, j), rest % 3, "v={v} digit {j}");
                assert_eq!(codes(stored)[j], rest % 3);
                rest /= 3;
            }
        }
        assert_eq!((0..=255u8).filter(|&b| is_valid(b)).count(), VALUES);
        assert!((0..=255u8).all(|b| is_valid(b) == is_valid_arith(b)));
        let invalid: Vec<u8> = (0..=255u8).filter(|&b| !is_valid(b)).collect();
        assert_eq!(
            invalid,
            [1, 20, 40, 60, 79, 99, 119, 138, 158, 178, 197, 217, 237]
        );
    }

    #[test]
    fn row_bytes_and_bits_per_weight() {
        for (k, bytes) in [
            (1, 1),
            (5, 1),
            (6, 2),
            (159, 32),
            (160, 32),
            (161, 33),
            (319, 64),
        ] {
            assert_eq!(row_bytes(k), bytes, "k={k}");
        }
        // 2B4T shapes: 2560 = 16 * 160; 6912 = 43 * 160 + 32.
        assert_eq!(row_bytes(2560), 512);
        assert_eq!(row_bytes(6912), 43 * 32 + 7);
        assert_eq!(8.0 * 512.0 / 2560.0, 1.6);
        assert!((8.0 * row_bytes(6912) as f64 / 6912.0 - 1.6007).abs() < 5e-5);
    }

    #[test]
    fn layout_of_a_whole_and_a_short_block() {
        let mut trits = vec![0i8; 167];
        trits[0] = 1; // byte 0 digit 0
        trits[32] = -1; // byte 0 digit 1
        trits[159] = 1; // byte 31 digit 4
        trits[160] = -1; // block 1 (r = 7, n = 2): byte 32 digit 0
        trits[166] = 1; // block 1: element 6 = byte 0 + 2 * 3 -> byte 32 digit 3
        let mut out = vec![0u8; row_bytes(167)];
        pack_row(&trits, &mut out);
        assert_eq!(out.len(), 34);
        // codes 2,0,1,1,1 -> v = 162 + 0 + 9 + 3 + 1 = 175 -> ceil(175 * 256 / 243) = 185
        assert_eq!(out[0], 185);
        assert_eq!(out[1], encode(121)); // all zeros: 11111 in base 3
        assert_eq!(out[31], encode(122)); // codes 1,1,1,1,2
        // elements 0, 2, 4, 6 and 8 (padding): codes 0,1,1,2,1 -> v = 43 -> 46
        assert_eq!(out[32], 46);
        // elements 1, 3, 5 and two padding slots: all code 1
        assert_eq!(out[33], encode(121));
    }

    #[test]
    fn invalid_bytes_and_padding_are_reported() {
        let mut out = vec![0u8; row_bytes(163)];
        pack_row(&[1i8; 163], &mut out);
        let mut back = [0i8; 163];
        let mut bad = out.clone();
        bad[3] = 20;
        assert_eq!(
            unpack_row(&bad, &mut back),
            Err(T5Error::InvalidByte {
                byte: 3,
                element: 3,
                value: 20
            })
        );
        // Last block: r = 3, n = 1; slots 3 and 4 are padding. Codes 2,2,2,1,0.
        let mut bad = out.clone();
        bad[32] = encode(2 * 81 + 2 * 27 + 2 * 9 + 3);
        assert_eq!(
            unpack_row(&bad, &mut back),
            Err(T5Error::BadPadding { slot: 164, code: 0 })
        );
    }

    /// `check_row` agrees with `unpack_row` on long rows (several scan chunks), with damage in
    /// whole blocks past the first chunk, and in the short last block (bytes and padding).
    #[test]
    fn check_row_agrees_with_unpack_row_on_long_rows() {
        let k = BLOCK * 200 + 13;
        let trits: Vec<i8> = (0..k).map(|i| (i * 7 % 3) as i8 - 1).collect();
        let mut clean = vec![0u8; row_bytes(k)];
        pack_row(&trits, &mut clean);
        let mut out = vec![0i8; k];
        assert_eq!(check_row(&clean, k), Ok(()));
        let n = clean.len();
        for (pos, value) in [
            (5000, 20),
            (SCAN_CHUNK, 1),
            (n - 4, 237),
            (n - 1, 1),
            (n - 1, encode(0)),
            (n - 1, encode(242)),
        ] {
            let mut bad = clean.clone();
            bad[pos] = value;
            let found = check_row(&bad, k);
            assert!(found.is_err(), "byte {pos} = {value}");
            assert_eq!(found, unpack_row(&bad, &mut out), "byte {pos} = {value}");
        }
    }

    proptest! {
        #[test]
        fn pack_unpack_round_trip(trits in prop::collection::vec(-1i8..=1, 1..800)) {
            let mut packed = vec![0u8; row_bytes(trits.len())];
            pack_row(&trits, &mut packed);
            let mut back = vec![0i8; trits.len()];
            unpack_row(&packed, &mut back).unwrap();
            prop_assert_eq!(&back, &trits);
            for (e, &t) in trits.iter().enumerate() {
                let (byte, j) = position(e, trits.len());
                prop_assert_eq!(digit(packed[byte], j) as i8 - 1, t);
            }
        }
    }
}
