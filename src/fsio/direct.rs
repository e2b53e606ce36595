//! Writing a large file around the page cache (`O_DIRECT`), for outputs that are flushed to
//! disk at the end anyway.
//!
//! Written the ordinary way, every byte of a converted model is first copied into a page-cache
//! page the kernel allocates for it, and written to disk by the `fsync` at the end. Allocating
//! those pages is not free: on a virtual machine that hands free memory back to its host (free
//! page reporting), each newly used page is also a fault in the host, and writing a 1.2 GB
//! output cost 1.5 to 2.5 s of system time on the benchmark machine against 0.4 s with direct
//! I/O (docs/benchmarks.md). With direct I/O the bytes go from our buffers to the disk.
//!
//! [`DirectWriter`] gathers the bytes written to it into a few aligned buffers and hands each
//! full buffer to a thread of its own, which writes it at its offset while the next one fills
//! (that thread waits for the disk, it does not compute). Offsets, lengths and buffer addresses
//! are multiples of [`BLOCK`]. The stream may start anywhere: the bytes before its start in the
//! first block are written as zeros, for the caller to write over afterwards with ordinary I/O
//! (as the .bpk writer does with the header). If the file system refuses direct I/O (at open,
//! or `EINVAL` on the first write), the same positional writes go through the page cache
//! instead: the file is the same either way.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

/// Alignment of offsets, lengths and buffer addresses: the largest logical block size in
/// common use (disks have 512 or 4096).
pub const BLOCK: usize = 4096;
/// Bytes per buffer handed to the writing thread.
const BUF_LEN: usize = 8 << 20;
/// Buffers in all: one filling, the others queued or being written.
const BUFFERS: usize = 4;

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Block([u8; BLOCK]);

/// A buffer whose address and length are multiples of [`BLOCK`].
struct AlignedBuf(Vec<Block>);

impl AlignedBuf {
    fn new(len: usize) -> Self {
        AlignedBuf(vec![Block([0; BLOCK]); len / BLOCK])
    }
    fn len(&self) -> usize {
        self.0.len() * BLOCK
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `Block` is a `repr(C)` byte array (size BLOCK, no padding), so the vector's
        // blocks are `len()` initialized bytes in a row.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.len()) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        // SAFETY: as in `bytes`; the borrow is unique through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) }
    }
}

thread_local! {
    /// What a [`DirectWriter`] on this thread does while it waits for the disk (see
    /// [`with_idle_work`]).
    static IDLE_WORK: Cell<Option<&'static IdleWork<'static>>> = const { Cell::new(None) };
}

/// A piece of work that returns whether it found something to do, short next to a buffer's
/// write (a few milliseconds).
pub type IdleWork<'a> = dyn Fn() -> bool + Sync + 'a;

/// Runs `body` with `work` as what every [`DirectWriter`] on this thread does when it has to
/// wait for the disk (all its buffers being written): `work` runs again and again until the
/// write it waits for is done or `work` returns false, then the writer waits as before. A
/// conversion gives its source hash here, so that the core it runs on is not idle while the
/// disk writes the embedding.
pub fn with_idle_work<'a, R>(work: &'a IdleWork<'a>, body: impl FnOnce() -> R) -> R {
    /// Puts the previous work back when `body` returns or unwinds.
    struct Restore(Option<&'static IdleWork<'static>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            IDLE_WORK.with(|w| w.set(self.0));
        }
    }
    // SAFETY: only the lifetime is erased. The reference is stored in this thread's slot for
    // the duration of `body` and taken out again by `Restore` before this function returns or
    // unwinds, so it is never used after `work`'s borrow ends; other threads never see it.
    let erased: &'static IdleWork<'static> =
        unsafe { std::mem::transmute::<&'a IdleWork<'a>, &'static IdleWork<'static>>(work) };
    let _restore = Restore(IDLE_WORK.with(|w| w.replace(Some(erased))));
    body()
}

/// Runs one piece of this thread's idle work, if it has any; whether it did something.
fn run_idle_work() -> bool {
    // Taken out while it runs, so that a writer used inside it does not run it again.
    match IDLE_WORK.with(|w| w.take()) {
        Some(work) => {
            struct Restore(&'static IdleWork<'static>);
            impl Drop for Restore {
                fn drop(&mut self) {
                    IDLE_WORK.with(|w| w.set(Some(self.0)));
                }
            }
            let _restore = Restore(work);
            work()
        }
        None => false,
    }
}

/// One buffer to write: `len` bytes at `offset`.
struct Job {
    buf: AlignedBuf,
    offset: u64,
    len: usize,
}

