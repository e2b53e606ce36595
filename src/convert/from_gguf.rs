//! GGUF in: a ternary GGUF (TQ1_0, TQ2_0 or bitnet.cpp's I2_S projections; F32, F16, BF16 or
//! Q8_0 for the rest) read with our hardened reader ([`crate::gguf`]) and written as a .bpk,
//! from which every other output is made. The trits are taken as stored.
//!
//! A .bpk keeps one scale per tensor. TQ1_0/TQ2_0 store one fp16 scale per 256-weight block;
//! a model made from a per-tensor scale (every BitNet b1.58 model) has the same value in every
//! block that holds a non-zero trit, and that value is taken. A tensor whose blocks disagree was
//! not made that way, and is refused rather than averaged.

use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::ConvertError;
use crate::export::gguf::{gguf_name_of, permuted_row};
use crate::format::header::{Encoding, Provenance, QuantScheme, SourceFile};
use crate::format::writer::{BpkWriter, Finished, TensorPlan, WriteError};
use crate::fsio;
use crate::gguf::{GgmlType, GgufFile, TensorInfo, Value, parse};
use crate::model::{Family, ModelConfig, Role, expected_tensors};
use crate::num::FloatDtype;
use crate::num::digest::sha256_file;
use crate::num::dtype::{decode_f32, encode_f32};
use crate::pack::TernaryLayout;

/// The `general.architecture` values bitnet-pack reads.
pub const ARCHITECTURES: &[&str] = &["bitnet", "bitnet-b1.58", "bitnet-25", "llama"];

/// What a GGUF import needs to know.
#[derive(Debug, Clone)]
pub struct GgufImportOptions {
    pub layout: TernaryLayout,
    /// Element type of embedding and head (`None`: as stored; Q8_0 becomes f32).
    pub keep: Option<FloatDtype>,
    /// zstd-compress the non-ternary tensors.
    pub compress: bool,
    pub force: bool,
}

/// A GGUF file that cannot be imported. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufImportError {
    #[error("{path}: {error}")]
    Parse {
        path: PathBuf,
        error: crate::gguf::GgufError,
    },
    #[error(
        "{path}: general.architecture is {found:?}; bitnet-pack reads bitnet (1bitLLM), bitnet-b1.58 / bitnet-25 (BitNet b1.58 2B4T) and llama"
    )]
    Architecture { path: PathBuf, found: String },
    #[error("{path}: metadata key `{key}` is missing or not {what}")]
    Key {
        path: PathBuf,
        key: String,
        what: &'static str,
    },
    #[error("{path}: the metadata describe no model bitnet-pack can run: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` is missing (the metadata imply it, with dims {dims:?})")]
    Missing {
        path: PathBuf,
        name: String,
        dims: Vec<u64>,
    },
    #[error("{path}: tensor `{name}` has dims {found:?}, but the metadata imply {expected:?}")]
    Dims {
        path: PathBuf,
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("{path}: tensor `{name}` is {ty}, {reason}")]
    Type {
        path: PathBuf,
        name: String,
        ty: String,
        reason: &'static str,
    },
    #[error("{path}: unexpected tensor `{name}`: the metadata imply no such tensor")]
    Unexpected { path: PathBuf, name: String },
    #[error(
        "{path}: tensor `{name}` has block scales {first} and {other} (block {block}); a .bpk keeps one scale per tensor, so a GGUF whose blocks were quantized separately cannot be imported without changing its weights"
    )]
    Scales {
        path: PathBuf,
        name: String,
        first: f32,
        other: f32,
        block: usize,
    },
    #[error("{path}: tensor `{name}`: {reason}")]
    Data {
        path: PathBuf,
        name: String,
        reason: String,
    },
}

