//! Hyperparameters read from an HF `config.json`.
//!
//! Every value the converter and runner rely on comes from the file itself. When a key is absent
//! we fall back to the default of the transformers config class named by `model_type` (that is
//! what transformers itself does when it loads the file), never to a guess from the architecture
//! name. Both the transformers 4.x spelling (`rope_theta`, `torch_dtype`) and the 5.x spelling
//! (`rope_parameters.rope_theta`, `dtype`) are accepted.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The model families bitnet-pack understands. Decided by `architectures[0]` in config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// `BitNetForCausalLM` (microsoft/bitnet-b1.58-2B-4T): sub-norms `attn_sub_norm`/`ffn_sub_norm`.
    Bitnet2b4t,
    /// `BitnetForCausalLM` (1bitLLM/bitnet_b1_58-*): sub-norms `inner_attn_ln`/`ffn_layernorm`.
    Bitnet1bitllm,
    /// `LlamaForCausalLM`: full-precision Llama layout without sub-norms.
    Llama,
}

/// Architecture strings accepted in `architectures[0]`, with the family each selects.
pub const SUPPORTED_ARCHITECTURES: &[(&str, Family)] = &[
    ("BitNetForCausalLM", Family::Bitnet2b4t),
    ("BitnetForCausalLM", Family::Bitnet1bitllm),
    ("LlamaForCausalLM", Family::Llama),
];

impl Family {
    /// Whether blocks of this family carry the extra RMSNorms before `o_proj` and `down_proj`.
    pub fn has_sub_norms(self) -> bool {
        !matches!(self, Family::Llama)
    }
}

/// Gate activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `relu(x)^2` (BitNet b1.58 2B4T).
    Relu2,
    /// `x * sigmoid(x)` (Llama, 1bitLLM).
    Silu,
}

/// The `quantization_config` block of an HF BitNet checkpoint, kept for provenance and to
/// interpret packed `weight_scale` tensors correctly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceQuantization {
    pub quant_method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linear_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_mode: Option<String>,
}

/// Model hyperparameters: everything needed to lay out the tensors and run the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `architectures[0]` exactly as written in config.json.
    pub architecture: String,
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub hidden_act: Activation,
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eos_token_ids: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_quantization: Option<SourceQuantization>,
    /// What config.json declares about its training forward beyond BitNet b1.58 (BitNet v2 keys;
    /// not part of a .bpk header's model section, which records the scheme on its own).
    #[serde(skip)]
    pub declared: DeclaredQuant,
}

/// The quantization a checkpoint declares it was trained with, beyond BitNet b1.58:
/// config.json's `online_hadamard` (projections whose input gets an online Hadamard transform,
/// BitNet v2's H-BitLinear) and `activation_scheme` (`a8`, `a4`, or per-site such as
/// `qkv=a4,o=a8,gate_up=a4,down=a8`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeclaredQuant {
    pub online_hadamard: Vec<super::Role>,
    pub activation_scheme: Option<String>,
}

