//! The shared bottom layer: element types and their codecs, CPU feature detection, digests.
//! Everything else may use it; it uses nothing of the crate but `fsio` (to open files).

pub mod cpu;
pub mod digest;
pub mod dtype;
pub mod sha256ni;
pub mod sha256x8;

/// SplitMix64 (Steele, Lea, Flood 2014): a small, fixed pseudo-random sequence for reproducible
/// token draws and rotation signs, identical in any implementation of the published algorithm.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

pub use dtype::FloatDtype;