/// Reads the GGUF at `src` and writes it as a .bpk at `out`, returned unpersisted (persist it,
/// or hand its temporary path to an exporter).
pub fn gguf_to_bpk(
    src: &Path,
    out: &Path,
    opts: &GgufImportOptions,
) -> Result<Finished, ConvertError> {
    let file = fsio::open_regular(src)?;
    // SAFETY: read-only map; like every mmap reader we assume the file is not changed meanwhile.
    let map = unsafe { Mmap::map(&file) }.map_err(|error| fsio::FileError::Io {
        path: src.to_path_buf(),
        error,
    })?;
    let g = parse(&map).map_err(|error| GgufImportError::Parse {
        path: src.to_path_buf(),
        error,
    })?;
    let path = src.to_path_buf();
    let (model, permute, specs, infos) = match_model(&g, &path)?;
    let plans: Vec<TensorPlan> = specs
        .iter()
        .zip(&infos)
        .map(|(s, i)| TensorPlan {
            name: s.name.clone(),
            role: s.role,
            layer: s.layer.map(|l| l as u32),
            encoding: if s.role.is_ternary() {
                Encoding::from_layout(opts.layout)
            } else if i.ty == GgmlType::Q8_0
                && opts.keep.is_none()
                && matches!(s.role, Role::Embedding | Role::LmHead)
            {
                // Kept as the same blocks: .bpk's q8_0 is GGML's Q8_0 byte for byte.
                Encoding::Q8
            } else {
                Encoding::from_float(float_target(i.ty, s.shape.len(), opts.keep))
            },
            shape: s.shape.iter().map(|&d| d as u64).collect(),
            compression: if opts.compress
                && !s.role.is_ternary()
                && !(i.ty == GgmlType::Q8_0 && opts.keep.is_none())
            {
                crate::format::header::Compression::Zstd
            } else {
                crate::format::header::Compression::None
            },
        })
        .collect();
    let sha = sha256_file(src)?;
    let len = map.len() as u64;
    let provenance = Provenance {
        tool: env!("CARGO_PKG_NAME").to_string(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        source_files: vec![SourceFile {
            name: src
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: len,
            sha256: sha,
        }],
        options: [
            ("source_format".to_string(), "gguf".to_string()),
            ("layout".to_string(), opts.layout.as_str().to_string()),
            (
                "keep".to_string(),
                opts.keep
                    .map(|d| d.as_str())
                    .unwrap_or("source")
                    .to_string(),
            ),
        ]
        .into_iter()
        .collect(),
    };
    let write_err = |error: WriteError| super::write_error(out, error);
    let mut w = BpkWriter::create(
        out,
        opts.force,
        model.clone(),
        QuantScheme::bitnet_b158(),
        provenance.clone(),
        plans.clone(),
    )
    .map_err(write_err)?;
    for ((spec, info), plan) in specs.iter().zip(&infos).zip(&plans) {
        if spec.role.is_ternary() {
            let (a, packed) = ternary_tensor(
                &g,
                info,
                &path,
                spec.shape[1],
                opts.layout,
                { permute && matches!(spec.role, Role::QProj | Role::KProj) }
                    .then_some(model.head_dim),
            )?;
            w.write_tensor(Some(a), |sink| sink.write_all(&packed))
                .map_err(write_err)?;
        } else if plan.encoding == Encoding::Q8 {
            let data = g.tensor_data(info);
            if let Some((block, value)) = crate::pack::q8::check_row(data) {
                return Err(ConvertError::Refused {
                    reason: format!(
                        "{}: tensor `{}` has Q8_0 block {block} with scale {value}, not a finite number >= 0",
                        path.display(),
                        info.name
                    ),
                });
            }
            w.write_tensor(None, |sink| sink.write_all(data))
                .map_err(write_err)?;
        } else {
            let target = plan.encoding.float().unwrap_or(FloatDtype::F32);
            let mut bad: Option<ConvertError> = None;
            w.write_tensor(None, |sink| {
                let mut done = 0usize;
                let mut out =
                    super::float_writer(target, opts.compress, info.numel() as usize, sink)?;
                float_chunks(&g, info, &path, &mut |values| {
                    let mut bytes = Vec::with_capacity(values.len() * target.size());
                    encode_f32(target, values, &mut bytes);
                    let mut back = vec![0f32; values.len()];
                    decode_f32(target, &bytes, &mut back);
                    if let Some(i) = back.iter().position(|x| !x.is_finite()) {
                        return Err(std::io::Error::other(format!(
                            "tensor `{}`: element {} is {}, beyond the range of {}; keep it as f32 (--keep f32)",
                            info.name,
                            done + i,
                            values[i],
                            target.as_str()
                        )));
                    }
                    done += values.len();
                    out.write_all(&bytes)
                })
                .map_err(|e| match e {
                    FloatErr::Io(e) => e,
                    FloatErr::Convert(c) => {
                        bad = Some(c);
                        std::io::Error::other("a non-finite value")
                    }
                })?;
                out.flush()
            })
            .map_err(|e| bad.take().unwrap_or_else(|| write_err(e)))?;
        }
    }
    w.finish(provenance).map_err(write_err)
}

/// The model a GGUF describes, matched tensor by tensor against what its metadata imply:
/// names, dims, and types bitnet-pack reads. What `validate` checks beyond the container.
pub fn check_model(g: &GgufFile<'_>, path: &Path) -> Result<(), ConvertError> {
    match_model(g, path).map(|_| ())
}

type Matched<'g> = (
    ModelConfig,
    bool,
    Vec<crate::model::TensorSpec>,
    Vec<&'g TensorInfo>,
);

