//! Export a .bpk file as a GGUF v3 file for llama.cpp (TQ1_0, TQ2_0) or bitnet.cpp (I2_S).
//! Spec of what is written: formats/gguf.md §6.
//!
//! Which architecture the file claims decides which graph a runtime builds, so it is chosen to
//! be truthful, never merely loadable:
//! - 1bitLLM's SiLU-gated `BitnetForCausalLM` is upstream llama.cpp's `bitnet` architecture
//!   (same sub-norms, NEOX RoPE, tied head);
//! - BitNet b1.58 2B4T (`BitNetForCausalLM`, ReLU²) is written as `bitnet-b1.58`, the name
//!   bitnet.cpp and ik_llama.cpp give it. Upstream llama.cpp does not know that name and refuses
//!   the file; its `bitnet` graph hard-codes SiLU, which would run this model wrong;
//! - `LlamaForCausalLM` is `llama`, with q/k rows permuted for llama.cpp's interleaved RoPE as
//!   its own converter does.
//!
//! Norms are F32, the embedding (and an untied head) F16 by default; projections in the chosen
//! ternary type, whose block must divide every row (no silent fallback to another type).

use std::path::{Path, PathBuf};

use super::{UnpackError, check_valid};
use crate::format::header::TensorEntry;
use crate::format::{BpkFile, Encoding};
use crate::fsio;
use crate::gguf::{Array, GgmlType, Value};
use crate::gguf::{GgufFileWriter, GgufPlan, TensorSpec};
use crate::model::{Family, ModelConfig, Role};
use crate::num::FloatDtype;
use crate::num::dtype::{STREAM_CHUNK, decode_f32, encode_f32};
use crate::pack::{i2_s, tq1_0, tq2_0};

/// The ternary GGUF types we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufTernary {
    /// llama.cpp's 2.0625 bits per weight, 256-weight blocks with an f16 scale each.
    Tq2_0,
    /// llama.cpp's 1.6875 bits per weight (base-3), 256-weight blocks.
    Tq1_0,
    /// bitnet.cpp's x86 layout: 2 bits per weight in 128-weight blocks, one f32 scale per tensor.
    I2S,
}

impl GgufTernary {
    pub fn ggml(self) -> GgmlType {
        match self {
            GgufTernary::Tq2_0 => GgmlType::TQ2_0,
            GgufTernary::Tq1_0 => GgmlType::TQ1_0,
            GgufTernary::I2S => GgmlType::I2_S,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GgufTernary::Tq2_0 => "tq2_0",
            GgufTernary::Tq1_0 => "tq1_0",
            GgufTernary::I2S => "i2_s",
        }
    }

    /// `general.file_type` (llama_ftype): upstream's MOSTLY_TQ1_0 = 36, MOSTLY_TQ2_0 = 37;
    /// bitnet.cpp writes 40 for I2_S (which upstream later gave to another type).
    fn file_type(self) -> u32 {
        match self {
            GgufTernary::Tq1_0 => 36,
            GgufTernary::Tq2_0 => 37,
            GgufTernary::I2S => 40,
        }
    }
}

/// A .bpk that cannot be written as GGUF truthfully.
#[derive(Debug, thiserror::Error)]
pub enum GgufExportError {
    #[error(
        "{path}: its quantization scheme goes beyond BitNet b1.58 ({what}); llama.cpp and bitnet.cpp run BitNet b1.58 only, so a GGUF would compute something else: keep the .bpk, or convert without these options"
    )]
    Scheme { path: PathBuf, what: String },
    #[error(
        "{path}: tensor `{tensor}` has rows of {k} weights, not a multiple of {block} ({ty}'s block); {options}"
    )]
    Block {
        path: PathBuf,
        tensor: String,
        k: u64,
        block: u64,
        ty: &'static str,
        options: String,
    },
    #[error("{path}: {reason}")]
    Architecture { path: PathBuf, reason: String },
    #[error(
        "{path}: tensor `{tensor}` has the value {value} at index {index}, beyond the range of f16; write it as f32 (--keep f32)"
    )]
    Overflow {
        path: PathBuf,
        tensor: String,
        index: usize,
        value: f32,
    },
    #[error(
        "{path}: tensor `{tensor}` has scale {scale}, which TQ blocks' fp16 stores as {stored}; use --gguf-type i2_s (an f32 scale) or keep the .bpk"
    )]
    Scale {
        path: PathBuf,
        tensor: String,
        scale: f32,
        stored: f32,
    },
    #[error("{0}")]
    Write(#[from] crate::gguf::GgufWriteError),
}

