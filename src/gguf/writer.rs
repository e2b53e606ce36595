//! Writes GGUF v3. Everything is planned first ([`GgufPlan`]): the caller gives all key-value
//! pairs and tensor infos up front, the plan checks them and computes every offset (each tensor
//! padded to the alignment, tensors back to back in the order given, as llama.cpp requires).
//! [`GgufWriter`] then writes the header and accepts tensor data in plan order, whole or in
//! chunks, checking lengths and the position against the plan. [`GgufFileWriter`] does this
//! into a temporary file beside the target and renames it only when everything is written.

use std::collections::HashSet;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{
    ALIGNMENT_KEY, Array, DEFAULT_ALIGNMENT, GgmlType, MAGIC, MAX_ALIGNMENT, MAX_ARRAY_LEN,
    MAX_DIMS, MAX_KEY_LEN, MAX_KV, MAX_NAME_LEN, MAX_STRING_LEN, MAX_TENSORS, ShapeError,
    VERSION_WRITTEN, Value, align_up, tensor_bytes,
};
use crate::fsio::{AtomicFile, FileError};

/// A plan or a write that does not go as the plan says.
#[derive(Debug, thiserror::Error)]
pub enum GgufWriteError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: write failed: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("key {key:?}: {reason}")]
    BadKey { key: String, reason: &'static str },
    #[error("key {key:?} is given twice")]
    DuplicateKey { key: String },
    #[error("{what}: {count} is above the limit of {limit}")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: u64,
    },
    #[error("{ALIGNMENT_KEY} must be a u32 power of two up to {MAX_ALIGNMENT}, not {value:?}")]
    BadAlignment { value: Value },
    #[error(
        "tensor name {name:?} is {len} bytes; names are 1 to {MAX_NAME_LEN} bytes (llama.cpp's limit)"
    )]
    BadName { name: String, len: usize },
    #[error("tensor {name:?} is given twice")]
    DuplicateTensor { name: String },
    #[error("tensor {name:?} ({ty:?}, dims {dims:?}): {source}")]
    BadShape {
        name: String,
        ty: GgmlType,
        dims: Vec<u64>,
        source: ShapeError,
    },
    #[error("the planned file would be larger than 2^64 bytes")]
    TooLarge,
    #[error("tensor {found:?} written where the plan has {expected:?} next")]
    OutOfOrder { expected: String, found: String },
    #[error("tensor {name:?}: all planned tensors have been written already")]
    NoneLeft { name: String },
    #[error("data written with no tensor begun; call begin_tensor first")]
    NoTensorOpen,
    #[error("tensor {name:?} is still being written; call end_tensor first")]
    TensorOpen { name: String },
    #[error("tensor {name:?}: {written} bytes written, the plan has {planned}")]
    Length {
        name: String,
        planned: u64,
        written: u64,
    },
    #[error("tensor {name:?} is planned but was not written")]
    Missing { name: String },
    #[error("position {found} differs from the planned {expected} (a bug in the writer)")]
    Position { expected: u64, found: u64 },
}

/// A tensor to be written: name, dimensions (GGUF order, innermost first), type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    /// Innermost (contiguous) first: a PyTorch `[out, in]` weight is `[in, out]`.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

/// A planned tensor: its spec, offset from the data section, and size in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub spec: TensorSpec,
    pub offset: u64,
    pub size: u64,
}

/// Everything about a file except the tensor bytes: checked, with offsets computed.
#[derive(Debug, Clone)]
pub struct GgufPlan {
    header: Vec<u8>,
    tensors: Vec<PlannedTensor>,
    alignment: u32,
    data_offset: u64,
    file_len: u64,
}

