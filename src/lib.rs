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
pub mod model;
pub mod pack;
pub mod quant;
pub mod run;
pub mod source;
