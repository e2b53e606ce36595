//! `rotate`: an HF checkpoint of the same architecture with the residual stream rotated by a
//! seeded randomized Hadamard (norm gains folded into the following linears, a tied head
//! untied), computing the same function in full precision. No online transform is added (a
//! stock transformers model could not apply one), so o_proj and down_proj only get the
//! residual rotation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::scheme::SchemeError;
use super::{ConvertError, gain_of, jobs, rotated_floats};
use crate::export::safetensors::{PlannedTensor, write_safetensors};
use crate::fsio::{self, AtomicDir};
use crate::num::FloatDtype;
use crate::num::dtype::{decode_f32, encode_f32, first_non_finite};
use crate::source::{CONFIG_FILE, Checkpoint, SINGLE_FILE};
use crate::transform::Rotation;

/// Files copied unchanged from the source directory when present (tokenizer and generation
/// settings).
const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

/// What to write.
#[derive(Debug, Clone)]
pub struct RotateOptions {
    pub seed: u64,
    /// Element type of every tensor written (f32 by default: rotated values are not bf16).
    pub dtype: FloatDtype,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct RotateSummary {
    pub tensors: usize,
    pub bytes: u64,
    pub copied: Vec<String>,
    /// Whether the source declares BitNet quantization (its quantized function changes).
    pub quantized_source: bool,
}

/// Writes the rotated checkpoint of `src` into the new directory `out`.
pub fn rotate(src: &Path, out: &Path, opts: &RotateOptions) -> Result<RotateSummary, ConvertError> {
    let ckpt = Checkpoint::open(src)?;
    if ckpt.is_ternary() {
        return Err(ConvertError::RotateTernary {
            path: ckpt.dir.clone(),
        });
    }
    let rotation = Rotation::new(&ckpt.config, opts.seed, &[])
        .map_err(|e| SchemeError::Rotation(e.to_string()))?;
    let dir = AtomicDir::create(out, &ckpt.dir)?;
    let mut model = ckpt.config.clone();
    model.tie_word_embeddings = false;
    let jobs = jobs(&ckpt, &model)?;
    for job in &jobs {
        let t = job.source;
        if let Some((index, value)) = first_non_finite(t.dtype, ckpt.bytes(t)) {
            return Err(ConvertError::NonFinite {
                path: ckpt.shards[t.shard].path.clone(),
                tensor: t.spec.name.clone(),
                index: super::unravel(index, &t.spec.shape),
                value,
            });
        }
    }
    let planned: Vec<PlannedTensor> = jobs
        .iter()
        .map(|j| PlannedTensor {
            name: j.spec.name.clone(),
            dtype: opts.dtype.safetensors_name(),
            elem_size: opts.dtype.size(),
            shape: j.spec.shape.clone(),
        })
        .collect();
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "bitnet_pack_rotation".to_string(),
            format!("randomized-hadamard seed {}", opts.seed),
        ),
    ]);
    let weights = dir.path().join(SINGLE_FILE);
    let mut overflow: Option<ConvertError> = None;
    let written = write_safetensors(&weights, false, &metadata, &planned, |i, w| {
        let job = &jobs[i];
        let gain = gain_of(&ckpt, job.spec.role, job.spec.layer)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut enc = Vec::new();
        let mut put = |start: usize, values: &[f32]| -> std::io::Result<()> {
            enc.clear();
            encode_f32(opts.dtype, values, &mut enc);
            let mut back = vec![0f32; values.len()];
            decode_f32(opts.dtype, &enc, &mut back);
            if let Some(p) = back.iter().position(|v| !v.is_finite()) {
                overflow = Some(ConvertError::Overflow {
                    path: weights.clone(),
                    tensor: job.spec.name.clone(),
                    index: super::unravel(start + p, &job.spec.shape),
                    value: values[p],
                    dtype: opts.dtype.as_str(),
                });
                return Err(std::io::Error::other("a value beyond the output type"));
            }
            w.write_all(&enc)
        };
        if job.spec.role.is_ternary() {
            // A writer's columns mix every row: the whole projection in f32.
            let t = job.source;
            let mut v = vec![0f32; t.numel()];
            decode_f32(t.dtype, ckpt.bytes(t), &mut v);
            rotation.fold(job.spec.role, &mut v, job.spec.shape[1], gain.as_deref());
            put(0, &v)
        } else {
            rotated_floats(&ckpt, job, &rotation, gain.as_deref(), &mut put)
        }
    });
    if let Some(e) = overflow {
        return Err(e);
    }
    written.map_err(|e| ConvertError::Output {
        error: e.to_string(),
    })?;
    let config = rotated_config(&ckpt, opts)?;
    fsio::write_atomic(&dir.path().join(CONFIG_FILE), false, &config)?;
    let mut copied = Vec::new();
    for name in COPIED {
        let from = ckpt.dir.join(name);
        if fsio::stat(&from)?.is_none() {
            continue;
        }
        let bytes = fsio::read_capped(&from, crate::source::MAX_JSON_FILE, "tokenizer file")?;
        fsio::write_atomic(&dir.path().join(name), false, &bytes)?;
        copied.push(name.to_string());
    }
    let bytes = std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0);
    dir.persist()?;
    Ok(RotateSummary {
        tensors: planned.len(),
        bytes,
        copied,
        quantized_source: ckpt
            .config
            .source_quantization
            .as_ref()
            .is_some_and(|q| q.quant_method == "bitnet"),
    })
}

/// The source's config.json with the head untied, the element type updated and the rotation
/// recorded (`bitnet_pack_rotation`, which transformers ignores).
fn rotated_config(ckpt: &Checkpoint, opts: &RotateOptions) -> Result<Vec<u8>, ConvertError> {
    let path: PathBuf = ckpt.dir.join(CONFIG_FILE);
    let bytes = fsio::read_capped(&path, crate::source::MAX_JSON_FILE, "config.json")?;
    let mut v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| ConvertError::Output {
            error: format!("{}: {e}", path.display()),
        })?;
    let obj = v.as_object_mut().ok_or_else(|| ConvertError::Output {
        error: format!("{}: not a JSON object", path.display()),
    })?;
    obj.insert("tie_word_embeddings".into(), false.into());
    let torch_name = match opts.dtype {
        FloatDtype::F32 => "float32",
        FloatDtype::F16 => "float16",
        FloatDtype::Bf16 => "bfloat16",
    };
    let key = if obj.contains_key("dtype") {
        "dtype"
    } else {
        "torch_dtype"
    };
    obj.insert(key.into(), torch_name.into());
    obj.insert(
        "bitnet_pack_rotation".into(),
        serde_json::json!({"transform": "randomized-hadamard", "seed": opts.seed}),
    );
    let mut text = serde_json::to_vec_pretty(&v).map_err(|e| ConvertError::Output {
        error: e.to_string(),
    })?;
    text.push(b'\n');
    Ok(text)
}
