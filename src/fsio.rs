//! The file-system boundary: opening the files a user names, and writing outputs so that a
//! failure or an interruption never leaves a partial file at the target.
//!
//! Inputs: [`open_regular`] opens without blocking and refuses anything but a regular file (a
//! FIFO in place of `config.json` would otherwise block forever, a directory fails later with
//! "No such device", `/dev/zero` looks like an empty file); [`read_capped`] reads a whole file
//! only up to a named limit.
//!
//! Outputs: [`check_output`] is run before any work and refuses a target that is not a regular
//! file, that is one of the inputs, or whose directory does not exist; [`AtomicFile`] is a
//! temporary file beside the target, renamed onto it at the end, created with the usual
//! permissions (0666 minus the umask) and removed if the process is interrupted by SIGINT,
//! SIGTERM or SIGHUP ([`install_interrupt_cleanup`]). A `kill -9` cannot be caught: it leaves
//! the temporary file, named `.<target name>.<pid>.<random>.tmp`, which the next write to the
//! same target removes once that process is gone ([`remove_stale_temps`]).

pub mod direct;

use std::collections::BTreeMap;
use std::fs::{File, Metadata};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A file that cannot be used as an input or an output. Each variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {}", describe_io(error))]
    Io { path: PathBuf, error: io::Error },
    #[error("{path} is {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is {len} bytes, more than the {limit} bytes a {what} may have")]
    TooLarge {
        path: PathBuf,
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("{path} already exists; pass --force to overwrite it")]
    Exists { path: PathBuf },
    #[error("{path} is {kind}; an output replaces only a regular file")]
    TargetNotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} does not name a file (it ends in `/`); give a file name")]
    NotAFileName { path: PathBuf },
    #[error(
        "{path} is a symbolic link to a file that does not exist; remove it or name another file"
    )]
    Dangling { path: PathBuf },
    #[error("cannot create a temporary file in {dir}: {}", describe_io(error))]
    Create { dir: PathBuf, error: io::Error },
    #[error("{path} is one of the inputs ({input}); write the output somewhere else")]
    TargetIsInput { path: PathBuf, input: PathBuf },
    #[error("{dir} does not exist or is not a directory; create it first")]
    NoDirectory { dir: PathBuf },
    #[error("{path} exists and is not an empty directory; choose a new directory")]
    DirNotEmpty { path: PathBuf },
}

/// An `io::Error` in words, without the "(os error N)" suffix for the common kinds.
fn describe_io(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) if code == libc::ELOOP => "too many levels of symbolic links (a loop?)".into(),
        Some(code) if code == libc::ENOENT => "no such file or directory".into(),
        Some(code) if code == libc::EACCES => "permission denied".into(),
        Some(code) if code == libc::ENOTDIR => "a component of the path is not a directory".into(),
        Some(code) if code == libc::EISDIR => "is a directory".into(),
        Some(code) if code == libc::ENOSPC => "no space left on the device".into(),
        _ => e.to_string(),
    }
}

impl FileError {
    fn io(path: &Path, error: io::Error) -> Self {
        FileError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// What kind of file `m` describes, for messages.
fn kind_of(m: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a regular file"
    }
}

/// Opens `path` for reading if it is a regular file (symbolic links followed). The open does
/// not block on a FIFO; anything but a regular file is refused before it is read.
pub fn open_regular(path: &Path) -> Result<File, FileError> {
    use std::os::unix::fs::OpenOptionsExt;
    // Look first (a socket cannot even be opened: its open error would say "No such device").
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            return Err(FileError::NotRegular {
                path: path.to_path_buf(),
                kind: kind_of(&m),
            });
        }
        Ok(_) => {}
        Err(e) => return Err(FileError::io(path, e)),
    }
    // Then open without blocking and look again at what was opened (it may have changed).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| FileError::io(path, e))?;
    let m = file.metadata().map_err(|e| FileError::io(path, e))?;
    if !m.is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(&m),
        });
    }
    // O_NONBLOCK has no effect on regular files; nothing to undo.
    Ok(file)
}