/// A config.json that cannot be used. Each variant names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("config.json must be a JSON object")]
    NotAnObject,
    #[error(
        "config.json has no `architectures` list; add e.g. \"architectures\": [\"BitNetForCausalLM\"]"
    )]
    NoArchitecture,
    #[error(
        "unknown architecture `{}`; supported: {supported}",
        truncate(found, 100)
    )]
    UnknownArchitecture { found: String, supported: String },
    #[error("config.json is missing `{key}`")]
    Missing { key: &'static str },
    #[error("config.json key `{key}` is invalid: {reason}")]
    Invalid { key: &'static str, reason: String },
}

// Not `#[from]`: the message includes the JSON error, so it is not also its `source()`.
impl From<serde_json::Error> for ConfigError {
    fn from(e: serde_json::Error) -> Self {
        ConfigError::Json(e)
    }
}

/// Class defaults of the transformers config classes, used only for keys the file omits.
struct ClassDefaults {
    rms_norm_eps: f64,
    rope_theta: f64,
    hidden_act: &'static str,
    tie_word_embeddings: bool,
    max_position_embeddings: usize,
}

fn class_defaults(model_type: Option<&str>, family: Family) -> ClassDefaults {
    // `BitNetConfig` (model_type "bitnet") vs `LlamaConfig` (model_type "llama", which the
    // 1bitLLM checkpoints also declare).
    let bitnet = match model_type {
        Some("bitnet") => true,
        Some(_) => false,
        None => family == Family::Bitnet2b4t,
    };
    if bitnet {
        ClassDefaults {
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            hidden_act: "relu2",
            tie_word_embeddings: false,
            max_position_embeddings: 2048,
        }
    } else {
        ClassDefaults {
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            hidden_act: "silu",
            tie_word_embeddings: false,
            max_position_embeddings: 2048,
        }
    }
}

impl ModelConfig {
    /// Parses the text of a config.json.
    pub fn from_json(text: &[u8]) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_slice(text)?;
        let obj = value.as_object().ok_or(ConfigError::NotAnObject)?;
        let architecture = obj
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or(ConfigError::NoArchitecture)?
            .to_string();
        let family = SUPPORTED_ARCHITECTURES
            .iter()
            .find(|(name, _)| *name == architecture)
            .map(|(_, f)| *f)
            .ok_or_else(|| ConfigError::UnknownArchitecture {
                found: architecture.clone(),
                supported: SUPPORTED_ARCHITECTURES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let model_type = match obj.get("model_type") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) if allowed_model_types(family).contains(&t.as_str()) => {
                Some(t.as_str())
            }
            Some(other) => {
                return Err(ConfigError::Invalid {
                    key: "model_type",
                    reason: format!(
                        "{other} does not go with {architecture} (expected {}); its defaults would be guessed",
                        allowed_model_types(family).join(" or ")
                    ),
                });
            }
        };
        let defaults = class_defaults(model_type, family);

        let hidden_size = req_usize(obj, "hidden_size")?;
        let num_heads = req_usize(obj, "num_attention_heads")?;
        let num_kv_heads = opt_usize(obj, "num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(ConfigError::Invalid {
                key: "num_key_value_heads",
                reason: format!("{num_kv_heads} does not divide num_attention_heads = {num_heads}"),
            });
        }
        let head_dim = match opt_usize(obj, "head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(ConfigError::Invalid {
                    key: "num_attention_heads",
                    reason: format!(
                        "{num_heads} does not divide hidden_size = {hidden_size} and there is no `head_dim`"
                    ),
                });
            }
        };
        if head_dim % 2 != 0 {
            return Err(ConfigError::Invalid {
                key: "head_dim",
                reason: format!("{head_dim} is odd; rotary embeddings need an even head dimension"),
            });
        }
        let hidden_act_name = match obj.get("hidden_act") {
            None | Some(Value::Null) => defaults.hidden_act.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(ConfigError::Invalid {
                    key: "hidden_act",
                    reason: format!("expected a string, found {other}"),
                });
            }
        };
        let hidden_act = match hidden_act_name.as_str() {
            "relu2" => Activation::Relu2,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(ConfigError::Invalid {
                    key: "hidden_act",
                    reason: format!("`{other}` is not supported (supported: relu2, silu)"),
                });
            }
        };
        let rope_theta = match obj.get("rope_theta") {
            Some(v) if !v.is_null() => as_positive_f64(v, "rope_theta")?,
            _ => match obj.get("rope_parameters").and_then(|p| p.get("rope_theta")) {
                Some(v) => as_positive_f64(v, "rope_theta")?,
                None => defaults.rope_theta,
            },
        };
        check_rope_scaling(obj)?;
        let rms_norm_eps = match obj.get("rms_norm_eps") {
            Some(v) if !v.is_null() => as_positive_f64(v, "rms_norm_eps")?,
            _ => defaults.rms_norm_eps,
        };
        let tie_word_embeddings = match obj.get("tie_word_embeddings") {
            None | Some(Value::Null) => defaults.tie_word_embeddings,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    key: "tie_word_embeddings",
                    reason: format!("expected true or false, found {other}"),
                });
            }
        };
        let source_quantization = match obj.get("quantization_config") {
            None | Some(Value::Null) => None,
            Some(v) => {
                Some(
                    serde_json::from_value(v.clone()).map_err(|e| ConfigError::Invalid {
                        key: "quantization_config",
                        reason: e.to_string(),
                    })?,
                )
            }
        };
        let config = ModelConfig {
            architecture,
            family,
            hidden_size,
            intermediate_size: req_usize(obj, "intermediate_size")?,
            num_layers: req_usize(obj, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: req_usize(obj, "vocab_size")?,
            max_position_embeddings: opt_usize(obj, "max_position_embeddings")?
                .unwrap_or(defaults.max_position_embeddings),
            rms_norm_eps,
            rope_theta,
            hidden_act,
            tie_word_embeddings,
            bos_token_id: opt_u64(obj, "bos_token_id")?,
            eos_token_ids: eos_ids(obj)?,
            source_quantization,
            declared: declared_quant(obj)?,
        };
        config
            .check_limits()
            .map_err(|reason| ConfigError::Invalid {
                key: "num_hidden_layers",
                reason,
            })?;
        Ok(config)
    }

    /// Checks the invariants [`ModelConfig::from_json`] establishes, for configs read from
    /// elsewhere (a .bpk header): every dimension positive and bounded, heads consistent.
    pub fn check_limits(&self) -> Result<(), String> {
        let dims = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, v) in dims {
            if v == 0 || v as u64 > MAX_DIM {
                return Err(format!("{key} = {v} is outside 1..=2^31"));
            }
        }
        if self.num_layers == 0 || self.num_layers > MAX_LAYERS {
            return Err(format!(
                "num_layers = {} is outside 1..={MAX_LAYERS}",
                self.num_layers
            ));
        }
        if self.num_heads % self.num_kv_heads != 0 || self.head_dim % 2 != 0 {
            return Err(format!(
                "{} heads, {} kv heads and head_dim {} are inconsistent",
                self.num_heads, self.num_kv_heads, self.head_dim
            ));
        }
        // Real models use eps 1e-6..1e-5 and theta 1e4..1e6; values far outside overflow f32
        // in the forward (theta 1e-300 gives infinite RoPE frequencies).
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps <= 0.1) {
            return Err(format!(
                "rms_norm_eps = {:e} is outside (0, 0.1]",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta >= 1.0 && self.rope_theta <= 1e12) {
            return Err(format!(
                "rope_theta = {:e} is outside [1, 1e12]",
                self.rope_theta
            ));
        }
        match SUPPORTED_ARCHITECTURES
            .iter()
            .find(|(name, _)| *name == self.architecture)
        {
            Some((_, family)) if *family == self.family => {}
            _ => {
                return Err(format!(
                    "architecture {:?} with family {:?} is not one of the supported pairs",
                    truncate(&self.architecture, 100),
                    self.family
                ));
            }
        }
        Ok(())
    }

    /// Width of the query projection output (`num_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of each of the key and value projection outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Input width of a projection (the length of the activation its quantizer sees).
    pub fn projection_in_dim(&self, role: super::Role) -> Option<usize> {
        use super::Role::*;
        match role {
            QProj | KProj | VProj | GateProj | UpProj => Some(self.hidden_size),
            OProj => Some(self.q_dim()),
            DownProj => Some(self.intermediate_size),
            _ => None,
        }
    }
}

