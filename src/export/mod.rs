//! Export: dequantize a .bpk file into a safetensors file (ternary tensors as `scale * trit`),
//! for round trips and for tools that only read floats. The file is validated first, so that a
//! damaged file is refused rather than exported as garbage.

pub mod safetensors;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use self::safetensors::{PlannedTensor, StWriteError, write_safetensors};
use crate::format::{BpkFile, validate_bytes_into};
use crate::fsio::FileError;
use crate::num::FloatDtype;
use crate::num::dtype::encode_f32;

/// Export failed; nothing was written at the target.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(
        "{path} fails validation ({first}); run `bitnet-pack validate` on it for the full report"
    )]
    Invalid { path: PathBuf, first: String },
    #[error(transparent)]
    Write(#[from] StWriteError),
}

/// Writes every tensor of `file` to a safetensors file at `out` in `dtype`. Returns the number
/// of tensors written.
pub fn unpack(
    file: &BpkFile,
    out: &Path,
    dtype: FloatDtype,
    force: bool,
) -> Result<usize, UnpackError> {
    crate::fsio::check_output(out, force, std::slice::from_ref(&file.path))?;
    let mut first_finding = None;
    validate_bytes_into(file.bytes(), &mut |f| {
        first_finding.get_or_insert(f);
    });
    if let Some(first) = first_finding {
        return Err(UnpackError::Invalid {
            path: file.path.clone(),
            first: first.message.clone(),
        });
    }
    let planned: Vec<PlannedTensor> = file
        .header
        .tensors
        .iter()
        .map(|e| PlannedTensor {
            name: e.name.clone(),
            dtype: dtype.safetensors_name(),
            elem_size: dtype.size(),
            shape: e.shape.iter().map(|&d| d as usize).collect(),
        })
        .collect();
    let source_name = file
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("bitnet_pack_source".to_string(), source_name),
        (
            "bitnet_pack_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ]);
    // One tensor in memory at a time, written beside the target and renamed at the end.
    write_safetensors(out, force, &metadata, &planned, |i, w| {
        let values = file
            .dequantize_f32(&file.header.tensors[i])
            .map_err(std::io::Error::other)?;
        let mut buf = Vec::with_capacity(values.len() * dtype.size());
        encode_f32(dtype, &values, &mut buf);
        w.write_all(&buf)
    })?;
    Ok(planned.len())
}
