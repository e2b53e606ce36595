//! Parses a GGUF file held in memory (usually a memory map). Every count and length is capped
//! by a named limit and compared with the bytes actually present before anything is allocated;
//! every offset is checked; nothing the file says can make this code panic. Split into
//! [`read_header`], [`read_kv`], [`read_tensor_infos`] and [`check_layout`].

use std::collections::{HashMap, HashSet};

use super::{
    ALIGNMENT_KEY, Array, DEFAULT_ALIGNMENT, GgmlType, GgufFile, GgufVersion, MAGIC, MAX_ALIGNMENT,
    MAX_ARRAY_LEN, MAX_DIMS, MAX_KEY_LEN, MAX_KV, MAX_NAME_LEN, MAX_STRING_LEN, MAX_TENSORS,
    ShapeError, TensorInfo, Value, ValueType, align_up, tensor_bytes,
};

/// Fewest bytes one key-value pair takes: key length, empty key, value type, a 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Fewest bytes one tensor info takes: name length, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// Something wrong with a GGUF file. Offsets are absolute byte offsets in the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error(
        "the file ends at byte {file_len}, inside the {what} that starts at byte {offset} and needs {need} bytes; it is truncated"
    )]
    Truncated {
        what: &'static str,
        offset: u64,
        need: u64,
        file_len: u64,
    },
    #[error("bad magic {found:02x?} at byte 0: not a GGUF file")]
    BadMagic { found: [u8; 4] },
    #[error("GGUF version {found} is not supported; this build reads versions 2 and 3")]
    UnsupportedVersion { found: u32 },
    #[error(
        "the version at byte 4 reads {found:#x}: a big-endian GGUF file; convert it with gguf-py's gguf-convert-endian first"
    )]
    BigEndian { found: u32 },
    #[error("the file declares {count} {what} (byte {offset}), above the limit of {limit}")]
    CountTooLarge {
        what: &'static str,
        offset: u64,
        count: u64,
        limit: u64,
    },
    #[error(
        "the file declares {count} {what} at byte {offset}, which need at least {need} bytes, but only {remaining} follow; it is truncated or damaged"
    )]
    CountExceedsFile {
        what: &'static str,
        offset: u64,
        count: u64,
        need: u64,
        remaining: u64,
    },
    #[error("{what} at byte {offset} is {len} bytes long, above the limit of {limit}")]
    StringTooLong {
        what: &'static str,
        offset: u64,
        len: u64,
        limit: u64,
    },
    #[error("{what} at byte {offset} is not valid UTF-8")]
    NotUtf8 { what: &'static str, offset: u64 },
    #[error("empty key at byte {offset}; every key needs a name")]
    EmptyKey { offset: u64 },
    #[error("key {key:?} at byte {offset} appears twice; the file is ambiguous")]
    DuplicateKey { key: String, offset: u64 },
    #[error("key {key:?}: value type {id} at byte {offset} is unknown (0 to 12 are defined)")]
    UnknownValueType { key: String, offset: u64, id: u32 },
    #[error("key {key:?}: array at byte {offset} holds arrays; nested arrays are not supported")]
    NestedArray { key: String, offset: u64 },
    #[error("key {key:?}: bool at byte {offset} is {value}, not 0 or 1")]
    BadBool { key: String, offset: u64, value: u8 },
    #[error("{ALIGNMENT_KEY} is a {found:?}; it must be a u32")]
    AlignmentType { found: ValueType },
    #[error("{ALIGNMENT_KEY} is {value}; it must be a power of two between 1 and {MAX_ALIGNMENT}")]
    BadAlignment { value: u32 },
    #[error(
        "tensor name at byte {offset} is {len} bytes; names are 1 to {MAX_NAME_LEN} bytes (llama.cpp's limit)"
    )]
    BadName { offset: u64, len: u64 },
    #[error("tensor {name:?} at byte {offset} appears twice")]
    DuplicateTensor { name: String, offset: u64 },
    #[error("tensor {name:?}: {n_dims} dimensions at byte {offset}; a tensor has 1 to {MAX_DIMS}")]
    BadDimCount {
        name: String,
        offset: u64,
        n_dims: u32,
    },
    #[error("tensor {name:?}: type id {id} at byte {offset} is not a GGML type this build knows")]
    UnknownTensorType { name: String, offset: u64, id: u32 },
    #[error("tensor {name:?} ({ty:?}, dims {dims:?}): {source}")]
    BadShape {
        name: String,
        ty: GgmlType,
        dims: Vec<u64>,
        source: ShapeError,
    },
    #[error("tensor {name:?}: offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned {
        name: String,
        offset: u64,
        alignment: u32,
    },
    #[error(
        "tensor {name:?}: bytes {start}..{end} run past the end of the {file_len}-byte file; it is truncated"
    )]
    TensorOutOfBounds {
        name: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error("tensors {first:?} and {second:?} overlap at byte {offset}")]
    Overlap {
        first: String,
        second: String,
        offset: u64,
    },
    #[error(
        "the file is {file_len} bytes but its contents end at byte {end} (at most {max} with padding); trailing bytes are refused"
    )]
    TrailingBytes { file_len: u64, end: u64, max: u64 },
    #[error("tensor {name:?} is too large to decode in memory on this machine")]
    TooLargeForMemory { name: String },
    #[error("tensor {name:?}: {reason}")]
    BadTensorData { name: String, reason: String },
}

