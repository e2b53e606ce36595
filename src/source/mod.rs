//! Read a checkpoint: an HF model directory with `config.json` and safetensors weights
//! (one `model.safetensors`, or shards listed in `model.safetensors.index.json`).
//!
//! Files are memory-mapped, never read whole into memory. Opening a checkpoint parses and
//! validates every shard header (offsets, overlaps, coverage: the `safetensors` crate; duplicate
//! names: our own check, which the crate lacks) and matches the tensors against the list the
//! config implies, so that a missing, extra or misshapen tensor is reported before any work.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub mod hf_packed;

pub use self::hf_packed::{LinearClass, TernarySource, TritStorage};

use crate::fsio::{self, FileError};
use crate::model::{
    ConfigError, ModelConfig, Role, TensorSpec, expected_tensors, roles::IGNORED_SUFFIXES,
};
pub use crate::num::FloatDtype;

/// File names inside an HF model directory.
pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Largest config.json or index file we read (real ones are a few KB to a few MB).
pub const MAX_JSON_FILE: u64 = 64 << 20;
/// Largest safetensors header we parse (the `safetensors` crate allows 100 MB; parsing costs
/// about 14 times the header in memory, and real headers are kilobytes to a few megabytes).
pub const MAX_SAFETENSORS_HEADER: u64 = 16 << 20;

/// A checkpoint that cannot be read. Every variant names the file, and the tensor where one is
/// at fault.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: {error}")]
    Config { path: PathBuf, error: ConfigError },
    #[error(
        "{dir}: no {SINGLE_FILE} or {INDEX_FILE} found; point at an HF model directory that holds config.json and safetensors weights"
    )]
    NoWeights { dir: PathBuf },
    #[error(
        "{path}: not a model directory, a .safetensors file or a .safetensors.index.json shard index"
    )]
    NotACheckpoint { path: PathBuf },
    #[error("{path}: invalid shard index: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error(
        "{path}: not a valid safetensors file ({reason}); the file may be truncated or corrupt, re-download or re-export it"
    )]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: {} is listed twice in the header", if name == "__metadata__" { "the `__metadata__` entry".to_string() } else { format!("tensor `{name}`") })]
    DuplicateTensor { path: PathBuf, name: String },
    #[error(
        "{path}: tensor `{name}` is in this shard, but model.safetensors.index.json does not list it (transformers would not load it either); add it to the index's weight_map"
    )]
    NotInIndex { path: PathBuf, name: String },
    #[error("{error} (note: {note})")]
    WithNote {
        note: String,
        error: Box<SourceError>,
    },
    #[error(
        "{path}: tensor `{tensor}` has dtype {dtype}; only F32, F16 and BF16 weights are supported"
    )]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: tensor `{tensor}` is already packed ({dtype}), but {reason}")]
    PackedCheckpoint {
        path: PathBuf,
        tensor: String,
        dtype: String,
        reason: String,
    },
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Offline {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error(
        "{path}: tensor `{tensor}` {error}; an HF packed checkpoint holds trits only: re-export it, or convert the master weights instead"
    )]
    Trits {
        path: PathBuf,
        tensor: String,
        error: hf_packed::TritError,
    },
    #[error("{dir}: tensor `{name}` is missing (expected shape {expected:?} from config.json)")]
    MissingTensor {
        dir: PathBuf,
        name: String,
        expected: Vec<usize>,
    },
    #[error("{path}: the index maps `{name}` to this file, but the file has no such tensor")]
    MissingInShard { path: PathBuf, name: String },
    #[error(
        "{path}: unexpected tensor `{name}`: config.json ({architecture}) implies no such tensor"
    )]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        architecture: String,
    },
    #[error(
        "{path}: tensor `{name}` has shape {found:?} but config.json implies {expected:?}; check that config.json belongs to these weights"
    )]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "{path}: config.json ties lm_head to the embeddings, but `lm_head.weight` differs from `model.embed_tokens.weight`; set tie_word_embeddings to false"
    )]
    TiedHeadDiffers { path: PathBuf },
}

