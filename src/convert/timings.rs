//! Where a conversion's time goes (`convert --timings`).
//!
//! Each piece of work adds the time it took to its stage: a chunk of rows ternarized, a shard
//! hashed, a tensor's bytes hashed or written. The sums are *busy* times: the time threads
//! spent in the stage, added over the threads (so a stage that kept two threads busy for one
//! second shows two seconds). They are measured with [`Instant`] around each piece, a few
//! thousand readings in a conversion, not with a profiler. On a machine shared with other work
//! a busy time also counts the moments the thread was runnable but not running. The process's
//! CPU time comes from `getrusage`. Two pieces are timed on the thread that started them only,
//! though other workers may help: the rotation of a projection with `--rotate`, and the range
//! check of a float tensor stored in a narrower type (`--keep f16`). The output
//! hash and write are measured by the writer ([`crate::format::writer::WriterTimes`]).

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A busy-time accumulator shared by the threads of one stage.
#[derive(Debug, Default)]
pub struct Busy(AtomicU64);

impl Busy {
    pub fn add(&self, d: Duration) {
        self.0.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Runs `f` and adds the time it took.
    pub fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.add(t.elapsed());
        r
    }

    pub fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// The live accumulators of one conversion.
#[derive(Debug, Default)]
pub struct Timings {
    /// SHA-256 of the source shards.
    pub source_hash: Busy,
    /// First start and last end of a shard's hashing.
    source_hash_span: Mutex<Option<(Instant, Instant)>>,
    /// Ternary projections: decoding, the absmean sum, ternarizing and packing (rows).
    pub ternarize: Busy,
    /// Float tensors (embedding, norms, head): checks for non-finite and overflowing values,
    /// re-encoding, compression, rotation.
    pub float: Busy,
    /// Source hashing done by the tensors' worker while the writer waited for the disk: part
    /// of `source_hash`, and taken out of the writer's own time.
    pub hashed_while_writing: Busy,
    /// SHA-256 of packed tensors computed in batches through the lanes, beside the writer's
    /// own hashing.
    pub output_hash: Busy,
}

impl Timings {
    /// Records one shard's hashing, from `start` to now.
    pub fn shard_hashed(&self, start: Instant) {
        let end = Instant::now();
        self.source_hash.add(end - start);
        let mut span = self
            .source_hash_span
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *span = Some(match *span {
            None => (start, end),
            Some((s, e)) => (s.min(start), e.max(end)),
        });
    }

    /// Wall time from the first shard's hashing starting to the last one's ending.
    pub fn source_hash_wall(&self) -> Duration {
        self.source_hash_span
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|(s, e)| e - s)
            .unwrap_or_default()
    }
}

/// CPU time the process has used so far: (user, system).
pub fn process_cpu() -> (Duration, Duration) {
    #[cfg(unix)]
    {
        // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            let tv = |t: libc::timeval| {
                Duration::from_secs(t.tv_sec.max(0) as u64)
                    + Duration::from_micros(t.tv_usec.max(0) as u64)
            };
            return (tv(ru.ru_utime), tv(ru.ru_stime));
        }
    }
    (Duration::ZERO, Duration::ZERO)
}

/// Where one conversion's time went (every figure in seconds).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TimingReport {
    /// Worker threads (the rayon pool the conversion ran in).
    pub threads: usize,
    /// Source files hashed (the shards).
    pub source_files: usize,
    /// Opening and checking the checkpoint, hashing config.json, creating the output (wall).
    pub open_s: f64,
    /// Hashing the source shards: wall from the first start to the last end, and busy.
    pub source_hash_wall_s: f64,
    pub source_hash_busy_s: f64,
    /// Reading, decoding, ternarizing and packing the projections (busy).
    pub ternarize_busy_s: f64,
    /// The float tensors: value checks, re-encoding, compression, rotation (busy).
    pub float_busy_s: f64,
    /// SHA-256 of the output tensors (busy).
    pub output_hash_busy_s: f64,
    /// Writing the output data into the file (busy).
    pub write_busy_s: f64,
    /// Whether the data went to disk by direct I/O (else through the page cache).
    pub direct_io: bool,
    /// From the end of the tensors to the file in place: header, fsync, rename (wall).
    pub finalize_s: f64,
    /// `--verify`, or writing another format from the .bpk (wall; 0 if neither).
    pub verify_export_s: f64,
    /// The whole conversion (wall).
    pub total_wall_s: f64,
    /// CPU time of the process during the conversion.
    pub user_cpu_s: f64,
    pub sys_cpu_s: f64,
}