/// What was written, for the summary line and the docs.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    pub architecture: String,
    pub tensors: usize,
    pub file_len: u64,
    /// Whether a vocabulary from tokenizer.json was embedded (else `no_vocab`).
    pub vocabulary: bool,
    /// Things the user must know about how runtimes will treat the file.
    pub notes: Vec<String>,
}

/// The GGUF architecture and tensor naming of a model family.
struct Arch {
    name: &'static str,
    /// Permute q/k rows for llama.cpp's interleaved (NORM) RoPE.
    permute_qk: bool,
    activation: &'static str,
}

fn arch_of(m: &ModelConfig, path: &Path) -> Result<(Arch, Vec<String>), GgufExportError> {
    let mut notes = Vec::new();
    let arch = match m.family {
        Family::Bitnet1bitllm => Arch {
            name: "bitnet",
            permute_qk: false,
            activation: "silu",
        },
        Family::Bitnet2b4t => {
            notes.push("architecture `bitnet-b1.58` (ReLU² FFN, as bitnet.cpp and ik_llama.cpp name BitNet b1.58 2B4T): upstream llama.cpp refuses it as an unknown architecture. That is deliberate: upstream's `bitnet` graph hard-codes SiLU, which would run this ReLU² model wrong (perplexity about 6x worse, microsoft/BitNet#588).".to_string());
            Arch {
                name: "bitnet-b1.58",
                permute_qk: false,
                activation: "relu2",
            }
        }
        Family::Llama => Arch {
            name: "llama",
            permute_qk: true,
            activation: "silu",
        },
    };
    let computes = match m.hidden_act {
        crate::model::Activation::Relu2 => "relu2",
        crate::model::Activation::Silu => "silu",
    };
    if computes != arch.activation {
        return Err(GgufExportError::Architecture {
            path: path.to_path_buf(),
            reason: format!(
                "this model's FFN activation is {computes}, but GGUF architecture `{}` runs {}; no architecture a runtime knows computes this model, so no GGUF is written",
                arch.name, arch.activation
            ),
        });
    }
    if arch.name != "llama" {
        if !m.tie_word_embeddings {
            return Err(GgufExportError::Architecture {
                path: path.to_path_buf(),
                reason: format!(
                    "architecture `{}` uses the embedding as the output head, but this model's lm_head is a separate tensor; a GGUF would drop it",
                    arch.name
                ),
            });
        }
        if m.num_heads * m.head_dim != m.hidden_size {
            return Err(GgufExportError::Architecture {
                path: path.to_path_buf(),
                reason: format!(
                    "architecture `{}` needs heads x head_dim = hidden size, but {} x {} != {}",
                    arch.name, m.num_heads, m.head_dim, m.hidden_size
                ),
            });
        }
    }
    Ok((arch, notes))
}

/// The GGUF name of a .bpk tensor.
fn gguf_name(e: &TensorEntry) -> String {
    gguf_name_of(e.role, e.layer.map(|l| l as usize))
}

