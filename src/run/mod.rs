//! Load and run: execute a model, either from a packed .bpk file with integer arithmetic
//! ([`packed`]) or from the source checkpoint in f32 ([`source`]), through one shared forward
//! ([`model`]).

pub mod assemble;
pub mod bench;
pub mod budget;
pub mod kernels;
pub mod model;
pub mod packed;
pub mod plan;
pub mod source;
pub mod team;
pub mod tiles;

use std::path::PathBuf;

pub use model::{
    AttentionState, ForwardOutput, InputError, KvCache, Linear, NoProbe, Probe, Site, Transformer,
};
pub use source::SourceMode;

/// A tensor's place in words: `q_proj of block 3`, `final_norm`.
pub(crate) fn describe_site(role: crate::model::Role, layer: Option<usize>) -> String {
    match layer {
        Some(l) => format!("{} of block {l}", role.as_str()),
        None => role.as_str().to_string(),
    }
}

/// A model that cannot be loaded for running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("unsupported quantization scheme: {reason}")]
    UnsupportedScheme { reason: String },
    #[error(
        "{path} fails validation ({first}); run `bitnet-pack validate` on it for the full report"
    )]
    Invalid { path: PathBuf, first: String },
    #[error("the model has no {what}")]
    Missing { what: String },
    #[error(
        "{path}: tensor `{tensor}` has a non-finite value {value} at index {index:?}; the checkpoint is damaged or was saved after a diverged training step"
    )]
    NonFinite {
        path: PathBuf,
        tensor: String,
        index: Vec<usize>,
        value: f32,
    },
    #[error(transparent)]
    Format(#[from] crate::format::FormatError),
    #[error(transparent)]
    Source(Box<crate::source::SourceError>),
    #[error(transparent)]
    Input(#[from] InputError),
}

/// Keeps the C allocator from returning the forward's working buffers to the system between
/// projections. A prompt's buffers (activations, quantized tokens, outputs: up to a few MB
/// each) are above glibc's default mmap threshold, so every projection mapped fresh pages,
/// took a page fault per 4 KiB on first touch and unmapped them again, which also cost the
/// other worker a TLB shootdown; about a tenth of a 1-thread prefill of a 2B4T-shaped model.
/// Called by the commands that run a model; a no-op except on glibc.
pub fn keep_working_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's largest allowed mmap threshold on 64-bit (32 MiB); above it allocations
        // still go to mmap. Freed memory below 512 MiB at the top of the heap stays mapped.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 512 << 20;
        // SAFETY: mallopt only changes allocator parameters; called before the model runs.
        // A refused setting (return 0) leaves glibc's default, which is still correct.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}