/// A sequential writer of one file, from a given offset on, through direct I/O.
pub struct DirectWriter {
    /// The ordinary handle: the fallback, and the truncation at the end.
    plain: File,
    /// The buffer being filled, and the file offset of its first byte (a block multiple).
    buf: Option<AlignedBuf>,
    start: u64,
    fill: usize,
    spare: Vec<AlignedBuf>,
    in_flight: usize,
    to_io: Option<SyncSender<Job>>,
    from_io: Receiver<io::Result<(AlignedBuf, bool)>>,
    io: Option<JoinHandle<()>>,
    /// Whether the writing thread is using direct I/O (until a refusal makes it fall back).
    direct: bool,
    /// The first error, once there has been one: every later call returns it again (a
    /// caller such as a zstd encoder being dropped may still write after an error).
    failed: Option<Failure>,
}

/// What is kept of the first error, to report it again ([`io::Error`] is not `Clone`).
struct Failure {
    kind: io::ErrorKind,
    os: Option<i32>,
    text: String,
}

impl Failure {
    fn error(&self) -> io::Error {
        match self.os {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.kind, self.text.clone()),
        }
    }
}

impl DirectWriter {
    /// Starts writing the file at `path` (open as `plain`) at `offset`. `None` if the file
    /// system does not take direct I/O (nothing has been written then).
    pub fn create(path: &Path, plain: &File, offset: u64) -> Option<Self> {
        let direct = open_direct(path, plain)?;
        Self::with(Some(direct), plain, offset, BUF_LEN).ok()
    }

    /// The writer, with `direct` (`None`: ordinary positional writes, the fallback) and buffers
    /// of `buf_len` bytes.
    fn with(direct: Option<File>, plain: &File, offset: u64, buf_len: usize) -> io::Result<Self> {
        assert!(buf_len >= BLOCK && buf_len % BLOCK == 0);
        let plain = plain.try_clone()?;
        let (to_io, jobs) = sync_channel::<Job>(BUFFERS);
        let (done, from_io) = sync_channel::<io::Result<(AlignedBuf, bool)>>(BUFFERS);
        let using_direct = direct.is_some();
        let io_plain = plain.try_clone()?;
        let io = std::thread::Builder::new()
            .name("bpk-direct-io".into())
            .spawn(move || io_loop(direct, io_plain, jobs, done))?;
        let start = offset / BLOCK as u64 * BLOCK as u64;
        Ok(DirectWriter {
            plain,
            // Zeroed: the bytes before `offset` in its block are written as zeros.
            buf: Some(AlignedBuf::new(buf_len)),
            start,
            fill: (offset - start) as usize,
            spare: (1..BUFFERS).map(|_| AlignedBuf::new(buf_len)).collect(),
            in_flight: 0,
            to_io: Some(to_io),
            from_io,
            io: Some(io),
            direct: using_direct,
            failed: None,
        })
    }

    /// File offset of the next byte written.
    pub fn position(&self) -> u64 {
        self.start + self.fill as u64
    }

    /// Writes what is left (the last block padded with zeros), waits for every write, and cuts
    /// the file at [`DirectWriter::position`], which it returns.
    pub fn finish(mut self) -> io::Result<u64> {
        self.check()?;
        let end = self.position();
        if self.fill > 0 {
            let padded = self.fill.div_ceil(BLOCK) * BLOCK;
            let fill = self.fill;
            let Some(buf) = self.buf.as_mut() else {
                return Err(io::Error::other("the direct I/O writer has no buffer"));
            };
            buf.bytes_mut()[fill..padded].fill(0);
            self.submit(padded)?;
        }
        self.to_io = None;
        while self.in_flight > 0 {
            self.wait_one()?;
        }
        if let Some(io) = self.io.take() {
            io.join()
                .map_err(|_| io::Error::other("the direct I/O thread panicked"))?;
        }
        self.plain.set_len(end)?;
        Ok(end)
    }

    /// Whether the bytes are going to disk by direct I/O so far (not through the page cache).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Records `e` as the writer's failure (the first one stays) and returns it.
    fn fail(&mut self, e: io::Error) -> io::Error {
        if self.failed.is_none() {
            self.failed = Some(Failure {
                kind: e.kind(),
                os: e.raw_os_error(),
                text: e.to_string(),
            });
        }
        e
    }

