//! Quantizers: weight ternarization (absmean, one scale per tensor) and the activation
//! quantizers of every scheme.

pub mod absmean;
pub mod activation;
pub mod attention;
pub mod rows;

pub use absmean::{ABSMEAN_EPS, ACTIVATION_EPS, AbsmeanScale, abs_sum_f64, round_clamp};
pub use activation::ActQuant;