/// One memory-mapped safetensors file.
pub struct Shard {
    /// File name inside the model directory.
    pub file_name: String,
    pub path: PathBuf,
    /// File size in bytes.
    pub len: u64,
    mmap: Mmap,
}

/// Where a source tensor's bytes are.
#[derive(Debug, Clone)]
pub struct SourceTensor {
    pub spec: TensorSpec,
    pub dtype: FloatDtype,
    /// Index into [`Checkpoint::shards`].
    pub shard: usize,
    /// Absolute byte range inside the shard file.
    pub start: usize,
    pub end: usize,
    /// Set when the checkpoint stores this projection already ternary (HF offline
    /// quantization): its trits are taken as they are. `dtype` is then the type of its scale.
    pub ternary: Option<TernarySource>,
}

impl SourceTensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.spec.shape.iter().product()
    }
}

/// An opened, fully checked checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub shards: Vec<Shard>,
    /// Tensors in canonical order (see [`expected_tensors`]).
    pub tensors: Vec<SourceTensor>,
    /// Names present in the files and deliberately skipped (buffers, a duplicate tied head).
    pub skipped: Vec<String>,
    /// The shard index, when the weights are sharded.
    pub index: Option<PathBuf>,
    /// Things a user should know about how the path was read (which weights were used).
    pub notes: Vec<String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |error| {
        SourceError::File(FileError::Io {
            path: path.to_path_buf(),
            error,
        })
    }
}

fn read_small(path: &Path, what: &'static str) -> Result<Vec<u8>, SourceError> {
    Ok(fsio::read_capped(path, MAX_JSON_FILE, what)?)
}

/// The weights a checkpoint path names.
enum Weights {
    /// One safetensors file (its name inside the directory).
    Single(String),
    /// A shard index file (its path).
    Index(PathBuf),
}

