//! Bad input: every case gets a typed error (matched on its variant) and, through the binary,
//! exit code 2 with a message naming the file and the tensor, and no output file.

mod common;

use std::path::Path;

use bitnet_pack::convert::{ConvertError, ConvertOptions, convert};
use bitnet_pack::model::ConfigError;
use bitnet_pack::pack::TernaryLayout;
use bitnet_pack::source::{Checkpoint, SourceError};
use common::*;

fn open(dir: &Path) -> SourceError {
    match Checkpoint::open(dir) {
        Ok(_) => panic!("{} opened without error", dir.display()),
        Err(e) => e,
    }
}

/// Runs the binary on `dir`, expects exit 2, no output file, and every `needles` in stderr.
fn cli_fails(dir: &Path, needles: &[&str]) {
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("out.bpk");
    let o = bin(&[
        "convert",
        dir.to_str().unwrap(),
        "-o",
        target.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert_eq!(code(&o), 2, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    assert!(
        !target.exists(),
        "a failed conversion left a file at the target"
    );
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "temporary files left behind"
    );
}

fn set_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn missing_config() {
    let d = copy_fixture("tiny-llama-fp");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    assert!(matches!(
        open(d.path()),
        SourceError::File(bitnet_pack::fsio::FileError::Io { .. })
    ));
    cli_fails(d.path(), &["config.json"]);
}

#[test]
fn malformed_config() {
    let d = copy_fixture("tiny-llama-fp");
    std::fs::write(
        d.path().join("config.json"),
        b"{\"architectures\": [\"LlamaForCausalLM\"],",
    )
    .unwrap();
    assert!(matches!(
        open(d.path()),
        SourceError::Config {
            error: ConfigError::Json(_),
            ..
        }
    ));
    cli_fails(d.path(), &["config.json", "not valid JSON"]);
}

#[test]
fn unknown_architecture() {
    let d = copy_fixture("tiny-llama-fp");
    set_config(d.path(), |v| {
        v["architectures"] = serde_json::json!(["MistralForCausalLM"])
    });
    assert!(matches!(
        open(d.path()),
        SourceError::Config {
            error: ConfigError::UnknownArchitecture { .. },
            ..
        }
    ));
    cli_fails(d.path(), &["MistralForCausalLM", "BitNetForCausalLM"]);
}

#[test]
fn missing_config_key() {
    let d = copy_fixture("tiny-llama-fp");
    set_config(d.path(), |v| {
        v.as_object_mut().unwrap().remove("num_attention_heads");
    });
    assert!(matches!(
        open(d.path()),
        SourceError::Config {
            error: ConfigError::Missing {
                key: "num_attention_heads"
            },
            ..
        }
    ));
    cli_fails(d.path(), &["num_attention_heads"]);
}

#[test]
fn no_weights() {
    let d = copy_fixture("tiny-llama-fp");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    assert!(matches!(open(d.path()), SourceError::NoWeights { .. }));
    cli_fails(d.path(), &["model.safetensors"]);
}

#[test]
fn truncated_safetensors() {
    let d = copy_fixture("tiny-2b4t-qat");
    let p = d.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    assert!(matches!(open(d.path()), SourceError::Safetensors { .. }));
    cli_fails(d.path(), &["model.safetensors", "truncated"]);
    // Shorter than the 8-byte length prefix.
    std::fs::write(&p, b"abc").unwrap();
    assert!(matches!(open(d.path()), SourceError::Safetensors { .. }));
}

/// Rewrites the JSON header of a safetensors file in place (keeping the data bytes).
fn rewrite_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_vec(&header).unwrap();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn overlapping_offsets() {
    let d = copy_fixture("tiny-awkward");
    rewrite_header(&d.path().join("model.safetensors"), |h| {
        let q = "model.layers.0.self_attn.q_proj.weight";
        let offsets = h[q]["data_offsets"].clone();
        let (s, e) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
        h[q]["data_offsets"] = serde_json::json!([s - 8, e - 8]);
    });
    assert!(matches!(open(d.path()), SourceError::Safetensors { .. }));
    cli_fails(d.path(), &["model.safetensors", "q_proj"]);
}

#[test]
fn offsets_beyond_the_file() {
    let d = copy_fixture("tiny-awkward");
    rewrite_header(&d.path().join("model.safetensors"), |h| {
        // The last tensor in the file claims more bytes than there are.
        let (name, end) = h
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .map(|(k, v)| (k.clone(), v["data_offsets"][1].as_u64().unwrap()))
            .max_by_key(|(_, e)| *e)
            .unwrap();
        // One more row, consistently sized, so only the file length disagrees.
        let shape: Vec<u64> = h[&name]["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        let row_bytes = 4 * shape[1..].iter().product::<u64>();
        let mut longer = shape.clone();
        longer[0] += 1;
        h[&name]["shape"] = serde_json::json!(longer);
        h[&name]["data_offsets"][1] = (end + row_bytes).into();
    });
    assert!(matches!(open(d.path()), SourceError::Safetensors { .. }));
    cli_fails(d.path(), &["model.safetensors"]);
}

#[test]
fn duplicate_tensor_in_header() {
    let d = copy_fixture("tiny-llama-fp");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let text = std::str::from_utf8(&bytes[8..8 + n]).unwrap().trim_end();
    // Repeat the first tensor entry under the same name (same offsets, so sizes still tile).
    let name = "\"model.norm.weight\"";
    let start = text.find(name).unwrap();
    let end = start + text[start..].find('}').unwrap() + 1;
    let entry = &text[start..end];
    let mut new_text = format!("{}, {}}}", &text[..text.len() - 1], entry).into_bytes();
    while new_text.len() % 8 != 0 {
        new_text.push(b' ');
    }
    let mut out = (new_text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&new_text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
    assert!(
        matches!(open(d.path()), SourceError::DuplicateTensor { name, .. } if name == "model.norm.weight")
    );
    cli_fails(d.path(), &["model.norm.weight", "twice"]);
}

#[test]
fn unsupported_dtype() {
    let d = copy_fixture("tiny-llama-fp");
    edit_tensors(d.path(), |t| {
        let n = t
            .iter_mut()
            .find(|t| t.name == "model.norm.weight")
            .unwrap();
        n.dtype = safetensors::Dtype::I16; // same size as the f16 it replaces
    });
    assert!(
        matches!(open(d.path()), SourceError::UnsupportedDtype { tensor, .. } if tensor == "model.norm.weight")
    );
    cli_fails(d.path(), &["model.safetensors", "model.norm.weight", "I16"]);
}

#[test]
fn hf_packed_checkpoint_is_named() {
    let d = copy_fixture("tiny-llama-fp");
    edit_tensors(d.path(), |t| {
        let q = t
            .iter_mut()
            .find(|t| t.name == "model.layers.0.self_attn.q_proj.weight")
            .unwrap();
        q.dtype = safetensors::Dtype::U8;
        q.shape = vec![q.shape[0] / 4, q.shape[1]];
        q.data = vec![0x55; q.shape[0] * q.shape[1]];
    });
    assert!(matches!(
        open(d.path()),
        SourceError::PackedCheckpoint { .. }
    ));
    cli_fails(d.path(), &["q_proj", "packed"]);
}

#[test]
fn shape_mismatch_with_config() {
    let d = copy_fixture("tiny-llama-fp");
    set_config(d.path(), |v| v["intermediate_size"] = 180.into());
    assert!(
        matches!(open(d.path()), SourceError::ShapeMismatch { name, .. } if name == "model.layers.0.mlp.gate_proj.weight")
    );
    cli_fails(d.path(), &["gate_proj", "[176, 64]", "[180, 64]"]);
}

#[test]
fn missing_tensor() {
    let d = copy_fixture("tiny-awkward");
    edit_tensors(d.path(), |t| {
        t.retain(|t| t.name != "model.layers.1.mlp.ffn_layernorm.weight")
    });
    assert!(
        matches!(open(d.path()), SourceError::MissingTensor { name, .. } if name == "model.layers.1.mlp.ffn_layernorm.weight")
    );
    cli_fails(
        d.path(),
        &["model.layers.1.mlp.ffn_layernorm.weight", "missing"],
    );
}

#[test]
fn extra_tensor() {
    let d = copy_fixture("tiny-awkward");
    edit_tensors(d.path(), |t| {
        let mut extra = t[0].clone();
        extra.name = "model.layers.9.mlp.gate_proj.weight".into();
        t.push(extra);
    });
    assert!(
        matches!(open(d.path()), SourceError::UnexpectedTensor { name, .. } if name == "model.layers.9.mlp.gate_proj.weight")
    );
    cli_fails(
        d.path(),
        &["model.layers.9.mlp.gate_proj.weight", "unexpected"],
    );
}

#[test]
fn tied_head_must_match_the_embeddings() {
    let d = copy_fixture("tiny-2b4t-qat");
    edit_tensors(d.path(), |t| {
        let mut head = t
            .iter()
            .find(|t| t.name == "model.embed_tokens.weight")
            .unwrap()
            .clone();
        head.name = "lm_head.weight".into();
        t.push(head);
    });
    // An identical tied head is accepted and skipped.
    let ckpt = Checkpoint::open(d.path()).unwrap();
    assert_eq!(ckpt.skipped, vec!["lm_head.weight".to_string()]);
    edit_tensors(d.path(), |t| {
        let head = t.iter_mut().find(|t| t.name == "lm_head.weight").unwrap();
        head.data[0] ^= 1;
    });
    assert!(matches!(
        open(d.path()),
        SourceError::TiedHeadDiffers { .. }
    ));
    cli_fails(d.path(), &["lm_head", "tie_word_embeddings"]);
}

#[test]
fn shard_index_problems() {
    let d = copy_fixture("tiny-sharded");
    let index_path = d.path().join("model.safetensors.index.json");
    let original = std::fs::read_to_string(&index_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(&index_path, serde_json::to_vec(&v).unwrap()).unwrap();
    assert!(
        matches!(open(d.path()), SourceError::MissingInShard { name, .. } if name == "model.norm.weight")
    );
    cli_fails(
        d.path(),
        &["model-00001-of-00002.safetensors", "model.norm.weight"],
    );

    v["weight_map"]["model.norm.weight"] = "../model-00002-of-00002.safetensors".into();
    std::fs::write(&index_path, serde_json::to_vec(&v).unwrap()).unwrap();
    assert!(matches!(open(d.path()), SourceError::Index { .. }));

    std::fs::write(&index_path, b"{\"weight_map\": 3}").unwrap();
    assert!(matches!(open(d.path()), SourceError::Index { .. }));
    cli_fails(d.path(), &["model.safetensors.index.json"]);
}

fn options() -> ConvertOptions {
    ConvertOptions {
        layout: TernaryLayout::I2,
        keep: None,
        q8_outputs: false,
        compress: false,
        force: false,
        scheme: Default::default(),
    }
}

#[test]
fn nan_or_inf_in_a_weight() {
    // down_proj is [60, 135]: flat element 212 is row 1, column 77.
    for (tensor, value, elem, expected_index) in [
        (
            "model.layers.1.mlp.down_proj.weight",
            f32::NAN,
            212usize,
            vec![1usize, 77],
        ),
        (
            "model.layers.0.input_layernorm.weight",
            f32::INFINITY,
            3,
            vec![3],
        ),
    ] {
        let d = copy_fixture("tiny-awkward");
        edit_tensors(d.path(), |t| {
            let w = t.iter_mut().find(|t| t.name == tensor).unwrap();
            w.data[elem * 4..elem * 4 + 4].copy_from_slice(&value.to_le_bytes());
        });
        let out = tempfile::tempdir().unwrap();
        match convert(d.path(), &out.path().join("x.bpk"), &options(), &|_| {}) {
            Err(ConvertError::NonFinite {
                tensor: t, index, ..
            }) => {
                assert_eq!(t, tensor);
                assert_eq!(index, expected_index);
            }
            other => panic!("{tensor}: {other:?}"),
        }
        cli_fails(d.path(), &[tensor, "non-finite"]);
    }
}

#[test]
fn unwritable_output() {
    let tmp = tempfile::tempdir().unwrap();
    // The parent of the target is a regular file, so nothing can be created there.
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let target = blocker.join("out.bpk");
    match convert(&fixture("tiny-llama-fp"), &target, &options(), &|_| {}) {
        Err(ConvertError::File(bitnet_pack::fsio::FileError::NoDirectory { .. })) => {}
        other => panic!("{other:?}"),
    }
    let o = bin(&[
        "convert",
        fixture("tiny-llama-fp").to_str().unwrap(),
        "-o",
        target.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("is not a directory; create it first"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(code(&bin(&["convert"])), 2);
    assert_eq!(code(&bin(&["frobnicate"])), 2);
    assert_eq!(
        code(&bin(&["convert", "x", "-o", "y", "--layout", "i3"])),
        2
    );
    let o = bin(&[
        "convert",
        fixture("tiny-llama-fp").to_str().unwrap(),
        "-o",
        "/tmp/never.bpk",
        "--threads",
        "0",
    ]);
    assert_eq!(code(&o), 2);
}
