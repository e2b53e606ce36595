//! Writes a .bpk file: plan the tensor table, stream tensors into a temporary file beside the
//! target, then write the preamble and header in front and rename (formats/bpk.md §6).
//!
//! The header is at the front, but the per-tensor checksums and scales are only known once the
//! data is written. So the writer reserves room for the header first: it renders the header with
//! the widest possible placeholder values, and at the end pads the real header with spaces to
//! that length. Nothing in the output depends on timing or thread count.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::header::{Compression, Encoding, Header, Provenance, QuantScheme, TensorEntry};
use super::{
    ALIGNMENT, HEADER_PAD, MAX_HEADER_LEN, Preamble, VERSION_MAJOR, VERSION_MINOR, align_up,
    data_offset_for,
};
use crate::fsio::direct::DirectWriter;
use crate::fsio::{AtomicFile, FileError, check_output};
use crate::model::{ModelConfig, Role};

/// A tensor the writer will be given, in file order.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    pub role: Role,
    pub layer: Option<u32>,
    pub encoding: Encoding,
    pub shape: Vec<u64>,
    pub compression: Compression,
}

/// Writing failed; the target is untouched.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("write failed: {0}")]
    Io(io::Error),
    #[error("the header would be {len} bytes, above the limit of {MAX_HEADER_LEN}")]
    HeaderTooLarge { len: u64 },
    #[error("internal error: tensor `{name}` {problem}")]
    Internal { name: String, problem: String },
}

// Not `#[from]`: the message includes the I/O error, so it must not also be its `source()`
// (a chain printer would repeat it).
impl From<io::Error> for WriteError {
    fn from(e: io::Error) -> Self {
        WriteError::Io(e)
    }
}

/// Time the writer spent hashing and writing tensor data (summed over the threads that did it),
/// for `convert --timings`.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterTimes {
    /// SHA-256 of the stored bytes.
    pub hash: Duration,
    /// Handing the bytes to the file (copies into the page cache, early writeback requests).
    pub write: Duration,
}

/// Counts and hashes the bytes of one tensor as they are written.
pub struct TensorSink<'a> {
    out: &'a mut DataOut,
    hasher: Sha256,
    written: u64,
    times: &'a mut WriterTimes,
}

impl Write for TensorSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = Instant::now();
        let n = self.out.write(buf)?;
        let t2 = Instant::now();
        self.hasher.update(&buf[..n]);
        self.times.write += t2 - t;
        self.times.hash += t2.elapsed();
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        let t = Instant::now();
        let r = self.out.flush();
        self.times.write += t.elapsed();
        r
    }
}

/// Where the data section goes: through the page cache, or around it ([`BpkWriter::to_disk`]).
enum DataOut {
    Buffered(BufWriter<File>),
    Direct(DirectWriter),
}

impl Write for DataOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            DataOut::Buffered(b) => b.write(buf),
            DataOut::Direct(d) => d.write(buf),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            DataOut::Buffered(b) => b.write_all(buf),
            DataOut::Direct(d) => d.write_all(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            DataOut::Buffered(b) => b.flush(),
            DataOut::Direct(d) => d.flush(),
        }
    }
}

/// How [`BpkWriter::to_disk`] sends the data to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskMode {
    /// Direct I/O, around the page cache.
    Direct,
    /// Through the page cache, with writeback started early.
    Writeback,
}

/// A .bpk file being written.
pub struct BpkWriter {
    /// Declared before `tmp` so that it drops first: a direct-I/O writer stops and joins its
    /// thread before the temporary file is removed.
    out: DataOut,
    tmp: Option<AtomicFile>,
    header: Header,
    plans: Vec<TensorPlan>,
    next: usize,
    /// Write position relative to the start of the data section.
    pos: u64,
    header_len: u64,
    data_offset: u64,
    /// Data-section position up to which early writeback has been requested.
    written_back: u64,
    /// Whether [`BpkWriter::to_disk`] asked for the data to go to disk as it is written.
    to_disk: bool,
    times: WriterTimes,
    /// Tensors written without their digest ([`BpkWriter::write_tensor_bytes_digest_later`]):
    /// name and index, until [`BpkWriter::set_digest`].
    deferred: Vec<(String, usize)>,
}

/// Dirty data after which the writer asks the kernel to start writing it to disk, so that the
/// final `fsync` finds little left to do (Linux only; elsewhere it all waits for the `fsync`).
const WRITEBACK_STEP: u64 = 64 << 20;

