//! Digests: SHA-256 of files (as model hubs publish them) and lower-case hex.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};

use super::sha256x8;
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

/// Files of at least this many bytes go through the eight-lane kernel; smaller ones, whose
/// hashing takes no time, are hashed on their own.
const MULTI_MIN_LEN: u64 = 1 << 20;

/// Bytes of a file mapped at a time per lane of [`sha256_files_unless`]: eight lanes keep at
/// most 64 MiB of the source mapped. A multiple of 64, so no block straddles two windows.
const MULTI_WINDOW: u64 = 8 << 20;

/// One file being hashed in a lane of [`sha256_files_unless`].
struct Stream {
    index: usize,
    path: std::path::PathBuf,
    file: std::fs::File,
    len: u64,
    /// Bytes compressed so far (a multiple of 64).
    done: u64,
    state: [u32; 8],
    /// The mapped window holding byte `done`, and the file offset where it starts.
    window: Option<(memmap2::Mmap, u64)>,
}

impl Stream {
    /// Maps the window that holds byte `done`, if the current one does not.
    fn ensure_window(&mut self, window: u64) -> std::io::Result<()> {
        if let Some((map, start)) = &self.window
            && self.done - start < map.len() as u64
        {
            return Ok(());
        }
        self.window = None;
        let start = self.done / window * window;
        let n = window.min(self.len - start) as usize;
        // SAFETY: a read-only private map of a range of the file; as for the checkpoint's own
        // maps, the file must not be truncated while it is read.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(start)
                .len(n)
                .map(&self.file)?
        };
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Sequential);
        self.window = Some((map, start));
        Ok(())
    }

    /// The bytes from `done` to the end of the mapped window.
    fn ahead(&self) -> &[u8] {
        let (map, start) = self.window.as_ref().expect("a window is mapped");
        &map[(self.done - start) as usize..]
    }

    /// Pads and compresses the last bytes (fewer than 64, read from the file); the digest.
    fn finish(mut self) -> Result<String, FileError> {
        use std::io::{Seek, SeekFrom};
        let n = (self.len - self.done) as usize;
        let mut last = [0u8; 128];
        let read = self
            .file
            .seek(SeekFrom::Start(self.done))
            .and_then(|_| self.file.read_exact(&mut last[..n]));
        read.map_err(|error| FileError::Io {
            path: self.path.clone(),
            error,
        })?;
        last[n] = 0x80;
        let end = if n < 56 { 64 } else { 128 };
        last[end - 8..end].copy_from_slice(&self.len.wrapping_mul(8).to_be_bytes());
        compress_one(&mut self.state, &last[..end]);
        let mut digest = [0u8; 32];
        for (d, w) in digest.chunks_exact_mut(4).zip(self.state) {
            d.copy_from_slice(&w.to_be_bytes());
        }
        Ok(hex(&digest))
    }
}

/// The `sha2` crate's compression function (SHA extensions where the CPU has them) on whole
/// 64-byte blocks, copied 32 at a time into the array type it takes.
fn compress_one(state: &mut [u32; 8], blocks: &[u8]) {
    use sha2::digest::generic_array::GenericArray;
    let mut buf = [GenericArray::<u8, sha2::digest::consts::U64>::default(); 32];
    for chunk in blocks.chunks(32 * 64) {
        let n = chunk.len() / 64;
        for (b, src) in buf.iter_mut().zip(chunk.chunks_exact(64)) {
            b.copy_from_slice(src);
        }
        sha2::compress256(state, &buf[..n]);
    }
}

/// SHA-256 of several files, as lower-case hex, each reported through `done(i, digest)` (`i`
/// indexes `paths`) as soon as it is known. Files are taken in order from `next`, a counter
/// that several calls may share to split the files between workers.
///
/// Where [`sha256x8::available`], up to eight large files are hashed at once, one per lane of
/// the multi-buffer kernel, a lane taking the next file as soon as its own is done: about 1.6
/// times the bytes per second of the SHA extensions hashing one file. Elsewhere, or with a
/// single file left, each file is hashed on its own ([`sha256_file_unless`]).
///
/// Once `cancel` is set, the files not finished get `Ok(None)`, within one window's time.
pub fn sha256_files_unless(
    paths: &[&Path],
    next: &std::sync::atomic::AtomicUsize,
    cancel: &AtomicBool,
    done: &mut dyn FnMut(usize, Result<Option<String>, FileError>),
) {
    sha256_files_with(paths, next, cancel, done, MULTI_MIN_LEN, MULTI_WINDOW);
}