/// Decides which weights `path` names: a directory (as transformers does, `model.safetensors`
/// before `model.safetensors.index.json`), a `.safetensors` file, or a shard index. Returns the
/// model directory, the weights and a note when the choice is not obvious.
fn locate(path: &Path) -> Result<(PathBuf, Weights, Option<String>), SourceError> {
    let meta = fsio::stat(path)?.ok_or_else(|| FileError::Io {
        path: path.to_path_buf(),
        error: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    if meta.is_dir() {
        let (single, index) = (path.join(SINGLE_FILE), path.join(INDEX_FILE));
        let (has_single, has_index) = (
            fsio::stat(&single)?.is_some(),
            fsio::stat(&index)?.is_some(),
        );
        let weights = match (has_single, has_index) {
            (true, _) => Weights::Single(SINGLE_FILE.to_string()),
            (false, true) => Weights::Index(index),
            (false, false) => {
                return Err(SourceError::NoWeights {
                    dir: path.to_path_buf(),
                });
            }
        };
        let note = (has_single && has_index).then(|| {
            format!(
                "{} holds both {SINGLE_FILE} and {INDEX_FILE}; using {SINGLE_FILE}, as transformers does (name the index file to use the shards)",
                path.display()
            )
        });
        return Ok((path.to_path_buf(), weights, note));
    }
    let dir = fsio::parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.ends_with(".safetensors") {
        Ok((dir, Weights::Single(name), None))
    } else if name.ends_with(".index.json") {
        Ok((dir, Weights::Index(path.to_path_buf()), None))
    } else {
        Err(SourceError::NotACheckpoint {
            path: path.to_path_buf(),
        })
    }
}

impl Checkpoint {
    /// Opens an HF model directory, or the `.safetensors` file or shard index named inside one
    /// (`config.json` is always the directory's).
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let (dir, weights, note) = locate(path)?;
        // When the weights were chosen among two candidates, an error says which.
        Self::open_located(dir, weights, note.clone()).map_err(|error| match note {
            Some(note) => SourceError::WithNote {
                note,
                error: Box::new(error),
            },
            None => error,
        })
    }

    fn open_located(
        dir: PathBuf,
        weights: Weights,
        note: Option<String>,
    ) -> Result<Self, SourceError> {
        let config_path = dir.join(CONFIG_FILE);
        let config_bytes = read_small(&config_path, "config.json")?;
        let config =
            ModelConfig::from_json(&config_bytes).map_err(|error| SourceError::Config {
                path: config_path.clone(),
                error,
            })?;
        let (shard_names, routing, index) = match weights {
            Weights::Index(index_path) => {
                let (names, map) = read_index(&index_path)?;
                (names, Some(map), Some(index_path))
            }
            Weights::Single(name) => (vec![name], None, None),
        };

        let mut shards = Vec::with_capacity(shard_names.len());
        let mut unrouted: Vec<(String, PathBuf)> = Vec::new();
        let mut found: BTreeMap<String, (usize, safetensors::tensor::TensorInfo, usize)> =
            BTreeMap::new();
        for (si, file_name) in shard_names.iter().enumerate() {
            let shard_path = dir.join(file_name);
            let (shard, infos) = open_shard(&shard_path, file_name)?;
            for (name, info, data_start) in infos {
                if let Some(map) = &routing {
                    match map.get(&name) {
                        Some(target) if target == file_name => {}
                        // A tensor the index does not route here is ignored, as transformers does.
                        _ => {
                            unrouted.push((name, shard_path.clone()));
                            continue;
                        }
                    }
                }
                found.insert(name, (si, info, data_start));
            }
            shards.push(shard);
        }
        if let Some(map) = &routing {
            for (name, file_name) in map {
                if !found.contains_key(name) {
                    return Err(SourceError::MissingInShard {
                        path: dir.join(file_name),
                        name: name.clone(),
                    });
                }
            }
        }
        let (tensors, skipped) =
            match_tensors(&dir, &config, &shards, found).map_err(|e| match e {
                SourceError::MissingTensor { name, .. }
                    if unrouted.iter().any(|(n, _)| *n == name) =>
                {
                    let path = unrouted
                        .into_iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, p)| p)
                        .unwrap_or_default();
                    SourceError::NotInIndex { path, name }
                }
                other => other,
            })?;
        Ok(Checkpoint {
            dir,
            config,
            shards,
            tensors,
            skipped,
            index,
            notes: note.into_iter().collect(),
        })
    }

    /// Every file the checkpoint was read from: config.json, the index if any, the shards.
    pub fn input_files(&self) -> Vec<PathBuf> {
        std::iter::once(self.dir.join(CONFIG_FILE))
            .chain(self.index.clone())
            .chain(self.shards.iter().map(|s| s.path.clone()))
            .collect()
    }

    /// The raw little-endian bytes of a tensor (borrowed from the memory map).
    pub fn bytes(&self, t: &SourceTensor) -> &[u8] {
        // Ranges were checked against the map when the shard was opened.
        &self.shards[t.shard].mmap[t.start..t.end]
    }

    /// Tells the kernel the tensor's pages are no longer needed, so that resident memory stays
    /// bounded by the tensors in flight rather than growing to the size of the checkpoint.
    /// Purely advisory: the pages are reloaded from the page cache if touched again.
    pub fn release(&self, t: &SourceTensor) {
        let mmap = &self.shards[t.shard].mmap;
        // SAFETY: the mapping is a read-only shared file mapping; MADV_DONTNEED on it only drops
        // page-table entries, and later reads fault the same file contents back in.
        let _ = unsafe {
            mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                t.start,
                t.end - t.start,
            )
        };
    }

    /// [`Checkpoint::release`] for `len` bytes of the tensor from `offset` (within it) on: the
    /// pages wholly inside the range.
    pub fn release_range(&self, t: &SourceTensor, offset: usize, len: usize) {
        const PAGE: usize = 4096;
        let mmap = &self.shards[t.shard].mmap;
        let from = t.start.saturating_add(offset).min(t.end);
        let to = from.saturating_add(len).min(t.end);
        // Whole 4 KiB pages only, so that no neighbouring tensor loses its pages where pages are
        // 4 KiB. (With larger pages memmap2 rounds the start down; that is harmless too: a
        // dropped page is read back from the page cache when touched.)
        let (from, to) = (from.div_ceil(PAGE) * PAGE, to / PAGE * PAGE);
        if from >= to {
            return;
        }
        // SAFETY: as in `release`: a read-only shared file mapping, whose pages read back the
        // same contents when touched again.
        let _ = unsafe {
            mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from)
        };
    }

    /// The trits of an already-ternary projection (`[out, in]`, row-major), checked.
    pub fn trits(&self, t: &SourceTensor) -> Result<Vec<i8>, SourceError> {
        let Some(ts) = &t.ternary else {
            return Err(SourceError::Offline {
                path: self.shards[t.shard].path.clone(),
                tensor: t.spec.name.clone(),
                reason: "holds master weights, not trits".into(),
            });
        };
        let (rows, k) = (t.spec.shape[0], t.spec.shape[1]);
        let mut out = vec![0i8; rows * k];
        let bytes = self.bytes(t);
        match ts.storage {
            TritStorage::Packed => hf_packed::unpack_packed(bytes, rows, k, &mut out),
            TritStorage::Float(d) => hf_packed::float_trits(d, bytes, k, &mut out),
        }
        .map_err(|error| SourceError::Trits {
            path: self.shards[t.shard].path.clone(),
            tensor: t.spec.name.clone(),
            error,
        })?;
        Ok(out)
    }

    /// Whether any projection is stored already ternary.
    pub fn is_ternary(&self) -> bool {
        self.tensors.iter().any(|t| t.ternary.is_some())
    }

    /// Total bytes of the tensors in canonical order (the work a conversion reads).
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| (t.end - t.start) as u64).sum()
    }
}