    /// The recorded failure, as an error, if there was one.
    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some(f) => Err(f.error()),
            None => Ok(()),
        }
    }

    /// Hands the current buffer's first `len` bytes to the writing thread and takes another.
    /// After an error the writer holds no buffer and refuses every later call with that error.
    fn submit(&mut self, len: usize) -> io::Result<()> {
        self.submit_inner(len).map_err(|e| self.fail(e))
    }

    fn submit_inner(&mut self, len: usize) -> io::Result<()> {
        self.check()?;
        let buf = self
            .buf
            .take()
            .ok_or_else(|| io::Error::other("the direct I/O writer has no buffer"))?;
        let job = Job {
            buf,
            offset: self.start,
            len,
        };
        let sender = self.to_io.as_ref().expect("open until finished");
        if sender.send(job).is_err() {
            // The thread has stopped: it sent its error before it did, possibly behind the
            // results of earlier writes that went well.
            while self.in_flight > 0 {
                self.wait_one()?;
            }
            return Err(io::Error::other("the direct I/O thread stopped"));
        }
        self.in_flight += 1;
        self.start += len as u64;
        self.fill = 0;
        let next = match self.spare.pop() {
            Some(b) => b,
            None => self.wait_one()?,
        };
        self.buf = Some(next);
        Ok(())
    }

    /// Waits for one write to finish; returns its buffer. Meanwhile it runs this thread's
    /// idle work ([`with_idle_work`]), a piece at a time, until the write is done or there is
    /// no work left.
    fn wait_one(&mut self) -> io::Result<AlignedBuf> {
        use std::sync::mpsc::TryRecvError;
        let stopped = || io::Error::other("the direct I/O thread stopped");
        let r = loop {
            match self.from_io.try_recv() {
                Ok(r) => break r,
                Err(TryRecvError::Disconnected) => return Err(stopped()),
                Err(TryRecvError::Empty) if run_idle_work() => {}
                Err(TryRecvError::Empty) => break self.from_io.recv().map_err(|_| stopped())?,
            }
        };
        self.in_flight -= 1;
        let (buf, direct) = r?;
        self.direct &= direct;
        Ok(buf)
    }
}

impl Write for DirectWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.check()?;
        let mut rest = data;
        while !rest.is_empty() {
            let Some(buf) = self.buf.as_mut() else {
                return Err(io::Error::other("the direct I/O writer has no buffer"));
            };
            let cap = buf.len();
            let n = rest.len().min(cap - self.fill);
            buf.bytes_mut()[self.fill..self.fill + n].copy_from_slice(&rest[..n]);
            self.fill += n;
            rest = &rest[n..];
            if self.fill == cap {
                self.submit(cap)?;
            }
        }
        Ok(data.len())
    }

    /// Nothing to do: full buffers are written as they fill, the rest by `finish`.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for DirectWriter {
    /// Without `finish` (an error on the way): stop the thread and wait for its writes, so
    /// that no write lands after the file is removed or reused.
    fn drop(&mut self) {
        self.to_io = None;
        while self.in_flight > 0 && self.wait_one().is_ok() {}
        if let Some(io) = self.io.take() {
            let _ = io.join();
        }
    }
}

/// The writing thread: writes each job at its offset and sends the buffer back with whether it
/// went by direct I/O. A refusal of direct I/O (`EINVAL`: the file system or the device wants
/// something else) turns it into ordinary writes for the rest of the file.
fn io_loop(
    mut direct: Option<File>,
    plain: File,
    jobs: Receiver<Job>,
    done: SyncSender<io::Result<(AlignedBuf, bool)>>,
) {
    use std::os::unix::fs::FileExt;
    for job in jobs {
        let data = &job.buf.bytes()[..job.len];
        let mut result = match &direct {
            Some(d) => d.write_all_at(data, job.offset),
            None => plain.write_all_at(data, job.offset),
        };
        if direct.is_some() && matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
            direct = None;
            result = plain.write_all_at(data, job.offset);
        }
        let via_direct = direct.is_some();
        let failed = result.is_err();
        if done.send(result.map(|_| (job.buf, via_direct))).is_err() || failed {
            break;
        }
    }
}