fn match_model<'g>(g: &'g GgufFile<'_>, path: &Path) -> Result<Matched<'g>, ConvertError> {
    let path = path.to_path_buf();
    let (model, permute) = model_of(g, &path)?;
    let specs = expected_tensors(&model);
    let mut infos = Vec::with_capacity(specs.len());
    for spec in &specs {
        let name = gguf_name_of(spec.role, spec.layer);
        let dims: Vec<u64> = spec.shape.iter().rev().map(|&d| d as u64).collect();
        let info = g.tensor(&name).ok_or_else(|| GgufImportError::Missing {
            path: path.clone(),
            name: name.clone(),
            dims: dims.clone(),
        })?;
        if info.dims != dims {
            return Err(GgufImportError::Dims {
                path,
                name,
                expected: dims,
                found: info.dims.clone(),
            }
            .into());
        }
        let ty_err = |reason| GgufImportError::Type {
            path: path.clone(),
            name: name.clone(),
            ty: info.ty.name(),
            reason,
        };
        match (spec.role.is_ternary(), info.ty) {
            (true, t) if t.is_ternary() => {}
            (true, _) => return Err(ty_err("not ternary (TQ1_0, TQ2_0 or I2_S); bitnet-pack imports ternary GGUF models only: convert the HF checkpoint instead").into()),
            (false, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0) => {}
            (false, _) => return Err(ty_err("a type bitnet-pack does not read for embeddings and norms (F32, F16, BF16, Q8_0)").into()),
        }
        infos.push(info);
    }
    for t in g.tensors() {
        if !infos.iter().any(|i| i.name == t.name) {
            return Err(GgufImportError::Unexpected {
                path,
                name: t.name.clone(),
            }
            .into());
        }
    }
    Ok((model, permute, specs, infos))
}

use std::io::Write as _;

/// The stored float type of a non-ternary tensor in the .bpk.
fn float_target(ty: GgmlType, ndim: usize, keep: Option<FloatDtype>) -> FloatDtype {
    if ndim == 1 {
        // Norm gains stay exact.
        return match ty {
            GgmlType::F16 => FloatDtype::F16,
            GgmlType::BF16 => FloatDtype::Bf16,
            _ => FloatDtype::F32,
        };
    }
    keep.unwrap_or(match ty {
        GgmlType::F16 => FloatDtype::F16,
        GgmlType::BF16 => FloatDtype::Bf16,
        // F32, and Q8_0 (its values d * q are exact in f32).
        _ => FloatDtype::F32,
    })
}

enum FloatErr {
    Io(std::io::Error),
    Convert(ConvertError),
}