/// Reads a whole regular file of at most `limit` bytes (`what` names it in the error).
pub fn read_capped(path: &Path, limit: u64, what: &'static str) -> Result<Vec<u8>, FileError> {
    use std::io::Read;
    let file = open_regular(path)?;
    let len = file.metadata().map_err(|e| FileError::io(path, e))?.len();
    let too_large = |len| FileError::TooLarge {
        path: path.to_path_buf(),
        what,
        len,
        limit,
    };
    if len > limit {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FileError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Whether `path` exists, distinguishing "absent" from "cannot tell" (a symlink loop, a
/// permission problem): `Ok(None)` if absent, the metadata (symlinks followed) if present.
pub fn stat(path: &Path) -> Result<Option<Metadata>, FileError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A dangling symlink is "present" as a link; treat it as absent only if the link
            // itself is absent too.
            match std::fs::symlink_metadata(path) {
                Ok(_) => Err(FileError::io(path, e)),
                Err(_) => Ok(None),
            }
        }
        Err(e) => Err(FileError::io(path, e)),
    }
}

/// Checks an output target before any work is done: its directory exists; if it exists, `force`
/// was given, it is a regular file (or a symlink to one) and it is none of `inputs`.
pub fn check_output(target: &Path, force: bool, inputs: &[PathBuf]) -> Result<(), FileError> {
    if target.as_os_str().as_encoded_bytes().ends_with(b"/") || target.file_name().is_none() {
        return Err(FileError::NotAFileName {
            path: target.to_path_buf(),
        });
    }
    let dir = parent_dir(target);
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        _ => return Err(FileError::NoDirectory { dir }),
    }
    if let Ok(link) = std::fs::symlink_metadata(target)
        && link.file_type().is_symlink()
        && std::fs::metadata(target).is_err()
    {
        return Err(FileError::Dangling {
            path: target.to_path_buf(),
        });
    }
    let Some(m) = stat(target)? else {
        return Ok(());
    };
    if !m.is_file() {
        return Err(FileError::TargetNotRegular {
            path: target.to_path_buf(),
            kind: kind_of(&m),
        });
    }
    if !force {
        return Err(FileError::Exists {
            path: target.to_path_buf(),
        });
    }
    use std::os::unix::fs::MetadataExt;
    for input in inputs {
        if let Ok(im) = std::fs::metadata(input)
            && im.dev() == m.dev()
            && im.ino() == m.ino()
        {
            return Err(FileError::TargetIsInput {
                path: target.to_path_buf(),
                input: input.clone(),
            });
        }
    }
    Ok(())
}

/// The directory a target lives in (`.` for a bare file name).
pub fn parent_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Temporary files in flight, removed by the interrupt handler.
static IN_FLIGHT: Mutex<BTreeMap<u64, PathBuf>> = Mutex::new(BTreeMap::new());
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn in_flight() -> std::sync::MutexGuard<'static, BTreeMap<u64, PathBuf>> {
    IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Installs (once) a handler for SIGINT, SIGTERM and SIGHUP that removes every temporary output
/// file in flight and exits with 128 + the signal number, as a shell reports a killed command;
/// and one for SIGBUS (an input truncated while mapped) that removes them and exits 2.
pub fn install_interrupt_cleanup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        // SAFETY: installs a handler that only calls async-signal-safe functions.
        unsafe {
            libc::signal(
                libc::SIGBUS,
                on_sigbus as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
            return;
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                for path in in_flight().values() {
                    remove_temp(path);
                }
                std::process::exit(128 + sig);
            }
        });
    });
}