type Obj = serde_json::Map<String, Value>;

/// `s` cut to at most `max` characters, for messages.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Largest dimension we accept from a config: far beyond any real model, small enough that
/// products of two dimensions cannot overflow a u64.
const MAX_DIM: u64 = 1 << 31;
/// Most blocks a model may have (real models have tens to a few hundred).
pub const MAX_LAYERS: usize = 4096;

fn opt_usize(obj: &Obj, key: &'static str) -> Result<Option<usize>, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 && n <= MAX_DIM => Ok(Some(n as usize)),
            _ => Err(ConfigError::Invalid {
                key,
                reason: format!("expected a positive integer below 2^31, found {v}"),
            }),
        },
    }
}

fn req_usize(obj: &Obj, key: &'static str) -> Result<usize, ConfigError> {
    opt_usize(obj, key)?.ok_or(ConfigError::Missing { key })
}

fn opt_u64(obj: &Obj, key: &'static str) -> Result<Option<u64>, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| ConfigError::Invalid {
            key,
            reason: format!("expected a token id, found {v}"),
        }),
    }
}

fn eos_ids(obj: &Obj) -> Result<Vec<u64>, ConfigError> {
    match obj.get("eos_token_id") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64().ok_or_else(|| ConfigError::Invalid {
                    key: "eos_token_id",
                    reason: format!("expected token ids, found {v}"),
                })
            })
            .collect(),
        Some(v) => Ok(vec![v.as_u64().ok_or_else(|| ConfigError::Invalid {
            key: "eos_token_id",
            reason: format!("expected a token id, found {v}"),
        })?]),
    }
}