/// A cursor over the file that never reads past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        self.bytes.len().saturating_sub(self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let truncated = || GgufError::Truncated {
            what,
            offset: self.pos as u64,
            need: n,
            file_len: self.bytes.len() as u64,
        };
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .ok_or_else(truncated)?;
        let slice = self.bytes.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        Ok(s.try_into().expect("take returns exactly N bytes"))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A string: u64 length (at most `limit`) and that many UTF-8 bytes.
    fn string(&mut self, what: &'static str, limit: u64) -> Result<String, GgufError> {
        let offset = self.offset();
        let len = self.u64(what)?;
        if len > limit {
            return Err(GgufError::StringTooLong {
                what,
                offset,
                len,
                limit,
            });
        }
        self.string_body(what, offset, len)
    }

    /// The `len` bytes of a string whose length field was at `offset`, as UTF-8.
    fn string_body(
        &mut self,
        what: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<String, GgufError> {
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::NotUtf8 { what, offset })
    }

    /// Checks that `count` items of at least `min_bytes` each can fit in what remains.
    fn check_count(
        &self,
        what: &'static str,
        offset: u64,
        count: u64,
        min_bytes: u64,
    ) -> Result<(), GgufError> {
        let need = count.saturating_mul(min_bytes);
        if need > self.remaining() {
            return Err(GgufError::CountExceedsFile {
                what,
                offset,
                count,
                need,
                remaining: self.remaining(),
            });
        }
        Ok(())
    }
}

/// Parses `bytes` as a GGUF v2 or v3 file (little-endian).
pub fn parse(bytes: &[u8]) -> Result<GgufFile<'_>, GgufError> {
    let mut cur = Cursor { bytes, pos: 0 };
    let (version, n_tensors, n_kv) = read_header(&mut cur)?;
    let (kv, index) = read_kv(&mut cur, n_kv)?;
    let alignment = alignment_of(&kv, &index)?;
    let tensors = read_tensor_infos(&mut cur, n_tensors, alignment)?;
    let data_offset = check_layout(&cur, &tensors, alignment)?;
    Ok(GgufFile {
        version,
        kv,
        index,
        tensors,
        alignment,
        data_offset,
        bytes,
    })
}

/// Magic, version and the two counts, capped and compared with the bytes that follow.
fn read_header(cur: &mut Cursor) -> Result<(GgufVersion, u64, u64), GgufError> {
    let magic: [u8; 4] = cur.array("magic")?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let found = cur.u32("version")?;
    let version = match GgufVersion::from_u32(found) {
        Some(v) => v,
        None if found & 0xffff == 0 && GgufVersion::from_u32(found.swap_bytes()).is_some() => {
            return Err(GgufError::BigEndian { found });
        }
        None => return Err(GgufError::UnsupportedVersion { found }),
    };
    let t_off = cur.offset();
    let n_tensors = cur.u64("tensor count")?;
    let kv_off = cur.offset();
    let n_kv = cur.u64("key-value count")?;
    for (what, offset, count, limit) in [
        ("tensors", t_off, n_tensors, MAX_TENSORS),
        ("key-value pairs", kv_off, n_kv, MAX_KV),
    ] {
        if count > limit {
            return Err(GgufError::CountTooLarge {
                what,
                offset,
                count,
                limit,
            });
        }
    }
    let need = n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES;
    if need > cur.remaining() {
        return Err(GgufError::CountExceedsFile {
            what: "key-value pairs and tensor infos",
            offset: t_off,
            count: n_kv + n_tensors,
            need,
            remaining: cur.remaining(),
        });
    }
    Ok((version, n_tensors, n_kv))
}

type KvTable = (Vec<(String, Value)>, HashMap<String, usize>);

