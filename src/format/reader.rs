//! Reads a .bpk file. Every check here treats the file as hostile: offsets are compared with
//! the bytes present before anything is sliced, counts and lengths are capped, arithmetic is
//! checked. Opening a file ([`BpkFile::open`]) runs the structural checks (preamble, header
//! checksum, tensor table); [`super::validate`] adds the checks that read every data byte.

use std::borrow::Cow;
use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::header::{Compression, Encoding, Header, TensorEntry};
use super::{
    ALIGNMENT, FormatVersion, HEADER_PAD, MAX_HEADER_LEN, MAX_NAME_LEN, MAX_RANK, MAX_TENSORS,
    PREAMBLE_LEN, Preamble, data_offset_for,
};
use crate::fsio::FileError;
use crate::model::Role;
use crate::pack::CodeError;

/// Something wrong with a .bpk file. Offsets are absolute byte offsets in the file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(
        "the file is {len} bytes long, shorter than the {PREAMBLE_LEN}-byte preamble; it is truncated or not a .bpk file"
    )]
    TooShort { len: u64 },
    #[error(
        "bad magic {found:02x?} at byte 0: not a .bpk file (or damaged by a text-mode transfer)"
    )]
    BadMagic { found: [u8; 8] },
    #[error(
        "format version {major}.{minor} is not supported; this build reads major version {}",
        super::VERSION_MAJOR
    )]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error(
        "unknown flags {flags:#010x} at byte 12; this build knows only bits 0, 1 and 2 (written by a newer tool?)"
    )]
    UnknownFlags { flags: u32 },
    #[error("header length {header_len} (byte 16) exceeds the limit of {MAX_HEADER_LEN}")]
    HeaderTooLarge { header_len: u64 },
    #[error(
        "header of {header_len} bytes (byte 16) runs past the end of the {file_len}-byte file; the file is truncated"
    )]
    HeaderOutOfBounds { header_len: u64, file_len: u64 },
    #[error("data offset {found} (byte 24) should be {expected} for this header length")]
    DataOffset { found: u64, expected: u64 },
    #[error(
        "header checksum mismatch (bytes 32..64): the preamble or header has been altered or damaged"
    )]
    HeaderChecksum,
    #[error("header is not valid UTF-8 at byte {offset}")]
    HeaderUtf8 { offset: u64 },
    #[error("header JSON is invalid at line {line}, column {column}: {reason}")]
    HeaderJson {
        line: usize,
        column: usize,
        reason: String,
    },
    #[error("model config in the header is unusable: {reason}")]
    BadConfig { reason: String },
    #[error("quantization scheme in the header is unusable: {reason}")]
    BadScheme { reason: String },
    #[error(
        "the preamble's flag for an extended quantization scheme (bit 0 of byte 12) is {}, but the header's scheme {} one",
        if *flagged { "set" } else { "clear" },
        if *extended { "is" } else { "is not" }
    )]
    FlagMismatch { flagged: bool, extended: bool },
    #[error(
        "the preamble's flag for the t5 encoding (bit 1 of byte 12) is {}, but {} tensor uses t5",
        if *flagged { "set" } else { "clear" },
        if *uses_t5 { "a" } else { "no" }
    )]
    DenseFlagMismatch { flagged: bool, uses_t5: bool },
    #[error(
        "preamble flag bit 2 (q8_0 encoding) is {} but the header lists {} q8_0 tensor",
        if *flagged { "set" } else { "clear" },
        if *uses_q8 { "a" } else { "no" }
    )]
    BlockQ8FlagMismatch { flagged: bool, uses_q8: bool },
    #[error(
        "tensor `{name}`: row {row}, block {block} has scale {value} (a q8_0 scale must be a finite f16 >= 0)"
    )]
    BadBlockScale {
        name: String,
        row: u64,
        block: u64,
        value: f32,
    },
    #[error("non-zero byte in {region} padding at byte {offset}")]
    NonZeroPadding { region: &'static str, offset: u64 },
    #[error(
        "the file is {found} bytes long but the header describes {expected}; it is truncated or has trailing bytes"
    )]
    FileLength { expected: u64, found: u64 },
    #[error("data_len {data_len} is not a multiple of {ALIGNMENT}")]
    DataLenUnaligned { data_len: u64 },
    #[error("the header lists {count} tensors, above the limit of {MAX_TENSORS}")]
    TooManyTensors { count: usize },
    #[error("tensor name {name:?} is listed twice")]
    DuplicateName { name: String },
    #[error("tensor name {name:?} is empty or longer than {MAX_NAME_LEN} bytes")]
    BadName { name: String },
    #[error("tensor `{name}`: rank {rank} is 0 or above {MAX_RANK}, or a dimension is 0")]
    BadShape { name: String, rank: usize },
    #[error(
        "tensor `{name}`: shape {shape:?} does not suit encoding {encoding} (ternary tensors are 2-D) or overflows"
    )]
    ShapeEncoding {
        name: String,
        shape: Vec<u64>,
        encoding: &'static str,
    },
    #[error("tensor `{name}`: role {role} cannot be stored as {encoding}")]
    RoleEncoding {
        name: String,
        role: &'static str,
        encoding: &'static str,
    },
    #[error("tensor `{name}`: {encoding} tensors cannot be compressed")]
    CompressionNotAllowed {
        name: String,
        encoding: &'static str,
    },
    #[error("tensor `{name}`: offset {offset} is not a multiple of {ALIGNMENT}")]
    Misaligned { name: String, offset: u64 },
    #[error("tensor `{name}`: bytes {start}..{end} run past the data section end at {data_end}")]
    OutOfBounds {
        name: String,
        start: u64,
        end: u64,
        data_end: u64,
    },
    #[error(
        "tensor `{name}` at byte {start} overlaps or precedes the previous tensor ending at byte {previous_end}"
    )]
    Overlap {
        name: String,
        start: u64,
        previous_end: u64,
    },
    #[error("tensor `{name}`: stored length {found} should be {expected}")]
    StoredLength {
        name: String,
        expected: u64,
        found: u64,
    },
    #[error("tensor `{name}`: ternary tensors need a scale")]
    ScaleMissing { name: String },
    #[error("tensor `{name}`: only ternary tensors carry a scale")]
    ScaleUnexpected { name: String },
    #[error("tensor `{name}`: scale {value} is not a finite, positive f32")]
    BadScale { name: String, value: f64 },
    #[error("tensor `{name}`: sha256 {value:?} is not 64 lower-case hex digits")]
    BadDigest { name: String, value: String },
    #[error("tensor `{name}`: data checksum mismatch in bytes {start}..{end}")]
    DataChecksum { name: String, start: u64, end: u64 },
    #[error("tensor `{name}`: row {row}: {error}")]
    BadCode {
        name: String,
        row: u64,
        error: CodeError,
    },
    #[error(
        "tensor `{name}`: zstd data does not decompress to the {expected} bytes the shape needs: {reason}"
    )]
    Decompress {
        name: String,
        expected: u64,
        reason: String,
    },
    #[error("tensor `{name}`: element {index} is {value} (weights must be finite)")]
    NonFinite {
        name: String,
        index: u64,
        value: f32,
    },
    #[error("tensor `{name}` is missing; the model config requires it")]
    MissingTensor { name: String },
    #[error("tensor `{name}` is not part of the model the config describes")]
    UnexpectedTensor { name: String },
    #[error("tensor `{name}`: shape {found:?} but the model config implies {expected:?}")]
    ShapeVsConfig {
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("tensor `{name}`: role {found} but the model config implies {expected}")]
    RoleVsConfig {
        name: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error(
        "tensor `{name}`: block {} but the model config implies {}",
        found.map_or("none".to_string(), |l| l.to_string()),
        expected.map_or("none".to_string(), |l| l.to_string())
    )]
    LayerVsConfig {
        name: String,
        expected: Option<u64>,
        found: Option<u64>,
    },
}

