//! Digests: SHA-256 of files (as model hubs publish them) and lower-case hex.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};

use super::{sha256ni, sha256x8};
use crate::fsio::{self, FileError};

/// A regular file opened for reading, and its length.
fn open_with_len(path: &Path) -> Result<(std::fs::File, u64), FileError> {
    let file = fsio::open_regular(path)?;
    let len = file
        .metadata()
        .map_err(|error| FileError::Io {
            path: path.to_path_buf(),
            error,
        })?
        .len();
    Ok((file, len))
}

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
    let (mut file, len) = open_with_len(path)?;
    let mut hasher = Sha256::new();
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

/// Files of at least this many bytes go through the multi-message kernels; smaller ones, whose
/// hashing takes no time, are hashed on their own.
const MULTI_MIN_LEN: u64 = 1 << 20;

/// Bytes of a file mapped at a time per lane of [`FilesHasher`]: eight lanes keep at most
/// 64 MiB of the source mapped, four 32 MiB. A multiple of 64, so no block straddles two
/// windows.
const MULTI_WINDOW: u64 = 8 << 20;

/// What [`Message::Bytes`] calls with each range of its bytes once hashed.
pub type Release<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// What a [`FilesHasher`] hashes.
#[derive(Clone, Copy)]
pub enum Message<'a> {
    /// A file, read through mapped windows.
    File(&'a Path),
    /// Bytes already mapped (a tensor of a checkpoint), and what to call with each range of
    /// them once hashed (`release(offset, len)`), so that their pages need not stay resident.
    Bytes(&'a [u8], Release<'a>),
}

/// One message being hashed by a [`FilesHasher`].
struct Stream<'a> {
    index: usize,
    path: std::path::PathBuf,
    /// The open file, or the bytes and their release call.
    file: Option<std::fs::File>,
    bytes: Option<(&'a [u8], Release<'a>)>,
    len: u64,
    /// Bytes compressed so far (a multiple of 64).
    done: u64,
    /// Bytes released so far (of bytes only).
    released: u64,
    state: [u32; 8],
    /// The mapped window holding byte `done`, and the file offset where it starts.
    window: Option<(memmap2::Mmap, u64)>,
    /// Bytes per window.
    step: u64,
}

impl Stream<'_> {
    /// Maps the window that holds byte `done`, if the current one does not.
    fn ensure_window(&mut self) -> std::io::Result<()> {
        let window = self.step;
        if let Some((bytes, release)) = self.bytes {
            // Bytes need no map: release the windows hashed so far.
            let behind = (self.done / window * window).min(bytes.len() as u64);
            if behind > self.released {
                release(self.released as usize, (behind - self.released) as usize);
                self.released = behind;
            }
            return Ok(());
        }
        let Some(file) = &self.file else {
            return Err(std::io::Error::other("neither a file nor bytes"));
        };
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
        let map = unsafe { memmap2::MmapOptions::new().offset(start).len(n).map(file)? };
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Sequential);
        self.window = Some((map, start));
        Ok(())
    }

    /// Compresses the next `blocks` blocks, all in the mapped window, with the `sha2` crate.
    fn compress(&mut self, blocks: usize) {
        let ahead = self.ahead();
        let n = (blocks * 64).min(ahead.len() / 64 * 64);
        let mut state = self.state;
        compress_one(&mut state, &ahead[..n]);
        self.state = state;
        self.done += n as u64;
    }

    /// The bytes from `done` to the end of the mapped window (none if no window is mapped).
    fn ahead(&self) -> &[u8] {
        if let Some((bytes, _)) = self.bytes {
            let end = (self.done / self.step + 1) * self.step;
            return bytes
                .get(self.done as usize..end.min(self.len) as usize)
                .unwrap_or_default();
        }
        match &self.window {
            Some((map, start)) => map.get((self.done - start) as usize..).unwrap_or_default(),
            None => &[],
        }
    }

    /// Pads and compresses the last bytes (fewer than 64, read from the file); the digest.
    /// Bytes are released to the end.
    fn finish(mut self) -> Result<String, FileError> {
        use std::io::{Seek, SeekFrom};
        let n = (self.len - self.done) as usize;
        let mut last = [0u8; 128];
        if let Some((bytes, release)) = self.bytes {
            last[..n].copy_from_slice(&bytes[self.done as usize..]);
            release(self.released as usize, (self.len - self.released) as usize);
        } else {
            let read = match &mut self.file {
                Some(file) => file
                    .seek(SeekFrom::Start(self.done))
                    .and_then(|_| file.read_exact(&mut last[..n])),
                None => Err(std::io::Error::other("neither a file nor bytes")),
            };
            read.map_err(|error| FileError::Io {
                path: self.path.clone(),
                error,
            })?;
        }
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

/// The kernel that hashes several messages at once on this CPU, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lanes {
    /// Up to four messages through the SHA extensions, their rounds interleaved
    /// ([`sha256ni`]): 3.3 GB/s on one core where one message alone goes at 1.8 GB/s, each
    /// message at 0.8 GB/s (on the machine of docs/benchmarks.md).
    ShaExtensions,
    /// Up to eight messages in the 32-bit lanes of AVX-512 vectors ([`sha256x8`]), for CPUs
    /// with AVX-512 and no SHA extensions: 2.8 to 3.0 GB/s on one core, each message at 0.35
    /// to 0.38 GB/s.
    Avx512,
}