/// The key-value pairs; keys non-empty and unique.
fn read_kv(cur: &mut Cursor, n_kv: u64) -> Result<KvTable, GgufError> {
    // Bounded by MAX_KV and by the bytes present (read_header).
    let mut kv = Vec::with_capacity(usize::try_from(n_kv).unwrap_or(0));
    let mut index = HashMap::new();
    for _ in 0..n_kv {
        let offset = cur.offset();
        let key = cur.string("key", MAX_KEY_LEN)?;
        if key.is_empty() {
            return Err(GgufError::EmptyKey { offset });
        }
        if index.contains_key(&key) {
            return Err(GgufError::DuplicateKey { key, offset });
        }
        let type_off = cur.offset();
        let id = cur.u32("value type")?;
        let ty = ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.clone(),
            offset: type_off,
            id,
        })?;
        let value = read_value(cur, &key, ty)?;
        index.insert(key.clone(), kv.len());
        kv.push((key, value));
    }
    Ok((kv, index))
}

/// One value of type `ty` (for `key`, in errors).
fn read_value(cur: &mut Cursor, key: &str, ty: ValueType) -> Result<Value, GgufError> {
    let offset = cur.offset();
    Ok(match ty {
        ValueType::U8 => Value::U8(cur.u8("u8 value")?),
        ValueType::I8 => Value::I8(i8::from_le_bytes(cur.array("i8 value")?)),
        ValueType::U16 => Value::U16(u16::from_le_bytes(cur.array("u16 value")?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(cur.array("i16 value")?)),
        ValueType::U32 => Value::U32(cur.u32("u32 value")?),
        ValueType::I32 => Value::I32(i32::from_le_bytes(cur.array("i32 value")?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(cur.array("f32 value")?)),
        ValueType::Bool => Value::Bool(read_bool(cur, key)?),
        ValueType::String => Value::String(cur.string("string value", MAX_STRING_LEN)?),
        ValueType::U64 => Value::U64(cur.u64("u64 value")?),
        ValueType::I64 => Value::I64(i64::from_le_bytes(cur.array("i64 value")?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(cur.array("f64 value")?)),
        ValueType::Array => {
            let id = cur.u32("array element type")?;
            let elem = ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType {
                key: key.to_string(),
                offset,
                id,
            })?;
            if elem == ValueType::Array {
                return Err(GgufError::NestedArray {
                    key: key.to_string(),
                    offset,
                });
            }
            let count_off = cur.offset();
            let count = cur.u64("array length")?;
            if count > MAX_ARRAY_LEN {
                return Err(GgufError::CountTooLarge {
                    what: "array elements",
                    offset: count_off,
                    count,
                    limit: MAX_ARRAY_LEN,
                });
            }
            cur.check_count("array elements", count_off, count, elem.min_bytes())?;
            Value::Array(read_array(cur, key, elem, count)?)
        }
    })
}

fn read_bool(cur: &mut Cursor, key: &str) -> Result<bool, GgufError> {
    let offset = cur.offset();
    match cur.u8("bool value")? {
        0 => Ok(false),
        1 => Ok(true),
        value => Err(GgufError::BadBool {
            key: key.to_string(),
            offset,
            value,
        }),
    }
}

/// `count` elements of `elem` (already checked against the bytes present).
fn read_array(
    cur: &mut Cursor,
    key: &str,
    elem: ValueType,
    count: u64,
) -> Result<Array, GgufError> {
    fn fixed<T, const N: usize>(
        cur: &mut Cursor,
        count: u64,
        what: &'static str,
        f: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, GgufError> {
        let raw = cur.take(count.saturating_mul(N as u64), what)?;
        Ok(raw
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks_exact gives N bytes")))
            .collect())
    }
    Ok(match elem {
        ValueType::U8 => Array::U8(fixed(cur, count, "u8 array", |[b]| b)?),
        ValueType::I8 => Array::I8(fixed(cur, count, "i8 array", i8::from_le_bytes)?),
        ValueType::U16 => Array::U16(fixed(cur, count, "u16 array", u16::from_le_bytes)?),
        ValueType::I16 => Array::I16(fixed(cur, count, "i16 array", i16::from_le_bytes)?),
        ValueType::U32 => Array::U32(fixed(cur, count, "u32 array", u32::from_le_bytes)?),
        ValueType::I32 => Array::I32(fixed(cur, count, "i32 array", i32::from_le_bytes)?),
        ValueType::F32 => Array::F32(fixed(cur, count, "f32 array", f32::from_le_bytes)?),
        ValueType::U64 => Array::U64(fixed(cur, count, "u64 array", u64::from_le_bytes)?),
        ValueType::I64 => Array::I64(fixed(cur, count, "i64 array", i64::from_le_bytes)?),
        ValueType::F64 => Array::F64(fixed(cur, count, "f64 array", f64::from_le_bytes)?),
        ValueType::Bool => {
            let mut v = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
            for _ in 0..count {
                v.push(read_bool(cur, key)?);
            }
            Array::Bool(v)
        }
        ValueType::String => {
            let mut v = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
            for _ in 0..count {
                v.push(cur.string("string array element", MAX_STRING_LEN)?);
            }
            Array::String(v)
        }
        ValueType::Array => unreachable!("nested arrays are refused before read_array"),
    })
}

/// The alignment from `general.alignment` (a u32 power of two) or the default.
fn alignment_of(kv: &[(String, Value)], index: &HashMap<String, usize>) -> Result<u32, GgufError> {
    let Some((_, value)) = index.get(ALIGNMENT_KEY).and_then(|&i| kv.get(i)) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match *value {
        Value::U32(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => Ok(a),
        Value::U32(value) => Err(GgufError::BadAlignment { value }),
        ref other => Err(GgufError::AlignmentType {
            found: other.value_type(),
        }),
    }
}

/// The tensor infos: names valid and unique, shapes sized, offsets aligned.
fn read_tensor_infos(
    cur: &mut Cursor,
    n_tensors: u64,
    alignment: u32,
) -> Result<Vec<TensorInfo>, GgufError> {
    // Bounded by MAX_TENSORS and by the bytes present (read_header).
    let mut tensors = Vec::with_capacity(usize::try_from(n_tensors).unwrap_or(0));
    let mut names = HashSet::new();
    for _ in 0..n_tensors {
        let offset = cur.offset();
        let len = cur.u64("tensor name length")?;
        if len == 0 || len > MAX_NAME_LEN as u64 {
            return Err(GgufError::BadName { offset, len });
        }
        let name = cur.string_body("tensor name", offset, len)?;
        if !names.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor { name, offset });
        }
        let dims_off = cur.offset();
        let n_dims = cur.u32("dimension count")?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(GgufError::BadDimCount {
                name,
                offset: dims_off,
                n_dims,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(cur.u64("dimension")?);
        }
        let type_off = cur.offset();
        let id = cur.u32("tensor type")?;
        let ty = GgmlType::from_id(id).ok_or_else(|| GgufError::UnknownTensorType {
            name: name.clone(),
            offset: type_off,
            id,
        })?;
        let data_off = cur.u64("tensor offset")?;
        let size = match tensor_bytes(ty, &dims) {
            Ok(size) => size,
            Err(source) => {
                return Err(GgufError::BadShape {
                    name,
                    ty,
                    dims,
                    source,
                });
            }
        };
        if data_off % u64::from(alignment) != 0 {
            return Err(GgufError::Misaligned {
                name,
                offset: data_off,
                alignment,
            });
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset: data_off,
            size,
        });
    }
    Ok(tensors)
}

/// Checks that every tensor lies inside the file, that no two overlap, and that nothing
/// but padding follows the last one. Returns the absolute data offset.
fn check_layout(cur: &Cursor, tensors: &[TensorInfo], alignment: u32) -> Result<u64, GgufError> {
    let file_len = cur.bytes.len() as u64;
    let align = u64::from(alignment);
    let infos_end = cur.offset();
    // infos_end <= file_len < 2^63 and align <= 2^24, so this cannot overflow.
    let data_offset = align_up(infos_end, align).unwrap_or(u64::MAX);
    let mut end = infos_end;
    let mut spans = Vec::with_capacity(tensors.len());
    for t in tensors {
        let start = data_offset.saturating_add(t.offset);
        let stop = start.saturating_add(t.size);
        if stop > file_len {
            return Err(GgufError::TensorOutOfBounds {
                name: t.name.clone(),
                start,
                end: stop,
                file_len,
            });
        }
        end = end.max(stop);
        spans.push((start, stop, &t.name));
    }
    spans.sort_unstable();
    for pair in spans.windows(2) {
        if let [(_, prev_end, first), (start, _, second)] = pair
            && start < prev_end
        {
            return Err(GgufError::Overlap {
                first: (*first).clone(),
                second: (*second).clone(),
                offset: *start,
            });
        }
    }
    let max = align_up(end, align).unwrap_or(u64::MAX);
    if file_len > max {
        return Err(GgufError::TrailingBytes { file_len, end, max });
    }
    Ok(data_offset)
}