/// The bytes of a file: memory-mapped from disk, read into memory (see
/// [`Storage::read_into_memory`]), or owned (tests, fuzzing).
pub enum Storage {
    Mapped(Mmap),
    /// A read-only copy in anonymous memory, backed by huge pages where the OS allows, and
    /// what identified the file when it was read.
    Memory(Mmap, Option<FileStamp>),
    Owned(Vec<u8>),
}

/// What identifies a file's contents cheaply: device, inode, length and modification time.
/// [`Storage::release`] maps a file over a copy of it only if the stamp has not changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    fn of(file: &std::fs::File) -> Option<FileStamp> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let m = file.metadata().ok()?;
            Some(FileStamp {
                dev: m.dev(),
                ino: m.ino(),
                len: m.len(),
                modified: m.modified().ok(),
            })
        }
        #[cfg(not(unix))]
        {
            let _ = file;
            None
        }
    }
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) | Storage::Memory(m, _) => m,
            Storage::Owned(v) => v,
        }
    }
}

impl Storage {
    /// Maps a file read-only.
    pub fn map(path: &Path) -> Result<Self, FormatError> {
        let io = |error| {
            FormatError::File(FileError::Io {
                path: path.to_path_buf(),
                error,
            })
        };
        let file = crate::fsio::open_regular(path)?;
        let len = file.metadata().map_err(io)?.len();
        if len < PREAMBLE_LEN as u64 {
            return Err(FormatError::TooShort { len });
        }
        // SAFETY: read-only map; we assume no other process truncates the file while we read it.
        Ok(Storage::Mapped(unsafe { Mmap::map(&file) }.map_err(io)?))
    }