impl GgufPlan {
    /// Checks the pairs and tensors (keys non-empty and unique, no nested arrays, lengths
    /// within the reader's caps, `general.alignment` a u32 power of two, names 1..=63 bytes
    /// and unique, shapes valid for their type) and lays the file out.
    pub fn new(kv: &[(String, Value)], tensors: Vec<TensorSpec>) -> Result<Self, GgufWriteError> {
        for (what, count, limit) in [
            ("key-value pairs", kv.len(), MAX_KV),
            ("tensors", tensors.len(), MAX_TENSORS),
        ] {
            if count as u64 > limit {
                return Err(GgufWriteError::TooMany { what, count, limit });
            }
        }
        let alignment = plan_alignment(kv)?;
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION_WRITTEN.to_le_bytes());
        header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(kv.len() as u64).to_le_bytes());
        let mut keys = HashSet::new();
        for (key, value) in kv {
            if key.is_empty() || key.len() as u64 > MAX_KEY_LEN {
                return Err(GgufWriteError::BadKey {
                    key: key.clone(),
                    reason: "keys are 1 to 65536 bytes",
                });
            }
            if !keys.insert(key.as_str()) {
                return Err(GgufWriteError::DuplicateKey { key: key.clone() });
            }
            put_str(&mut header, key);
            header.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut header, key, value)?;
        }
        let mut names = HashSet::new();
        let mut planned = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        let align = u64::from(alignment);
        for spec in tensors {
            if spec.name.is_empty() || spec.name.len() > MAX_NAME_LEN {
                let len = spec.name.len();
                return Err(GgufWriteError::BadName {
                    name: spec.name,
                    len,
                });
            }
            if !names.insert(spec.name.clone()) {
                return Err(GgufWriteError::DuplicateTensor { name: spec.name });
            }
            let size = match tensor_bytes(spec.ty, &spec.dims) {
                Ok(s) => s,
                Err(source) => {
                    return Err(GgufWriteError::BadShape {
                        name: spec.name,
                        ty: spec.ty,
                        dims: spec.dims,
                        source,
                    });
                }
            };
            put_str(&mut header, &spec.name);
            // dims.len() <= MAX_DIMS, checked by tensor_bytes.
            header.extend_from_slice(&(spec.dims.len() as u32).to_le_bytes());
            for d in &spec.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&spec.ty.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            let next = offset
                .checked_add(size)
                .and_then(|e| align_up(e, align))
                .ok_or(GgufWriteError::TooLarge)?;
            planned.push(PlannedTensor { spec, offset, size });
            offset = next;
        }
        debug_assert!(planned.iter().all(|t| t.spec.dims.len() <= MAX_DIMS));
        let data_offset = align_up(header.len() as u64, align).ok_or(GgufWriteError::TooLarge)?;
        let file_len = data_offset
            .checked_add(offset)
            .ok_or(GgufWriteError::TooLarge)?;
        Ok(GgufPlan {
            header,
            tensors: planned,
            alignment,
            data_offset,
            file_len,
        })
    }

    /// Header bytes: magic through the last tensor info, before the padding.
    pub fn header_bytes(&self) -> &[u8] {
        &self.header
    }

    /// The tensors in write order, with offsets (from the data section) and sizes.
    pub fn tensors(&self) -> &[PlannedTensor] {
        &self.tensors
    }

    /// Alignment of the data section and of each tensor.
    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    /// Absolute offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Length of the finished file.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
}

fn plan_alignment(kv: &[(String, Value)]) -> Result<u32, GgufWriteError> {
    match kv.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, Value::U32(a))) if a.is_power_of_two() && *a <= MAX_ALIGNMENT => Ok(*a),
        Some((_, value)) => Err(GgufWriteError::BadAlignment {
            value: value.clone(),
        }),
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn check_string(key: &str, s: &str) -> Result<(), GgufWriteError> {
    if s.len() as u64 > MAX_STRING_LEN {
        return Err(GgufWriteError::BadKey {
            key: key.to_string(),
            reason: "a string is longer than the 64 MiB readers accept",
        });
    }
    Ok(())
}

fn put_value(out: &mut Vec<u8>, key: &str, value: &Value) -> Result<(), GgufWriteError> {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => {
            check_string(key, s)?;
            put_str(out, s);
        }
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Array(a) => put_array(out, key, a)?,
    }
    Ok(())
}

