//! Export a .bpk file as an HF *packed* BitNet checkpoint that transformers loads with its own
//! bitnet quantizer (offline mode): a directory with `config.json` (its `quantization_config`
//! names the linear class), `model.safetensors` (every projection as uint8 `[out/4, in]` in
//! transformers' pack order plus a one-element `weight_scale`, every other tensor as stored) and
//! the tokenizer files, if given. Spec: formats/hf.md.
//!
//! `weight_scale` is written as F32 so that `a` (or `1/a`) is kept exactly as the .bpk holds it;
//! transformers casts it to the dtype the model is loaded in. The directory is filled beside the
//! target and renamed onto it at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::safetensors::{PlannedTensor, write_safetensors};
use super::{UnpackError, check_valid};
use crate::format::{BpkFile, Encoding};
use crate::fsio::{self, AtomicDir};
use crate::model::{Family, ModelConfig};
use crate::num::FloatDtype;
use crate::source::LinearClass;
use crate::source::hf_packed::{self, TRITS_PER_BYTE};
use crate::source::{CONFIG_FILE, SINGLE_FILE};

/// Tokenizer and generation files copied from the source directory when present.
pub const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// A file transformers' bitnet quantizer cannot run as it is.
#[derive(Debug, thiserror::Error)]
pub enum HfExportError {
    #[error(
        "{path}: its quantization scheme goes beyond BitNet b1.58 ({what}); transformers' BitNet layers quantize every input per token to int8 and have no online transforms or attention-state quantizers, so an HF checkpoint would compute something else: export the .bpk or a GGUF instead, or convert without these options"
    )]
    Scheme { path: PathBuf, what: String },
    #[error(
        "{path}: architecture {arch} has no class in transformers (1bitLLM's BitnetForCausalLM needs its own remote code); only BitNetForCausalLM and LlamaForCausalLM are exported to HF"
    )]
    Architecture { path: PathBuf, arch: String },
    #[error(
        "{path}: tensor `{tensor}` has {rows} output rows, not a multiple of 4, which transformers' packed layout needs"
    )]
    Rows {
        path: PathBuf,
        tensor: String,
        rows: u64,
    },
}

/// What was written.
#[derive(Debug, Clone)]
pub struct HfSummary {
    pub tensors: usize,
    pub copied: Vec<String>,
}