/// Parses `model.safetensors.index.json`: returns the shard files in order of first use (sorted
/// by name) and the tensor-to-shard map.
fn read_index(path: &Path) -> Result<(Vec<String>, BTreeMap<String, String>), SourceError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let bad = |reason: String| SourceError::Index {
        path: path.to_path_buf(),
        reason,
    };
    let index: Index = serde_json::from_slice(&read_small(path, "shard index")?)
        .map_err(|e| bad(e.to_string()))?;
    let mut names: Vec<String> = index.weight_map.values().cloned().collect();
    names.sort();
    names.dedup();
    for n in &names {
        let plain = Path::new(n)
            .file_name()
            .map(|f| f == n.as_str())
            .unwrap_or(false);
        if !plain || n.starts_with('.') {
            return Err(bad(format!(
                "shard name `{n}` is not a plain file name inside the model directory"
            )));
        }
    }
    if names.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    Ok((names, index.weight_map))
}

/// The tensors of one safetensors file: name, what the header says, and the absolute offset of
/// the data section.
pub type ShardInfos = Vec<(String, safetensors::tensor::TensorInfo, usize)>;

/// Maps and validates one safetensors file; returns each tensor with the absolute offset of the
/// data section.
fn open_shard(path: &Path, file_name: &str) -> Result<(Shard, ShardInfos), SourceError> {
    let file = fsio::open_regular(path)?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let bad = |reason: String| SourceError::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    if len < 8 {
        return Err(bad(format!(
            "the file is {len} bytes long, shorter than the 8-byte header length"
        )));
    }
    // SAFETY: the map is read-only. Like every mmap-based reader we assume the file is not
    // truncated or rewritten by another process while we run.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    let infos = parse_safetensors(&mmap).map_err(|e| match e {
        StHeaderError::Duplicate(name) => SourceError::DuplicateTensor {
            path: path.to_path_buf(),
            name,
        },
        StHeaderError::Invalid(reason) => bad(reason),
    })?;
    Ok((
        Shard {
            file_name: file_name.to_string(),
            path: path.to_path_buf(),
            len,
            mmap,
        },
        infos,
    ))
}

