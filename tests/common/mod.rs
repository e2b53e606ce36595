//! Helpers shared by the end-to-end tests: the real binary, fixture copies, and a small
//! safetensors rewriter used to build damaged checkpoints.
#![allow(dead_code)]

pub mod defects;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const FIXTURES: [&str; 4] = [
    "tiny-2b4t-qat",
    "tiny-llama-fp",
    "tiny-awkward",
    "tiny-sharded",
];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Runs the real `bitnet-pack` binary.
pub fn bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet-pack"))
        .args(args)
        .output()
        .expect("the binary runs")
}

pub fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally, not by a signal")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Converts a fixture (or any directory) into `out`, asserting success.
pub fn convert_ok(src: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let o = bin(&args);
    assert_eq!(code(&o), 0, "convert failed: {}", stderr(&o));
}

/// Copies a fixture's config and weight files into a fresh temporary directory.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        let file = p.file_name().unwrap().to_str().unwrap().to_string();
        if !file.starts_with("golden") {
            std::fs::copy(&p, dir.path().join(&file)).unwrap();
        }
    }
    dir
}

/// One tensor of a safetensors file, owned.
#[derive(Clone, Debug)]
pub struct Raw {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Reads every tensor of a safetensors file, sorted by name.
pub fn read_st(path: &Path) -> Vec<Raw> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<Raw> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| Raw {
            name,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Writes tensors as a safetensors file.
pub fn write_st(path: &Path, tensors: &[Raw]) {
    let views: Vec<(String, &Raw)> = tensors.iter().map(|t| (t.name.clone(), t)).collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Reads the tensors of `dir/model.safetensors`, lets `edit` change them, writes them back.
pub fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<Raw>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = read_st(&path);
    edit(&mut tensors);
    write_st(&path, &tensors);
}

/// Decodes f32 little-endian bytes.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// SHA-256 of a file, hex.
/// SHA-256 of a whole file read into memory (independent of the library's windowed hashing).
pub fn sha256(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a logits JSON file (`{"tokens": [...], "logits": [[...], ...]}`, as goldens and
/// `run --logits-json` write it): the tokens and the logits flattened row by row.
#[allow(dead_code)]
pub fn read_logits_json(path: &Path) -> (Vec<u32>, Vec<f32>) {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let tokens = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    (tokens, logits)
}