/// Writes `file` as an HF packed checkpoint into the new directory `out`, with `class`'s scale
/// convention, copying the tokenizer files of `tokenizer_dir` (the source checkpoint) if given.
/// `input_dir` is refused as the target.
pub fn export_hf(
    file: &BpkFile,
    out: &Path,
    class: LinearClass,
    tokenizer_dir: Option<&Path>,
) -> Result<HfSummary, UnpackError> {
    check_valid(file)?;
    let h = &file.header;
    let path = file.path.clone();
    if h.quantization.is_extended() {
        return Err(HfExportError::Scheme {
            path,
            what: extended_parts(&h.quantization),
        }
        .into());
    }
    if h.model.family == Family::Bitnet1bitllm {
        return Err(HfExportError::Architecture {
            path,
            arch: h.model.architecture.clone(),
        }
        .into());
    }
    for e in &h.tensors {
        if e.encoding.ternary().is_some() && e.shape[0] % TRITS_PER_BYTE as u64 != 0 {
            return Err(HfExportError::Rows {
                path,
                tensor: e.name.clone(),
                rows: e.shape[0],
            }
            .into());
        }
    }
    let input_dir = fsio::parent_dir(&file.path);
    let dir = AtomicDir::create(out, tokenizer_dir.unwrap_or(&input_dir))?;

    let mut planned = Vec::new();
    for e in &h.tensors {
        let shape: Vec<usize> = e.shape.iter().map(|&d| d as usize).collect();
        if e.encoding.ternary().is_some() {
            planned.push(PlannedTensor {
                name: e.name.clone(),
                dtype: "U8",
                elem_size: 1,
                shape: vec![shape[0] / TRITS_PER_BYTE, shape[1]],
            });
            planned.push(PlannedTensor {
                name: hf_packed::scale_name(&e.name),
                dtype: FloatDtype::F32.safetensors_name(),
                elem_size: 4,
                shape: vec![1],
            });
        } else if let Some(d) = e.encoding.float() {
            planned.push(PlannedTensor {
                name: e.name.clone(),
                dtype: d.safetensors_name(),
                elem_size: d.size(),
                shape,
            });
        } else if e.encoding == Encoding::Q8 {
            // HF has no q8_0: its values `d * q` are exact in f32.
            planned.push(PlannedTensor {
                name: e.name.clone(),
                dtype: FloatDtype::F32.safetensors_name(),
                elem_size: 4,
                shape,
            });
        }
    }
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "bitnet_pack_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ]);
    // Planned order: each ternary entry is followed by its scale.
    let mut order = Vec::new();
    for e in &h.tensors {
        if e.encoding.ternary().is_some() {
            order.push((e, false));
            order.push((e, true));
        } else if e.encoding.float().is_some() || e.encoding == Encoding::Q8 {
            order.push((e, false));
        }
    }
    write_safetensors(
        &dir.path().join(SINGLE_FILE),
        false,
        &metadata,
        &planned,
        |i, w| {
            let (e, is_scale) = order[i];
            let raw = file.raw(e).map_err(std::io::Error::other)?;
            if e.encoding == Encoding::Q8 {
                let k = e.shape[1] as usize;
                let mut values = vec![0f32; k];
                let mut bytes = Vec::with_capacity(4 * k);
                for row in raw.chunks_exact(crate::pack::q8::row_bytes(k)) {
                    crate::pack::q8::dequantize_row(row, &mut values);
                    bytes.clear();
                    crate::num::dtype::encode_f32(FloatDtype::F32, &values, &mut bytes);
                    w.write_all(&bytes)?;
                }
                return Ok(());
            }
            let Some(layout) = e.encoding.ternary() else {
                return w.write_all(&raw);
            };
            let a = e.scale_f32().unwrap_or(0.0);
            if is_scale {
                return w.write_all(&class.weight_scale_from_a(a).to_le_bytes());
            }
            let (rows, k) = (e.shape[0] as usize, e.shape[1] as usize);
            let rb = layout.row_bytes(k);
            let mut trits = vec![0i8; rows * k];
            for (row, dst) in raw.chunks_exact(rb).zip(trits.chunks_exact_mut(k)) {
                layout.unpack_row(row, dst).map_err(std::io::Error::other)?;
            }
            let mut packed = vec![0u8; rows * k / TRITS_PER_BYTE];
            hf_packed::pack_packed(&trits, rows, k, &mut packed);
            w.write_all(&packed)
        },
    )?;
    let config = hf_config(&h.model, class, tokenizer_dir, file)?;
    fsio::write_atomic(&dir.path().join(CONFIG_FILE), false, &config)?;
    let mut copied = Vec::new();
    if let Some(src) = tokenizer_dir {
        for name in COPIED {
            let from = src.join(name);
            if fsio::stat(&from)?.is_none() {
                continue;
            }
            let bytes = fsio::read_capped(&from, crate::source::MAX_JSON_FILE, "tokenizer file")?;
            fsio::write_atomic(&dir.path().join(name), false, &bytes)?;
            copied.push(name.to_string());
        }
    }
    dir.persist()?;
    Ok(HfSummary {
        tensors: planned.len(),
        copied,
    })
}

