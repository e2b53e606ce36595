//! The shared bottom layer: element types and their codecs, CPU feature detection, digests.
//! Everything else may use it; it uses nothing of the crate but `fsio` (to open files).

pub mod cpu;
pub mod digest;
pub mod dtype;

pub use dtype::FloatDtype;
