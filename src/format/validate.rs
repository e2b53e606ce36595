//! Validation: every check a .bpk file can fail, collected rather than stopping at the first.
//! Structure (preamble, header checksum, table, padding) comes from the reader; this module adds
//! the checks that read every data byte (checksums, trit codes, zstd frames, finite floats) and
//! the consistency of the table with the model config.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::header::{Compression, Header, TensorEntry};
use super::reader::{
    Container, FormatError, Storage, check_structure_per_entry, parse_container_into,
};
use crate::model::expected_tensors;

/// One problem, as data: a stable kind (the error variant), the tensor if any, and a message.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensor: Option<String>,
    pub message: String,
}

impl Finding {
    fn from_error(e: &FormatError, tensor: Option<&str>) -> Self {
        let debug = format!("{e:?}");
        let kind = debug
            .split(|c: char| !c.is_alphanumeric())
            .next()
            .unwrap_or("")
            .to_string();
        Finding {
            kind,
            tensor: tensor.map(str::to_string),
            message: e.to_string(),
        }
    }
}

/// The outcome of validating a file, without the findings themselves (see
/// [`validate_bytes_into`], which hands them over one at a time).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ValidationSummary {
    /// `major.minor` from the preamble, when it could be read.
    pub version: Option<String>,
    pub file_len: u64,
    pub tensors: usize,
    /// Bytes of tensor data whose checksum was verified.
    pub data_bytes_checked: u64,
    /// Number of findings.
    pub problems: usize,
}

/// The outcome of validating a file, with every finding.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    #[serde(flatten)]
    pub summary: ValidationSummary,
    pub findings: Vec<Finding>,
}

