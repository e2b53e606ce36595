//! Digests: SHA-256 of files (as model hubs publish them) and lower-case hex.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};

use crate::fsio::{self, FileError};

/// SHA-256 of a file, as lower-case hex.
///
/// Large files are hashed through read-only memory maps of 64 MiB windows, one at a time: that
/// saves copying every byte into a buffer (a sixth of a conversion's CPU time on a 5 GB
/// checkpoint) while keeping at most one window resident. Small files, and files that cannot
/// be mapped, are read.
pub fn sha256_file(path: &Path) -> Result<String, FileError> {
    let never = AtomicBool::new(false);
    Ok(sha256_file_unless(path, &never)?.expect("never cancelled"))
}

/// [`sha256_file`], giving up (`Ok(None)`) once `cancel` is set: it is checked before each
/// window or read, so a hash nobody needs any more stops within a window's time.
pub fn sha256_file_unless(path: &Path, cancel: &AtomicBool) -> Result<Option<String>, FileError> {
    const WINDOW: u64 = 64 << 20;
    let mut file = fsio::open_regular(path)?;
    let mut hasher = Sha256::new();
    let len = file
        .metadata()
        .map_err(|error| FileError::Io {
            path: path.to_path_buf(),
            error,
        })?
        .len();
    if len >= WINDOW {
        let mut offset = 0;
        while offset < len {
            if cancel.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let n = WINDOW.min(len - offset);
            // SAFETY: a read-only private map of a range of the file; as for the checkpoint's
            // own maps, the file must not be truncated while it is read.
            let map = unsafe {
                memmap2::MmapOptions::new()
                    .offset(offset)
                    .len(n as usize)
                    .map(&file)
            };
            let Ok(map) = map else { break };
            #[cfg(unix)]
            let _ = map.advise(memmap2::Advice::Sequential);
            hasher.update(&map[..]);
            offset += n;
        }
        if offset == len {
            return Ok(Some(hex(&hasher.finalize())));
        }
        // Mapping failed part way: start over by reading.
        hasher = Sha256::new();
        file = fsio::open_regular(path)?;
    }
    let mut buf = vec![0u8; 4 << 20];
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = file.read(&mut buf).map_err(|error| FileError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Some(hex(&hasher.finalize())))
}

/// Lower-case hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files above one mapping window are hashed window by window; small ones are read. Both
    /// must give the digest of the whole content (expected digests computed with Python hashlib).
    #[test]
    fn file_hashes_cross_window_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        // 64 MiB + 3 bytes of 0x61 ('a'): two windows, the second of 3 bytes.
        std::fs::write(&big, vec![b'a'; (64 << 20) + 3]).unwrap();
        assert_eq!(
            sha256_file(&big).unwrap(),
            "2cf9517c599eae1e7c8bf849ce6ddc7567fa5f3b39d3157b578157d710b749a3"
        );
        let small = dir.path().join("small");
        std::fs::write(&small, b"abc").unwrap();
        assert_eq!(
            sha256_file(&small).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let cancelled = AtomicBool::new(true);
        assert_eq!(sha256_file_unless(&big, &cancelled).unwrap(), None);
        assert_eq!(sha256_file_unless(&small, &cancelled).unwrap(), None);
    }
}
