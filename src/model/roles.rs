//! Tensor names and roles: which tensors a model of a given config must have, in which shape.
//!
//! The list produced by [`expected_tensors`] is also the canonical order of tensors in a .bpk
//! file: embeddings, then each block in execution order, then the final norm and the head.

use serde::{Deserialize, Serialize};

use super::config::{Family, ModelConfig};

/// What a tensor does in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Embedding,
    AttnNorm,
    QProj,
    KProj,
    VProj,
    AttnSubNorm,
    OProj,
    FfnNorm,
    GateProj,
    UpProj,
    FfnSubNorm,
    DownProj,
    FinalNorm,
    LmHead,
}

impl Role {
    /// The seven projections that BitNet b1.58 trains with ternary weights.
    pub fn is_ternary(self) -> bool {
        matches!(
            self,
            Role::QProj
                | Role::KProj
                | Role::VProj
                | Role::OProj
                | Role::GateProj
                | Role::UpProj
                | Role::DownProj
        )
    }

    /// The seven projections, in execution order.
    pub const PROJECTIONS: [Role; 7] = [
        Role::QProj,
        Role::KProj,
        Role::VProj,
        Role::OProj,
        Role::GateProj,
        Role::UpProj,
        Role::DownProj,
    ];

    /// Position among [`Role::PROJECTIONS`], for the seven projections.
    pub fn projection_index(self) -> Option<usize> {
        Role::PROJECTIONS.iter().position(|&r| r == self)
    }

    /// The role named `name` (`q_proj`, `final_norm`, ...), as in .bpk headers.
    pub fn from_name(name: &str) -> Option<Role> {
        serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
    }

    /// The name used in the .bpk header and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Embedding => "embedding",
            Role::AttnNorm => "attn_norm",
            Role::QProj => "q_proj",
            Role::KProj => "k_proj",
            Role::VProj => "v_proj",
            Role::AttnSubNorm => "attn_sub_norm",
            Role::OProj => "o_proj",
            Role::FfnNorm => "ffn_norm",
            Role::GateProj => "gate_proj",
            Role::UpProj => "up_proj",
            Role::FfnSubNorm => "ffn_sub_norm",
            Role::DownProj => "down_proj",
            Role::FinalNorm => "final_norm",
            Role::LmHead => "lm_head",
        }
    }
}

/// One tensor the model needs: its HF name, role, block index and shape (row-major, `[out, in]`
/// for projections).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub role: Role,
    pub layer: Option<usize>,
    pub shape: Vec<usize>,
}

/// Names of the per-block sub-norms for a family (`None` for families without them).
fn sub_norm_names(family: Family) -> Option<(&'static str, &'static str)> {
    match family {
        Family::Bitnet2b4t => Some(("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")),
        Family::Bitnet1bitllm => Some(("self_attn.inner_attn_ln", "mlp.ffn_layernorm")),
        Family::Llama => None,
    }
}

/// HF tensor-name suffixes that are buffers, not weights, and are skipped when present.
pub const IGNORED_SUFFIXES: &[&str] = &["rotary_emb.inv_freq"];

/// The tensors a checkpoint with this config must contain, in canonical order.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let mut out = vec![TensorSpec {
        name: "model.embed_tokens.weight".into(),
        role: Role::Embedding,
        layer: None,
        shape: vec![cfg.vocab_size, h],
    }];
    let sub = sub_norm_names(cfg.family);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let mut push = |suffix: &str, role: Role, shape: Vec<usize>| {
            out.push(TensorSpec {
                name: format!("{p}.{suffix}.weight"),
                role,
                layer: Some(i),
                shape,
            })
        };
        push("input_layernorm", Role::AttnNorm, vec![h]);
        push("self_attn.q_proj", Role::QProj, vec![cfg.q_dim(), h]);
        push("self_attn.k_proj", Role::KProj, vec![cfg.kv_dim(), h]);
        push("self_attn.v_proj", Role::VProj, vec![cfg.kv_dim(), h]);
        if let Some((attn_sub, _)) = sub {
            push(attn_sub, Role::AttnSubNorm, vec![cfg.q_dim()]);
        }
        push("self_attn.o_proj", Role::OProj, vec![h, cfg.q_dim()]);
        push("post_attention_layernorm", Role::FfnNorm, vec![h]);
        push("mlp.gate_proj", Role::GateProj, vec![f, h]);
        push("mlp.up_proj", Role::UpProj, vec![f, h]);
        if let Some((_, ffn_sub)) = sub {
            push(ffn_sub, Role::FfnSubNorm, vec![f]);
        }
        push("mlp.down_proj", Role::DownProj, vec![h, f]);
    }
    out.push(TensorSpec {
        name: "model.norm.weight".into(),
        role: Role::FinalNorm,
        layer: None,
        shape: vec![h],
    });
    if !cfg.tie_word_embeddings {
        out.push(TensorSpec {
            name: "lm_head.weight".into(),
            role: Role::LmHead,
            layer: None,
            shape: vec![cfg.vocab_size, h],
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(arch: &str, tied: bool) -> ModelConfig {
        let text = format!(
            r#"{{"architectures":["{arch}"],"hidden_size":64,"intermediate_size":96,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "vocab_size":100,"tie_word_embeddings":{tied}}}"#
        );
        ModelConfig::from_json(text.as_bytes()).unwrap()
    }

    #[test]
    fn counts_per_family() {
        // embed + final norm (+ head) + per block: 2 norms + 7 projections (+ 2 sub-norms)
        assert_eq!(
            expected_tensors(&cfg("BitNetForCausalLM", true)).len(),
            2 + 2 * 11
        );
        assert_eq!(
            expected_tensors(&cfg("BitnetForCausalLM", false)).len(),
            3 + 2 * 11
        );
        assert_eq!(
            expected_tensors(&cfg("LlamaForCausalLM", false)).len(),
            3 + 2 * 9
        );
    }

    #[test]
    fn shapes_follow_the_config() {
        let t = expected_tensors(&cfg("BitnetForCausalLM", false));
        let find = |n: &str| t.iter().find(|s| s.name == n).unwrap();
        assert_eq!(
            find("model.layers.1.self_attn.k_proj.weight").shape,
            vec![32, 64]
        );
        assert_eq!(
            find("model.layers.0.mlp.down_proj.weight").shape,
            vec![64, 96]
        );
        assert_eq!(
            find("model.layers.0.mlp.ffn_layernorm.weight").role,
            Role::FfnSubNorm
        );
        assert_eq!(t.iter().filter(|s| s.role.is_ternary()).count(), 14);
    }
}
