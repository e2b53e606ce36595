//! GGUF, the container llama.cpp and bitnet.cpp load: a hardened reader ([`parse`]) that treats
//! every file as hostile, and a writer ([`GgufWriter`], [`GgufFileWriter`]) that plans every
//! offset before writing and never leaves a partial file at its target. The ternary block
//! layouts that go inside (TQ1_0, TQ2_0, I2_S) are in [`crate::pack`]; this module knows their
//! sizes and decodes them on request ([`GgufFile::ternary`]). Spec: formats/gguf.md.

mod reader;
mod writer;

pub use reader::{GgufError, parse};
pub use writer::{
    FinishedGguf, GgufFileWriter, GgufPlan, GgufWriteError, GgufWriter, PlannedTensor, TensorSpec,
};

use std::collections::HashMap;

use crate::pack::{i2_s, tq, tq1_0, tq2_0};

/// The four bytes every GGUF file starts with (§2).
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The version the writer produces (§2).
pub const VERSION_WRITTEN: u32 = 3;
/// Alignment of the data section and of every tensor when `general.alignment` is absent (§5).
pub const DEFAULT_ALIGNMENT: u32 = 32;
/// The key that overrides the alignment; its value must be a u32 power of two (§5).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Largest alignment accepted (ours; llama.cpp only asks for a power of two) (§8).
pub const MAX_ALIGNMENT: u32 = 1 << 24;
/// Longest tensor name in bytes: llama.cpp's `GGML_MAX_NAME` is 64 including the NUL (§4).
pub const MAX_NAME_LEN: usize = 63;
/// Most dimensions a tensor may have (`GGML_MAX_DIMS`) (§4).
pub const MAX_DIMS: usize = 4;
/// Most tensors in a file (ours; real models have a few thousand) (§8).
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most key-value pairs in a file (ours) (§8).
pub const MAX_KV: u64 = 1 << 20;
/// Longest key in bytes (ours) (§8).
pub const MAX_KEY_LEN: u64 = 1 << 16;
/// Longest string value in bytes (ours; chat templates are tens of KB) (§8).
pub const MAX_STRING_LEN: u64 = 1 << 26;
/// Most elements in an array value (ours; vocabularies have a few hundred thousand) (§8).
pub const MAX_ARRAY_LEN: u64 = 1 << 26;
/// Largest tensor in bytes and elements: llama.cpp keeps both within `i64` (§4).
pub const MAX_TENSOR_BYTES: u64 = i64::MAX as u64;

/// A supported GGUF version. v2 and v3 have the same little-endian layout; v3 only added
/// big-endian files, which carry no marker and are refused (their version reads as 2^24 * v).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufVersion {
    V2,
    V3,
}

impl GgufVersion {
    /// The version for the number stored at byte 4, if supported.
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            2 => Some(GgufVersion::V2),
            3 => Some(GgufVersion::V3),
            _ => None,
        }
    }

    /// The stored number.
    pub fn as_u32(self) -> u32 {
        match self {
            GgufVersion::V2 => 2,
            GgufVersion::V3 => 3,
        }
    }
}