/// What is wrong with a safetensors file's header.
#[derive(Debug)]
pub enum StHeaderError {
    /// A tensor name listed twice.
    Duplicate(String),
    /// Anything else, in words naming the tensor at fault.
    Invalid(String),
}

/// Parses and checks the header of a whole safetensors file held in `bytes`: the header length
/// against [`MAX_SAFETENSORS_HEADER`] and the file, duplicate names, each entry and the tiling of
/// the data (our own checks, whose messages name the tensor), then the `safetensors` crate's
/// own parse. Returns each tensor with the absolute offset of the data section.
pub fn parse_safetensors(bytes: &[u8]) -> Result<ShardInfos, StHeaderError> {
    let bad = StHeaderError::Invalid;
    let len = bytes.len() as u64;
    let Some(prefix) = bytes.get(..8) else {
        return Err(bad(format!(
            "the file is {len} bytes long, shorter than the 8-byte header length"
        )));
    };
    let declared = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if declared > MAX_SAFETENSORS_HEADER {
        return Err(bad(format!(
            "the header declares {declared} bytes (bytes 0..8), more than the {MAX_SAFETENSORS_HEADER} bytes this reader accepts; real checkpoints have headers of kilobytes to a few megabytes"
        )));
    }
    let header_end = 8 + declared as usize;
    let header = bytes.get(8..header_end).ok_or_else(|| {
        bad(format!(
            "the header declares {declared} bytes (bytes 0..8) but the file has {} after them; the file is truncated",
            len - 8
        ))
    })?;
    if let Some(name) = first_duplicate_key(header) {
        return Err(StHeaderError::Duplicate(name));
    }
    check_st_header(header, len - header_end as u64).map_err(bad)?;
    let (header_len, metadata) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let data_start = 8 + header_len;
    Ok(metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.clone(), data_start))
        .collect())
}

/// Bytes per element of a safetensors dtype name (the whole-byte ones).
fn st_dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// Checks a safetensors header against the `data_len` bytes after it: every entry well-formed,
/// its byte range the size its dtype and shape need, and the ranges tiling the data exactly.
/// Each message names the tensor (or the two tensors) at fault.
fn check_st_header(header: &[u8], data_len: u64) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        dtype: String,
        shape: Vec<u64>,
        data_offsets: (u64, u64),
    }
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| format!("the header is not a JSON object of tensors: {e}"))?;
    let mut ranges = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let e: Entry = serde_json::from_value(v)
            .map_err(|e| format!("tensor `{name}`: malformed entry ({e})"))?;
        let (begin, end) = e.data_offsets;
        if begin > end {
            return Err(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] are reversed"
            ));
        }
        if end > data_len {
            return Err(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] run past the end of the {data_len}-byte data section; the file is truncated or the header is wrong"
            ));
        }
        let size = st_dtype_size(&e.dtype)
            .ok_or_else(|| format!("tensor `{name}`: unknown dtype `{}`", e.dtype))?;
        let need = e
            .shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: shape {:?} overflows", e.shape))?;
        if need != end - begin {
            return Err(format!(
                "tensor `{name}`: shape {:?} of {} needs {need} bytes, but data_offsets [{begin}, {end}] span {}",
                e.shape,
                e.dtype,
                end - begin
            ));
        }
        ranges.push((begin, end, name));
    }
    ranges.sort();
    let mut previous: Option<(u64, &str)> = None;
    for (begin, end, name) in &ranges {
        let prev_end = previous.map_or(0, |p| p.0);
        if *begin < prev_end {
            return Err(format!(
                "tensors `{}` and `{name}` overlap (bytes {begin}..{prev_end} of the data)",
                previous.map_or("", |p| p.1)
            ));
        }
        if *begin > prev_end {
            return Err(format!(
                "bytes {prev_end}..{begin} of the data, before tensor `{name}`, belong to no tensor"
            ));
        }
        previous = Some((*end, name));
    }
    let last = previous.map_or(0, |p| p.0);
    if last != data_len {
        return Err(format!(
            "bytes {last}..{data_len} at the end of the data belong to no tensor"
        ));
    }
    Ok(())
}