fn as_positive_f64(v: &Value, key: &'static str) -> Result<f64, ConfigError> {
    match v.as_f64() {
        Some(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(ConfigError::Invalid {
            key,
            reason: format!("expected a positive number, found {v}"),
        }),
    }
}

/// Only plain RoPE is implemented; a scaled variant would silently change the numbers.
/// Reads the BitNet v2 keys of config.json (see [`DeclaredQuant`]).
fn declared_quant(obj: &Obj) -> Result<DeclaredQuant, ConfigError> {
    let online_hadamard = match obj.get("online_hadamard") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .and_then(super::Role::from_name)
                    .filter(|r| r.is_ternary())
                    .ok_or_else(|| ConfigError::Invalid {
                        key: "online_hadamard",
                        reason: format!(
                            "{v} is not a projection (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                        ),
                    })
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ConfigError::Invalid {
                key: "online_hadamard",
                reason: format!("expected a list of projection names, found {other}"),
            });
        }
    };
    let activation_scheme = match obj.get("activation_scheme") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(ConfigError::Invalid {
                key: "activation_scheme",
                reason: format!("expected a string such as \"a4\", found {other}"),
            });
        }
    };
    Ok(DeclaredQuant {
        online_hadamard,
        activation_scheme,
    })
}

/// Accepts only plain RoPE: `rope_scaling` absent, null or `{"rope_type": "default", ...}`;
/// `rope_parameters` (transformers 5.x) absent, null or an object whose `rope_type` is absent or
/// `default`. Anything else (a string, a scaling type) is refused rather than ignored.
fn check_rope_scaling(obj: &Obj) -> Result<(), ConfigError> {
    for (key, name) in [
        ("rope_scaling", "rope_scaling"),
        ("rope_parameters", "rope_parameters"),
    ] {
        let Some(v) = obj.get(key).filter(|v| !v.is_null()) else {
            continue;
        };
        let Some(o) = v.as_object() else {
            return Err(ConfigError::Invalid {
                key: name,
                reason: format!("expected null or an object, found {v}"),
            });
        };
        let rope_type = o.get("rope_type").or_else(|| o.get("type"));
        match rope_type {
            None if key == "rope_parameters" => {}
            Some(Value::String(t)) if t == "default" => {}
            None => {
                return Err(ConfigError::Invalid {
                    key: name,
                    reason: "an object without `rope_type`: which scaling is meant is unclear; only plain RoPE (`default`) is supported".into(),
                });
            }
            Some(other) => {
                return Err(ConfigError::Invalid {
                    key: name,
                    reason: format!(
                        "rope type {other} is not supported (only plain RoPE, `default`)"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The `model_type` values each architecture may declare (what transformers and the published
/// checkpoints write).
fn allowed_model_types(family: Family) -> &'static [&'static str] {
    match family {
        Family::Bitnet2b4t => &["bitnet"],
        Family::Bitnet1bitllm => &["llama", "bitnet"],
        Family::Llama => &["llama"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Map<String, Value> {
        serde_json::from_str(
            r#"{"architectures":["BitNetForCausalLM"],"model_type":"bitnet","hidden_size":64,
            "intermediate_size":96,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"vocab_size":100}"#,
        )
        .unwrap()
    }

    fn parse(obj: &serde_json::Map<String, Value>) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json(serde_json::to_string(obj).unwrap().as_bytes())
    }

    #[test]
    fn bitnet_class_defaults_apply_when_keys_are_absent() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.family, Family::Bitnet2b4t);
        assert_eq!(c.hidden_act, Activation::Relu2);
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.kv_dim(), 32);
    }

    #[test]
    fn config_values_win_over_the_architecture() {
        let mut o = base();
        o.insert("hidden_act".into(), "silu".into());
        o.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_theta": 1234.0, "rope_type": "default"}),
        );
        let c = parse(&o).unwrap();
        assert_eq!(c.hidden_act, Activation::Silu);
        assert_eq!(c.rope_theta, 1234.0);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let mut o = base();
        o.insert(
            "architectures".into(),
            serde_json::json!(["GPT2LMHeadModel"]),
        );
        match parse(&o) {
            Err(ConfigError::UnknownArchitecture { found, .. }) => {
                assert_eq!(found, "GPT2LMHeadModel")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_and_invalid_keys_are_named() {
        let mut o = base();
        o.remove("hidden_size");
        assert!(matches!(
            parse(&o),
            Err(ConfigError::Missing { key: "hidden_size" })
        ));
        let mut o = base();
        o.insert("num_key_value_heads".into(), 3.into());
        assert!(matches!(
            parse(&o),
            Err(ConfigError::Invalid {
                key: "num_key_value_heads",
                ..
            })
        ));
        let mut o = base();
        o.insert("hidden_act".into(), "gelu".into());
        assert!(matches!(
            parse(&o),
            Err(ConfigError::Invalid {
                key: "hidden_act",
                ..
            })
        ));
        let mut o = base();
        o.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
        );
        assert!(matches!(
            parse(&o),
            Err(ConfigError::Invalid {
                key: "rope_scaling",
                ..
            })
        ));
        assert!(matches!(
            ModelConfig::from_json(b"{not json"),
            Err(ConfigError::Json(_))
        ));
        assert!(matches!(
            ModelConfig::from_json(b"[1]"),
            Err(ConfigError::NotAnObject)
        ));
    }

    #[test]
    fn only_plain_rope_is_accepted() {
        let bad = [
            ("rope_scaling", serde_json::json!("yarn")),
            ("rope_scaling", serde_json::json!({"factor": 2.0})),
            (
                "rope_scaling",
                serde_json::json!({"type": "linear", "factor": 2.0}),
            ),
            (
                "rope_parameters",
                serde_json::json!({"rope_type": "llama3", "rope_theta": 5e5}),
            ),
            ("rope_parameters", serde_json::json!(500000.0)),
        ];
        for (key, value) in bad {
            let mut o = base();
            o.insert(key.into(), value.clone());
            match parse(&o) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{value}"),
                other => panic!("{key} {value}: {other:?}"),
            }
        }
        for (key, value) in [
            ("rope_scaling", Value::Null),
            ("rope_scaling", serde_json::json!({"rope_type": "default"})),
            ("rope_parameters", serde_json::json!({"rope_theta": 1e4})),
        ] {
            let mut o = base();
            o.insert(key.into(), value);
            assert!(parse(&o).is_ok());
        }
    }

    #[test]
    fn a_model_type_that_does_not_go_with_the_architecture_is_refused() {
        let mut o = base();
        o.insert("model_type".into(), "mistral".into());
        assert!(matches!(
            parse(&o),
            Err(ConfigError::Invalid {
                key: "model_type",
                ..
            })
        ));
        o.insert("model_type".into(), "llama".into());
        assert!(matches!(
            parse(&o),
            Err(ConfigError::Invalid {
                key: "model_type",
                ..
            })
        ));
        o.insert(
            "architectures".into(),
            serde_json::json!(["BitnetForCausalLM"]),
        );
        assert_eq!(parse(&o).unwrap().family, Family::Bitnet1bitllm);
    }
}