fn put_array(out: &mut Vec<u8>, key: &str, a: &Array) -> Result<(), GgufWriteError> {
    if a.len() as u64 > MAX_ARRAY_LEN {
        return Err(GgufWriteError::BadKey {
            key: key.to_string(),
            reason: "an array has more elements than readers accept (2^26)",
        });
    }
    out.extend_from_slice(&a.elem_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    fn each<T: Copy, const N: usize>(out: &mut Vec<u8>, v: &[T], f: fn(T) -> [u8; N]) {
        v.iter().for_each(|&x| out.extend_from_slice(&f(x)));
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => each(out, v, i8::to_le_bytes),
        Array::U16(v) => each(out, v, u16::to_le_bytes),
        Array::I16(v) => each(out, v, i16::to_le_bytes),
        Array::U32(v) => each(out, v, u32::to_le_bytes),
        Array::I32(v) => each(out, v, i32::to_le_bytes),
        Array::F32(v) => each(out, v, f32::to_le_bytes),
        Array::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        Array::U64(v) => each(out, v, u64::to_le_bytes),
        Array::I64(v) => each(out, v, i64::to_le_bytes),
        Array::F64(v) => each(out, v, f64::to_le_bytes),
        Array::String(v) => {
            for s in v {
                check_string(key, s)?;
                put_str(out, s);
            }
        }
    }
    Ok(())
}

/// Zeros used for padding (at most one alignment's worth at a time).
const ZEROS: [u8; 4096] = [0; 4096];

/// Streams a planned file into `out`. Tensors must be written in plan order.
pub struct GgufWriter<W: Write> {
    out: W,
    plan: GgufPlan,
    /// Index of the next tensor to begin (or the one being written).
    next: usize,
    /// Bytes written of the tensor being written, if one is open.
    open: Option<u64>,
    /// Bytes written to `out` so far.
    pos: u64,
    /// Names the output in I/O errors.
    path: PathBuf,
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header and the padding before the data section. `path` names the output in
    /// I/O errors.
    pub fn new(out: W, plan: GgufPlan, path: &Path) -> Result<Self, GgufWriteError> {
        let mut w = GgufWriter {
            out,
            plan,
            next: 0,
            open: None,
            pos: 0,
            path: path.to_path_buf(),
        };
        let header = std::mem::take(&mut w.plan.header);
        w.put(&header)?;
        w.plan.header = header;
        w.pad_to(w.plan.data_offset)?;
        Ok(w)
    }

    /// The plan being followed.
    pub fn plan(&self) -> &GgufPlan {
        &self.plan
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), GgufWriteError> {
        self.out
            .write_all(bytes)
            .map_err(|error| GgufWriteError::Io {
                path: self.path.clone(),
                error,
            })?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, target: u64) -> Result<(), GgufWriteError> {
        while self.pos < target {
            let n = (target - self.pos).min(ZEROS.len() as u64) as usize;
            self.put(&ZEROS[..n])?;
        }
        self.check_pos(target)
    }

    fn check_pos(&self, expected: u64) -> Result<(), GgufWriteError> {
        if self.pos == expected {
            Ok(())
        } else {
            Err(GgufWriteError::Position {
                expected,
                found: self.pos,
            })
        }
    }

    /// Starts the next planned tensor, which must be `name`.
    pub fn begin_tensor(&mut self, name: &str) -> Result<(), GgufWriteError> {
        if let Some(t) = self.open.and(self.plan.tensors.get(self.next)) {
            return Err(GgufWriteError::TensorOpen {
                name: t.spec.name.clone(),
            });
        }
        let Some(t) = self.plan.tensors.get(self.next) else {
            return Err(GgufWriteError::NoneLeft {
                name: name.to_string(),
            });
        };
        if t.spec.name != name {
            return Err(GgufWriteError::OutOfOrder {
                expected: t.spec.name.clone(),
                found: name.to_string(),
            });
        }
        self.check_pos(self.plan.data_offset + t.offset)?;
        self.open = Some(0);
        Ok(())
    }

    /// Appends bytes to the tensor being written; refuses more than planned.
    pub fn write_chunk(&mut self, bytes: &[u8]) -> Result<(), GgufWriteError> {
        let (Some(written), Some(t)) = (self.open, self.plan.tensors.get(self.next)) else {
            return Err(GgufWriteError::NoTensorOpen);
        };
        let total = written.saturating_add(bytes.len() as u64);
        if total > t.size {
            return Err(GgufWriteError::Length {
                name: t.spec.name.clone(),
                planned: t.size,
                written: total,
            });
        }
        self.put(bytes)?;
        self.open = Some(total);
        Ok(())
    }

    /// Ends the tensor being written (which must be complete) and pads to the alignment.
    pub fn end_tensor(&mut self) -> Result<(), GgufWriteError> {
        let (Some(written), Some(t)) = (self.open, self.plan.tensors.get(self.next)) else {
            return Err(GgufWriteError::NoTensorOpen);
        };
        if written != t.size {
            return Err(GgufWriteError::Length {
                name: t.spec.name.clone(),
                planned: t.size,
                written,
            });
        }
        let end = self.plan.data_offset + t.offset + t.size;
        self.check_pos(end)?;
        let padded =
            align_up(end, u64::from(self.plan.alignment)).ok_or(GgufWriteError::TooLarge)?;
        self.open = None;
        self.next += 1;
        self.pad_to(padded)
    }

    /// Writes the whole of the next planned tensor, which must be `name`.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<(), GgufWriteError> {
        self.begin_tensor(name)?;
        self.write_chunk(bytes)?;
        self.end_tensor()
    }

    /// Checks that every planned tensor was written and returns the output.
    pub fn finish(mut self) -> Result<W, GgufWriteError> {
        if let Some(t) = self.plan.tensors.get(self.next) {
            return Err(match self.open {
                Some(_) => GgufWriteError::TensorOpen {
                    name: t.spec.name.clone(),
                },
                None => GgufWriteError::Missing {
                    name: t.spec.name.clone(),
                },
            });
        }
        self.check_pos(self.plan.file_len)?;
        self.out.flush().map_err(|error| GgufWriteError::Io {
            path: self.path.clone(),
            error,
        })?;
        Ok(self.out)
    }
}