/// The type of a metadata value, as stored (a u32) before it (§3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    const ALL: [ValueType; 13] = [
        ValueType::U8,
        ValueType::I8,
        ValueType::U16,
        ValueType::I16,
        ValueType::U32,
        ValueType::I32,
        ValueType::F32,
        ValueType::Bool,
        ValueType::String,
        ValueType::Array,
        ValueType::U64,
        ValueType::I64,
        ValueType::F64,
    ];

    /// The type stored as `id`, if there is one.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(id).ok()?).copied()
    }

    /// The stored id.
    pub fn id(self) -> u32 {
        match self {
            ValueType::U8 => 0,
            ValueType::I8 => 1,
            ValueType::U16 => 2,
            ValueType::I16 => 3,
            ValueType::U32 => 4,
            ValueType::I32 => 5,
            ValueType::F32 => 6,
            ValueType::Bool => 7,
            ValueType::String => 8,
            ValueType::Array => 9,
            ValueType::U64 => 10,
            ValueType::I64 => 11,
            ValueType::F64 => 12,
        }
    }

    /// Fewest bytes one value of this type takes (a string is at least its u64 length; an
    /// array its element type and count). Used to bound counts by the bytes present.
    pub fn min_bytes(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// An array value: elements of one type. Arrays of arrays are refused (as llama.cpp does).
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Value {
    /// The stored type of this value.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }
}

impl Array {
    /// The stored type of the elements.
    pub fn elem_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a tensor's elements are stored: a GGML type id and its block geometry (§4, §6).
///
/// Id 36 is read as bitnet.cpp's I2_S. Upstream ggml once used 36 for IQ4_NL_4_4, removed
/// before any GGUF could carry it (its block size is 0, so upstream refuses such tensors); a
/// file with a type-36 tensor therefore comes from bitnet.cpp. bitnet.cpp's other private ids
/// (I8_S 37, TL1 38, TL2 39) are not read: 37 and 38 are unknown types here, and 39 is
/// upstream's MXFP4, whose size it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    /// bitnet.cpp's 2-bit ternary layout: see [`crate::pack::i2_s`].
    I2_S,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// (type, id, weights per block, bytes per block); I2_S's size is special (see
/// [`tensor_bytes`]). Sizes as in gguf-py 0.19.0's `GGML_QUANT_SIZES`.
const GGML_TYPES: [(GgmlType, u32, u64, u64); 35] = [
    (GgmlType::F32, 0, 1, 4),
    (GgmlType::F16, 1, 1, 2),
    (GgmlType::Q4_0, 2, 32, 18),
    (GgmlType::Q4_1, 3, 32, 20),
    (GgmlType::Q5_0, 6, 32, 22),
    (GgmlType::Q5_1, 7, 32, 24),
    (GgmlType::Q8_0, 8, 32, 34),
    (GgmlType::Q8_1, 9, 32, 40),
    (GgmlType::Q2_K, 10, 256, 84),
    (GgmlType::Q3_K, 11, 256, 110),
    (GgmlType::Q4_K, 12, 256, 144),
    (GgmlType::Q5_K, 13, 256, 176),
    (GgmlType::Q6_K, 14, 256, 210),
    (GgmlType::Q8_K, 15, 256, 292),
    (GgmlType::IQ2_XXS, 16, 256, 66),
    (GgmlType::IQ2_XS, 17, 256, 74),
    (GgmlType::IQ3_XXS, 18, 256, 98),
    (GgmlType::IQ1_S, 19, 256, 50),
    (GgmlType::IQ4_NL, 20, 32, 18),
    (GgmlType::IQ3_S, 21, 256, 110),
    (GgmlType::IQ2_S, 22, 256, 82),
    (GgmlType::IQ4_XS, 23, 256, 136),
    (GgmlType::I8, 24, 1, 1),
    (GgmlType::I16, 25, 1, 2),
    (GgmlType::I32, 26, 1, 4),
    (GgmlType::I64, 27, 1, 8),
    (GgmlType::F64, 28, 1, 8),
    (GgmlType::IQ1_M, 29, 256, 56),
    (GgmlType::BF16, 30, 1, 2),
    (
        GgmlType::TQ1_0,
        34,
        tq::BLOCK as u64,
        tq1_0::BLOCK_BYTES as u64,
    ),
    (
        GgmlType::TQ2_0,
        35,
        tq::BLOCK as u64,
        tq2_0::BLOCK_BYTES as u64,
    ),
    (
        GgmlType::I2_S,
        36,
        i2_s::BLOCK as u64,
        i2_s::BLOCK_BYTES as u64,
    ),
    (GgmlType::MXFP4, 39, 32, 17),
    (GgmlType::NVFP4, 40, 64, 36),
    (GgmlType::Q1_0, 41, 128, 18),
];

impl GgmlType {
    fn row(self) -> (GgmlType, u32, u64, u64) {
        GGML_TYPES
            .iter()
            .copied()
            .find(|r| r.0 == self)
            .expect("every variant has a row in GGML_TYPES")
    }

    /// The type stored as `id`, if this build knows it.
    pub fn from_id(id: u32) -> Option<Self> {
        GGML_TYPES.iter().find(|r| r.1 == id).map(|r| r.0)
    }

    /// The stored id.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// Weights per block (1 for plain types). A tensor's first dimension must be a multiple.
    pub fn block_size(self) -> u64 {
        self.row().2
    }

    /// Bytes per block (for I2_S, excluding the per-tensor tail).
    pub fn block_bytes(self) -> u64 {
        self.row().3
    }

    /// The name llama.cpp uses.
    pub fn name(self) -> String {
        format!("{self:?}")
    }

    /// Whether [`GgufFile::ternary`] decodes tensors of this type.
    pub fn is_ternary(self) -> bool {
        matches!(self, GgmlType::TQ1_0 | GgmlType::TQ2_0 | GgmlType::I2_S)
    }
}

/// A tensor shape that cannot be stored in a type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("{n} dimensions; a tensor has 1 to {MAX_DIMS}")]
    DimCount { n: usize },
    #[error("dimension {axis} is 0")]
    ZeroDim { axis: usize },
    #[error(
        "rows of {ne0} elements are not a whole number of {ty:?} blocks of {block}; store this tensor in another type (F16, F32)"
    )]
    NotBlockMultiple { ty: GgmlType, ne0: u64, block: u64 },
    #[error("the element or byte count overflows {MAX_TENSOR_BYTES}")]
    Overflow,
}

