//! Pack: lay trits out in bytes. Two layouts, both with one f32 scale per tensor (kept in the
//! .bpk header): `i2` (2 bits per weight, SIMD-friendly blocks of 128) and `i8` (one signed byte
//! per weight, for runtimes that want no unpacking). Spec: formats/bpk.md §5.

pub mod i2;

use serde::{Deserialize, Serialize};

/// How the trits of a ternary tensor are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TernaryLayout {
    /// 2 bits per weight, see [`i2`].
    I2,
    /// One `i8` in {-1, 0, 1} per weight, row-major, no padding.
    I8,
}

/// A packed value that is not a trit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    #[error(transparent)]
    I2(#[from] i2::I2Error),
    #[error("weight {element} has int8 value {value}, not in {{-1, 0, 1}}")]
    I8 { element: usize, value: i8 },
}

impl TernaryLayout {
    /// Lower-case name, as on the command line and in .bpk headers.
    pub fn as_str(self) -> &'static str {
        match self {
            TernaryLayout::I2 => "i2",
            TernaryLayout::I8 => "i8",
        }
    }

    /// Bytes of one packed row of `k` weights.
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            TernaryLayout::I2 => i2::row_bytes(k),
            TernaryLayout::I8 => k,
        }
    }

    /// Packs one row of trits into `out` (exactly `row_bytes(trits.len())` bytes).
    // Always inlined, so that the AVX2 builds of its callers (quant::rows, run::model) vectorize it too.
    #[inline(always)]
    pub fn pack_row(self, trits: &[i8], out: &mut [u8]) {
        match self {
            TernaryLayout::I2 => i2::pack_row(trits, out),
            TernaryLayout::I8 => {
                for (o, &t) in out.iter_mut().zip(trits) {
                    *o = t as u8;
                }
            }
        }
    }

    /// Unpacks one row of `out.len()` trits, checking every value.
    pub fn unpack_row(self, bytes: &[u8], out: &mut [i8]) -> Result<(), CodeError> {
        match self {
            TernaryLayout::I2 => Ok(i2::unpack_row(bytes, out)?),
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
        fn both_layouts_round_trip(trits in prop::collection::vec(-1i8..=1, 1..300)) {
            for layout in [TernaryLayout::I2, TernaryLayout::I8] {
                let mut packed = vec![0u8; layout.row_bytes(trits.len())];
                layout.pack_row(&trits, &mut packed);
                let mut back = vec![0i8; trits.len()];
                layout.unpack_row(&packed, &mut back).unwrap();
                prop_assert_eq!(&back, &trits);
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