/// Finds a key that occurs twice at the top level of a safetensors header (serde_json keeps the
/// last one silently, and the safetensors crate does not check).
fn first_duplicate_key(header: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys(Option<String>);
    impl<'de> Visitor<'de> for &mut Keys {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if !seen.insert(key.clone()) && self.0.is_none() {
                    self.0 = Some(key);
                }
            }
            Ok(())
        }
    }
    let mut keys = Keys(None);
    let mut de = serde_json::Deserializer::from_slice(header);
    de.deserialize_map(&mut keys).ok()?;
    keys.0
}

type Found = BTreeMap<String, (usize, safetensors::tensor::TensorInfo, usize)>;

/// Decides whether a projection is stored already ternary (transformers' offline BitNet
/// quantization, [`hf_packed`]) and, if so, checks its shape and its `weight_scale` (taken out
/// of `found`). Returns `None` for master weights (the default: floats and no offline config).
fn offline_projection(
    config: &ModelConfig,
    shards: &[Shard],
    found: &mut Found,
    path: &Path,
    spec: &TensorSpec,
    info: &safetensors::tensor::TensorInfo,
) -> Result<Option<(FloatDtype, TernarySource)>, SourceError> {
    let offline = |reason: String| SourceError::Offline {
        path: path.to_path_buf(),
        tensor: spec.name.clone(),
        reason,
    };
    let packed = matches!(info.dtype, safetensors::Dtype::U8);
    let sq = config.source_quantization.as_ref();
    let mode = sq.and_then(|q| q.quantization_mode.as_deref());
    if let Some(m) = mode
        && m != "offline"
        && m != "online"
    {
        return Err(offline(format!(
            "quantization_config.quantization_mode `{m}` is not offline or online (transformers accepts only these)"
        )));
    }
    let bitnet = sq.is_some_and(|q| q.quant_method == "bitnet");
    // transformers' default mode is offline: with no quantization_mode, float weights that
    // have a weight_scale beside them are offline trits; without one they are master weights.
    let offline_floats = bitnet
        && (mode == Some("offline")
            || (mode.is_none() && found.contains_key(&hf_packed::scale_name(&spec.name))));
    if !packed && !offline_floats {
        // Master weights (or an unsupported dtype, reported by the caller).
        if matches!(info.dtype, safetensors::Dtype::I8) {
            return Err(SourceError::PackedCheckpoint {
                path: path.to_path_buf(),
                tensor: spec.name.clone(),
                dtype: "I8".into(),
                reason: "int8 projection weights are no layout bitnet-pack reads (HF packed checkpoints store uint8 [out/4, in] with quantization_config.quantization_mode offline)".into(),
            });
        }
        return Ok(None);
    }
    let packed_error = |reason: &str| SourceError::PackedCheckpoint {
        path: path.to_path_buf(),
        tensor: spec.name.clone(),
        dtype: format!("{:?}", info.dtype),
        reason: reason.to_string(),
    };
    if packed && !bitnet {
        return Err(packed_error(
            "config.json has no BitNet quantization_config, so the scale convention is unknown; add the quantization_config the checkpoint was exported with (quant_method bitnet, linear_class bitlinear or autobitlinear, quantization_mode offline)",
        ));
    }
    if packed && mode == Some("online") {
        return Err(packed_error(
            "quantization_config says quantization_mode online (bf16 master weights); a packed checkpoint is offline: fix quantization_mode, or use the master-weight checkpoint",
        ));
    }
    let class_name = sq.and_then(|q| q.linear_class.as_deref());
    let class = LinearClass::parse(class_name).ok_or_else(|| {
        offline(format!(
            "quantization_config.linear_class `{}` is not bitlinear or autobitlinear",
            class_name.unwrap_or_default()
        ))
    })?;
    let (rows, k) = (spec.shape[0], spec.shape[1]);
    let storage = if packed {
        if rows % hf_packed::TRITS_PER_BYTE != 0 {
            return Err(offline(format!(
                "{rows} output rows are not a multiple of 4, which transformers' packed layout needs"
            )));
        }
        let want = vec![rows / hf_packed::TRITS_PER_BYTE, k];
        if info.shape != want {
            return Err(SourceError::ShapeMismatch {
                path: path.to_path_buf(),
                name: spec.name.clone(),
                expected: want,
                found: info.shape.clone(),
            });
        }
        TritStorage::Packed
    } else {
        if class == LinearClass::BitLinear {
            return Err(offline(
                "quantization_config says linear_class bitlinear, offline: transformers' BitLinear holds packed uint8 weights only, but this one is a float tensor; set linear_class autobitlinear if these are ternary floats, or quantization_mode online if they are master weights".into(),
            ));
        }
        let dtype = FloatDtype::from_safetensors(info.dtype).ok_or_else(|| {
            SourceError::UnsupportedDtype {
                path: path.to_path_buf(),
                tensor: spec.name.clone(),
                dtype: format!("{:?}", info.dtype),
            }
        })?;
        if info.shape != spec.shape {
            return Err(SourceError::ShapeMismatch {
                path: path.to_path_buf(),
                name: spec.name.clone(),
                expected: spec.shape.clone(),
                found: info.shape.clone(),
            });
        }
        TritStorage::Float(dtype)
    };
    let scale_tensor = hf_packed::scale_name(&spec.name);
    let Some((ssi, sinfo, sstart)) = found.remove(&scale_tensor) else {
        return Err(offline(format!(
            "its scale `{scale_tensor}` is missing; an offline BitNet checkpoint stores one weight_scale per projection (re-export the checkpoint with it)"
        )));
    };
    let spath = &shards[ssi].path;
    let scale_err = |reason: String| SourceError::Offline {
        path: spath.clone(),
        tensor: scale_tensor.clone(),
        reason,
    };
    let sdtype = FloatDtype::from_safetensors(sinfo.dtype)
        .ok_or_else(|| scale_err(format!("dtype {:?} is not F32, F16 or BF16", sinfo.dtype)))?;
    if sinfo.shape.iter().product::<usize>() != 1 {
        return Err(scale_err(format!(
            "shape {:?} is not a single value (one scale per tensor)",
            sinfo.shape
        )));
    }
    let bytes = shards[ssi]
        .mmap
        .get(sstart + sinfo.data_offsets.0..sstart + sinfo.data_offsets.1)
        .ok_or_else(|| scale_err("data lies outside the file".into()))?;
    let mut v = [0f32];
    crate::num::dtype::decode_f32(sdtype, bytes, &mut v);
    let ws = v[0];
    let a = class.a_from_weight_scale(ws);
    if !(ws.is_finite() && ws > 0.0 && a.is_finite() && a > 0.0) {
        return Err(scale_err(format!(
            "weight_scale is {ws}; it must be finite and positive (linear_class {} makes a = {a})",
            class.as_str()
        )));
    }
    Ok(Some((
        sdtype,
        TernarySource {
            storage,
            class,
            scale_tensor,
            weight_scale: ws,
            a,
        },
    )))
}