    /// Reads a whole file into anonymous memory, which on Linux asks for transparent huge
    /// pages. A model run streams every weight once per decoded token: from 2 MiB pages the
    /// hardware prefetchers run on across what would be 512 page boundaries, and the TLB
    /// misses go, which decoded 2B4T-shaped models measurably faster than the page-cache
    /// mapping. Files larger than 80% of the memory the OS reports available are mapped
    /// instead (`Storage::map`), so a big model never pushes the machine into swap.
    pub fn read_into_memory(path: &Path) -> Result<Self, FormatError> {
        let io = |error| {
            FormatError::File(FileError::Io {
                path: path.to_path_buf(),
                error,
            })
        };
        let mut file = crate::fsio::open_regular(path)?;
        let len = file.metadata().map_err(io)?.len();
        if len < PREAMBLE_LEN as u64 {
            return Err(FormatError::TooShort { len });
        }
        let fits = available_memory().is_some_and(|avail| len <= avail / 5 * 4);
        let Ok(len) = usize::try_from(len) else {
            return Self::map(path);
        };
        if !fits {
            return Self::map(path);
        }
        let stamp = FileStamp::of(&file);
        let mut memory = anonymous_huge(len).map_err(io)?;
        // A file that shrank since its length was read fails here (unexpected end of file).
        read_all(&mut file, &mut memory).map_err(io)?;
        Ok(Storage::Memory(memory.make_read_only().map_err(io)?, stamp))
    }

    /// Gives back to the OS the memory behind the whole pages of `range`, where the same bytes
    /// can be read again from the file at `path` at the same offsets: an in-memory copy gets
    /// the file mapped over those pages (private, read-only), if the file there is still the
    /// one it was read from, unchanged ([`FileStamp`]); a mapping drops its resident pages.
    /// The bytes then take no memory until read, and read the same as long as the file is not
    /// changed afterwards (the contract of any mapped file). For a caller that keeps its own
    /// form of them (the runner's re-laid `t5` rows). Returns the bytes given back: 0 for an
    /// owned copy, off Linux, for a changed file, or where the OS refuses (the memory then
    /// stays as it was).
    pub fn release(&self, path: &Path, range: std::ops::Range<usize>) -> usize {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: sysconf has no preconditions.
            let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0);
            if page == 0 || range.end > self.len() {
                return 0;
            }
            let (start, end) = (range.start.next_multiple_of(page), range.end / page * page);
            if end <= start {
                return 0;
            }
            let len = end - start;
            match self {
                Storage::Mapped(m) => {
                    // SAFETY: dropping the resident pages of a read-only file mapping: later
                    // reads fault them in again from the file.
                    let r = unsafe {
                        m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
                    };
                    r.map_or(0, |()| len)
                }
                Storage::Memory(m, Some(stamp)) => remap_from_file(m, *stamp, path, start, len),
                Storage::Memory(_, None) => 0,
                Storage::Owned(_) => 0,
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (path, range);
            0
        }
    }

    /// Where the bytes live: `mapped`, `memory` or `owned`.
    pub fn kind(&self) -> &'static str {
        match self {
            Storage::Mapped(_) => "mapped",
            Storage::Memory(..) => "memory",
            Storage::Owned(_) => "owned",
        }
    }
}

