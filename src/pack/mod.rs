//! Pack: lay trits out in bytes. Three layouts, all with one f32 scale per tensor (kept in the
//! .bpk header): `i2` (2 bits per weight, SIMD-friendly blocks of 128), `t5` (five trits per
//! byte, 1.6 bits per weight, blocks of 160) and `i8` (one signed byte per weight, for runtimes
//! that want no unpacking). Spec: formats/bpk.md §5.

pub mod i2;
pub mod i2_s;
pub mod q8;
pub mod t5;
pub mod tq;
pub mod tq1_0;
pub mod tq2_0;

use serde::{Deserialize, Serialize};

/// How the trits of a ternary tensor are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TernaryLayout {
    /// 2 bits per weight, see [`i2`].
    I2,
    /// One `i8` in {-1, 0, 1} per weight, row-major, no padding.
    I8,
    /// Five trits per byte (1.6 bits per weight), see [`t5`].
    T5,
}

/// A packed value that is not a trit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    #[error(transparent)]
    I2(#[from] i2::I2Error),
    #[error(transparent)]
    T5(#[from] t5::T5Error),
    #[error("weight {element} has int8 value {value}, not in {{-1, 0, 1}}")]
    I8 { element: usize, value: i8 },
}

impl CodeError {
    /// The same error for a row segment that starts `by` weights into its row (for `t5`, `by`
    /// is a multiple of [`t5::BLOCK`], so the segment starts `by / 160 * 32` bytes in).
    fn shifted(self, by: usize) -> Self {
        match self {
            CodeError::I2(i2::I2Error::InvalidCode { element }) => {
                CodeError::I2(i2::I2Error::InvalidCode {
                    element: element + by,
                })
            }
            CodeError::I2(i2::I2Error::BadPadding { slot, code }) => {
                CodeError::I2(i2::I2Error::BadPadding {
                    slot: slot + by,
                    code,
                })
            }
            CodeError::T5(t5::T5Error::InvalidByte {
                byte,
                element,
                value,
            }) => CodeError::T5(t5::T5Error::InvalidByte {
                byte: byte + by / t5::BLOCK * t5::BLOCK_BYTES,
                element: element + by,
                value,
            }),
            CodeError::T5(t5::T5Error::BadPadding { slot, code }) => {
                CodeError::T5(t5::T5Error::BadPadding {
                    slot: slot + by,
                    code,
                })
            }
            CodeError::I8 { element, value } => CodeError::I8 {
                element: element + by,
                value,
            },
        }
    }
}

impl TernaryLayout {
    /// Every layout.
    pub const ALL: [TernaryLayout; 3] = [TernaryLayout::I2, TernaryLayout::I8, TernaryLayout::T5];

    /// Lower-case name, as on the command line and in .bpk headers.
    pub fn as_str(self) -> &'static str {
        match self {
            TernaryLayout::I2 => "i2",
            TernaryLayout::I8 => "i8",
            TernaryLayout::T5 => "t5",
        }
    }

    /// Bytes of one packed row of `k` weights.
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            TernaryLayout::I2 => i2::row_bytes(k),
            TernaryLayout::I8 => k,
            TernaryLayout::T5 => t5::row_bytes(k),
        }
    }

    /// Packs one row of trits into `out` (exactly `row_bytes(trits.len())` bytes).
    // Always inlined, so that the AVX2 builds of its callers (quant::rows, run::model) vectorize it too.
    #[inline(always)]
    pub fn pack_row(self, trits: &[i8], out: &mut [u8]) {
        match self {
            TernaryLayout::I2 => i2::pack_row(trits, out),
            TernaryLayout::T5 => t5::pack_row(trits, out),
            TernaryLayout::I8 => {
                for (o, &t) in out.iter_mut().zip(trits) {
                    *o = t as u8;
                }
            }
        }
    }

    /// Checks every code of one packed row of `k` weights (`bytes.len() == row_bytes(k)`)
    /// without unpacking it whole: the same verdict and error as [`Self::unpack_row`], with
    /// memory bounded by one block however long a (hostile) row claims to be (`t5` rows are
    /// checked by [`t5::check_row`]).
    pub fn check_row(self, bytes: &[u8], k: usize) -> Result<(), CodeError> {
        debug_assert_eq!(bytes.len(), self.row_bytes(k));
        if self == TernaryLayout::T5 {
            return Ok(t5::check_row(bytes, k)?);
        }
        let mut buf = [0i8; i2::BLOCK];
        for (s, segment) in bytes.chunks(self.row_bytes(i2::BLOCK)).enumerate() {
            let start = s * i2::BLOCK;
            let n = (k - start).min(i2::BLOCK);
            self.unpack_row(segment, &mut buf[..n])
                .map_err(|e| e.shifted(start))?;
        }
        Ok(())
    }

    /// Unpacks one row of `out.len()` trits, checking every value.
    pub fn unpack_row(self, bytes: &[u8], out: &mut [i8]) -> Result<(), CodeError> {
        match self {
            TernaryLayout::I2 => Ok(i2::unpack_row(bytes, out)?),
            TernaryLayout::T5 => Ok(t5::unpack_row(bytes, out)?),
            TernaryLayout::I8 => {
                for (e, (o, &b)) in out.iter_mut().zip(bytes).enumerate() {
                    let value = b as i8;
                    if !(-1..=1).contains(&value) {
                        return Err(CodeError::I8 { element: e, value });
                    }
                    *o = value;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_layout_round_trips(trits in prop::collection::vec(-1i8..=1, 1..400)) {
            for layout in TernaryLayout::ALL {
                let mut packed = vec![0u8; layout.row_bytes(trits.len())];
                layout.pack_row(&trits, &mut packed);
                let mut back = vec![0i8; trits.len()];
                layout.unpack_row(&packed, &mut back).unwrap();
                prop_assert_eq!(&back, &trits);
            }
        }
    }

    /// `check_row` finds exactly what `unpack_row` finds, at the same element, in rows of
    /// several blocks with damage anywhere (codes, padding).
    #[test]
    fn check_row_agrees_with_unpack_row() {
        for layout in TernaryLayout::ALL {
            for k in [1usize, 5, 127, 128, 129, 159, 160, 161, 300, 515] {
                let trits: Vec<i8> = (0..k).map(|i| (i % 3) as i8 - 1).collect();
                let mut clean = vec![0u8; layout.row_bytes(k)];
                layout.pack_row(&trits, &mut clean);
                let mut out = vec![0i8; k];
                assert_eq!(layout.check_row(&clean, k), Ok(()));
                for pos in 0..clean.len() {
                    for bits in [0x03u8, 0x0c, 0x30, 0xc0, 0x02, 0x80] {
                        let mut bad = clean.clone();
                        bad[pos] ^= bits;
                        assert_eq!(
                            layout.check_row(&bad, k),
                            layout.unpack_row(&bad, &mut out),
                            "{layout:?} k={k} byte {pos} ^ {bits:#x}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn i8_rejects_non_trits() {
        let mut out = [0i8; 3];
        assert_eq!(
            TernaryLayout::I8.unpack_row(&[1, 2, 0xFF], &mut out),
            Err(CodeError::I8 {
                element: 1,
                value: 2
            })
        );
    }
}
