//! Export: dequantize a .bpk file into a safetensors file (ternary tensors as `scale * trit`),
//! for round trips and for tools that only read floats. The file is validated first, so that a
//! damaged file is refused rather than exported as garbage.

pub mod gguf;
pub mod hf;
pub mod safetensors;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use self::safetensors::{PlannedTensor, StWriteError, write_safetensors};
use crate::format::{BpkFile, validate_bytes_into};
use crate::fsio::FileError;
use crate::num::FloatDtype;
use crate::num::dtype::{STREAM_CHUNK, decode_f32, encode_f32};

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
    #[error(transparent)]
    Hf(#[from] hf::HfExportError),
    #[error(transparent)]
    Gguf(#[from] gguf::GgufExportError),
    #[error("could not encode the output: {0}")]
    Encode(#[from] std::io::Error),
}

/// Refuses a file that fails validation: a damaged file is never exported as garbage.
pub fn check_valid(file: &BpkFile) -> Result<(), UnpackError> {
    let mut first_finding = None;
    validate_bytes_into(file.bytes(), &mut |f| {
        first_finding.get_or_insert(f);
    });
    match first_finding {
        Some(first) => Err(UnpackError::Invalid {
            path: file.path.clone(),
            first: first.message.clone(),
        }),
        None => Ok(()),
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
    crate::fsio::check_output(out, force, std::slice::from_ref(&file.path))?;
    check_valid(file)?;
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
    // One chunk of a tensor in memory at a time (plus the raw bytes of a compressed one).
    write_safetensors(out, force, &metadata, &planned, |i, w| {
        let e = &file.header.tensors[i];
        let raw = file.raw(e).map_err(std::io::Error::other)?;
        let mut enc = Vec::new();
        let mut put = |values: &[f32]| {
            enc.clear();
            encode_f32(dtype, values, &mut enc);
            w.write_all(&enc)
        };
        if let Some(layout) = e.encoding.ternary() {
            let k = e.shape[1] as usize;
            let scale = e.scale_f32().unwrap_or(0.0);
            let (rows_per_chunk, rb) = ((STREAM_CHUNK / k).max(1), layout.row_bytes(k));
            let (mut trits, mut values) = (vec![0i8; k], Vec::with_capacity(rows_per_chunk * k));
            for chunk in raw.chunks(rows_per_chunk * rb) {
                values.clear();
                for row in chunk.chunks_exact(rb) {
                    layout
                        .unpack_row(row, &mut trits)
                        .map_err(std::io::Error::other)?;
                    values.extend(trits.iter().map(|&t| scale * f32::from(t)));
                }
                put(&values)?;
            }
        } else if e.encoding == crate::format::Encoding::Q8 {
            let k = e.shape[1] as usize;
            let rb = crate::pack::q8::row_bytes(k);
            let rows_per_chunk = (STREAM_CHUNK / k).max(1);
            let mut values = vec![0f32; rows_per_chunk * k];
            for chunk in raw.chunks(rows_per_chunk * rb) {
                let n = chunk.len() / rb * k;
                for (src, dst) in chunk.chunks_exact(rb).zip(values.chunks_exact_mut(k)) {
                    crate::pack::q8::dequantize_row(src, dst);
                }
                put(&values[..n])?;
            }
        } else if let Some(src) = e.encoding.float() {
            let mut values = vec![0f32; STREAM_CHUNK];
            for chunk in raw.chunks(STREAM_CHUNK * src.size()) {
                let n = chunk.len() / src.size();
                decode_f32(src, chunk, &mut values[..n]);
                put(&values[..n])?;
            }
        }
        Ok(())
    })?;
    Ok(planned.len())
}