/// `len` bytes (at least one) of zeroed anonymous memory, on transparent huge pages where the
/// OS allows (only a hint: without them the memory is the same): for data streamed once per
/// decoded token, where 4 KiB pages would cost a TLB miss every 64 lines and stop the hardware
/// prefetchers at every page boundary.
pub(crate) fn anonymous_huge(len: usize) -> std::io::Result<memmap2::MmapMut> {
    let memory = memmap2::MmapOptions::new().len(len.max(1)).map_anon()?;
    #[cfg(target_os = "linux")]
    {
        let _ = memory.advise(memmap2::Advice::HugePage);
    }
    Ok(memory)
}

/// [`Storage::release`] of an in-memory copy: bytes `start..start + len` (whole pages) of `m`,
/// which were read from the file at `path` at the same offsets, replaced by a private
/// read-only mapping of that file. A file at `path` whose [`FileStamp`] is not `stamp` (another
/// file, or this one changed since) leaves `m` untouched, as does a file system that cannot
/// map files: the file is mapped first wherever the OS likes, then the mapping moves onto the
/// copy's pages in one `mremap`. Returns `len`, or 0 if nothing changed.
#[cfg(target_os = "linux")]
fn remap_from_file(m: &Mmap, stamp: FileStamp, path: &Path, start: usize, len: usize) -> usize {
    use std::os::fd::AsRawFd;
    let Ok(file) = crate::fsio::open_regular(path) else {
        return 0;
    };
    let Ok(offset) = libc::off_t::try_from(start) else {
        return 0;
    };
    if FileStamp::of(&file) != Some(stamp) || stamp.len < (start + len) as u64 {
        return 0;
    }
    // SAFETY: a new private read-only mapping of the open file, where the OS picks.
    let probe = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            offset,
        )
    };
    if probe == libc::MAP_FAILED {
        return 0;
    }
    let target = m
        .as_ptr()
        .wrapping_add(start)
        .cast_mut()
        .cast::<libc::c_void>();
    // SAFETY: moves the new mapping over whole pages inside `m`'s own anonymous mapping, which
    // hold the bytes the file has at these offsets; the move unmaps the pages it replaces, and
    // `m`'s drop later unmaps its whole range, the moved pages included.
    let moved = unsafe {
        libc::mremap(
            probe,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target,
        )
    };
    if moved != libc::MAP_FAILED {
        return len;
    }
    // The move failed, perhaps after unmapping the target (out of memory mappings): map the
    // file straight over it, which reads the same bytes whether or not the copy's pages are
    // still there.
    // SAFETY: the probe mapping is still ours (it was not moved).
    unsafe { libc::munmap(probe, len) };
    // SAFETY: as for the move: whole pages inside `m`, replaced by the file's same bytes.
    let fixed = unsafe {
        libc::mmap(
            target,
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            file.as_raw_fd(),
            offset,
        )
    };
    if fixed == libc::MAP_FAILED {
        // The pages may be gone, and the model's bytes with them: nothing safe to go on with.
        eprintln!(
            "error: could not map {} back into memory ({}); stopping",
            path.display(),
            std::io::Error::last_os_error()
        );
        std::process::abort();
    }
    len
}

/// Fills `out` from the start of `file`. On Unix, pieces of 32 MiB are read in parallel on the
/// current rayon pool: the page faults of fresh (huge) pages, where the kernel zeroes and
/// may first compact memory, then run on every core.
fn read_all(file: &mut std::fs::File, out: &mut [u8]) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use rayon::prelude::*;
        use std::os::unix::fs::FileExt;
        const PIECE: usize = 32 << 20;
        let file = &*file;
        out.par_chunks_mut(PIECE)
            .enumerate()
            .try_for_each(|(i, piece)| file.read_exact_at(piece, (i * PIECE) as u64))
    }
    #[cfg(not(unix))]
    {
        use std::io::Read;
        file.read_exact(out)
    }
}

/// Bytes of memory the OS reports available (Linux `MemAvailable`), if known.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// A .bpk file whose structure has been checked.
pub struct BpkFile {
    pub path: PathBuf,
    pub preamble: Preamble,
    pub version: FormatVersion,
    pub header: Header,
    mmap: Storage,
}

/// Result of parsing the preamble and header: either fully usable, or the first fatal error
/// (nothing past it can be trusted to even be located).
pub(crate) struct Container {
    pub preamble: Preamble,
    pub version: FormatVersion,
    pub header: Header,
}