impl Lanes {
    /// The best multi-message kernel of this CPU: the SHA extensions' where it has them (as
    /// fast in all and twice as fast per message as the AVX-512 lanes where both run).
    pub fn detect() -> Option<Lanes> {
        if sha256ni::available() {
            Some(Lanes::ShaExtensions)
        } else if sha256x8::available() {
            Some(Lanes::Avx512)
        } else {
            None
        }
    }

    /// How many messages the kernel hashes at once.
    pub fn width(self) -> usize {
        match self {
            Lanes::ShaExtensions => sha256ni::MAX_STREAMS,
            Lanes::Avx512 => 8,
        }
    }
}

/// One step of the lanes: every stream's mapped blocks, as far as the shortest window goes,
/// through `kernel` (or the `sha2` crate's for a single stream). The streams must have their
/// windows mapped and be at most `kernel.width()`.
fn step_lanes(kernel: Lanes, lanes: &mut [Stream<'_>]) {
    let blocks = lanes
        .iter()
        .map(|s| s.ahead().len() / 64)
        .min()
        .unwrap_or(0);
    if let [one] = lanes {
        one.compress(blocks);
        return;
    }
    match kernel {
        Lanes::ShaExtensions => {
            let mut states: Vec<[u32; 8]> = lanes.iter().map(|s| s.state).collect();
            let views: Vec<sha256x8::Lane<'_>> = lanes
                .iter()
                .map(|s| sha256x8::Lane {
                    data: s.ahead(),
                    step: 64,
                })
                .collect();
            sha256ni::compress(&mut states, &views, blocks);
            for (s, st) in lanes.iter_mut().zip(states) {
                s.state = st;
            }
        }
        Lanes::Avx512 => {
            static IDLE: [u8; 64] = [0; 64];
            let mut states = [sha256x8::IV; 8];
            for (st, s) in states.iter_mut().zip(lanes.iter()) {
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
    }
    for s in lanes.iter_mut() {
        s.done += blocks as u64 * 64;
    }
}

/// SHA-256 of several files, shared by workers of two kinds.
///
/// - [`FilesHasher::run_lanes`] hashes several large files at once through the CPU's
///   multi-message kernel ([`Lanes`]: four files through the SHA extensions, or eight in
///   AVX-512 lanes), taking the next file as soon as a lane is free: 1.7 to 1.8 times the
///   bytes per second of the SHA extensions hashing one file, but each file slower.
/// - [`FilesHasher::help`] hashes one file at a time with the SHA extensions: a new file if
///   any is left, else the one with the most bytes left, taken over from the lanes between two
///   steps of theirs (a step is one 8 MiB window). A worker with nothing else to do calls it,
///   so the last bytes of the files are not left to a single core's lanes.
///
/// Files are started in order; digests are the same whoever computes them. Once `cancel` is
/// set, the files not finished get `Ok(None)`, within one window's time.
pub struct FilesHasher<'a> {
    messages: &'a [Message<'a>],
    /// The multi-message kernel of [`FilesHasher::run_lanes`], if the CPU has one.
    kernel: Option<Lanes>,
    cancel: &'a AtomicBool,
    min_len: u64,
    window: u64,
    shared: std::sync::Mutex<Shared<'a>>,
}

/// What the workers of a [`FilesHasher`] share.
struct Shared<'a> {
    /// The next file not started.
    next: usize,
    /// Files started and not being worked on.
    idle: Vec<Stream<'a>>,
    /// Files held by the lanes ([`FilesHasher::run_lanes`]): the only ones that come back to
    /// `idle` unfinished, so the only ones a helper waits for.
    in_lanes: usize,
    /// Helpers waiting for a file to come back from the lanes.
    waiting: usize,
    results: Vec<Option<Result<Option<String>, FileError>>>,
}