impl ValidationReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Validates the file at `path`, handing each finding to `sink` as it is found (so a report of
/// a hostile table with a million bad entries needs no memory for them). `Err` only when the
/// file cannot be read at all.
pub fn validate_file_into(
    path: &Path,
    sink: &mut dyn FnMut(Finding),
) -> Result<ValidationSummary, FormatError> {
    match Storage::map(path) {
        Ok(storage) => Ok(validate_bytes_into(&storage, sink)),
        Err(e @ FormatError::TooShort { .. }) => {
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            sink(Finding::from_error(&e, None));
            Ok(ValidationSummary {
                file_len: len,
                problems: 1,
                ..ValidationSummary::default()
            })
        }
        Err(e) => Err(e),
    }
}

/// Validates the file at `path`, collecting every finding.
pub fn validate_file(path: &Path) -> Result<ValidationReport, FormatError> {
    let mut findings = Vec::new();
    let summary = validate_file_into(path, &mut |f| findings.push(f))?;
    Ok(ValidationReport { summary, findings })
}

/// Validates a whole file held in memory, collecting every finding.
pub fn validate_bytes(bytes: &[u8]) -> ValidationReport {
    let mut findings = Vec::new();
    let summary = validate_bytes_into(bytes, &mut |f| findings.push(f));
    ValidationReport { summary, findings }
}

/// Validates a whole file held in memory, handing each finding to `sink` in file order.
pub fn validate_bytes_into(bytes: &[u8], sink: &mut dyn FnMut(Finding)) -> ValidationSummary {
    let mut count = 0usize;
    let mut emit = |e: &FormatError| {
        count += 1;
        sink(Finding::from_error(e, tensor_of(e)));
    };
    let file_len = bytes.len() as u64;
    let mut problems = Vec::new();
    let container = match parse_container_into(bytes, &mut problems) {
        Ok(c) => c,
        Err(fatal) => {
            problems.iter().for_each(&mut emit);
            emit(&fatal);
            return ValidationSummary {
                file_len,
                problems: count,
                ..ValidationSummary::default()
            };
        }
    };
    problems.iter().for_each(&mut emit);
    let (structural, sound) = check_structure_per_entry(&container, bytes);
    structural.iter().for_each(&mut emit);
    drop(structural);
    if container.header.model.check_limits().is_ok() {
        check_against_config(&container.header)
            .iter()
            .for_each(&mut emit);
    }
    let data_offset = container.preamble.data_offset;
    let deep: Vec<(u64, Vec<FormatError>)> = container
        .header
        .tensors
        .par_iter()
        .zip(&sound)
        .filter(|(_, sound)| **sound)
        .map(|(e, _)| check_data(&container, bytes, data_offset, e))
        .collect();
    let mut data_bytes_checked = 0;
    for (checked, errors) in deep {
        data_bytes_checked += checked;
        errors.iter().for_each(&mut emit);
    }
    let Container {
        preamble, header, ..
    } = container;
    ValidationSummary {
        version: Some(format!("{}.{}", preamble.major, preamble.minor)),
        file_len,
        tensors: header.tensors.len(),
        data_bytes_checked,
        problems: count,
    }
}

/// The tensor a finding is about, for the report's `tensor` field.
fn tensor_of(e: &FormatError) -> Option<&str> {
    use FormatError::*;
    match e {
        DuplicateName { name }
        | BadName { name }
        | BadShape { name, .. }
        | ShapeEncoding { name, .. }
        | RoleEncoding { name, .. }
        | CompressionNotAllowed { name, .. }
        | Misaligned { name, .. }
        | OutOfBounds { name, .. }
        | Overlap { name, .. }
        | StoredLength { name, .. }
        | ScaleMissing { name }
        | ScaleUnexpected { name }
        | BadScale { name, .. }
        | BadDigest { name, .. }
        | DataChecksum { name, .. }
        | BadCode { name, .. }
        | Decompress { name, .. }
        | NonFinite { name, .. }
        | MissingTensor { name }
        | UnexpectedTensor { name }
        | ShapeVsConfig { name, .. }
        | RoleVsConfig { name, .. }
        | LayerVsConfig { name, .. } => Some(name),
        _ => None,
    }
}

/// The table must hold exactly the tensors the model config implies, with the same shapes.
pub(crate) fn check_against_config(header: &Header) -> Vec<FormatError> {
    let mut problems = Vec::new();
    let expected = expected_tensors(&header.model);
    let by_name: HashMap<&str, &TensorEntry> = header
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    for spec in &expected {
        let shape: Vec<u64> = spec.shape.iter().map(|&d| d as u64).collect();
        match by_name.get(spec.name.as_str()) {
            None => problems.push(FormatError::MissingTensor {
                name: spec.name.clone(),
            }),
            Some(t) if t.shape != shape => problems.push(FormatError::ShapeVsConfig {
                name: spec.name.clone(),
                expected: shape,
                found: t.shape.clone(),
            }),
            Some(t) if t.role != spec.role => problems.push(FormatError::RoleVsConfig {
                name: spec.name.clone(),
                expected: spec.role.as_str(),
                found: t.role.as_str(),
            }),
            Some(t) if t.layer.map(|l| l as usize) != spec.layer => {
                problems.push(FormatError::LayerVsConfig {
                    name: spec.name.clone(),
                    expected: spec.layer.map(|l| l as u64),
                    found: t.layer.map(u64::from),
                })
            }
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|s| s.name.as_str()).collect();
    for t in &header.tensors {
        if !known.contains(t.name.as_str()) {
            problems.push(FormatError::UnexpectedTensor {
                name: t.name.clone(),
            });
        }
    }
    problems
}

/// Reads one tensor's bytes: checksum, then codes or float values. Entries whose bounds are
/// broken were reported by the structural checks and are skipped here.
fn check_data(
    c: &Container,
    bytes: &[u8],
    data_offset: u64,
    e: &TensorEntry,
) -> (u64, Vec<FormatError>) {
    let mut problems = Vec::new();
    let start = data_offset.saturating_add(e.offset);
    let end = start.saturating_add(e.length);
    let in_data = end <= data_offset.saturating_add(c.header.data_len);
    let Some(stored) = bytes.get(start as usize..end as usize).filter(|_| in_data) else {
        return (0, problems);
    };
    let digest = crate::num::digest::hex(&Sha256::digest(stored));
    if digest != e.sha256 {
        problems.push(FormatError::DataChecksum {
            name: e.name.clone(),
            start,
            end,
        });
    }
    let Some(raw_len) = e.encoding.raw_len(&e.shape) else {
        return (e.length, problems);
    };
    if let Some(layout) = e.encoding.ternary() {
        // A zero dimension was reported as a bad shape; reading rows of zero bytes must not
        // happen. Codes are checked a block at a time, so memory does not depend on the
        // (possibly hostile) row length.
        let well_formed = e.shape.len() == 2 && !e.shape.contains(&0);
        if well_formed && e.compression == Compression::None && stored.len() as u64 == raw_len {
            let k = e.shape[1] as usize;
            for (row, src) in stored.chunks_exact(layout.row_bytes(k)).enumerate() {
                if let Err(error) = layout.check_row(src, k) {
                    problems.push(FormatError::BadCode {
                        name: e.name.clone(),
                        row: row as u64,
                        error,
                    });
                    break;
                }
            }
        }
    } else if e.encoding == crate::format::Encoding::Q8 {
        let well_formed = e.shape.len() == 2 && !e.shape.contains(&0);
        if well_formed && e.compression == Compression::None && stored.len() as u64 == raw_len {
            let k = e.shape[1] as usize;
            for (row, src) in stored
                .chunks_exact(crate::pack::q8::row_bytes(k))
                .enumerate()
            {
                if let Some((block, value)) = crate::pack::q8::check_row(src) {
                    problems.push(FormatError::BadBlockScale {
                        name: e.name.clone(),
                        row: row as u64,
                        block: block as u64,
                        value,
                    });
                    break;
                }
            }
        }
    } else if let Some(dtype) = e.encoding.float() {
        let result = match e.compression {
            Compression::None => scan_floats(&e.name, dtype, &mut &stored[..], raw_len),
            Compression::Zstd => match zstd::stream::read::Decoder::new(stored) {
                Ok(mut d) => scan_floats(&e.name, dtype, &mut d, raw_len),
                Err(err) => Err(FormatError::Decompress {
                    name: e.name.clone(),
                    expected: raw_len,
                    reason: err.to_string(),
                }),
            },
        };
        if let Err(err) = result {
            problems.push(err);
        }
    }
    (e.length, problems)
}

/// Streams `expected` bytes of float elements from `r` in fixed-size chunks (so that a hostile
/// zstd frame cannot make us allocate its claimed size), checking that every value is finite and
/// that the stream holds exactly `expected` bytes.
fn scan_floats(
    name: &str,
    dtype: crate::num::FloatDtype,
    r: &mut dyn Read,
    expected: u64,
) -> Result<(), FormatError> {
    const CHUNK: usize = 1 << 20;
    let size = dtype.size();
    // No larger than the tensor: small tensors must not pay for a large buffer.
    let chunk = (expected as usize).clamp(size, CHUNK) / size * size;
    let mut buf = vec![0u8; chunk];
    let mut vals = vec![0f32; chunk / size];
    let mut total: u64 = 0;
    let decompress_err = |reason: String| FormatError::Decompress {
        name: name.to_string(),
        expected,
        reason,
    };
    loop {
        let mut filled = 0;
        while filled < chunk {
            let n = r
                .read(&mut buf[filled..])
                .map_err(|e| decompress_err(e.to_string()))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if total + filled as u64 > expected || filled % size != 0 {
            return Err(decompress_err(format!(
                "more than {expected} bytes, or a partial element"
            )));
        }
        let n = filled / size;
        crate::num::dtype::decode_f32(dtype, &buf[..filled], &mut vals[..n]);
        if let Some(i) = vals[..n].iter().position(|v| !v.is_finite()) {
            return Err(FormatError::NonFinite {
                name: name.to_string(),
                index: total / size as u64 + i as u64,
                value: vals[i],
            });
        }
        total += filled as u64;
    }
    if total != expected {
        return Err(decompress_err(format!("got {total} bytes")));
    }
    Ok(())
}