/// Widest decimal an f32 scale can take in the header (`-1.2345678901234567e-300` is wider than
/// any f32 value printed as the shortest f64 that round-trips).
const PLACEHOLDER_SCALE: f64 = -1.234_567_890_123_456_7e-300;
/// Hex digits of a SHA-256.
const SHA256_HEX: usize = 64;

fn placeholder_entry(p: &TensorPlan) -> TensorEntry {
    TensorEntry {
        name: p.name.clone(),
        role: p.role,
        layer: p.layer,
        encoding: p.encoding,
        shape: p.shape.clone(),
        scale: p.encoding.ternary().map(|_| PLACEHOLDER_SCALE),
        offset: u64::MAX,
        length: u64::MAX,
        compression: p.compression,
        sha256: "f".repeat(SHA256_HEX),
    }
}

impl BpkWriter {
    /// Starts a file at `target`. `provenance` may hold placeholder checksums of the right width
    /// (64 hex digits); the final one is given to [`BpkWriter::finish`].
    pub fn create(
        target: &Path,
        force: bool,
        model: ModelConfig,
        quantization: QuantScheme,
        provenance: Provenance,
        plans: Vec<TensorPlan>,
    ) -> Result<Self, WriteError> {
        check_output(target, force, &[])?;
        let tmp = AtomicFile::create(target, force)?;
        let file = tmp.file().try_clone()?;

        let header = Header {
            model,
            quantization,
            tensors: plans.iter().map(placeholder_entry).collect(),
            data_len: u64::MAX,
            provenance,
        };
        let header_len = serde_json::to_vec(&header).map_err(io::Error::other)?.len() as u64;
        if header_len > MAX_HEADER_LEN {
            return Err(WriteError::HeaderTooLarge { len: header_len });
        }
        let data_offset = data_offset_for(header_len).expect("header length is capped");
        let mut out = BufWriter::with_capacity(8 << 20, file);
        out.seek(SeekFrom::Start(data_offset))?;
        let out = DataOut::Buffered(out);
        Ok(BpkWriter {
            tmp: Some(tmp),
            out,
            header,
            plans,
            next: 0,
            pos: 0,
            header_len,
            data_offset,
            written_back: 0,
            to_disk: false,
            times: WriterTimes::default(),
            deferred: Vec::new(),
        })
    }

    /// Declares that the file will be persisted (and so flushed to disk): its data then goes
    /// to disk as it is written, by direct I/O where the file system takes it ([`DirectWriter`],
    /// no page-cache copy), else through the page cache with writeback requested every
    /// [`WRITEBACK_STEP`] bytes, so that the `fsync` at the end has little left to do. Call it
    /// before the first tensor; the file is the same either way. Not for a file that is read
    /// back at once and never persisted, which is better left in the page cache.
    pub fn to_disk(&mut self) -> Result<DiskMode, WriteError> {
        if self.next != 0 || self.pos != 0 {
            return Err(WriteError::Internal {
                name: String::new(),
                problem: "to_disk after the first tensor".into(),
            });
        }
        self.to_disk = true;
        if let DataOut::Buffered(b) = &mut self.out {
            b.flush()?;
            let tmp = self.tmp.as_ref().expect("present until finish");
            if let Some(d) = DirectWriter::create(tmp.temp_path(), tmp.file(), self.data_offset) {
                self.out = DataOut::Direct(d);
            }
        }
        Ok(self.disk_mode())
    }

    /// How the data goes to disk, once [`BpkWriter::to_disk`] was called: direct I/O can fall
    /// back to the page cache on its first write, so ask after the data is written.
    pub fn disk_mode(&self) -> DiskMode {
        match &self.out {
            DataOut::Direct(d) if d.is_direct() => DiskMode::Direct,
            _ => DiskMode::Writeback,
        }
    }

    /// Time spent so far hashing and writing tensor data.
    pub fn times(&self) -> WriterTimes {
        self.times
    }

    /// The plan of the next tensor to write, if any.
    pub fn next_plan(&self) -> Option<&TensorPlan> {
        self.plans.get(self.next)
    }