/// What a worker takes from the shared state.
enum Work<'a> {
    /// A small file (or one that cannot be mapped), to hash on its own.
    Whole(usize),
    Stream(Stream<'a>),
}

impl<'a> FilesHasher<'a> {
    pub fn new(messages: &'a [Message<'a>], cancel: &'a AtomicBool) -> Self {
        Self::with(
            messages,
            cancel,
            MULTI_MIN_LEN,
            MULTI_WINDOW,
            Lanes::detect(),
        )
    }

    /// With its two sizes and its kernel as parameters (tests use small sizes, and each
    /// kernel the CPU runs); `window` must be a multiple of 64 and of the page size.
    fn with(
        messages: &'a [Message<'a>],
        cancel: &'a AtomicBool,
        min_len: u64,
        window: u64,
        kernel: Option<Lanes>,
    ) -> Self {
        FilesHasher {
            messages,
            kernel,
            cancel,
            min_len,
            window,
            shared: std::sync::Mutex::new(Shared {
                next: 0,
                idle: Vec::new(),
                in_lanes: 0,
                waiting: 0,
                results: messages.iter().map(|_| None).collect(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared<'a>> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens message `i`: a stream for the lanes, or, for a small one, the message to hash
    /// whole.
    fn open(&self, i: usize) -> Result<Work<'a>, FileError> {
        let (path, file, bytes, len) = match self.messages[i] {
            Message::File(path) => {
                let (file, len) = open_with_len(path)?;
                (path.to_path_buf(), Some(file), None, len)
            }
            Message::Bytes(b, release) => (
                std::path::PathBuf::new(),
                None,
                Some((b, release)),
                b.len() as u64,
            ),
        };
        if len < self.min_len {
            return Ok(Work::Whole(i));
        }
        Ok(Work::Stream(Stream {
            index: i,
            path,
            file,
            bytes,
            len,
            done: 0,
            released: 0,
            state: sha256x8::IV,
            window: None,
            step: self.window,
        }))
    }

    /// Takes the next file not started, if any; reports it at once if it cannot be opened.
    fn start_next(&self, shared: &mut Shared<'a>) -> Option<Work<'a>> {
        while shared.next < self.messages.len() {
            let i = shared.next;
            shared.next += 1;
            match self.open(i) {
                Ok(w) => return Some(w),
                Err(e) => shared.results[i] = Some(Err(e)),
            }
        }
        None
    }

    /// Hashes a whole message on its own and records its digest.
    fn whole(&self, i: usize) {
        let d = match self.messages[i] {
            Message::File(path) => sha256_file_unless(path, self.cancel),
            Message::Bytes(b, release) => {
                let d = hex(&Sha256::digest(b));
                release(0, b.len());
                Ok(Some(d))
            }
        };
        self.lock().results[i] = Some(d);
    }

    /// Records a stream that is finished, or puts it back for the next step.
    fn put_back(&self, shared: &mut Shared<'a>, s: Stream<'a>) {
        if s.len - s.done < 64 {
            let i = s.index;
            shared.results[i] = Some(s.finish().map(Some));
        } else {
            shared.idle.push(s);
        }
    }

    /// Maps the window of `s`'s next block; if that fails, hashes the file by reading it.
    fn ready(&self, s: &mut Stream<'a>) -> bool {
        if s.ensure_window().is_ok() {
            return true;
        }
        let d = sha256_file_unless(&s.path, self.cancel);
        self.lock().results[s.index] = Some(d);
        false
    }

    /// Hashes files in the lanes of the multi-message kernel ([`Lanes`]) until none is left to
    /// take. Where the CPU has none, the same as [`FilesHasher::help`]. Whether it hashed anything.
    pub fn run_lanes(&self) -> bool {
        let Some(kernel) = self.kernel else {
            return self.help();
        };
        let width = kernel.width();
        let mut worked = false;
        let mut lanes: Vec<Stream<'a>> = Vec::with_capacity(width);
        let mut whole = Vec::new();
        loop {
            {
                let mut shared = self.lock();
                for s in lanes.drain(..) {
                    shared.in_lanes -= 1;
                    self.put_back(&mut shared, s);
                }
                // Leave the file with the most bytes left to a waiting helper.
                let keep = usize::from(shared.waiting > 0);
                shared.idle.sort_by_key(|s| s.done.wrapping_sub(s.len));
                while lanes.len() < width && shared.idle.len() > keep {
                    let Some(s) = shared.idle.pop() else { break };
                    lanes.push(s);
                }
                while lanes.len() < width {
                    match self.start_next(&mut shared) {
                        Some(Work::Stream(s)) => lanes.push(s),
                        Some(Work::Whole(i)) => whole.push(i),
                        None => break,
                    }
                }
                shared.in_lanes += lanes.len();
                worked |= !lanes.is_empty() || !whole.is_empty();
            }
            for i in whole.drain(..) {
                self.whole(i);
            }
            if self.cancel.load(Ordering::Relaxed) {
                let n = lanes.len();
                self.cancel_all(std::mem::take(&mut lanes));
                self.lock().in_lanes -= n;
                return worked;
            }
            let mut k = 0;
            while k < lanes.len() {
                if self.ready(&mut lanes[k]) {
                    k += 1;
                } else {
                    lanes.swap_remove(k);
                    self.lock().in_lanes -= 1;
                }
            }
            if lanes.is_empty() {
                // Nothing left, or only what a helper is doing or about to take.
                return worked;
            }
            step_lanes(kernel, &mut lanes);
        }
    }

    /// Hashes files one at a time with the SHA extensions until none is left to take: new
    /// files first, then files taken over from the lanes (the one with the most bytes left),
    /// waiting for the lanes' current step when they hold every file left. Whether it hashed
    /// anything.
    pub fn help(&self) -> bool {
        let mut worked = false;
        let mut waiting = false;
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                if waiting {
                    self.lock().waiting -= 1;
                }
                return worked;
            }
            let work = {
                let mut shared = self.lock();
                shared.idle.sort_by_key(|s| s.done.wrapping_sub(s.len));
                let work = if shared.idle.is_empty() {
                    self.start_next(&mut shared)
                } else {
                    Some(Work::Stream(shared.idle.remove(0)))
                };
                match work {
                    Some(w) => {
                        if waiting {
                            shared.waiting -= 1;
                            waiting = false;
                        }
                        w
                    }
                    None if shared.in_lanes == 0 => {
                        if waiting {
                            shared.waiting -= 1;
                        }
                        return worked;
                    }
                    None => {
                        // Every file left is in the lanes: ask for one back at their next step.
                        if !waiting {
                            shared.waiting += 1;
                            waiting = true;
                        }
                        drop(shared);
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        continue;
                    }
                }
            };
            worked = true;
            match work {
                Work::Whole(i) => self.whole(i),
                Work::Stream(mut s) => {
                    let mut mapped = true;
                    while !self.cancel.load(Ordering::Relaxed) && s.len - s.done >= 64 {
                        mapped = self.ready(&mut s);
                        if !mapped {
                            break;
                        }
                        let blocks = s.ahead().len() / 64;
                        s.compress(blocks);
                    }
                    if mapped && s.len - s.done < 64 {
                        let mut shared = self.lock();
                        self.put_back(&mut shared, s);
                    } else if mapped {
                        // Cancelled.
                        self.cancel_all(vec![s]);
                    }
                }
            }
        }
    }

    /// One step of the lanes ([`FilesHasher::run_lanes`]: a window of up to four files
    /// through the SHA extensions) on files nobody holds, without waiting, then puts them back
    /// for whoever comes next: files put back between steps, else the next ones not started
    /// (the lanes keep theirs through their steps). For a worker with a few milliseconds to
    /// spare (the writer waiting for the disk). Whether there was a file.
    pub fn help_step(&self) -> bool {
        if self.cancel.load(Ordering::Relaxed) {
            return false;
        }
        let width = self.kernel.map_or(1, Lanes::width);
        let mut lanes: Vec<Stream<'a>> = Vec::with_capacity(width);
        let mut whole = Vec::new();
        {
            let mut shared = self.lock();
            while lanes.len() < width {
                match shared.idle.pop() {
                    Some(s) => lanes.push(s),
                    None => match self.start_next(&mut shared) {
                        Some(Work::Stream(s)) => lanes.push(s),
                        Some(Work::Whole(i)) => whole.push(i),
                        None => break,
                    },
                }
            }
        }
        let found = !lanes.is_empty() || !whole.is_empty();
        for i in whole {
            self.whole(i);
        }
        // A file that cannot be mapped is hashed by reading it (and recorded) by `ready`.
        lanes.retain_mut(|s| self.ready(s));
        match (self.kernel, lanes.as_mut_slice()) {
            (_, []) => {}
            (Some(kernel), lanes) => step_lanes(kernel, lanes),
            (None, [one]) => {
                let blocks = one.ahead().len() / 64;
                one.compress(blocks);
            }
            (None, _) => unreachable!("one file at a time without a kernel"),
        }
        let mut shared = self.lock();
        for s in lanes {
            self.put_back(&mut shared, s);
        }
        found
    }

    /// After `cancel`: every file not finished, `held` and the rest, gets `Ok(None)`.
    fn cancel_all(&self, held: Vec<Stream<'a>>) {
        let mut shared = self.lock();
        for s in held.into_iter().chain(std::mem::take(&mut shared.idle)) {
            shared.results[s.index].get_or_insert(Ok(None));
        }
        shared.next = self.messages.len();
        for r in shared.results.iter_mut() {
            r.get_or_insert(Ok(None));
        }
    }

    /// The digests, in the order of the messages. Call it once every worker has returned.
    pub fn into_results(self) -> Vec<Result<Option<String>, FileError>> {
        let shared = self.shared.into_inner().unwrap_or_else(|e| e.into_inner());
        shared
            .results
            .into_iter()
            .map(|r| r.unwrap_or(Ok(None)))
            .collect()
    }
}

/// Lower-case hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files `f0, f1, ...` of random bytes of the given lengths in `dir`, and their digests
    /// by the `sha2` crate.
    fn random_files(
        dir: &Path,
        lens: &[u64],
        rng: &mut crate::num::SplitMix64,
    ) -> (Vec<std::path::PathBuf>, Vec<String>) {
        let mut paths = Vec::new();
        let mut expected = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            let path = dir.join(format!("f{i}"));
            std::fs::write(&path, &bytes).unwrap();
            expected.push(hex(&Sha256::digest(&bytes)));
            paths.push(path);
        }
        (paths, expected)
    }

    /// Every multi-message kernel this CPU runs, and none (the lanes then work as helpers).
    fn kernels() -> Vec<Option<Lanes>> {
        let mut k = vec![None];
        if sha256ni::available() {
            k.push(Some(Lanes::ShaExtensions));
        }
        if sha256x8::available() {
            k.push(Some(Lanes::Avx512));
        }
        k
    }

    /// Runs `lanes` lane workers and `helpers` helpers on `hasher` at once, to the end.
    fn run_workers(hasher: &FilesHasher<'_>, lanes: usize, helpers: usize) {
        run_workers_stepping(hasher, lanes, helpers, 0);
    }

    /// [`run_workers`] with `steppers` more threads that work as a conversion's tensors' worker
    /// does: a few single steps ([`FilesHasher::help_step`], as while the writer waits), then
    /// the lanes and the helper's work at the end.
    fn run_workers_stepping(
        hasher: &FilesHasher<'_>,
        lanes: usize,
        helpers: usize,
        steppers: usize,
    ) {
        std::thread::scope(|s| {
            for _ in 0..lanes {
                s.spawn(|| hasher.run_lanes());
            }
            for _ in 0..helpers {
                s.spawn(|| hasher.help());
            }
            for _ in 0..steppers {
                s.spawn(|| {
                    for _ in 0..5 {
                        hasher.help_step();
                    }
                    hasher.run_lanes();
                    hasher.help();
                });
            }
        });
    }

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
        let (mut paths, expected) = random_files(dir.path(), &lens, &mut rng);
        let mut expected: Vec<Option<String>> = expected.into_iter().map(Some).collect();
        paths.insert(3, dir.path().join("missing"));
        expected.insert(3, None);
        // Bytes in memory too, each recording the ranges released behind the hash.
        let blobs: Vec<Vec<u8>> = [50, 3 * window + 7, 2 * window, window + 64]
            .iter()
            .map(|&n| (0..n).map(|_| rng.next_u64() as u8).collect())
            .collect();
        let released: Vec<std::sync::Mutex<Vec<(usize, usize)>>> =
            blobs.iter().map(|_| Default::default()).collect();
        let recorders: Vec<Box<dyn Fn(usize, usize) + Sync>> = released
            .iter()
            .map(|r| Box::new(move |o, n| r.lock().unwrap().push((o, n))) as Box<_>)
            .collect();
        let mut refs: Vec<Message<'_>> = paths.iter().map(|p| Message::File(p.as_path())).collect();
        for (b, r) in blobs.iter().zip(&recorders) {
            refs.push(Message::Bytes(b, r.as_ref()));
            expected.push(Some(hex(&sha2::Sha256::digest(b))));
        }
        let never = AtomicBool::new(false);
        // Lanes alone, a helper alone, lanes and helpers together, and beside a worker that
        // takes single steps first, with each kernel.
        let runs = [
            (1, 0, 0),
            (0, 1, 0),
            (1, 1, 0),
            (2, 1, 0),
            (1, 2, 0),
            (0, 0, 1),
            (1, 0, 1),
            (1, 1, 1),
        ];
        for (kernel, (lanes, helpers, steppers)) in kernels()
            .into_iter()
            .flat_map(|k| runs.iter().map(move |&r| (k, r)))
        {
            for r in &released {
                r.lock().unwrap().clear();
            }
            let hasher = FilesHasher::with(&refs, &never, 100, window, kernel);
            run_workers_stepping(&hasher, lanes, helpers, steppers);
            let got = hasher.into_results();
            for (i, (d, want)) in got.into_iter().zip(&expected).enumerate() {
                match want {
                    Some(want) => assert_eq!(
                        d.unwrap().as_deref(),
                        Some(want.as_str()),
                        "file {i}, {kernel:?}"
                    ),
                    None => assert!(d.is_err(), "file {i} is missing"),
                }
            }
            // Every byte released once, in order.
            for (b, r) in blobs.iter().zip(&released) {
                let mut at = 0;
                for &(o, n) in r.lock().unwrap().iter() {
                    assert_eq!(o, at);
                    at += n;
                }
                assert_eq!(at, b.len());
            }
        }
    }

    /// A file part-hashed in the lanes and taken over by a helper ends with the right digest:
    /// the state moves from a multi-message kernel to the `sha2` crate's between two windows.
    #[test]
    fn files_taken_over_from_the_lanes_hash_right() {
        let dir = tempfile::tempdir().unwrap();
        let window = 4096u64;
        let mut rng = crate::num::SplitMix64(3);
        let lens = [3 * window + 5, 5 * window, 2 * window + 63];
        let (paths, expected) = random_files(dir.path(), &lens, &mut rng);
        let refs: Vec<Message<'_>> = paths.iter().map(|p| Message::File(p.as_path())).collect();
        let never = AtomicBool::new(false);
        let available: Vec<Lanes> = kernels().into_iter().flatten().collect();
        if available.is_empty() {
            eprintln!("skipped: no multi-message kernel on this CPU");
        }
        for kernel in available {
            let hasher = FilesHasher::with(&refs, &never, 100, window, Some(kernel));
            // One lanes step by hand: every file's first window through the kernel.
            let mut streams: Vec<Stream> = (0..lens.len())
                .map(|i| match hasher.open(i).unwrap() {
                    Work::Stream(s) => s,
                    Work::Whole(_) => unreachable!("every file is above min_len"),
                })
                .collect();
            for s in streams.iter_mut() {
                s.ensure_window().unwrap();
            }
            step_lanes(kernel, &mut streams);
            assert!(streams.iter().all(|s| s.done == window));
            {
                let mut shared = hasher.lock();
                shared.next = lens.len();
                shared.idle = streams;
            }
            assert!(hasher.help());
            let got: Vec<String> = hasher
                .into_results()
                .into_iter()
                .map(|d| d.unwrap().unwrap())
                .collect();
            assert_eq!(got, expected, "{kernel:?}");
        }
    }

    /// Single steps alone, until there is none to take, hash every file to its digest, with
    /// each kernel and none: a step does one window of each file it takes (all the files a
    /// kernel has lanes for, else one, with the small files before it hashed whole) and puts
    /// them back for the next.
    #[test]
    fn single_steps_alone_finish_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let window = 4096u64;
        let mut rng = crate::num::SplitMix64(5);
        let lens = [0, 99, 100, window - 1, window, 3 * window + 70, 5 * window];
        let (paths, expected) = random_files(dir.path(), &lens, &mut rng);
        let refs: Vec<Message<'_>> = paths.iter().map(|p| Message::File(p.as_path())).collect();
        let never = AtomicBool::new(false);
        for kernel in kernels() {
            let hasher = FilesHasher::with(&refs, &never, 100, window, kernel);
            let mut steps = 0;
            while hasher.help_step() {
                steps += 1;
                assert!(steps < 100, "steps never run out");
            }
            if kernel.is_none() {
                // One step for each window of the files from 100 bytes (none of which ends
                // with a window of fewer than 64 bytes); the two below ride along.
                let windows: u64 = lens
                    .iter()
                    .filter(|&&n| n >= 100)
                    .map(|n| n.div_ceil(window))
                    .sum();
                assert_eq!(steps as u64, windows);
            }
            let got: Vec<String> = hasher
                .into_results()
                .into_iter()
                .map(|d| d.unwrap().unwrap())
                .collect();
            assert_eq!(got, expected, "{kernel:?}");
        }
        let cancel = AtomicBool::new(true);
        let hasher = FilesHasher::with(&refs, &cancel, 100, window, Lanes::detect());
        assert!(!hasher.help_step(), "no step once cancelled");
    }

    /// A cancel in the middle of the work: every worker returns, and every file has either
    /// its right digest or none.
    #[test]
    fn a_cancel_midway_stops_every_worker() {
        let dir = tempfile::tempdir().unwrap();
        let window = 4096u64;
        let mut rng = crate::num::SplitMix64(9);
        let lens: Vec<u64> = (0..10).map(|i| (2 + i % 5) * window + 17).collect();
        let (paths, expected) = random_files(dir.path(), &lens, &mut rng);
        let blob: Vec<u8> = (0..3 * window).map(|_| rng.next_u64() as u8).collect();
        for (lanes, helpers) in [(1, 0), (0, 1), (1, 1)] {
            let cancel = AtomicBool::new(false);
            // The blob's first window hashed: cancel.
            let trip = |_: usize, _: usize| cancel.store(true, Ordering::Relaxed);
            let mut refs = vec![Message::Bytes(&blob, &trip)];
            refs.extend(paths.iter().map(|p| Message::File(p.as_path())));
            let hasher = FilesHasher::with(&refs, &cancel, 100, window, Lanes::detect());
            run_workers(&hasher, lanes, helpers);
            let got = hasher.into_results();
            let unfinished = got.iter().filter(|d| matches!(d, Ok(None))).count();
            assert!(
                unfinished > 0,
                "the cancel stopped something ({lanes}, {helpers})"
            );
            for (i, d) in got.into_iter().enumerate().skip(1) {
                if let Some(d) = d.unwrap() {
                    assert_eq!(d, expected[i - 1], "file {i}");
                }
            }
        }
    }
}
