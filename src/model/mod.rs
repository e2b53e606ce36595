//! Describe the model: hyperparameters from config.json and the tensors they imply.

pub mod config;
pub mod roles;

pub use config::{Activation, ConfigError, DeclaredQuant, Family, ModelConfig, SourceQuantization};
pub use roles::{Role, TensorSpec, expected_tensors};