    /// Writes the next tensor in plan order. `write` streams the stored bytes into the sink;
    /// `scale` is the dequantization scale of a ternary tensor.
    pub fn write_tensor(
        &mut self,
        scale: Option<f32>,
        write: impl FnOnce(&mut TensorSink<'_>) -> io::Result<()>,
    ) -> Result<(), WriteError> {
        let start = self.begin_tensor()?;
        let mut sink = TensorSink {
            out: &mut self.out,
            hasher: Sha256::new(),
            written: 0,
            times: &mut self.times,
        };
        write(&mut sink)?;
        let (written, digest) = (sink.written, sink.hasher.finalize());
        self.end_tensor(scale, start, written, &digest)
    }

    /// Writes the next tensor in plan order from bytes already in memory: its SHA-256 is
    /// computed on another rayon task while the bytes are written, so the two overlap when a
    /// worker is free (the result is the same as [`BpkWriter::write_tensor`]'s).
    pub fn write_tensor_bytes(
        &mut self,
        scale: Option<f32>,
        bytes: &[u8],
    ) -> Result<(), WriteError> {
        let start = self.begin_tensor()?;
        let out = &mut self.out;
        let ((digest, hash_time), (written, write_time)) = rayon::join(
            || {
                let t = Instant::now();
                let d = Sha256::digest(bytes);
                (d, t.elapsed())
            },
            || {
                let t = Instant::now();
                let r = out.write_all(bytes);
                (r, t.elapsed())
            },
        );
        self.times.hash += hash_time;
        self.times.write += write_time;
        written?;
        self.end_tensor(scale, start, bytes.len() as u64, &digest)
    }

    /// Writes the next tensor in plan order from bytes already in memory, without hashing
    /// them: the caller computes their SHA-256 elsewhere (a conversion, in a free lane of the
    /// source's hashing) and gives it to [`BpkWriter::set_digest`] before
    /// [`BpkWriter::finish`], which refuses to write a header with a digest missing.
    pub fn write_tensor_bytes_digest_later(
        &mut self,
        scale: Option<f32>,
        bytes: &[u8],
    ) -> Result<(), WriteError> {
        let start = self.begin_tensor()?;
        let t = Instant::now();
        let written = self.out.write_all(bytes);
        self.times.write += t.elapsed();
        written?;
        let index = self.next;
        self.deferred.push((self.plans[index].name.clone(), index));
        self.end_tensor(scale, start, bytes.len() as u64, &[])
    }

    /// The SHA-256 of a tensor written by [`BpkWriter::write_tensor_bytes_digest_later`].
    /// `digest` is lower-case hex.
    pub fn set_digest(&mut self, name: &str, digest: String) -> Result<(), WriteError> {
        let found = self.deferred.iter().position(|(n, _)| n == name);
        let Some(at) = found.filter(|_| digest.len() == SHA256_HEX) else {
            return Err(WriteError::Internal {
                name: name.to_string(),
                problem: "has no digest to be set".into(),
            });
        };
        let (_, index) = self.deferred.swap_remove(at);
        self.header.tensors[index].sha256 = digest;
        Ok(())
    }

    /// Pads to the next tensor's offset; returns it.
    fn begin_tensor(&mut self) -> Result<u64, WriteError> {
        if self.next >= self.plans.len() {
            return Err(WriteError::Internal {
                name: String::new(),
                problem: "is beyond the plan".into(),
            });
        }
        let start = align_up(self.pos).expect("data section fits in u64");
        self.pad_to(start)?;
        Ok(start)
    }

    /// Checks and records the tensor just written at `start`.
    fn end_tensor(
        &mut self,
        scale: Option<f32>,
        start: u64,
        written: u64,
        digest: &[u8],
    ) -> Result<(), WriteError> {
        let plan = &self.plans[self.next];
        if plan.compression == Compression::None
            && Some(written) != plan.encoding.raw_len(&plan.shape)
        {
            return Err(WriteError::Internal {
                name: plan.name.clone(),
                problem: format!(
                    "wrote {written} bytes, expected {:?}",
                    plan.encoding.raw_len(&plan.shape)
                ),
            });
        }
        if plan.encoding.ternary().is_some() != scale.is_some() {
            return Err(WriteError::Internal {
                name: plan.name.clone(),
                problem: "has a scale mismatch".into(),
            });
        }
        let entry = &mut self.header.tensors[self.next];
        entry.scale = scale.map(f64::from);
        entry.offset = start;
        entry.length = written;
        entry.sha256 = crate::num::digest::hex(digest);
        self.pos = start + written;
        self.next += 1;
        if self.to_disk && self.pos - self.written_back >= WRITEBACK_STEP {
            let t = Instant::now();
            self.write_back()?;
            self.times.write += t.elapsed();
        }
        Ok(())
    }

    /// Asks the kernel to start writing what has been written so far to disk, without waiting
    /// for it: the `fsync` at the end then finds most of the file on disk already.
    fn write_back(&mut self) -> io::Result<()> {
        if let DataOut::Buffered(out) = &mut self.out {
            out.flush()?;
            #[cfg(target_os = "linux")]
            {
                use std::os::fd::AsRawFd;
                let from = self.data_offset + self.written_back;
                let len = self.pos - self.written_back;
                // SAFETY: a plain system call on a file descriptor we own; it only starts I/O.
                // Failure is harmless (the fsync at the end writes everything anyway).
                unsafe {
                    libc::sync_file_range(
                        out.get_ref().as_raw_fd(),
                        from as libc::off64_t,
                        len as libc::off64_t,
                        libc::SYNC_FILE_RANGE_WRITE,
                    );
                }
            }
        }
        self.written_back = self.pos;
        Ok(())
    }

    fn pad_to(&mut self, to: u64) -> io::Result<()> {
        const ZEROS: [u8; ALIGNMENT as usize] = [0; ALIGNMENT as usize];
        let n = (to - self.pos) as usize;
        self.out.write_all(&ZEROS[..n])?;
        self.pos = to;
        Ok(())
    }

    /// Writes the header and checks the layout. The file stays at its temporary path until
    /// [`Finished::persist`].
    pub fn finish(mut self, provenance: Provenance) -> Result<Finished, WriteError> {
        if self.next != self.plans.len() {
            let name = self.plans[self.next].name.clone();
            return Err(WriteError::Internal {
                name,
                problem: "was never written".into(),
            });
        }
        if let Some((name, _)) = self.deferred.first() {
            return Err(WriteError::Internal {
                name: name.clone(),
                problem: "was written without its digest, which never came".into(),
            });
        }
        let data_len = align_up(self.pos).expect("data section fits in u64");
        self.pad_to(data_len)?;
        self.header.data_len = data_len;
        self.header.provenance = provenance;

        let mut header_bytes = serde_json::to_vec(&self.header).map_err(io::Error::other)?;
        if header_bytes.len() as u64 > self.header_len {
            return Err(WriteError::Internal {
                name: String::new(),
                problem: format!(
                    "header grew to {} bytes beyond its reserved {}",
                    header_bytes.len(),
                    self.header_len
                ),
            });
        }
        header_bytes.resize(self.header_len as usize, HEADER_PAD);
        let mut preamble = Preamble {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
            flags: self.header.flags(),
            header_len: self.header_len,
            data_offset: self.data_offset,
            header_sha256: [0; 32],
        };
        preamble.header_sha256 = Preamble::compute_sha256(&preamble.head_bytes(), &header_bytes);

        let expected_len = self.data_offset + data_len;
        let (file, end) = match self.out {
            DataOut::Buffered(out) => {
                let mut file = out.into_inner().map_err(|e| e.into_error())?;
                let end = file.stream_position()?;
                (file, end)
            }
            DataOut::Direct(d) => {
                let end = d.finish()?;
                let tmp = self.tmp.as_ref().expect("present until finish");
                (tmp.file().try_clone()?, end)
            }
        };
        if end != expected_len {
            return Err(WriteError::Internal {
                name: String::new(),
                problem: format!("file ends at {end}, planned {expected_len}"),
            });
        }
        // The front: preamble, header, zeros up to the data section.
        let mut front = Vec::with_capacity(self.data_offset as usize);
        front.extend_from_slice(&preamble.to_bytes());
        front.extend_from_slice(&header_bytes);
        front.resize(self.data_offset as usize, 0);
        file.write_all_at(&front, 0)?;
        drop(file);

        let tmp = self.tmp.take().expect("temp file is present until finish");
        Ok(Finished {
            tmp,
            header: self.header,
            len: expected_len,
        })
    }
}

/// A complete file still at its temporary path beside the target: check it, then
/// [`Finished::persist`] it (dropping it instead deletes it).
pub struct Finished {
    tmp: AtomicFile,
    pub header: Header,
    pub len: u64,
}

impl Finished {
    /// Where the finished file is until it is persisted.
    pub fn temp_path(&self) -> &Path {
        self.tmp.temp_path()
    }

    /// Renames the file onto the target (refusing to replace an existing file without force).
    pub fn persist(self) -> Result<(Header, u64), WriteError> {
        self.tmp.persist()?;
        Ok((self.header, self.len))
    }
}