/// What a scheme has beyond BitNet b1.58, in words.
pub fn extended_parts(q: &crate::format::header::QuantScheme) -> String {
    let mut what = Vec::new();
    if let Ok(a) = q.activations.quantizer()
        && a.name() != "a8"
    {
        what.push(format!("activations {}", a.name()));
    }
    if !q.activation_sites.is_empty() {
        what.push("per-site activation schemes".into());
    }
    if !q.online_rotations.is_empty() {
        what.push("online Hadamard transforms".into());
    }
    if q.attention.is_some() {
        what.push("quantized attention states".into());
    }
    if q.residual_rotation.is_some() {
        what.push("a residual rotation".into());
    }
    if what.is_empty() {
        what.push("a non-standard activation quantizer".into());
    }
    what.join(", ")
}

/// The config.json: the source's own when there is one (every key transformers knows stays),
/// else one written from the .bpk's model section; either way with the offline
/// `quantization_config` of `class` and the dtype of the stored embedding.
fn hf_config(
    m: &ModelConfig,
    class: LinearClass,
    source_dir: Option<&Path>,
    file: &BpkFile,
) -> Result<Vec<u8>, UnpackError> {
    let from_source = match source_dir.map(|d| d.join(CONFIG_FILE)) {
        Some(p) if fsio::stat(&p)?.is_some() => {
            let bytes = fsio::read_capped(&p, crate::source::MAX_JSON_FILE, "config.json")?;
            // The source was read from this very file, so it is an object; say so if it no
            // longer is rather than write another config silently.
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", p.display())))?;
            if !v.is_object() {
                return Err(
                    std::io::Error::other(format!("{}: not a JSON object", p.display())).into(),
                );
            }
            Some(v)
        }
        _ => None,
    };
    let mut v = from_source.unwrap_or_else(|| synthesized_config(m));
    let obj = v
        .as_object_mut()
        .expect("an object, checked or built above");
    obj.insert(
        "quantization_config".into(),
        serde_json::json!({
            "quant_method": "bitnet",
            "linear_class": class.as_str(),
            "quantization_mode": "offline",
        }),
    );
    obj.insert("tie_word_embeddings".into(), m.tie_word_embeddings.into());
    let dtype = file
        .header
        .tensors
        .first()
        .and_then(|e| {
            // A q8_0 embedding is exported as f32.
            e.encoding
                .float()
                .or((e.encoding == Encoding::Q8).then_some(FloatDtype::F32))
        })
        .unwrap_or(FloatDtype::Bf16);
    let key = if obj.contains_key("torch_dtype") && !obj.contains_key("dtype") {
        "torch_dtype"
    } else {
        "dtype"
    };
    obj.insert(
        key.into(),
        match dtype {
            FloatDtype::F32 => "float32",
            FloatDtype::F16 => "float16",
            FloatDtype::Bf16 => "bfloat16",
        }
        .into(),
    );
    let mut text = serde_json::to_vec_pretty(&v).map_err(std::io::Error::other)?;
    text.push(b'\n');
    Ok(text)
}

/// A transformers config for `m` written from scratch (the source's config.json is not at
/// hand, e.g. when exporting a .bpk file).
fn synthesized_config(m: &ModelConfig) -> serde_json::Value {
    let model_type = match m.family {
        Family::Llama => "llama",
        _ => "bitnet",
    };
    // The activation the model computes (a config may override its family's).
    let act = match m.hidden_act {
        crate::model::Activation::Relu2 => "relu2",
        crate::model::Activation::Silu => "silu",
    };
    let mut v = serde_json::json!({
        "architectures": [m.architecture],
        "model_type": model_type,
        "hidden_act": act,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": false,
        "attention_dropout": 0.0,
    });
    let obj = v.as_object_mut().expect("built as an object");
    if m.family == Family::Llama {
        obj.insert("mlp_bias".into(), false.into());
    }
    if let Some(b) = m.bos_token_id {
        obj.insert("bos_token_id".into(), b.into());
    }
    match m.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            obj.insert("eos_token_id".into(), (*one).into());
        }
        many => {
            obj.insert("eos_token_id".into(), many.to_vec().into());
        }
    }
    v
}