/// Bytes of a tensor of type `ty` with dimensions `dims` (innermost first, GGUF order):
/// `dims[0] / block_size * block_bytes * dims[1] * ...`; for I2_S, `numel / 4 + 32` (the
/// per-tensor scale tail). Refuses 0 or more than [`MAX_DIMS`] dimensions, a zero
/// dimension, a first dimension that is not a whole number of blocks, and sizes or element
/// counts above [`MAX_TENSOR_BYTES`].
pub fn tensor_bytes(ty: GgmlType, dims: &[u64]) -> Result<u64, ShapeError> {
    if dims.is_empty() || dims.len() > MAX_DIMS {
        return Err(ShapeError::DimCount { n: dims.len() });
    }
    if let Some(axis) = dims.iter().position(|&d| d == 0) {
        return Err(ShapeError::ZeroDim { axis });
    }
    let numel = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_TENSOR_BYTES)
        .ok_or(ShapeError::Overflow)?;
    let ne0 = dims.first().copied().unwrap_or(1);
    let block = ty.block_size();
    if ne0 % block != 0 {
        return Err(ShapeError::NotBlockMultiple { ty, ne0, block });
    }
    let bytes = match ty {
        GgmlType::I2_S => Some(numel / 4 + i2_s::TAIL_BYTES as u64),
        _ => (numel / block).checked_mul(ty.block_bytes()),
    };
    bytes
        .filter(|&b| b <= MAX_TENSOR_BYTES)
        .ok_or(ShapeError::Overflow)
}

/// Rounds `n` up to a multiple of `align` (a power of two), if that fits in a u64.
pub fn align_up(n: u64, align: u64) -> Option<u64> {
    n.checked_next_multiple_of(align)
}

/// One tensor of a parsed file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The name (at most [`MAX_NAME_LEN`] bytes, unique in the file).
    pub name: String,
    /// Dimensions, innermost (contiguous) first: a PyTorch `[out, in]` weight is `[in, out]`.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
    /// Offset of the first byte from the start of the data section.
    pub offset: u64,
    /// Bytes, from [`tensor_bytes`].
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The trits and scales of a ternary tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Ternary {
    /// All trits, row after row (rows of `dims[0]`).
    pub trits: Vec<i8>,
    /// One scale per 256-weight block for TQ1_0 / TQ2_0 (in trit order), one for I2_S.
    pub scales: Vec<f32>,
}

/// A parsed GGUF file: metadata, tensor table, and the bytes it was parsed from.
pub struct GgufFile<'a> {
    version: GgufVersion,
    kv: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    alignment: u32,
    data_offset: u64,
    bytes: &'a [u8],
}