/// A float tensor's values, handed to `put` a chunk at a time (memory: one chunk), each
/// checked to be finite.
fn float_chunks(
    g: &GgufFile<'_>,
    info: &TensorInfo,
    path: &Path,
    put: &mut dyn FnMut(&[f32]) -> std::io::Result<()>,
) -> Result<(), FloatErr> {
    use crate::num::dtype::STREAM_CHUNK;
    let data = g.tensor_data(info);
    // Q8_0: blocks of 32 values in 34 bytes (an f16 scale d, then 32 int8; value = d * q).
    let (elem_bytes, per): (usize, usize) = match info.ty {
        GgmlType::Q8_0 => (34, 32),
        GgmlType::F32 => (4, 1),
        _ => (2, 1),
    };
    let chunk_bytes = (STREAM_CHUNK / per).max(1) * elem_bytes;
    let mut v = Vec::new();
    for (c, chunk) in data.chunks(chunk_bytes).enumerate() {
        v.clear();
        v.resize(chunk.len() / elem_bytes * per, 0f32);
        match info.ty {
            GgmlType::F32 => decode_f32(FloatDtype::F32, chunk, &mut v),
            GgmlType::F16 => decode_f32(FloatDtype::F16, chunk, &mut v),
            GgmlType::BF16 => decode_f32(FloatDtype::Bf16, chunk, &mut v),
            GgmlType::Q8_0 => {
                for (block, out) in chunk.chunks_exact(34).zip(v.chunks_mut(32)) {
                    let mut d = [0f32];
                    decode_f32(FloatDtype::F16, &block[..2], &mut d);
                    for (o, &q) in out.iter_mut().zip(&block[2..]) {
                        *o = d[0] * f32::from(q as i8);
                    }
                }
            }
            _ => unreachable!("types checked by match_model"),
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(FloatErr::Convert(
                GgufImportError::Data {
                    path: path.to_path_buf(),
                    name: info.name.clone(),
                    reason: format!(
                        "element {} is {}, not finite",
                        c * (chunk_bytes / elem_bytes * per) + i,
                        v[i]
                    ),
                }
                .into(),
            ));
        }
        put(&v).map_err(FloatErr::Io)?;
    }
    Ok(())
}

/// A ternary tensor's scale and its rows packed in `layout` (HF row order).
fn ternary_tensor(
    g: &GgufFile<'_>,
    info: &TensorInfo,
    path: &Path,
    k: usize,
    layout: TernaryLayout,
    unpermute_head_dim: Option<usize>,
) -> Result<(f32, Vec<u8>), ConvertError> {
    let t = g
        .ternary(info)
        .map_err(|e| GgufImportError::Data {
            path: path.to_path_buf(),
            name: info.name.clone(),
            reason: e.to_string(),
        })?
        .expect("a ternary type, checked by gguf_to_bpk");
    // The common scale of the blocks that hold a non-zero trit.
    let per_block = t.trits.len() / t.scales.len().max(1);
    let mut a: Option<f32> = None;
    for (b, (&s, block)) in t
        .scales
        .iter()
        .zip(t.trits.chunks(per_block.max(1)))
        .enumerate()
    {
        if block.iter().all(|&x| x == 0) {
            continue;
        }
        match a {
            None => a = Some(s),
            Some(first) if first.to_bits() != s.to_bits() => {
                return Err(GgufImportError::Scales {
                    path: path.to_path_buf(),
                    name: info.name.clone(),
                    first,
                    other: s,
                    block: b,
                }
                .into());
            }
            Some(_) => {}
        }
    }
    let a = match a {
        Some(a) if a.is_finite() && a > 0.0 => a,
        // An all-zero tensor: any positive scale gives the same weights.
        None => 1.0,
        Some(bad) => {
            return Err(GgufImportError::Data {
                path: path.to_path_buf(),
                name: info.name.clone(),
                reason: format!("its scale is {bad}; it must be finite and positive"),
            }
            .into());
        }
    };
    let rows = t.trits.len() / k;
    let rb = layout.row_bytes(k);
    let mut packed = vec![0u8; rows * rb];
    for (r, dst) in packed.chunks_exact_mut(rb).enumerate() {
        let from = unpermute_head_dim.map_or(r, |hd| permuted_row(r, hd));
        layout.pack_row(&t.trits[from * k..(from + 1) * k], dst);
    }
    Ok((a, packed))
}