/// A second handle on the file at `path` with `O_DIRECT` (a flag of the open file description,
/// so it cannot be set on a duplicate of the ordinary handle without affecting it). The path is
/// opened again, so it must still name the file `plain` has open: no symbolic link is
/// followed, and the device and inode must match; otherwise there is no direct handle and the
/// writer keeps to `plain`.
#[cfg(target_os = "linux")]
fn open_direct(path: &Path, plain: &File) -> Option<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let (a, b) = (f.metadata().ok()?, plain.metadata().ok()?);
    (a.dev() == b.dev() && a.ino() == b.ino()).then_some(f)
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path, _plain: &File) -> Option<File> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Writes `total` pattern bytes from `offset` in pieces of varying sizes (some larger than
    /// a buffer, some a single byte), then the head with ordinary I/O, and checks the file.
    fn round_trip(direct: bool, offset: u64, total: usize, buf_len: usize) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let plain = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let handle = if direct {
            open_direct(&path, &plain)
        } else {
            None
        };
        let mut w = DirectWriter::with(handle, &plain, offset, buf_len).unwrap();
        let data: Vec<u8> = (0..total).map(|i| (i * 7 + i / 251) as u8).collect();
        let sizes = [
            1usize,
            4095,
            4096,
            4097,
            buf_len + 3,
            17,
            3 * buf_len,
            100_000,
        ];
        let mut at = 0;
        for s in sizes.iter().cycle() {
            if at == total {
                break;
            }
            let n = (*s).min(total - at);
            w.write_all(&data[at..at + n]).unwrap();
            at += n;
            assert_eq!(w.position(), offset + at as u64);
        }
        assert_eq!(w.finish().unwrap(), offset + total as u64);
        let head: Vec<u8> = (0..offset).map(|i| 0xA0 ^ i as u8).collect();
        plain.write_all_at(&head, 0).unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), offset as usize + total);
        assert!(back[..offset as usize] == head[..], "head");
        let first_diff = back[offset as usize..]
            .iter()
            .zip(&data)
            .position(|(a, b)| a != b);
        assert_eq!(
            first_diff, None,
            "direct {direct}, offset {offset}, total {total}"
        );
    }

    /// Idle work runs only inside its scope and on its thread, not inside itself, and is put
    /// back after a panic; a writer waiting with idle work writes the same file.
    #[test]
    fn idle_work_is_scoped_to_its_thread_and_call() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        assert!(!run_idle_work(), "none outside a scope");
        let calls = AtomicUsize::new(0);
        let nested = AtomicUsize::new(0);
        let work = || {
            calls.fetch_add(1, Ordering::Relaxed);
            // Not run again from inside itself.
            if run_idle_work() {
                nested.fetch_add(1, Ordering::Relaxed);
            }
            true
        };
        with_idle_work(&work, || {
            assert!(run_idle_work());
            assert!(run_idle_work());
            std::thread::scope(|s| {
                s.spawn(|| assert!(!run_idle_work(), "another thread has none"));
            });
        });
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert_eq!(nested.load(Ordering::Relaxed), 0);
        assert!(!run_idle_work(), "none after the scope");
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            with_idle_work(&work, || panic!("in the body"))
        }));
        assert!(caught.is_err());
        assert!(!run_idle_work(), "none after a panic");
        // Small buffers, so that the writer waits often; the work finds nothing to do half
        // the time (then the writer blocks as before).
        let rounds = AtomicUsize::new(0);
        let some = || rounds.fetch_add(1, Ordering::Relaxed) % 2 == 0;
        with_idle_work(&some, || {
            round_trip(true, 100, 3 << 20, 8 * BLOCK);
            round_trip(false, 0, 1 << 20, BLOCK);
        });
    }

    #[test]
    fn bytes_land_at_their_offsets_across_buffers_and_blocks() {
        for direct in [true, false] {
            for (offset, total) in [
                (0, 0),
                (0, 1),
                (64, 4032),
                (4160, 100_000),
                (12_345, 300_001),
            ] {
                round_trip(direct, offset, total, 3 * BLOCK);
            }
            round_trip(direct, 192, BUF_LEN * 2 + 5, BUF_LEN);
        }
    }

    /// The direct handle is refused when the path no longer names the file being written
    /// (here a symbolic link to another file put in its place).
    #[cfg(target_os = "linux")]
    #[test]
    fn the_direct_handle_must_be_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, other) = (dir.path().join("f"), dir.path().join("other"));
        let plain = File::create(&path).unwrap();
        // The positive control first: where the file system takes no direct I/O at all, the
        // refusals below would prove nothing.
        if open_direct(&path, &plain).is_none() {
            eprintln!("skipped: this file system refuses O_DIRECT");
            return;
        }
        std::fs::write(&other, b"").unwrap();
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&other, &path).unwrap();
        assert!(open_direct(&path, &plain).is_none(), "a symbolic link");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"").unwrap();
        assert!(
            open_direct(&path, &plain).is_none(),
            "another file at the path"
        );
    }

    #[test]
    fn a_failed_write_is_reported_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        // A read-only handle: every write fails.
        let ro = File::open(&path).unwrap();
        let mut w = DirectWriter::with(None, &ro, 0, BLOCK).unwrap();
        let r = w.write_all(&vec![1u8; 10 * BLOCK]);
        // The operating system's own error (a read-only descriptor), not a stand-in.
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
        // Writing again after the error (as a dropped zstd encoder does) reports the same
        // error instead of panicking, and so does finishing.
        let again = w.write(&[1u8; 3 * BLOCK]);
        assert_eq!(again.unwrap_err().raw_os_error(), Some(libc::EBADF));
        assert_eq!(w.finish().unwrap_err().raw_os_error(), Some(libc::EBADF));
        let w = DirectWriter::with(None, &ro, 0, BLOCK).unwrap();
        let mut w = w;
        w.write_all(&[1, 2, 3]).unwrap();
        assert!(w.finish().is_err());
    }
}