/// The GGUF name of the tensor of `role` in block `layer` (llama.cpp's names).
pub fn gguf_name_of(role: Role, layer: Option<usize>) -> String {
    let blk = |s: &str| format!("blk.{}.{s}.weight", layer.unwrap_or(0));
    match role {
        Role::Embedding => "token_embd.weight".into(),
        Role::FinalNorm => "output_norm.weight".into(),
        Role::LmHead => "output.weight".into(),
        Role::AttnNorm => blk("attn_norm"),
        Role::QProj => blk("attn_q"),
        Role::KProj => blk("attn_k"),
        Role::VProj => blk("attn_v"),
        Role::AttnSubNorm => blk("attn_sub_norm"),
        Role::OProj => blk("attn_output"),
        Role::FfnNorm => blk("ffn_norm"),
        Role::GateProj => blk("ffn_gate"),
        Role::UpProj => blk("ffn_up"),
        Role::FfnSubNorm => blk("ffn_sub_norm"),
        Role::DownProj => blk("ffn_down"),
    }
}

/// The GGUF type of a tensor: the ternary type for projections, F32 for 1-D tensors, `embed`
/// for the embedding and head.
fn gguf_type(e: &TensorEntry, ty: GgufTernary, embed: FloatDtype) -> GgmlType {
    if e.encoding.ternary().is_some() {
        ty.ggml()
    } else if e.encoding == Encoding::Q8 {
        // The same bytes: a q8_0 row is a row of GGML Q8_0 blocks.
        GgmlType::Q8_0
    } else if e.shape.len() == 1 {
        GgmlType::F32
    } else {
        match embed {
            FloatDtype::F32 => GgmlType::F32,
            FloatDtype::F16 => GgmlType::F16,
            FloatDtype::Bf16 => GgmlType::BF16,
        }
    }
}

/// llama.cpp's q/k row order for interleaved RoPE: within each head, row `i * half + j` of the
/// HF (rotate-half) layout goes to row `2 * j + i`.
pub fn permuted_row(row: usize, head_dim: usize) -> usize {
    let (h, r) = (row / head_dim, row % head_dim);
    let half = head_dim / 2;
    let (i, j) = (r / half, r % half);
    h * head_dim + 2 * j + i
}

/// The inverse of [`permuted_row`]: the HF row that llama.cpp's row `row` comes from.
pub fn unpermuted_row(row: usize, head_dim: usize) -> usize {
    let (h, r) = (row / head_dim, row % head_dim);
    let half = head_dim / 2;
    let (j, i) = (r / 2, r % 2);
    h * head_dim + i * half + j
}

/// Checks that every ternary row length (`(tensor, k)`) is a whole number of `ty`'s blocks;
/// the error names the first that is not and the types that would fit. Run before a
/// conversion (from the checkpoint's shapes) and again on the file.
pub fn check_rows<'n>(
    path: &Path,
    rows: impl Iterator<Item = (&'n str, u64)> + Clone,
    ty: GgufTernary,
) -> Result<(), GgufExportError> {
    let block = ty.ggml().block_size();
    let Some((name, k)) = rows.clone().find(|(_, k)| k % block != 0) else {
        return Ok(());
    };
    let fits: Vec<&str> = [GgufTernary::Tq2_0, GgufTernary::Tq1_0, GgufTernary::I2S]
        .into_iter()
        .filter(|t| rows.clone().all(|(_, k)| k % t.ggml().block_size() == 0))
        .map(|t| t.as_str())
        .collect();
    let options = if fits.is_empty() {
        "no ternary GGUF type fits this model (TQ1_0/TQ2_0 need rows that are multiples of 256 weights, I2_S of 128); keep the .bpk".to_string()
    } else {
        format!(
            "--gguf-type {} fits every row of this model",
            fits.join(" or ")
        )
    };
    Err(GgufExportError::Block {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        k,
        block,
        ty: ty.as_str(),
        options,
    })
}

