//! A streaming safetensors writer: the header is planned from names, dtypes and shapes, then
//! each tensor's bytes are written in order into an [`AtomicFile`] beside the target, so that
//! memory stays at one tensor and a failure or an interruption leaves nothing at the target.
//!
//! Layout (the safetensors format): an 8-byte little-endian header length `N`, `N` bytes of
//! JSON (`{"__metadata__": {...}, "<name>": {"dtype", "shape", "data_offsets": [begin, end]}}`,
//! padded with spaces to a multiple of 8), then the tensors back to back in the order given.
//! The output is read back by the `safetensors` crate in the tests.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::fsio::{AtomicFile, FileError};

/// A tensor to be written: its name, safetensors dtype name (`F32`, `BF16`, `U8`, ...),
/// element size in bytes and shape.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: &'static str,
    pub elem_size: usize,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.elem_size
    }
}

/// Why a safetensors file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StWriteError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: write failed: {error}")]
    Io {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("internal error: tensor `{name}` wrote {written} bytes, planned {planned}")]
    Length {
        name: String,
        written: usize,
        planned: usize,
    },
}

/// Counts the bytes written through it.
struct Counting<'w> {
    inner: &'w mut dyn Write,
    written: usize,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `tensors` to `target` with `metadata`; `data(i, out)` writes the bytes of tensor `i`
/// (in as many pieces as it likes: a tensor need not be in memory at once).
pub fn write_safetensors(
    target: &Path,
    force: bool,
    metadata: &BTreeMap<String, String>,
    tensors: &[PlannedTensor],
    mut data: impl FnMut(usize, &mut dyn Write) -> std::io::Result<()>,
) -> Result<(), StWriteError> {
    let io = |error| StWriteError::Io {
        path: target.to_path_buf(),
        error,
    };
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(|e| io(e.into()))?,
        );
    }
    let mut offset = 0usize;
    for t in tensors {
        let end = offset + t.bytes();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text =
        serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| io(e.into()))?;
    text.resize(text.len().div_ceil(8) * 8, b' ');

    let mut file = AtomicFile::create(target, force)?;
    {
        let mut out = BufWriter::with_capacity(8 << 20, file.file_mut());
        out.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&text).map_err(io)?;
        for (i, t) in tensors.iter().enumerate() {
            let mut counting = Counting {
                inner: &mut out,
                written: 0,
            };
            data(i, &mut counting).map_err(io)?;
            if counting.written != t.bytes() {
                return Err(StWriteError::Length {
                    name: t.name.clone(),
                    written: counting.written,
                    planned: t.bytes(),
                });
            }
        }
        out.flush().map_err(io)?;
    }
    file.persist()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_safetensors_crate_reads_what_we_write() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t.safetensors");
        let tensors = vec![
            PlannedTensor {
                name: "b".into(),
                dtype: "F32",
                elem_size: 4,
                shape: vec![2, 3],
            },
            PlannedTensor {
                name: "a".into(),
                dtype: "BF16",
                elem_size: 2,
                shape: vec![5],
            },
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&target, false, &meta, &tensors, |i, out| {
            let bytes: Vec<u8> = (0..tensors[i].bytes()).map(|b| (b + i) as u8).collect();
            // In two pieces, as a streaming producer would.
            out.write_all(&bytes[..3])?;
            out.write_all(&bytes[3..])
        })
        .unwrap();
        let bytes = std::fs::read(&target).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let b = st.tensor("b").unwrap();
        assert_eq!(b.shape(), &[2, 3]);
        assert_eq!(b.dtype(), safetensors::Dtype::F32);
        assert_eq!(b.data(), (0..24).map(|x| x as u8).collect::<Vec<_>>());
        let a = st.tensor("a").unwrap();
        assert_eq!(a.data(), (0..10).map(|x| (x + 1) as u8).collect::<Vec<_>>());
        let (_, meta_read) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta_read
                .metadata()
                .as_ref()
                .unwrap()
                .get("format")
                .unwrap(),
            "pt"
        );
        // A failing tensor leaves nothing behind.
        let bad = dir.path().join("bad.safetensors");
        assert!(
            write_safetensors(&bad, false, &meta, &tensors, |_, _| Err(
                std::io::Error::other("no")
            ))
            .is_err()
        );
        assert!(!bad.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