/// [`sha256_files_unless`] with its two sizes as parameters (tests use small ones); `window`
/// must be a multiple of 64 and of the page size.
fn sha256_files_with(
    paths: &[&Path],
    next: &std::sync::atomic::AtomicUsize,
    cancel: &AtomicBool,
    done: &mut dyn FnMut(usize, Result<Option<String>, FileError>),
    min_len: u64,
    window: u64,
) {
    let take = || {
        let i = next.fetch_add(1, Ordering::Relaxed);
        (i < paths.len()).then_some(i)
    };
    if !sha256x8::available() {
        while let Some(i) = take() {
            done(i, sha256_file_unless(paths[i], cancel));
        }
        return;
    }
    let mut lanes: Vec<Stream> = Vec::with_capacity(8);
    let mut exhausted = false;
    loop {
        while lanes.len() < 8 && !exhausted {
            let Some(i) = take() else {
                exhausted = true;
                break;
            };
            let path = paths[i];
            let opened = fsio::open_regular(path).and_then(|file| {
                let len = file
                    .metadata()
                    .map_err(|error| FileError::Io {
                        path: path.to_path_buf(),
                        error,
                    })?
                    .len();
                Ok((file, len))
            });
            match opened {
                Err(e) => done(i, Err(e)),
                Ok((_, len)) if len < min_len => done(i, sha256_file_unless(path, cancel)),
                Ok((file, len)) => lanes.push(Stream {
                    index: i,
                    path: path.to_path_buf(),
                    file,
                    len,
                    done: 0,
                    state: sha256x8::IV,
                    window: None,
                }),
            }
        }
        if lanes.is_empty() {
            return;
        }
        if cancel.load(Ordering::Relaxed) {
            for s in lanes.drain(..) {
                done(s.index, Ok(None));
            }
            while let Some(i) = take() {
                done(i, Ok(None));
            }
            return;
        }
        // A file that cannot be mapped is read instead, on its own.
        let mut k = 0;
        while k < lanes.len() {
            if lanes[k].ensure_window(window).is_err() {
                let s = lanes.swap_remove(k);
                done(s.index, sha256_file_unless(&s.path, cancel));
            } else {
                k += 1;
            }
        }
        if lanes.is_empty() {
            continue;
        }
        let blocks = lanes
            .iter()
            .map(|s| s.ahead().len() / 64)
            .min()
            .unwrap_or(0);
        if lanes.len() == 1 {
            let s = &mut lanes[0];
            let (map, start) = s.window.as_ref().expect("a window is mapped");
            let at = (s.done - start) as usize;
            compress_one(&mut s.state, &map[at..at + blocks * 64]);
        } else {
            static IDLE: [u8; 64] = [0; 64];
            let mut states = [sha256x8::IV; 8];
            for (st, s) in states.iter_mut().zip(&lanes) {
                *st = s.state;
            }
            let views: [sha256x8::Lane<'_>; 8] = std::array::from_fn(|l| match lanes.get(l) {
                Some(s) => sha256x8::Lane {
                    data: s.ahead(),
                    step: 64,
                },
                None => sha256x8::Lane {
                    data: &IDLE,
                    step: 0,
                },
            });
            sha256x8::compress8(&mut states, &views, blocks);
            for (s, st) in lanes.iter_mut().zip(states) {
                s.state = st;
            }
        }
        let mut k = 0;
        while k < lanes.len() {
            let s = &mut lanes[k];
            s.done += blocks as u64 * 64;
            if s.len - s.done < 64 {
                let s = lanes.swap_remove(k);
                done(s.index, s.finish().map(Some));
            } else {
                k += 1;
            }
        }
    }
}

/// Lower-case hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

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

    /// Many files of lengths around the padding and window boundaries, more files than lanes,
    /// two workers sharing the queue, one missing file: every digest is the `sha2` crate's.
    #[test]
    fn several_files_hash_as_one_at_a_time() {
        use sha2::Digest;
        use std::sync::atomic::AtomicUsize;
        let dir = tempfile::tempdir().unwrap();
        let window = 4096u64;
        let mut lens: Vec<u64> = vec![0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 200];
        for base in [window, 3 * window] {
            for r in [0, 10, 55, 56, 63, 64, 100] {
                lens.push(base + r);
            }
        }
        lens.push(5 * window - 1);
        let mut rng = crate::num::SplitMix64(11);
        let mut paths = Vec::new();
        let mut expected = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            let path = dir.path().join(format!("f{i}"));
            std::fs::write(&path, &bytes).unwrap();
            expected.push(Some(hex(&sha2::Sha256::digest(&bytes))));
            paths.push(path);
        }
        paths.insert(3, dir.path().join("missing"));
        expected.insert(3, None);
        let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let next = AtomicUsize::new(0);
        let never = AtomicBool::new(false);
        let got = Mutex::new((0..refs.len()).map(|_| None).collect::<Vec<_>>());
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    sha256_files_with(
                        &refs,
                        &next,
                        &never,
                        &mut |i, d| got.lock().unwrap()[i] = Some(d),
                        100,
                        window,
                    )
                });
            }
        });
        for (i, (d, want)) in got
            .into_inner()
            .unwrap()
            .into_iter()
            .zip(&expected)
            .enumerate()
        {
            let d = d.expect("every file is reported");
            match want {
                Some(want) => assert_eq!(d.unwrap().as_deref(), Some(want.as_str()), "file {i}"),
                None => assert!(d.is_err(), "file {i} is missing"),
            }
        }

        let cancelled = AtomicBool::new(true);
        let next = AtomicUsize::new(0);
        let mut seen = Vec::new();
        sha256_files_with(
            &refs,
            &next,
            &cancelled,
            &mut |i, d| {
                if let Ok(d) = d {
                    assert_eq!(d, None, "file {i}");
                }
                seen.push(i)
            },
            100,
            window,
        );
        seen.sort();
        assert_eq!(seen, (0..refs.len()).collect::<Vec<_>>());
    }
}
