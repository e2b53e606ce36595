//! Transforms applied to weights (before ternarization) or to activations (online, before
//! quantization): Hadamard transforms, and the folding of a residual-stream rotation.

pub mod hadamard;
pub mod rotation;

pub use hadamard::{Hadamard, UnsupportedSize};
pub use rotation::{Rotation, RotationError};
