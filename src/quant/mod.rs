//! Ternarize: turn float weights into trits and one scale per tensor.

pub mod absmean;
pub mod rows;

pub use absmean::{ABSMEAN_EPS, ACTIVATION_EPS, AbsmeanScale, abs_sum_f64, round_clamp};