/// Where a GGUF's vocabulary comes from.
#[derive(Debug, Clone, Copy)]
pub enum Vocab<'a> {
    /// `tokenizer.json` in this directory, if there is one.
    Dir(&'a Path),
    /// The `tokenizer.*` pairs of a source GGUF, carried over as they are.
    Carried(&'a [(String, Value)]),
}

/// A TQ row encoder (`tq1_0::encode_row` or `tq2_0::encode_row`).
type TqEncode = fn(&[i8], f32, &mut [u8]) -> Result<(), crate::pack::tq::TqError>;

/// Writes `file` as GGUF at `out`.
pub fn export_gguf(
    file: &BpkFile,
    out: &Path,
    force: bool,
    ty: GgufTernary,
    embed: FloatDtype,
    vocab: Vocab<'_>,
) -> Result<GgufSummary, UnpackError> {
    check_valid(file)?;
    let h = &file.header;
    let path = file.path.clone();
    if h.quantization.is_extended() {
        return Err(GgufExportError::Scheme {
            path,
            what: super::hf::extended_parts(&h.quantization),
        }
        .into());
    }
    let (arch, mut notes) = arch_of(&h.model, &path)?;
    check_rows(
        &path,
        h.tensors
            .iter()
            .filter(|e| e.encoding.ternary().is_some())
            .map(|e| (e.name.as_str(), e.shape[1])),
        ty,
    )?;
    fsio::check_output(out, force, std::slice::from_ref(&file.path))?;

    let m = &h.model;
    let a = arch.name;
    let key = |s: &str| format!("{a}.{s}");
    let mut kv: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String(m.architecture.clone())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (
            "general.alignment".into(),
            Value::U32(crate::gguf::DEFAULT_ALIGNMENT),
        ),
        (key("block_count"), Value::U32(m.num_layers as u32)),
        (
            key("context_length"),
            Value::U32(m.max_position_embeddings as u32),
        ),
        (key("embedding_length"), Value::U32(m.hidden_size as u32)),
        (
            key("feed_forward_length"),
            Value::U32(m.intermediate_size as u32),
        ),
        (key("attention.head_count"), Value::U32(m.num_heads as u32)),
        (
            key("attention.head_count_kv"),
            Value::U32(m.num_kv_heads as u32),
        ),
        (key("attention.key_length"), Value::U32(m.head_dim as u32)),
        (key("attention.value_length"), Value::U32(m.head_dim as u32)),
        (key("rope.dimension_count"), Value::U32(m.head_dim as u32)),
        (key("rope.freq_base"), Value::F32(m.rope_theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(m.rms_norm_eps as f32),
        ),
        (key("vocab_size"), Value::U32(m.vocab_size as u32)),
        // Not read by upstream llama.cpp (its graphs fix the activation per architecture);
        // written so that the file says what the model computes.
        (
            key("hidden_activation"),
            Value::String(arch.activation.into()),
        ),
        (
            "bitnet_pack.version".into(),
            Value::String(env!("CARGO_PKG_VERSION").into()),
        ),
    ];
    let tokenizer_dir = match vocab {
        Vocab::Dir(d) => Some(d),
        Vocab::Carried(_) => None,
    };
    let carried = match vocab {
        Vocab::Carried(kvs) if kvs.iter().any(|(k, _)| k == "tokenizer.ggml.model") => {
            kv.extend(kvs.iter().cloned());
            true
        }
        _ => false,
    };
    const NO_VOCAB: &str = "the GGUF has no vocabulary (tokenizer.ggml.model = no_vocab): runtimes take token ids only";
    let vocabulary = if carried {
        let model = kv
            .iter()
            .find(|(k, _)| k == "tokenizer.ggml.model")
            .map(|(_, v)| v.clone());
        let real = !matches!(&model, Some(Value::String(m)) if m == "no_vocab" || m == "none");
        if !real {
            notes.push(format!("the source GGUF has no vocabulary, so {NO_VOCAB}"));
        }
        real
    } else {
        match tokenizer_dir.map(|d| d.join("tokenizer.json")) {
            Some(p) if fsio::stat(&p)?.is_some() => {
                let bytes = fsio::read_capped(&p, crate::source::MAX_JSON_FILE, "tokenizer.json")?;
                match vocab_kv(&bytes, m) {
                    Ok(v) => {
                        kv.extend(v);
                        true
                    }
                    Err(why) => {
                        notes.push(format!("{}: {why}; {NO_VOCAB}", p.display()));
                        false
                    }
                }
            }
            Some(p) => {
                notes.push(format!("no {} to carry over, so {NO_VOCAB}", p.display()));
                false
            }
            None => {
                notes.push(format!("the source holds no vocabulary, so {NO_VOCAB}"));
                false
            }
        }
    };
    if !carried && !vocabulary {
        kv.push((
            "tokenizer.ggml.model".into(),
            Value::String("no_vocab".into()),
        ));
    }

    let specs: Vec<TensorSpec> = h
        .tensors
        .iter()
        .map(|e| TensorSpec {
            name: gguf_name(e),
            dims: e.shape.iter().rev().copied().collect(),
            ty: gguf_type(e, ty, embed),
        })
        .collect();
    let plan = GgufPlan::new(&kv, specs).map_err(GgufExportError::from)?;
    let file_len = plan.file_len();
    let mut w = GgufFileWriter::create(out, force, plan).map_err(GgufExportError::from)?;
    for e in &h.tensors {
        w.begin_tensor(&gguf_name(e))
            .map_err(GgufExportError::from)?;
        write_tensor_chunks(file, e, ty, embed, &arch, m, &path, &mut |bytes| {
            w.write_chunk(bytes)
                .map_err(|e| GgufExportError::from(e).into())
        })?;
        w.end_tensor().map_err(GgufExportError::from)?;
    }
    w.finish()
        .and_then(|f| f.persist())
        .map_err(GgufExportError::from)?;
    Ok(GgufSummary {
        architecture: a.to_string(),
        tensors: h.tensors.len(),
        file_len,
        vocabulary,
        notes,
    })
}

/// Writes one tensor's GGUF bytes through `put`, a chunk at a time: memory stays at one chunk
/// of rows (or of float elements) whatever the tensor's size, except for I2_S, whose per-tensor
/// tail needs the whole tensor encoded at once. Rows are encoded in parallel.
#[allow(clippy::too_many_arguments)]
fn write_tensor_chunks(
    file: &BpkFile,
    e: &TensorEntry,
    ty: GgufTernary,
    embed: FloatDtype,
    arch: &Arch,
    m: &ModelConfig,
    path: &Path,
    put: &mut dyn FnMut(&[u8]) -> Result<(), UnpackError>,
) -> Result<(), UnpackError> {
    use rayon::prelude::*;
    let raw = file.raw(e).map_err(std::io::Error::other)?;
    let other = |e: String| -> UnpackError { std::io::Error::other(e).into() };
    if let Some(layout) = e.encoding.ternary() {
        let (rows, k) = (e.shape[0] as usize, e.shape[1] as usize);
        let rb = layout.row_bytes(k);
        let permute = arch.permute_qk && matches!(e.role, Role::QProj | Role::KProj);
        let scale = e.scale_f32().unwrap_or(0.0);
        // The trits of GGUF row `r` (a q/k row of llama.cpp's order comes from another HF row).
        let source_row = |r: usize| -> usize {
            if permute {
                unpermuted_row(r, m.head_dim)
            } else {
                r
            }
        };
        let unpack = |r: usize, out: &mut [i8]| -> Result<(), UnpackError> {
            let src = source_row(r);
            layout
                .unpack_row(&raw[src * rb..(src + 1) * rb], out)
                .map_err(|e| other(e.to_string()))
        };
        if ty == GgufTernary::I2S {
            let mut trits = vec![0i8; rows * k];
            trits
                .par_chunks_mut(k)
                .enumerate()
                .try_for_each(|(r, out)| unpack(r, out))?;
            let n = i2_s::tensor_bytes(rows, k).map_err(|e| other(e.to_string()))?;
            let mut out = vec![0u8; n];
            i2_s::encode_tensor(&trits, k, scale, &mut out).map_err(|e| other(e.to_string()))?;
            return put(&out);
        }
        // TQ blocks store the scale as fp16: refuse one it cannot hold to 1 part in 256.
        let d = half::f16::from_f32(scale).to_f32();
        if !(d > 0.0 && ((d - scale) / scale).abs() <= 1.0 / 256.0) {
            return Err(GgufExportError::Scale {
                path: path.to_path_buf(),
                tensor: e.name.clone(),
                scale,
                stored: d,
            }
            .into());
        }
        let (row_bytes, encode): (usize, TqEncode) = if ty == GgufTernary::Tq2_0 {
            (
                tq2_0::row_bytes(k).map_err(|e| other(e.to_string()))?,
                tq2_0::encode_row,
            )
        } else {
            (
                tq1_0::row_bytes(k).map_err(|e| other(e.to_string()))?,
                tq1_0::encode_row,
            )
        };
        let rows_per_chunk = (STREAM_CHUNK / k).max(1);
        let mut out = vec![0u8; rows_per_chunk * row_bytes];
        for first in (0..rows).step_by(rows_per_chunk) {
            let n = rows_per_chunk.min(rows - first);
            out[..n * row_bytes]
                .par_chunks_mut(row_bytes)
                .enumerate()
                .try_for_each_init(
                    || vec![0i8; k],
                    |trits, (i, dst)| -> Result<(), UnpackError> {
                        unpack(first + i, trits)?;
                        encode(trits, scale, dst).map_err(|e| other(e.to_string()))
                    },
                )?;
            put(&out[..n * row_bytes])?;
        }
        return Ok(());
    }
    if e.encoding == Encoding::Q8 {
        // Q8_0 in the GGUF too (see `gguf_type`): the stored blocks as they are. Embedding and
        // head are never q/k-permuted.
        for chunk in raw.chunks(STREAM_CHUNK * crate::pack::q8::BLOCK_BYTES) {
            put(chunk)?;
        }
        return Ok(());
    }
    let src = e.encoding.float().unwrap_or(FloatDtype::F32);
    let target = match gguf_type(e, ty, embed) {
        GgmlType::F16 => FloatDtype::F16,
        GgmlType::BF16 => FloatDtype::Bf16,
        _ => FloatDtype::F32,
    };
    let (mut v, mut back, mut enc) = (Vec::new(), Vec::new(), Vec::new());
    for (c, chunk) in raw.chunks(STREAM_CHUNK * src.size()).enumerate() {
        let n = chunk.len() / src.size();
        v.resize(n, 0f32);
        decode_f32(src, chunk, &mut v);
        enc.clear();
        encode_f32(target, &v, &mut enc);
        if target == FloatDtype::F16 {
            back.resize(n, 0f32);
            decode_f32(FloatDtype::F16, &enc, &mut back);
            if let Some(i) = back.iter().position(|x| !x.is_finite()) {
                return Err(GgufExportError::Overflow {
                    path: path.to_path_buf(),
                    tensor: e.name.clone(),
                    index: c * STREAM_CHUNK + i,
                    value: v[i],
                }
                .into());
            }
        }
        put(&enc)?;
    }
    Ok(())
}

/// The vocabulary keys of a byte-level BPE tokenizer.json (`gpt2` in GGUF terms), or why it
/// cannot be carried.
fn vocab_kv(bytes: &[u8], m: &ModelConfig) -> Result<Vec<(String, Value)>, String> {
    let t: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let model = &t["model"];
    if model["type"] != "BPE" {
        return Err(format!("tokenizer model {} is not BPE", model["type"]));
    }
    let pre = pre_tokenizer_name(&t["pre_tokenizer"])?;
    let vocab = model["vocab"]
        .as_object()
        .ok_or("model.vocab is not a map")?;
    let mut tokens = vec![String::new(); m.vocab_size];
    let mut types = vec![0i32; m.vocab_size];
    let mut put = |text: &str, id: u64, ty: i32| -> Result<(), String> {
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| format!("token id {id} is beyond the vocabulary of {}", m.vocab_size))?;
        *slot = text.to_string();
        types[id as usize] = ty;
        Ok(())
    };
    for (text, id) in vocab {
        put(text, id.as_u64().ok_or("a vocab id is not an integer")?, 1)?;
    }
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let id = a["id"].as_u64().ok_or("an added token has no id")?;
        let text = a["content"]
            .as_str()
            .ok_or("an added token has no content")?;
        // 3 = control (special), 4 = user-defined (llama_token_type).
        put(text, id, if a["special"] == true { 3 } else { 4 })?;
    }
    for (i, (tok, ty)) in tokens.iter_mut().zip(types.iter_mut()).enumerate() {
        if *ty == 0 {
            // Ids the tokenizer never produces (padding rows of the embedding).
            *tok = format!("[PAD{i}]");
            *ty = 5; // unused
        }
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .ok_or("model.merges is not a list")?
        .iter()
        .map(|mg| match mg {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                _ => Err("a merge pair holds something other than two strings".to_string()),
            },
            _ => Err("a merge is neither \"a b\" nor [a, b]".to_string()),
        })
        .collect::<Result<_, _>>()?;
    let mut kv = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(tokens)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(Array::String(merges)),
        ),
    ];
    let id = |what: &str, t: u64| -> Result<Value, String> {
        if t < m.vocab_size as u64 {
            Ok(Value::U32(t as u32))
        } else {
            Err(format!(
                "config.json's {what} {t} is beyond the vocabulary of {}",
                m.vocab_size
            ))
        }
    };
    if let Some(b) = m.bos_token_id {
        kv.push(("tokenizer.ggml.bos_token_id".into(), id("bos_token_id", b)?));
    }
    if let Some(&e) = m.eos_token_ids.first() {
        kv.push(("tokenizer.ggml.eos_token_id".into(), id("eos_token_id", e)?));
    }
    Ok(kv)
}