impl TimingReport {
    /// CPUs kept busy on average: CPU time over wall time.
    pub fn cpus_used(&self) -> f64 {
        (self.user_cpu_s + self.sys_cpu_s) / self.total_wall_s.max(1e-9)
    }
}

impl fmt::Display for TimingReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let busy = self.source_hash_busy_s
            + self.ternarize_busy_s
            + self.float_busy_s
            + self.output_hash_busy_s
            + self.write_busy_s;
        writeln!(
            f,
            "timings ({} worker threads; busy = time threads spent in a stage, added over threads):",
            self.threads
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, secs: f64, what: &str| {
            let line = format!("  {name:<34} {secs:>7.3} s {what}");
            writeln!(f, "{}", line.trim_end())
        };
        row(f, "open and check the checkpoint", self.open_s, "wall")?;
        row(
            f,
            "source hash (SHA-256)",
            self.source_hash_busy_s,
            &format!(
                "busy, {:.3} s wall, {} file{}",
                self.source_hash_wall_s,
                self.source_files,
                if self.source_files == 1 { "" } else { "s" }
            ),
        )?;
        row(
            f,
            "read, decode, ternarize, pack",
            self.ternarize_busy_s,
            "busy",
        )?;
        row(f, "float tensors (check, copy)", self.float_busy_s, "busy")?;
        row(f, "output hash (SHA-256)", self.output_hash_busy_s, "busy")?;
        row(
            f,
            "write",
            self.write_busy_s,
            if self.direct_io {
                "busy (direct I/O)"
            } else {
                "busy (page cache)"
            },
        )?;
        row(
            f,
            "finalize (header, fsync, rename)",
            self.finalize_s,
            "wall",
        )?;
        // Only when there was a verification or an export (a millisecond or more).
        if self.verify_export_s >= 0.001 {
            row(f, "verify / export", self.verify_export_s, "wall")?;
        }
        row(f, "stages above, busy", busy, "")?;
        writeln!(
            f,
            "  {:<34} {:>7.3} s wall; CPU {:.3} s (user {:.3} + sys {:.3}) = {:.2} CPUs busy on average",
            "total",
            self.total_wall_s,
            self.user_cpu_s + self.sys_cpu_s,
            self.user_cpu_s,
            self.sys_cpu_s,
            self.cpus_used()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_adds_over_threads() {
        let b = Busy::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| b.add(Duration::from_millis(5)));
            }
        });
        assert_eq!(b.get(), Duration::from_millis(20));
        let v = b.time(|| 7);
        assert_eq!(v, 7);
        assert!(b.get() >= Duration::from_millis(20));
    }

    #[test]
    fn the_hash_span_runs_from_the_first_start_to_the_last_end() {
        let t = Timings::default();
        assert_eq!(t.source_hash_wall(), Duration::ZERO);
        let a = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        let b = Instant::now();
        t.shard_hashed(b);
        t.shard_hashed(a);
        let wall = t.source_hash_wall();
        assert!(wall >= b - a, "{wall:?}");
        assert!(
            t.source_hash.get() >= wall,
            "two overlapping spans add up to more"
        );
    }

    #[test]
    fn cpus_used_is_cpu_over_wall() {
        let r = TimingReport {
            total_wall_s: 2.0,
            user_cpu_s: 3.0,
            sys_cpu_s: 0.5,
            ..Default::default()
        };
        assert!((r.cpus_used() - 1.75).abs() < 1e-12);
        let text = r.to_string();
        assert!(text.contains("1.75 CPUs"), "{text}");
    }
}