/// A [`GgufWriter`] into a temporary file beside `target`; nothing appears at the target
/// until [`FinishedGguf::persist`], and an error or a drop removes the temporary file.
pub struct GgufFileWriter {
    writer: GgufWriter<BufWriter<std::fs::File>>,
    atomic: AtomicFile,
}

/// A complete GGUF in its temporary file, ready to be renamed onto the target.
pub struct FinishedGguf {
    atomic: AtomicFile,
}

impl FinishedGguf {
    /// Renames the file onto the target.
    pub fn persist(self) -> Result<(), GgufWriteError> {
        Ok(self.atomic.persist()?)
    }
}

impl GgufFileWriter {
    /// Checks the target (an existing one is refused unless `force`; see
    /// [`crate::fsio::check_output`]), creates the temporary file and writes the header. The
    /// target is checked again when the file is persisted.
    pub fn create(target: &Path, force: bool, plan: GgufPlan) -> Result<Self, GgufWriteError> {
        crate::fsio::check_output(target, force, &[])?;
        let atomic = AtomicFile::create(target, force)?;
        let io = |error| GgufWriteError::Io {
            path: atomic.temp_path().to_path_buf(),
            error,
        };
        // A second handle on the same open file: the buffered writer owns it, the AtomicFile
        // keeps the name and does the rename.
        let file = atomic.file().try_clone().map_err(io)?;
        let writer = GgufWriter::new(BufWriter::new(file), plan, target)?;
        Ok(GgufFileWriter { writer, atomic })
    }

    /// The plan being followed.
    pub fn plan(&self) -> &GgufPlan {
        self.writer.plan()
    }

    /// See [`GgufWriter::begin_tensor`].
    pub fn begin_tensor(&mut self, name: &str) -> Result<(), GgufWriteError> {
        self.writer.begin_tensor(name)
    }

    /// See [`GgufWriter::write_chunk`].
    pub fn write_chunk(&mut self, bytes: &[u8]) -> Result<(), GgufWriteError> {
        self.writer.write_chunk(bytes)
    }

    /// See [`GgufWriter::end_tensor`].
    pub fn end_tensor(&mut self) -> Result<(), GgufWriteError> {
        self.writer.end_tensor()
    }

    /// See [`GgufWriter::write_tensor`].
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<(), GgufWriteError> {
        self.writer.write_tensor(name, bytes)
    }

    /// Checks that everything was written and flushes; the file is still temporary.
    pub fn finish(self) -> Result<FinishedGguf, GgufWriteError> {
        let buf = self.writer.finish()?;
        let path = self.atomic.temp_path().to_path_buf();
        let file = buf.into_inner().map_err(|e| GgufWriteError::Io {
            path: path.clone(),
            error: e.into_error(),
        })?;
        file.sync_all()
            .map_err(|error| GgufWriteError::Io { path, error })?;
        Ok(FinishedGguf {
            atomic: self.atomic,
        })
    }
}
