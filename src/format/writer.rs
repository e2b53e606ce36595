//! Writes a .bpk file: plan the tensor table, stream tensors into a temporary file beside the
//! target, then write the preamble and header in front and rename (formats/bpk.md §6).
//!
//! The header is at the front, but the per-tensor checksums and scales are only known once the
//! data is written. So the writer reserves room for the header first: it renders the header with
//! the widest possible placeholder values, and at the end pads the real header with spaces to
//! that length. Nothing in the output depends on timing or thread count.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::header::{Compression, Encoding, Header, Provenance, QuantScheme, TensorEntry};
use super::{
    ALIGNMENT, HEADER_PAD, MAX_HEADER_LEN, PREAMBLE_LEN, Preamble, VERSION_MAJOR, VERSION_MINOR,
    align_up, data_offset_for,
};
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

/// Counts and hashes the bytes of one tensor as they are written.
pub struct TensorSink<'a> {
    out: &'a mut BufWriter<File>,
    hasher: Sha256,
    written: u64,
}

impl Write for TensorSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A .bpk file being written.
pub struct BpkWriter {
    tmp: Option<AtomicFile>,
    out: BufWriter<File>,
    header: Header,
    plans: Vec<TensorPlan>,
    next: usize,
    /// Write position relative to the start of the data section.
    pos: u64,
    header_len: u64,
    data_offset: u64,
}

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
        Ok(BpkWriter {
            tmp: Some(tmp),
            out,
            header,
            plans,
            next: 0,
            pos: 0,
            header_len,
            data_offset,
        })
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
        let Some(plan) = self.plans.get(self.next).cloned() else {
            return Err(WriteError::Internal {
                name: String::new(),
                problem: "is beyond the plan".into(),
            });
        };
        let start = align_up(self.pos).expect("data section fits in u64");
        self.pad_to(start)?;
        let mut sink = TensorSink {
            out: &mut self.out,
            hasher: Sha256::new(),
            written: 0,
        };
        write(&mut sink)?;
        let (written, digest) = (sink.written, sink.hasher.finalize());
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
        entry.sha256 = crate::num::digest::hex(&digest);
        self.pos = start + written;
        self.next += 1;
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

        let mut file = self.out.into_inner().map_err(|e| e.into_error())?;
        let expected_len = self.data_offset + data_len;
        let end = file.stream_position()?;
        if end != expected_len {
            return Err(WriteError::Internal {
                name: String::new(),
                problem: format!("file ends at {end}, planned {expected_len}"),
            });
        }
        file.seek(SeekFrom::Start(0))?;
        let mut front = BufWriter::new(&mut file);
        front.write_all(&preamble.to_bytes())?;
        front.write_all(&header_bytes)?;
        let gap = self.data_offset - PREAMBLE_LEN as u64 - self.header_len;
        front.write_all(&vec![0u8; gap as usize])?;
        front.flush()?;
        drop(front);
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
