//! Export: dequantize a .bpk file into a safetensors file (ternary tensors as `scale * trit`),
//! for round trips and for tools that only read floats. The file is validated first, so that a
//! damaged file is refused rather than exported as garbage.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::format::{BpkFile, TensorEntry, validate_bytes};
use crate::source::FloatDtype;
use crate::source::dtype::encode_f32;

/// Export failed; nothing was written at the target.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{path} already exists; pass --force to overwrite it")]
    Exists { path: PathBuf },
    #[error(
        "{path} fails validation ({first}); run `bitnet-pack validate` on it for the full report"
    )]
    Invalid { path: PathBuf, first: String },
    #[error("{path}: cannot write safetensors: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// A tensor dequantized on demand, when the safetensors writer asks for its bytes.
struct Lazy<'a> {
    file: &'a BpkFile,
    entry: &'a TensorEntry,
    dtype: FloatDtype,
    shape: Vec<usize>,
}

impl safetensors::View for Lazy<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let values = self
            .file
            .dequantize_f32(self.entry)
            .expect("the file passed validation before export");
        let mut out = Vec::new();
        encode_f32(self.dtype, &values, &mut out);
        Cow::Owned(out)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Writes every tensor of `file` to a safetensors file at `out` in `dtype`. Returns the number
/// of tensors written.
pub fn unpack(
    file: &BpkFile,
    out: &Path,
    dtype: FloatDtype,
    force: bool,
) -> Result<usize, UnpackError> {
    if !force && out.exists() {
        return Err(UnpackError::Exists {
            path: out.to_path_buf(),
        });
    }
    let report = validate_bytes(file.bytes());
    if let Some(first) = report.findings.first() {
        return Err(UnpackError::Invalid {
            path: file.path.clone(),
            first: first.message.clone(),
        });
    }
    let views: Vec<(String, Lazy<'_>)> = file
        .header
        .tensors
        .iter()
        .map(|entry| {
            let shape = entry.shape.iter().map(|&d| d as usize).collect();
            (
                entry.name.clone(),
                Lazy {
                    file,
                    entry,
                    dtype,
                    shape,
                },
            )
        })
        .collect();
    let source_name = file
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("bitnet_pack_source".to_string(), source_name),
        (
            "bitnet_pack_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ]);
    let n = views.len();
    safetensors::serialize_to_file(views, Some(metadata), out).map_err(|e| UnpackError::Write {
        path: out.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(n)
}