impl BpkFile {
    /// Opens a file and runs every structural check; the first failure is returned.
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        Self::from_storage(path, Storage::map(path)?)
    }

    /// Checks bytes already in memory (`path` is only used in messages).
    pub fn from_storage(path: &Path, mmap: Storage) -> Result<Self, FormatError> {
        let (container, mut problems) = parse_container(&mmap)?;
        problems.extend(check_structure(&container, &mmap));
        if let Some(first) = problems.into_iter().next() {
            return Err(first);
        }
        let Container {
            preamble,
            version,
            header,
        } = container;
        Ok(BpkFile {
            path: path.to_path_buf(),
            preamble,
            version,
            header,
            mmap,
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// Where the file's bytes live ([`Storage::kind`]).
    pub fn storage_kind(&self) -> &'static str {
        self.mmap.kind()
    }

    /// The stored bytes of a tensor of this file's table (bounds were checked at open).
    /// [`Storage::release`] of a tensor's stored bytes (the whole pages among them); returns
    /// the bytes given back.
    pub fn release(&self, e: &TensorEntry) -> usize {
        let start = (self.preamble.data_offset + e.offset) as usize;
        self.mmap
            .release(&self.path, start..start + e.length as usize)
    }

    pub fn stored(&self, e: &TensorEntry) -> &[u8] {
        let start = (self.preamble.data_offset + e.offset) as usize;
        &self.mmap[start..start + e.length as usize]
    }

    /// The uncompressed bytes of a tensor, decompressing zstd data with a cap at the size its
    /// shape implies.
    pub fn raw(&self, e: &TensorEntry) -> Result<Cow<'_, [u8]>, FormatError> {
        let stored = self.stored(e);
        let expected = e.encoding.raw_len(&e.shape).unwrap_or(0);
        match e.compression {
            Compression::None => Ok(Cow::Borrowed(stored)),
            Compression::Zstd => decompress_exact(&e.name, stored, expected).map(Cow::Owned),
        }
    }

    /// Looks a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    /// Dequantizes a tensor to f32: `scale * trit` for ternary tensors, a widening for floats.
    pub fn dequantize_f32(&self, e: &TensorEntry) -> Result<Vec<f32>, FormatError> {
        let raw = self.raw(e)?;
        let numel = e.numel().unwrap_or(0) as usize;
        let mut out = vec![0f32; numel];
        if let Some(layout) = e.encoding.ternary() {
            let scale = e.scale_f32().ok_or_else(|| FormatError::ScaleMissing {
                name: e.name.clone(),
            })?;
            let k = e.shape[1] as usize;
            let row_bytes = layout.row_bytes(k);
            let mut trits = vec![0i8; k];
            for (row, (dst, src)) in out
                .chunks_exact_mut(k)
                .zip(raw.chunks_exact(row_bytes))
                .enumerate()
            {
                layout
                    .unpack_row(src, &mut trits)
                    .map_err(|error| FormatError::BadCode {
                        name: e.name.clone(),
                        row: row as u64,
                        error,
                    })?;
                for (d, &t) in dst.iter_mut().zip(&trits) {
                    *d = scale * f32::from(t);
                }
            }
        } else if let Some(dtype) = e.encoding.float() {
            crate::num::dtype::decode_f32(dtype, &raw, &mut out);
        } else if e.encoding == Encoding::Q8 {
            let k = e.shape[1] as usize;
            for (dst, src) in out
                .chunks_exact_mut(k)
                .zip(raw.chunks_exact(crate::pack::q8::row_bytes(k)))
            {
                crate::pack::q8::dequantize_row(src, dst);
            }
        }
        Ok(out)
    }
}

/// Decompresses one zstd frame, refusing to produce more than `expected` bytes.
pub(crate) fn decompress_exact(
    name: &str,
    stored: &[u8],
    expected: u64,
) -> Result<Vec<u8>, FormatError> {
    let fail = |reason: String| FormatError::Decompress {
        name: name.to_string(),
        expected,
        reason,
    };
    let decoder = zstd::stream::read::Decoder::new(stored).map_err(|e| fail(e.to_string()))?;
    let mut out = Vec::with_capacity(expected.min(1 << 30) as usize);
    decoder
        .take(expected + 1)
        .read_to_end(&mut out)
        .map_err(|e| fail(e.to_string()))?;
    if out.len() as u64 != expected {
        return Err(fail(format!("got {} bytes", out.len())));
    }
    Ok(out)
}