/// The model the metadata describe, and whether q/k rows are permuted (llama).
fn model_of(g: &GgufFile<'_>, path: &Path) -> Result<(ModelConfig, bool), ConvertError> {
    let arch = g.get_str("general.architecture").unwrap_or_default();
    let (architecture, act, permute) = match arch {
        "bitnet" => ("BitnetForCausalLM", "silu", false),
        "bitnet-b1.58" | "bitnet-25" => ("BitNetForCausalLM", "relu2", false),
        "llama" => ("LlamaForCausalLM", "silu", true),
        other => {
            return Err(GgufImportError::Architecture {
                path: path.to_path_buf(),
                found: other.to_string(),
            }
            .into());
        }
    };
    let uint = |key: &str| -> Result<u64, GgufImportError> {
        g.get_uint(&format!("{arch}.{key}"))
            .ok_or_else(|| GgufImportError::Key {
                path: path.to_path_buf(),
                key: format!("{arch}.{key}"),
                what: "an unsigned integer",
            })
    };
    let float = |key: &str| -> Option<f64> {
        match g.get(&format!("{arch}.{key}"))? {
            Value::F32(v) => Some(f64::from(*v)),
            Value::F64(v) => Some(*v),
            _ => None,
        }
    };
    let hidden = uint("embedding_length")?;
    let heads = uint("attention.head_count")?;
    let embd = g
        .tensor("token_embd.weight")
        .ok_or_else(|| GgufImportError::Missing {
            path: path.to_path_buf(),
            name: "token_embd.weight".into(),
            dims: vec![hidden],
        })?;
    let vocab = embd.dims.get(1).copied().unwrap_or(0);
    let mut cfg = serde_json::json!({
        "architectures": [architecture],
        "model_type": if arch == "llama" { "llama" } else { "bitnet" },
        "hidden_act": act,
        "hidden_size": hidden,
        "intermediate_size": uint("feed_forward_length")?,
        "num_hidden_layers": uint("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": uint("attention.head_count_kv").unwrap_or(heads),
        "vocab_size": vocab,
        "max_position_embeddings": uint("context_length").unwrap_or(2048),
        "rms_norm_eps": float("attention.layer_norm_rms_epsilon").ok_or_else(|| GgufImportError::Key {
            path: path.to_path_buf(),
            key: format!("{arch}.attention.layer_norm_rms_epsilon"),
            what: "a float",
        })?,
        "rope_theta": float("rope.freq_base").unwrap_or(10000.0),
        "tie_word_embeddings": g.tensor("output.weight").is_none(),
    });
    let obj = cfg.as_object_mut().expect("built as an object");
    let head_dim = uint("attention.key_length").unwrap_or(hidden / heads.max(1));
    obj.insert("head_dim".into(), head_dim.into());
    // Keys a runtime reads that must agree with what bitnet-pack runs.
    for (key, want, what) in [
        (
            "attention.value_length",
            head_dim,
            "the key length (values and keys of one width)",
        ),
        (
            "rope.dimension_count",
            head_dim,
            "the head dimension (RoPE over the whole head; partial rotary is not supported)",
        ),
        ("vocab_size", vocab, "the embedding's rows"),
    ] {
        if let Some(v) = g.get_uint(&format!("{arch}.{key}"))
            && v != want
        {
            return Err(GgufImportError::Config {
                path: path.to_path_buf(),
                reason: format!("{arch}.{key} is {v}, but must equal {what}, {want}"),
            }
            .into());
        }
    }
    if let Some(b) = g.get_uint("tokenizer.ggml.bos_token_id") {
        obj.insert("bos_token_id".into(), b.into());
    }
    if let Some(e) = g.get_uint("tokenizer.ggml.eos_token_id") {
        obj.insert("eos_token_id".into(), e.into());
    }
    if let Some(a) = g.get_str(&format!("{arch}.hidden_activation"))
        && a != act
    {
        return Err(GgufImportError::Config {
            path: path.to_path_buf(),
            reason: format!(
                "{arch}.hidden_activation is {a:?}, but architecture {arch} runs {act}"
            ),
        }
        .into());
    }
    let model = ModelConfig::from_json(cfg.to_string().as_bytes()).map_err(|e| {
        GgufImportError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    debug_assert!(model.family != Family::Llama || permute);
    Ok((model, permute))
}