impl std::fmt::Debug for GgufFile<'_> {
    /// Everything but the bytes (a memory map may be gigabytes).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("kv", &self.kv)
            .field("tensors", &self.tensors)
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("file_len", &self.bytes.len())
            .finish()
    }
}

impl<'a> GgufFile<'a> {
    /// The version read at byte 4.
    pub fn version(&self) -> GgufVersion {
        self.version
    }

    /// The key-value pairs in file order.
    pub fn kv(&self) -> &[(String, Value)] {
        &self.kv
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index
            .get(key)
            .and_then(|&i| self.kv.get(i))
            .map(|(_, v)| v)
    }

    /// The value of `key` if it is a u32.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        match self.get(key)? {
            Value::U32(v) => Some(*v),
            _ => None,
        }
    }

    /// The value of `key` if it is an unsigned integer of any width (the spec asks for u64
    /// counts, llama.cpp's converters write u32).
    pub fn get_uint(&self, key: &str) -> Option<u64> {
        match self.get(key)? {
            Value::U8(v) => Some(u64::from(*v)),
            Value::U16(v) => Some(u64::from(*v)),
            Value::U32(v) => Some(u64::from(*v)),
            Value::U64(v) => Some(*v),
            _ => None,
        }
    }

    /// The value of `key` if it is an f32.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        match self.get(key)? {
            Value::F32(v) => Some(*v),
            _ => None,
        }
    }

    /// The value of `key` if it is a bool.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(v) => Some(*v),
            _ => None,
        }
    }

    /// The value of `key` if it is a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::String(v) => Some(v),
            _ => None,
        }
    }

    /// The value of `key` if it is an array.
    pub fn get_array(&self, key: &str) -> Option<&Array> {
        match self.get(key)? {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }

    /// The tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Alignment of the data section and tensors.
    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    /// Absolute offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The bytes of `info`, a tensor of this file (bounds were checked by [`parse`]). An info
    /// that does not come from this file and lies outside it gives an empty slice.
    pub fn tensor_data(&self, info: &TensorInfo) -> &'a [u8] {
        let bytes: &'a [u8] = self.bytes;
        self.data_offset
            .checked_add(info.offset)
            .and_then(|start| Some((start, start.checked_add(info.size)?)))
            .and_then(|(s, e)| bytes.get(usize::try_from(s).ok()?..usize::try_from(e).ok()?))
            .unwrap_or(&[])
    }

    /// Decodes a TQ1_0, TQ2_0 or I2_S tensor into trits and scales; `Ok(None)` for other
    /// types. Errors name the tensor and the weight.
    pub fn ternary(&self, info: &TensorInfo) -> Result<Option<Ternary>, GgufError> {
        if !info.ty.is_ternary() {
            return Ok(None);
        }
        let data = self.tensor_data(info);
        let numel = usize::try_from(info.numel()).map_err(|_| GgufError::TooLargeForMemory {
            name: info.name.clone(),
        })?;
        let k = usize::try_from(info.dims.first().copied().unwrap_or(0)).unwrap_or(0);
        let mut trits = vec![0i8; numel];
        let bad = |reason: String| GgufError::BadTensorData {
            name: info.name.clone(),
            reason,
        };
        let scales = match info.ty {
            GgmlType::I2_S => {
                vec![i2_s::decode_tensor(data, k, &mut trits).map_err(|e| bad(e.to_string()))?]
            }
            ty => {
                let blocks = numel / tq::BLOCK;
                let mut scales = vec![0f32; blocks];
                let decode = if ty == GgmlType::TQ1_0 {
                    tq1_0::decode_row
                } else {
                    tq2_0::decode_row
                };
                // Blocks never span rows (dims[0] is a multiple of 256), so the whole tensor
                // decodes as one long row; element indices are then flattened indices.
                decode(data, &mut trits, &mut scales).map_err(|e| bad(e.to_string()))?;
                scales
            }
        };
        Ok(Some(Ternary { trits, scales }))
    }
}

#[cfg(test)]
mod tests;