/// Removes a temporary file or directory of ours.
fn remove_temp(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// The prefix of temporary files for `target`: `.<name>.`.
fn temp_prefix(target: &Path) -> String {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.")
}

/// Removes temporary files that an earlier, killed write to `target` left behind (named by
/// [`AtomicFile`], owned by a process that no longer runs). Returns what was removed.
pub fn remove_stale_temps(target: &Path) -> Vec<PathBuf> {
    let dir = parent_dir(target);
    let prefix = temp_prefix(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone = pid > 0
            && unsafe { libc::kill(pid, 0) } == -1
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        let kind = entry.file_type();
        if gone && kind.map(|t| t.is_file() || t.is_dir()).unwrap_or(false) {
            let path = entry.path();
            remove_temp(&path);
            if std::fs::symlink_metadata(&path).is_err() {
                removed.push(path);
            }
        }
    }
    removed
}

/// A file being written beside its target, renamed onto it by [`AtomicFile::persist`]. Dropped
/// without persisting (an error), or interrupted by a signal, it is removed.
pub struct AtomicFile {
    /// Present until persisted.
    tmp: Option<tempfile::NamedTempFile>,
    target: PathBuf,
    force: bool,
    id: u64,
    /// Slot in the table the SIGBUS handler reads.
    slot: Option<usize>,
}

impl AtomicFile {
    /// Creates the temporary file in the target's directory. The target is checked again at
    /// [`AtomicFile::persist`] (it may appear meanwhile).
    pub fn create(target: &Path, force: bool) -> Result<Self, FileError> {
        use std::os::unix::fs::PermissionsExt;
        // A symlink target is written through: the file it points to is replaced, the link
        // stays (the checks of `check_output` follow links too).
        let target = match std::fs::symlink_metadata(target) {
            Ok(m) if m.file_type().is_symlink() => {
                std::fs::canonicalize(target).map_err(|_| FileError::Dangling {
                    path: target.to_path_buf(),
                })?
            }
            _ => target.to_path_buf(),
        };
        // Leftovers of a killed earlier write to the same target.
        remove_stale_temps(&target);
        let dir = parent_dir(&target);
        // The interrupt handler takes this lock first: holding it from creation to
        // registration means it never sees a temporary file it does not know of.
        let mut registry = in_flight();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}{}.", temp_prefix(&target), std::process::id()))
            .suffix(".tmp")
            // The process umask applies, as for any file the user creates.
            .permissions(std::fs::Permissions::from_mode(0o666))
            .tempfile_in(&dir)
            .map_err(|error| FileError::Create {
                dir: dir.clone(),
                error: io::Error::new(error.kind(), error.kind().to_string()),
            })?;
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        registry.insert(id, tmp.path().to_path_buf());
        drop(registry);
        let slot = signal_safe_register(tmp.path());
        Ok(AtomicFile {
            tmp: Some(tmp),
            target,
            force,
            id,
            slot,
        })
    }

    fn tmp(&self) -> &tempfile::NamedTempFile {
        self.tmp.as_ref().expect("present until persisted")
    }

    pub fn file(&self) -> &File {
        self.tmp().as_file()
    }

    pub fn file_mut(&mut self) -> &mut File {
        self.tmp
            .as_mut()
            .expect("present until persisted")
            .as_file_mut()
    }

    /// Where the data is until it is persisted.
    pub fn temp_path(&self) -> &Path {
        self.tmp().path()
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Flushes the data to disk and renames the file onto the target (refusing to replace an
    /// existing file without `force`, and anything but a regular file even with it).
    pub fn persist(mut self) -> Result<(), FileError> {
        let target = self.target.clone();
        self.file()
            .sync_all()
            .map_err(|e| FileError::io(&target, e))?;
        if let Some(m) = stat(&target)? {
            if !self.force {
                return Err(FileError::Exists { path: target });
            }
            if !m.is_file() {
                return Err(FileError::TargetNotRegular {
                    path: target,
                    kind: kind_of(&m),
                });
            }
        }
        let tmp = self.tmp.take().expect("present until persisted");
        // Rename and unregister under the handler's lock: an interrupt either removes the
        // temporary file before the rename or finds the target complete, never between.
        let mut registry = in_flight();
        let persisted = if self.force {
            tmp.persist(&target)
        } else {
            tmp.persist_noclobber(&target)
        };
        registry.remove(&self.id);
        drop(registry);
        signal_safe_unregister(self.slot.take());
        persisted.map(|_| ()).map_err(|e| {
            if e.error.kind() == io::ErrorKind::AlreadyExists {
                FileError::Exists { path: target }
            } else {
                FileError::io(&target, e.error)
            }
        })
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        in_flight().remove(&self.id);
        signal_safe_unregister(self.slot.take());
    }
}

/// Temporary files a SIGBUS handler may unlink: a fixed table of C strings, written with atomic
/// operations only (a signal handler may not take a lock or free memory). The strings are
/// leaked on purpose (a few per run), so that the handler never reads freed memory.
const SAFE_SLOTS: usize = 64;
static SAFE_PATHS: [std::sync::atomic::AtomicPtr<libc::c_char>; SAFE_SLOTS] =
    [const { std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()) }; SAFE_SLOTS];

fn signal_safe_register(path: &Path) -> Option<usize> {
    use std::os::unix::ffi::OsStrExt;
    use std::sync::atomic::Ordering::SeqCst;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let ptr = c.into_raw();
    SAFE_PATHS.iter().position(|slot| {
        slot.compare_exchange(std::ptr::null_mut(), ptr, SeqCst, SeqCst)
            .is_ok()
    })
}

fn signal_safe_unregister(slot: Option<usize>) {
    if let Some(i) = slot {
        SAFE_PATHS[i].store(std::ptr::null_mut(), std::sync::atomic::Ordering::SeqCst);
    }
}

/// SIGBUS: an input file mapped into memory shrank under us (truncated while being read). The
/// faulting access cannot be resumed: remove the temporary outputs, say what happened, exit 2.
extern "C" fn on_sigbus(_: libc::c_int) {
    for slot in &SAFE_PATHS {
        let p = slot.load(std::sync::atomic::Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` is a leaked, NUL-terminated CString; unlink is async-signal-safe.
            unsafe { libc::unlink(p) };
        }
    }
    let msg: &[u8] = b"error: an input file changed size while it was being read (truncated or rewritten by another program); stopped, nothing was written\n";
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(2);
    }
}

/// Checks, before any work, that a new directory can be made at `target`: its parent is a
/// directory and the target is absent or an empty directory ([`AtomicDir::create`] checks it
/// again when it is made).
pub fn check_new_dir(target: &Path) -> Result<(), FileError> {
    let parent = parent_dir(target);
    match std::fs::metadata(&parent) {
        Ok(m) if m.is_dir() => {}
        _ => return Err(FileError::NoDirectory { dir: parent }),
    }
    if let Some(m) = stat(target)? {
        let empty_dir = m.is_dir()
            && std::fs::read_dir(target)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        if !empty_dir {
            return Err(FileError::DirNotEmpty {
                path: target.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// A directory being filled beside its target directory, renamed onto it by
/// [`AtomicDir::persist`]; dropped without persisting, or interrupted, it is removed with its
/// contents. The target must not exist, or be an empty directory.
pub struct AtomicDir {
    tmp: Option<PathBuf>,
    target: PathBuf,
    id: u64,
}

impl AtomicDir {
    /// Checks the target (its parent exists; it is absent or an empty directory; it is not
    /// `input_dir`) and creates the temporary directory.
    pub fn create(target: &Path, input_dir: &Path) -> Result<Self, FileError> {
        let parent = parent_dir(target);
        match std::fs::metadata(&parent) {
            Ok(m) if m.is_dir() => {}
            _ => return Err(FileError::NoDirectory { dir: parent }),
        }
        if let Some(m) = stat(target)? {
            use std::os::unix::fs::MetadataExt;
            if let Ok(im) = std::fs::metadata(input_dir)
                && im.dev() == m.dev()
                && im.ino() == m.ino()
            {
                return Err(FileError::TargetIsInput {
                    path: target.to_path_buf(),
                    input: input_dir.to_path_buf(),
                });
            }
            let empty_dir = m.is_dir()
                && std::fs::read_dir(target)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
            if !empty_dir {
                return Err(FileError::DirNotEmpty {
                    path: target.to_path_buf(),
                });
            }
        }
        // Leftovers of a killed earlier run into the same target.
        remove_stale_temps(target);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = parent.join(format!(
            "{}{}.{}.tmp",
            temp_prefix(target),
            std::process::id(),
            id
        ));
        // Created and registered under the interrupt handler's lock (see AtomicFile::create).
        let mut registry = in_flight();
        std::fs::create_dir(&tmp).map_err(|e| FileError::io(&tmp, e))?;
        registry.insert(id, tmp.clone());
        drop(registry);
        Ok(AtomicDir {
            tmp: Some(tmp),
            target: target.to_path_buf(),
            id,
        })
    }

    /// Where files go until the directory is persisted.
    pub fn path(&self) -> &Path {
        self.tmp.as_deref().expect("present until persisted")
    }

    /// Renames the directory onto the target (replacing an empty directory).
    pub fn persist(mut self) -> Result<(), FileError> {
        let tmp = self.tmp.take().expect("present until persisted");
        // Under the interrupt handler's lock, as AtomicFile::persist.
        let mut registry = in_flight();
        if let Ok(m) = std::fs::symlink_metadata(&self.target)
            && m.is_dir()
        {
            // Empty (checked at creation; remove_dir refuses otherwise).
            if let Err(e) = std::fs::remove_dir(&self.target) {
                remove_temp(&tmp);
                registry.remove(&self.id);
                return Err(FileError::io(&self.target, e));
            }
        }
        let result =
            std::fs::rename(&tmp, &self.target).map_err(|e| FileError::io(&self.target, e));
        if result.is_err() {
            remove_temp(&tmp);
        }
        registry.remove(&self.id);
        result
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            remove_temp(&tmp);
        }
        in_flight().remove(&self.id);
    }
}

/// Writes `bytes` to `target` through an [`AtomicFile`].
pub fn write_atomic(target: &Path, force: bool, bytes: &[u8]) -> Result<(), FileError> {
    use std::io::Write;
    let mut f = AtomicFile::create(target, force)?;
    f.file_mut()
        .write_all(bytes)
        .map_err(|e| FileError::io(target, e))?;
    f.persist()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_regular_inputs_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        assert!(matches!(
            open_regular(&fifo),
            Err(FileError::NotRegular {
                kind: "a FIFO (named pipe)",
                ..
            })
        ));
        assert!(matches!(
            open_regular(dir.path()),
            Err(FileError::NotRegular {
                kind: "a directory",
                ..
            })
        ));
        assert!(matches!(
            open_regular(Path::new("/dev/zero")),
            Err(FileError::NotRegular {
                kind: "a character device",
                ..
            })
        ));
        let lp = dir.path().join("loop");
        std::os::unix::fs::symlink(&lp, &lp).unwrap();
        let e = open_regular(&lp).unwrap_err();
        assert!(e.to_string().contains("symbolic links"), "{e}");
    }

    #[test]
    fn reads_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read_capped(&p, 10, "test file").unwrap().len(), 10);
        assert!(matches!(
            read_capped(&p, 9, "test file"),
            Err(FileError::TooLarge {
                len: 10,
                limit: 9,
                ..
            })
        ));
    }

    #[test]
    fn outputs_are_checked_before_work() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::write(&input, b"x").unwrap();
        let inputs = [input.clone()];
        assert!(check_output(&dir.path().join("new"), false, &inputs).is_ok());
        assert!(matches!(
            check_output(&input, false, &inputs),
            Err(FileError::Exists { .. })
        ));
        assert!(matches!(
            check_output(&input, true, &inputs),
            Err(FileError::TargetIsInput { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&input, &link).unwrap();
        assert!(matches!(
            check_output(&link, true, &inputs),
            Err(FileError::TargetIsInput { .. })
        ));
        assert!(matches!(
            check_output(dir.path(), true, &inputs),
            Err(FileError::TargetNotRegular { .. })
        ));
        assert!(matches!(
            check_output(Path::new("/dev/null"), true, &inputs),
            Err(FileError::TargetNotRegular { .. })
        ));
        assert!(matches!(
            check_output(&dir.path().join("missing/x.bpk"), true, &inputs),
            Err(FileError::NoDirectory { .. })
        ));
    }

    #[test]
    fn atomic_files_respect_the_umask_and_leave_nothing_on_error() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        write_atomic(&target, false, b"hello").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"hello");
        // SAFETY: reading the umask requires setting it; it is put back at once.
        let umask = unsafe {
            let m = libc::umask(0o022);
            libc::umask(m);
            m
        };
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !(umask as u32));
        assert!(matches!(
            write_atomic(&target, false, b"again"),
            Err(FileError::Exists { .. })
        ));
        {
            let f = AtomicFile::create(&dir.path().join("never"), false).unwrap();
            assert!(f.temp_path().exists());
        }
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the persisted file remains");
    }

    #[test]
    fn stale_temps_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m.bpk");
        // A PID far above any real one on Linux (pid_max is at most 2^22).
        let stale = dir.path().join(".m.bpk.99999999.abc.tmp");
        let live = dir
            .path()
            .join(format!(".m.bpk.{}.abc.tmp", std::process::id()));
        let other = dir.path().join(".other.bpk.99999999.abc.tmp");
        for p in [&stale, &live, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        assert_eq!(remove_stale_temps(&target), vec![stale.clone()]);
        assert!(!stale.exists() && live.exists() && other.exists());
    }
}