/// Matches the tensors found in the files against the list implied by the config.
fn match_tensors(
    dir: &Path,
    config: &ModelConfig,
    shards: &[Shard],
    mut found: Found,
) -> Result<(Vec<SourceTensor>, Vec<String>), SourceError> {
    let mut tensors = Vec::new();
    for spec in expected_tensors(config) {
        let Some((si, info, data_start)) = found.remove(&spec.name) else {
            return Err(SourceError::MissingTensor {
                dir: dir.to_path_buf(),
                name: spec.name,
                expected: spec.shape,
            });
        };
        let path = shards[si].path.clone();
        let (start, end) = (
            data_start + info.data_offsets.0,
            data_start + info.data_offsets.1,
        );
        if spec.role.is_ternary()
            && let Some((dtype, ternary)) =
                offline_projection(config, shards, &mut found, &path, &spec, &info)?
        {
            tensors.push(SourceTensor {
                spec,
                dtype,
                shard: si,
                start,
                end,
                ternary: Some(ternary),
            });
            continue;
        }
        let dtype = FloatDtype::from_safetensors(info.dtype).ok_or_else(|| {
            SourceError::UnsupportedDtype {
                path: path.clone(),
                tensor: spec.name.clone(),
                dtype: format!("{:?}", info.dtype),
            }
        })?;
        if info.shape != spec.shape {
            return Err(SourceError::ShapeMismatch {
                path,
                name: spec.name,
                expected: spec.shape,
                found: info.shape,
            });
        }
        tensors.push(SourceTensor {
            spec,
            dtype,
            shard: si,
            start,
            end,
            ternary: None,
        });
    }
    let mut skipped = Vec::new();
    for (name, (si, info, data_start)) in found {
        if IGNORED_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            skipped.push(name);
            continue;
        }
        if name == "lm_head.weight" && config.tie_word_embeddings {
            // Some exporters write the tied head out anyway; accept it only if it is the same data.
            let embed = &tensors[0];
            let shard = &shards[si];
            let head = shard
                .mmap
                .get(data_start + info.data_offsets.0..data_start + info.data_offsets.1);
            let same = FloatDtype::from_safetensors(info.dtype) == Some(embed.dtype)
                && info.shape == embed.spec.shape
                && head == shards[embed.shard].mmap.get(embed.start..embed.end);
            if !same {
                return Err(SourceError::TiedHeadDiffers {
                    path: shard.path.clone(),
                });
            }
            skipped.push(name);
            continue;
        }
        return Err(SourceError::UnexpectedTensor {
            path: shards[si].path.clone(),
            name,
            architecture: config.architecture.clone(),
        });
    }
    debug_assert!(
        tensors
            .first()
            .map(|t| t.spec.role == Role::Embedding)
            .unwrap_or(false)
    );
    Ok((tensors, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_problems_name_the_tensor() {
        let h = |s: &str| check_st_header(s.as_bytes(), 24);
        let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[8],"data_offsets":[8,24]}}"#;
        assert_eq!(h(ok), Ok(()));
        let e = h(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"k":{"dtype":"BF16","shape":[9],"data_offsets":[8,24]}}"#).unwrap_err();
        assert!(e.contains("`k`") && e.contains("needs 18 bytes"), "{e}");
        let e = h(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"k":{"dtype":"BF16","shape":[8],"data_offsets":[8,24]}}"#).unwrap_err();
        assert!(e.contains("`a` and `k` overlap"), "{e}");
        let e = h(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"k":{"dtype":"BF16","shape":[4],"data_offsets":[16,24]}}"#).unwrap_err();
        assert!(e.contains("bytes 8..16") && e.contains("`k`"), "{e}");
        let e = h(r#"{"k":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}}"#).unwrap_err();
        assert!(e.contains("`k`") && e.contains("run past"), "{e}");
        let e = h(r#"{"k":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#).unwrap_err();
        assert!(e.contains("8..24 at the end"), "{e}");
        let e = h(r#"{"k":{"dtype":"Q9","shape":[2],"data_offsets":[0,24]}}"#).unwrap_err();
        assert!(e.contains("`k`: unknown dtype"), "{e}");
    }

    #[test]
    fn duplicate_header_keys_are_found() {
        let h = br#"{"a": {"x": 1}, "b": [], "a": 3}"#;
        assert_eq!(first_duplicate_key(h).as_deref(), Some("a"));
        assert_eq!(first_duplicate_key(br#"{"a": 1, "b": 2}"#), None);
    }
}