/// Parses the preamble and the header JSON. Errors returned here are fatal (the rest of the file
/// cannot be located); the second value lists non-fatal problems found on the way (a checksum
/// mismatch on a header that still parses, for example).
pub(crate) fn parse_container(bytes: &[u8]) -> Result<(Container, Vec<FormatError>), FormatError> {
    let mut problems = Vec::new();
    let container = parse_container_into(bytes, &mut problems)?;
    Ok((container, problems))
}

/// [`parse_container`], collecting the non-fatal problems in `problems` (so that a caller that
/// reports everything keeps them when a fatal error follows, e.g. a checksum mismatch before a
/// header that does not parse).
pub(crate) fn parse_container_into(
    bytes: &[u8],
    problems: &mut Vec<FormatError>,
) -> Result<Container, FormatError> {
    let file_len = bytes.len() as u64;
    let pre: &[u8; PREAMBLE_LEN] = bytes
        .get(..PREAMBLE_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(FormatError::TooShort { len: file_len })?;
    let preamble = Preamble::parse(pre)?;
    let version = FormatVersion::decode(preamble.major, preamble.minor)?;
    if preamble.flags & !super::KNOWN_FLAGS != 0 {
        return Err(FormatError::UnknownFlags {
            flags: preamble.flags,
        });
    }
    let header_len = preamble.header_len;
    if header_len > MAX_HEADER_LEN {
        return Err(FormatError::HeaderTooLarge { header_len });
    }
    let header_end = PREAMBLE_LEN as u64 + header_len;
    let header_bytes = bytes
        .get(PREAMBLE_LEN..header_end as usize)
        .filter(|_| header_end <= file_len)
        .ok_or(FormatError::HeaderOutOfBounds {
            header_len,
            file_len,
        })?;
    if Preamble::compute_sha256(&preamble.head_bytes(), header_bytes) != preamble.header_sha256 {
        problems.push(FormatError::HeaderChecksum);
    }
    let expected_offset = data_offset_for(header_len).expect("header length is capped");
    if preamble.data_offset != expected_offset {
        problems.push(FormatError::DataOffset {
            found: preamble.data_offset,
            expected: expected_offset,
        });
    }
    let text = std::str::from_utf8(header_bytes).map_err(|e| FormatError::HeaderUtf8 {
        offset: PREAMBLE_LEN as u64 + e.valid_up_to() as u64,
    })?;
    let json_end = text.trim_end_matches(HEADER_PAD as char).len();
    // One JSON object with nothing before it and only spaces after it (§3).
    if !(text.starts_with('{') && text[..json_end].ends_with('}')) {
        return Err(FormatError::HeaderJson {
            line: 1,
            column: 1,
            reason:
                "the header must be one JSON object, starting at byte 64, followed only by spaces"
                    .into(),
        });
    }
    let header: Header =
        serde_json::from_str(&text[..json_end]).map_err(|e| FormatError::HeaderJson {
            line: e.line(),
            column: e.column(),
            reason: e.to_string(),
        })?;
    // The padding is all spaces by construction of `json_end`; JSON whitespace inside the text
    // other than the pad is the JSON parser's business.
    if header.tensors.len() > MAX_TENSORS {
        return Err(FormatError::TooManyTensors {
            count: header.tensors.len(),
        });
    }
    Ok(Container {
        preamble,
        version,
        header,
    })
}

/// Checks the layout the header describes against the file: lengths, padding, the tensor table.
/// Reads no tensor data (padding bytes excepted). Returns every problem found.
pub(crate) fn check_structure(c: &Container, bytes: &[u8]) -> Vec<FormatError> {
    check_structure_per_entry(c, bytes).0
}

/// [`check_structure`], plus for each table entry whether it passed every structural check
/// (sound on its own, aligned, in bounds, not overlapping an earlier entry). Only sound
/// entries have their data read by validation: an entry already reported must not cost more
/// work (a hostile table can list a million entries over the same bytes).
pub(crate) fn check_structure_per_entry(
    c: &Container,
    bytes: &[u8],
) -> (Vec<FormatError>, Vec<bool>) {
    let mut problems = Vec::new();
    let mut sound = Vec::with_capacity(c.header.tensors.len());
    if let Err(reason) = c.header.model.check_limits() {
        problems.push(FormatError::BadConfig { reason });
    } else if let Err(reason) = c.header.quantization.check(&c.header.model) {
        problems.push(FormatError::BadScheme { reason });
    }
    let flagged = c.preamble.flags & super::FLAG_EXTENDED_QUANT != 0;
    let extended = c.header.quantization.is_extended();
    if flagged != extended {
        problems.push(FormatError::FlagMismatch { flagged, extended });
    }
    let flagged = c.preamble.flags & super::FLAG_DENSE_TERNARY != 0;
    let uses_t5 = c.header.uses_dense_ternary();
    if flagged != uses_t5 {
        problems.push(FormatError::DenseFlagMismatch { flagged, uses_t5 });
    }
    let flagged = c.preamble.flags & super::FLAG_BLOCK_Q8 != 0;
    let uses_q8 = c.header.uses_block_q8();
    if flagged != uses_q8 {
        problems.push(FormatError::BlockQ8FlagMismatch { flagged, uses_q8 });
    }
    let file_len = bytes.len() as u64;
    let header_end = PREAMBLE_LEN as u64 + c.preamble.header_len;
    let data_offset = data_offset_for(c.preamble.header_len).expect("header length is capped");
    check_zero(bytes, header_end, data_offset, "header", &mut problems);

    let data_len = c.header.data_len;
    if data_len % ALIGNMENT != 0 {
        problems.push(FormatError::DataLenUnaligned { data_len });
    }
    match data_offset.checked_add(data_len) {
        Some(expected) if expected == file_len => {}
        expected => problems.push(FormatError::FileLength {
            expected: expected.unwrap_or(u64::MAX),
            found: file_len,
        }),
    }
    let data_end = data_offset.saturating_add(data_len).min(file_len);

    let mut names = HashSet::new();
    let mut previous_end = data_offset;
    for e in &c.header.tensors {
        let before = problems.len();
        check_entry(e, &mut names, &mut problems);
        if problems.len() > before {
            sound.push(false);
            continue;
        }
        let start = data_offset.saturating_add(e.offset);
        let end = start.saturating_add(e.length);
        if e.offset % ALIGNMENT != 0 {
            problems.push(FormatError::Misaligned {
                name: e.name.clone(),
                offset: start,
            });
        } else if end > data_end {
            problems.push(FormatError::OutOfBounds {
                name: e.name.clone(),
                start,
                end,
                data_end,
            });
        } else if start < previous_end {
            problems.push(FormatError::Overlap {
                name: e.name.clone(),
                start,
                previous_end,
            });
        } else {
            check_zero(bytes, previous_end, start, "inter-tensor", &mut problems);
            previous_end = end;
            sound.push(true);
            continue;
        }
        sound.push(false);
    }
    check_zero(bytes, previous_end, data_end, "trailing", &mut problems);
    (problems, sound)
}

/// Checks one table entry on its own (names, shapes, encodings, scales).
fn check_entry(e: &TensorEntry, names: &mut HashSet<String>, problems: &mut Vec<FormatError>) {
    let name = || e.name.clone();
    if e.name.is_empty() || e.name.len() > MAX_NAME_LEN {
        problems.push(FormatError::BadName { name: name() });
    }
    if !names.insert(e.name.clone()) {
        problems.push(FormatError::DuplicateName { name: name() });
    }
    if e.shape.is_empty() || e.shape.len() > MAX_RANK || e.shape.contains(&0) {
        problems.push(FormatError::BadShape {
            name: name(),
            rank: e.shape.len(),
        });
        return;
    }
    let Some(raw_len) = e.encoding.raw_len(&e.shape) else {
        problems.push(FormatError::ShapeEncoding {
            name: name(),
            shape: e.shape.clone(),
            encoding: e.encoding.as_str(),
        });
        return;
    };
    let ternary = e.encoding.ternary().is_some();
    let q8_misplaced =
        e.encoding == Encoding::Q8 && !matches!(e.role, Role::Embedding | Role::LmHead);
    if ternary != e.role.is_ternary() || q8_misplaced {
        problems.push(FormatError::RoleEncoding {
            name: name(),
            role: e.role.as_str(),
            encoding: e.encoding.as_str(),
        });
    }
    match (e.compression, ternary) {
        (Compression::None, _) if e.length != raw_len => problems.push(FormatError::StoredLength {
            name: name(),
            expected: raw_len,
            found: e.length,
        }),
        (Compression::Zstd, _) if ternary || e.encoding == Encoding::Q8 => {
            problems.push(FormatError::CompressionNotAllowed {
                name: name(),
                encoding: e.encoding.as_str(),
            })
        }
        _ => {}
    }
    match (ternary, e.scale) {
        (true, None) => problems.push(FormatError::ScaleMissing { name: name() }),
        (false, Some(_)) => problems.push(FormatError::ScaleUnexpected { name: name() }),
        (true, Some(value)) => {
            let ok = e
                .scale_f32()
                .map(|s| s.is_finite() && s > 0.0)
                .unwrap_or(false);
            if !ok {
                problems.push(FormatError::BadScale {
                    name: name(),
                    value,
                });
            }
        }
        (false, None) => {}
    }
    let hex_ok = e.sha256.len() == 64
        && e.sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex_ok {
        problems.push(FormatError::BadDigest {
            name: name(),
            value: e.sha256.clone(),
        });
    }
}

/// Reports the first non-zero byte in `bytes[from..to]` (clamped to the file).
fn check_zero(
    bytes: &[u8],
    from: u64,
    to: u64,
    region: &'static str,
    problems: &mut Vec<FormatError>,
) {
    let to = to.min(bytes.len() as u64);
    if from >= to {
        return;
    }
    if let Some(i) = bytes[from as usize..to as usize]
        .iter()
        .position(|&b| b != 0)
    {
        problems.push(FormatError::NonZeroPadding {
            region,
            offset: from + i as u64,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident bytes of the process's mappings that cover `ptr` (from `/proc/self/smaps`).
    #[cfg(target_os = "linux")]
    fn resident_kib_at(ptr: *const u8) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let addr = ptr as u64;
        let mut covering = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((a, b)) = range.split_once('-')
                && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            {
                covering = a <= addr && addr < b;
            } else if covering && let Some(rest) = line.strip_prefix("Rss:") {
                return rest.trim().trim_end_matches("kB").trim().parse().ok();
            }
        }
        None
    }

    /// Released bytes read the same afterwards, from an in-memory copy and from a mapping,
    /// for ranges that start and end inside pages, and the in-memory copy gives the pages
    /// back (the file's pages are not read until touched). An owned copy keeps its bytes.
    #[test]
    fn released_bytes_read_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let mut rng = crate::num::SplitMix64(3);
        let bytes: Vec<u8> = (0..(3 << 20) + 123).map(|_| rng.next_u64() as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let storages = [
            Storage::read_into_memory(&path).unwrap(),
            Storage::map(&path).unwrap(),
            Storage::Owned(bytes.clone()),
        ];
        for storage in storages {
            let kind = storage.kind();
            assert_eq!(&storage[..], &bytes[..], "{kind}");
            let range = 1000..(3 << 20) + 100;
            let released = storage.release(&path, range.clone());
            if cfg!(target_os = "linux") && kind != "owned" {
                assert_eq!(released, (3 << 20) - 4096, "{kind}");
            } else {
                assert_eq!(released, 0, "{kind}");
            }
            #[cfg(target_os = "linux")]
            if kind == "memory" {
                let rss = resident_kib_at(storage.as_ptr().wrapping_add(1 << 20));
                assert_eq!(rss, Some(0), "the released pages are not resident");
            }
            assert_eq!(&storage[..], &bytes[..], "{kind}: after the release");
            // Out of range, or within one page: nothing to give back.
            assert_eq!(storage.release(&path, 0..bytes.len() + 1), 0, "{kind}");
            assert_eq!(storage.release(&path, 10..4000), 0, "{kind}");
        }
    }

    /// An in-memory copy is not replaced by a file that changed since it was read, nor by
    /// another file at its path: its bytes stay the ones read.
    #[test]
    fn a_changed_file_is_not_mapped_over_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let bytes = vec![7u8; 1 << 20];
        for change in ["rewrite", "replace"] {
            std::fs::write(&path, &bytes).unwrap();
            let storage = Storage::read_into_memory(&path).unwrap();
            assert_eq!(storage.kind(), "memory");
            let other = vec![9u8; 1 << 20];
            if change == "rewrite" {
                std::thread::sleep(std::time::Duration::from_millis(20));
                std::fs::write(&path, &other).unwrap();
            } else {
                let new = dir.path().join("g.bin");
                std::fs::write(&new, &other).unwrap();
                std::fs::rename(&new, &path).unwrap();
            }
            assert_eq!(storage.release(&path, 0..bytes.len()), 0, "{change}");
            assert_eq!(&storage[..], &bytes[..], "{change}");
        }
    }
}
