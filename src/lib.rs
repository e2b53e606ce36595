//! bitnet-pack: turn LLM checkpoints into packed ternary (BitNet b1.58) models and prove the
//! packed files sound.
//!
//! The modules follow a tensor through the program: [`source`] reads a checkpoint, [`model`]
//! describes it, [`quant`] ternarizes, [`pack`] lays trits out in bytes, [`format`] reads and
//! writes .bpk files, [`convert`] runs the pipeline, [`export`] dequantizes back to safetensors.
//! The command-line front end is in [`cli`].

pub mod cli;
pub mod compare;
pub mod convert;
pub mod export;
pub mod format;
pub mod fsio;
pub mod gguf;
pub mod model;
pub mod num;
pub mod pack;
pub mod quant;
pub mod run;
pub mod source;
pub mod transform;

/// Helpers shared by unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    /// A fixed linear congruential sequence of 32-bit states (Numerical Recipes constants).
    pub fn lcg(seed: u32) -> impl Iterator<Item = u32> {
        std::iter::successors(Some(seed), |s| {
            Some(s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223))
        })
        .skip(1)
    }

    /// `n` reproducible values spread uniformly over `[lo, hi)`.
    pub fn uniform(n: usize, seed: u32, lo: f32, hi: f32) -> Vec<f32> {
        lcg(seed)
            .take(n)
            .map(|s| lo + (s >> 8) as f32 / (1u32 << 24) as f32 * (hi - lo))
            .collect()
    }
}