/// Llama 3's split pattern (tokenizer.json of Llama 3 and BitNet b1.58 2B4T).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The llama.cpp pre-tokenizer that splits text as `pre` does: GPT-2's byte-level regex
/// (`gpt-2`) or Llama 3's split (`llama-bpe`). Anything else is refused rather than carried
/// with a pre-tokenizer that would split differently (and so tokenize differently).
fn pre_tokenizer_name(pre: &serde_json::Value) -> Result<&'static str, String> {
    if pre["type"] == "ByteLevel" && pre["use_regex"] != false {
        if pre["add_prefix_space"] == true {
            return Err("its byte-level pre-tokenizer adds a prefix space, which llama.cpp's gpt-2 pre-tokenizer does not".into());
        }
        return Ok("gpt-2");
    }
    if pre["type"] == "Sequence"
        && let Some(parts) = pre["pretokenizers"].as_array()
        && let [split, byte_level] = parts.as_slice()
        && split["type"] == "Split"
        && split["pattern"]["Regex"] == LLAMA3_SPLIT
        && byte_level["type"] == "ByteLevel"
        && byte_level["use_regex"] == false
    {
        return Ok("llama-bpe");
    }
    Err("its pre-tokenizer is neither GPT-2's byte-level regex nor Llama 3's split, and llama.cpp has no way to be told another one".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The permutation llama.cpp's converter applies (reshape to [heads, 2, half], swap the
    /// last two axes), written from that description and compared.
    #[test]
    fn unpermuted_row_inverts_permuted_row() {
        for hd in [2, 8, 64, 128] {
            for row in 0..3 * hd {
                assert_eq!(unpermuted_row(permuted_row(row, hd), hd), row);
                assert_eq!(permuted_row(unpermuted_row(row, hd), hd), row);
            }
        }
    }

    #[test]
    fn qk_permutation_matches_the_reshape() {
        let (heads, hd) = (3, 8);
        let half = hd / 2;
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..half {
                    let src = h * hd + i * half + j;
                    let dst = h * hd + j * 2 + i;
                    assert_eq!(permuted_row(src, hd), dst);
                }
            }
        }
    }
}
