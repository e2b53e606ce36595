//! Convert: the pipeline from a checkpoint to a .bpk file.
//!
//! Source -> (transform: fold a residual rotation and online Hadamards into the weights, in f32,
//! only when asked) -> ternarize -> pack -> write.
//!
//! Tensors are processed one at a time in canonical order, straight from the memory-mapped
//! source: a ternary projection is decoded row by row (never the whole tensor in f32), summed
//! in f64 for its absmean scale, then ternarized and packed in a second pass over the rows;
//! other tensors are copied (or re-encoded, or zstd-compressed) in chunks. Rows are spread over
//! the rayon pool the caller installs; every reduction has a fixed order, so the output is
//! byte-identical whatever the thread count.
//!
//! Scheduling, so that every worker of the pool stays busy (see docs/benchmarks.md):
//! - the source files are hashed for provenance as tasks of the same pool, spawned first, so a
//!   free worker takes them at once: SHA-256 is sequential within a file, so for a single-file
//!   checkpoint that hash is the longest chain of work and must never wait. Where the CPU has
//!   a multi-message kernel ([`crate::num::digest::Lanes`]) and there are at least two shards
//!   per worker (three for the AVX-512 lanes), one task hashes several shards at once: four
//!   interleaved through the SHA extensions, or eight in AVX-512 lanes. That is 1.5 to 1.8
//!   times the throughput of hashing them one by one, each shard slower. Once the tensors are
//!   written, the worker that wrote them takes shards over from the lanes
//!   ([`FilesHasher::help`]);
//! - tensors go through a two-stage pipeline: while tensor `i` is made (ternarized, or its
//!   values checked), tensor `i - 1` is written, its SHA-256 computed on another task beside
//!   the write. Idle workers steal whichever of these is waiting, and at most two tensors'
//!   output is held at once;
//! - a persisted output goes to disk as it is written, by direct I/O where the file system
//!   allows it ([`BpkWriter::to_disk`]): no copy into the page cache, and little left for the
//!   `fsync` at the end.
//!
//! `convert --timings` reports the time spent in each stage ([`timings`]).

pub mod from_gguf;
pub mod rotate;
pub mod scheme;
pub mod timings;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rayon::prelude::*;

use crate::format::writer::{DiskMode, TensorSink};
use crate::format::{
    BpkWriter, Compression, Encoding, Header, Provenance, SourceFile, TensorPlan, WriteError,
};
use crate::fsio::FileError;
use crate::model::{ModelConfig, Role, TensorSpec, expected_tensors};
use crate::num::FloatDtype;
use crate::num::digest::{FilesHasher, Message, sha256_file};
use crate::num::dtype::{decode_f32, encode_f32, first_non_finite, first_non_finite_serial};
use crate::pack::{TernaryLayout, q8};
use crate::quant::AbsmeanScale;
use crate::quant::rows::{row_abs_sum, row_ternarize};
use crate::source::{CONFIG_FILE, Checkpoint, SourceError, SourceTensor};
use crate::transform::Rotation;
use scheme::{SchemeError, SchemeOptions};
use timings::{Busy, TimingReport, Timings, process_cpu};

/// zstd level for `--compress`: fast, and the output is identical on every run.
pub const ZSTD_LEVEL: i32 = 3;
use crate::num::dtype::STREAM_CHUNK;

/// What to produce.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub layout: TernaryLayout,
    /// Element type for non-ternary tensors; `None` keeps each tensor's source type.
    pub keep: Option<FloatDtype>,
    /// Store the embedding and the head as `q8_0` blocks (`--keep q8`; norms keep `keep`).
    pub q8_outputs: bool,
    /// zstd-compress non-ternary tensors.
    pub compress: bool,
    /// Overwrite an existing output file.
    pub force: bool,
    /// Activation scheme, online transforms, attention states, rotation.
    pub scheme: SchemeOptions,
}

/// A conversion failed; no file was left at the target.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Scheme(#[from] SchemeError),
    #[error("could not write the output: {error}")]
    Output { error: String },
    /// The output cannot be made as asked (found before any work).
    #[error("{reason}")]
    Refused { reason: String },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: {error}")]
    Write { path: PathBuf, error: WriteError },
    #[error(transparent)]
    GgufImport(#[from] from_gguf::GgufImportError),
    #[error(
        "{path}: the projections are already ternary (an HF offline/packed checkpoint), and a rotation must be folded into float weights before ternarization; rotate the bf16 master-weight checkpoint instead"
    )]
    RotateTernary { path: PathBuf },
    #[error("{path}: verification failed, nothing was written: {reason}")]
    VerifyFailed { path: PathBuf, reason: String },
    #[error(
        "{path}: tensor `{tensor}` has a non-finite value {value} at index {index:?}; the checkpoint is damaged or was saved after a diverged training step"
    )]
    NonFinite {
        path: PathBuf,
        tensor: String,
        index: Vec<usize>,
        value: f32,
    },
    #[error(
        "{path}: tensor `{tensor}` has the value {value} at index {index:?}, beyond the range of {dtype}; keep it as bf16, f32 or as in the source (--keep)"
    )]
    Overflow {
        path: PathBuf,
        tensor: String,
        index: Vec<usize>,
        value: f32,
        dtype: &'static str,
    },
}

/// A writer error as a conversion error: file errors name their path already.
pub(crate) fn write_error(out: &Path, error: WriteError) -> ConvertError {
    match error {
        WriteError::File(e) => ConvertError::File(e),
        error => ConvertError::Write {
            path: out.to_path_buf(),
            error,
        },
    }
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    pub header: Header,
    pub file_len: u64,
    /// Bytes of source tensor data read.
    pub source_tensor_bytes: u64,
    /// How the source path was read, when that is worth saying ([`Checkpoint::notes`]).
    pub notes: Vec<String>,
    /// Where the time went.
    pub timings: TimingReport,
}

/// Converts the checkpoint at `src` into a .bpk file at `out`. `progress` is called with the
/// number of source bytes just processed.
pub fn convert(
    src: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ConvertSummary, ConvertError> {
    convert_verified(src, out, opts, progress, &|_, _| Ok(()))
}

/// A check run on the finished file (at its temporary path) before it is renamed onto the
/// target; an `Err` message aborts the conversion and leaves nothing at the target.
pub type Verifier<'a> = dyn Fn(&Checkpoint, &Path) -> Result<(), String> + Sync + 'a;

/// [`convert`], with `verify` run on the finished file before it replaces the target.
pub fn convert_verified(
    src: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
    verify: &Verifier<'_>,
) -> Result<ConvertSummary, ConvertError> {
    convert_inner(src, out, opts, progress, verify, None)
}

/// Writes another format from the finished .bpk (at its temporary path), with the source
/// checkpoint at hand; the .bpk itself is then deleted.
pub type Exporter<'a> = dyn Fn(&Checkpoint, &Path) -> Result<(), ConvertError> + Sync + 'a;

/// Converts to a .bpk beside `out` (never persisted), verifies it, and hands it to `export`,
/// which writes the requested format at `out`: every output format is made from the same
/// checked .bpk (docs/architecture.md). `export` checks its own target.
pub fn convert_export(
    src: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
    verify: &Verifier<'_>,
    export: &Exporter<'_>,
) -> Result<ConvertSummary, ConvertError> {
    convert_inner(src, out, opts, progress, verify, Some(export))
}

fn convert_inner(
    src: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
    verify: &Verifier<'_>,
    export: Option<&Exporter<'_>>,
) -> Result<ConvertSummary, ConvertError> {
    let start = Instant::now();
    let cpu_start = process_cpu();
    let ckpt = Checkpoint::open(src)?;
    // Before any work: the target must be writable and must not be one of the inputs.
    if export.is_none() {
        crate::fsio::check_output(out, opts.force, &ckpt.input_files())?;
    }
    let write_err = |error| write_error(out, error);

    if opts.scheme.rotate_seed.is_some() && ckpt.is_ternary() {
        return Err(ConvertError::RotateTernary {
            path: ckpt.dir.clone(),
        });
    }
    let scheme = scheme::scheme(&ckpt.config, &opts.scheme)?;
    let model = scheme::converted_model(&ckpt.config, &opts.scheme);
    let rotation = match &scheme.residual_rotation {
        Some(r) => Some(
            Rotation::new(&ckpt.config, r.seed, &r.online)
                .map_err(|e| SchemeError::Rotation(e.to_string()))?,
        ),
        None => None,
    };
    check_q8(&model, opts)?;
    let jobs = jobs(&ckpt, &model)?;
    let plans: Vec<TensorPlan> = jobs.iter().map(|j| plan(j, opts)).collect();
    let config_sha = sha256_file(&ckpt.dir.join(CONFIG_FILE))?;
    let config_len = std::fs::metadata(ckpt.dir.join(CONFIG_FILE))
        .map(|m| m.len())
        .unwrap_or(0);
    let provenance_with = |shard_hashes: &[String]| Provenance {
        tool: env!("CARGO_PKG_NAME").to_string(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        source_files: std::iter::once(SourceFile {
            name: CONFIG_FILE.into(),
            bytes: config_len,
            sha256: config_sha.clone(),
        })
        .chain(
            ckpt.shards
                .iter()
                .zip(shard_hashes)
                .map(|(s, h)| SourceFile {
                    name: s.file_name.clone(),
                    bytes: s.len,
                    sha256: h.clone(),
                }),
        )
        .collect(),
        options: options_record(opts),
    };
    let placeholder: Vec<String> = ckpt.shards.iter().map(|_| "0".repeat(64)).collect();
    let mut writer = BpkWriter::create(
        out,
        opts.force,
        model,
        scheme,
        provenance_with(&placeholder),
        plans,
    )
    .map_err(write_err)?;
    if export.is_none() {
        // Persisted, so flushed to disk at the end: send the data there as it is written.
        writer.to_disk().map_err(write_err)?;
    }
    let opened = start.elapsed();

    let timings = Timings::default();
    let threads = rayon::current_num_threads();
    let (hashes, written) = hash_and_write(
        &ckpt,
        &jobs,
        rotation.as_ref(),
        &mut writer,
        out,
        opts,
        progress,
        &timings,
    );
    written?;
    let hashes = hashes?;
    let tensors_done = Instant::now();
    let writer_times = writer.times();
    let direct_io = export.is_none() && writer.disk_mode() == DiskMode::Direct;
    let finished = writer.finish(provenance_with(&hashes)).map_err(write_err)?;
    let mut finalize = tensors_done.elapsed();
    let verify_start = Instant::now();
    verify(&ckpt, finished.temp_path()).map_err(|reason| ConvertError::VerifyFailed {
        path: out.to_path_buf(),
        reason,
    })?;
    let mut verify_export = verify_start.elapsed();
    let (header, file_len) = match export {
        None => {
            let t = Instant::now();
            let r = finished.persist().map_err(write_err)?;
            finalize += t.elapsed();
            r
        }
        Some(export) => {
            let t = Instant::now();
            export(&ckpt, finished.temp_path())?;
            verify_export += t.elapsed();
            (finished.header.clone(), finished.len)
        }
    };
    let total = start.elapsed();
    let cpu_end = process_cpu();
    let timings = TimingReport {
        threads,
        source_files: ckpt.shards.len(),
        open_s: opened.as_secs_f64(),
        source_hash_wall_s: timings.source_hash_wall().as_secs_f64(),
        source_hash_busy_s: timings.source_hash.get().as_secs_f64(),
        ternarize_busy_s: timings.ternarize.get().as_secs_f64(),
        float_busy_s: timings.float.get().as_secs_f64(),
        output_hash_busy_s: (writer_times.hash + timings.output_hash.get()).as_secs_f64(),
        write_busy_s: writer_times
            .write
            .saturating_sub(timings.hashed_while_writing.get())
            .as_secs_f64(),
        direct_io,
        finalize_s: finalize.as_secs_f64(),
        verify_export_s: verify_export.as_secs_f64(),
        total_wall_s: total.as_secs_f64(),
        user_cpu_s: cpu_end.0.saturating_sub(cpu_start.0).as_secs_f64(),
        sys_cpu_s: cpu_end.1.saturating_sub(cpu_start.1).as_secs_f64(),
    };
    Ok(ConvertSummary {
        header,
        file_len,
        source_tensor_bytes: ckpt.tensor_bytes(),
        notes: ckpt.notes.clone(),
        timings,
    })
}

/// Hashes the source shards and writes the tensors, in the current rayon pool: the shards'
/// hashes are spawned first, so that free workers start them at once, and the tensors are
/// written on the current worker meanwhile ([`write_tensors`]). A failed conversion cancels the
/// hashing.
#[allow(clippy::too_many_arguments)]
fn hash_and_write(
    ckpt: &Checkpoint,
    jobs: &[Job<'_>],
    rotation: Option<&Rotation>,
    writer: &mut BpkWriter,
    out: &Path,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
    timings: &Timings,
) -> (Result<Vec<String>, SourceError>, Result<(), ConvertError>) {
    let cancel = AtomicBool::new(false);
    let shards = ckpt.shards.len();
    // The lanes hash several files on one core (four through the SHA extensions, or eight in
    // AVX-512 lanes) with 55 to 65% of the CPU time the SHA extensions take one at a time, but
    // each file slower: worth it when cores are scarce. Four files through the SHA extensions
    // go at 0.8 GB/s each, so two files per worker are enough (4 shards on 2 cores: 1.66-1.73 s
    // against 2.38-2.48 s one file per task); eight AVX-512 lanes go at 0.35 GB/s each, so they
    // need three (7 shards on 2 cores). Otherwise one file per task, as many at once as there
    // are workers.
    let kernel = crate::num::digest::Lanes::detect();
    let per_worker = match kernel {
        Some(crate::num::digest::Lanes::ShaExtensions) => 2,
        _ => 3,
    };
    let lanes = kernel.is_some() && shards >= per_worker * rayon::current_num_threads();
    let width = kernel.map_or(1, |k| k.width());
    // Lanes the shards leave free hash the largest float tensors stored as they are (the
    // embedding), whose digests the writer would otherwise compute on the tensors' worker.
    let free = if lanes {
        (width - shards % width) % width
    } else {
        0
    };
    let mut as_is: Vec<&Job<'_>> = jobs
        .iter()
        .filter(|j| stored_as_is(j, rotation, opts) && ckpt.bytes(j.source).len() >= 16 << 20)
        .collect();
    as_is.sort_by_key(|j| std::cmp::Reverse(ckpt.bytes(j.source).len()));
    as_is.truncate(free);
    let releases: Vec<Box<dyn Fn(usize, usize) + Sync + '_>> = as_is
        .iter()
        .map(|j| {
            let t = j.source;
            Box::new(move |offset, len| ckpt.release_range(t, offset, len)) as Box<_>
        })
        .collect();
    let messages: Vec<Message<'_>> = ckpt
        .shards
        .iter()
        .map(|s| Message::File(s.path.as_path()))
        .chain(
            as_is
                .iter()
                .zip(&releases)
                .map(|(j, r)| Message::Bytes(ckpt.bytes(j.source), r.as_ref())),
        )
        .collect();
    let deferred: Vec<&str> = as_is.iter().map(|j| j.spec.name.as_str()).collect();
    let hasher = FilesHasher::new(&messages, &cancel);
    // One lanes task: it takes the next file as each finishes, and the tensors' worker joins
    // it once the tensors are written.
    let tasks = if lanes { 1 } else { shards };
    let written = rayon::scope(|s| {
        for _ in 0..tasks {
            let hasher = &hasher;
            s.spawn(move |_| {
                let t = Instant::now();
                let worked = if lanes {
                    hasher.run_lanes()
                } else {
                    hasher.help()
                };
                if worked {
                    timings.shard_hashed(t);
                }
            });
        }
        // While the writer waits for the disk (the 656 MB embedding of 2B4T comes first and
        // the disk takes about half a second for it), this worker takes steps of the lanes on
        // files the lanes' worker does not hold, a window at a time.
        let hash_a_window = || {
            let t = Instant::now();
            let worked = hasher.help_step();
            if worked {
                timings.shard_hashed(t);
                timings.hashed_while_writing.add(t.elapsed());
            }
            worked
        };
        let written = crate::fsio::direct::with_idle_work(&hash_a_window, || {
            write_tensors(
                ckpt, jobs, rotation, writer, out, opts, &deferred, progress, timings,
            )
        });
        if written.is_err() {
            cancel.store(true, Ordering::Relaxed);
        } else {
            // The tensors are done. With one worker, the spawned lanes task would only run when
            // the scope ends, so run the lanes here; then take files over from the lanes rather
            // than wait for them.
            let t = Instant::now();
            let lanes_ran = lanes && hasher.run_lanes();
            if hasher.help() || lanes_ran {
                timings.shard_hashed(t);
            }
        }
        written
    });
    let cancelled = cancel.load(Ordering::Relaxed);
    let mut results = hasher.into_results();
    let tensor_digests = results.split_off(shards);
    let hashes = results
        .into_iter()
        .zip(&ckpt.shards)
        .map(|(d, shard)| match d {
            Ok(Some(h)) => Ok(h),
            // Cancelled: only after the conversion failed, whose error is the one reported.
            Ok(None) if cancelled => Ok(String::new()),
            Ok(None) => Err(SourceError::from(FileError::Io {
                path: shard.path.clone(),
                error: io::Error::other("was not hashed (an internal error; please report it)"),
            })),
            Err(e) => Err(SourceError::from(e)),
        })
        .collect();
    let written = written.and_then(|()| {
        for (name, d) in deferred.iter().zip(tensor_digests) {
            // Bytes in memory cannot fail to hash; `None` only after a cancel.
            let d = match d {
                Ok(Some(d)) => d,
                _ => String::new(),
            };
            writer
                .set_digest(name, d)
                .map_err(|e| write_error(out, e))?;
        }
        Ok(())
    });
    (hashes, written)
}

fn options_record(opts: &ConvertOptions) -> BTreeMap<String, String> {
    let mut map = opts.scheme.record();
    map.extend([
        ("layout".to_string(), opts.layout.as_str().to_string()),
        (
            "keep".to_string(),
            if opts.q8_outputs {
                "q8".to_string()
            } else {
                opts.keep
                    .map(|d| d.as_str())
                    .unwrap_or("source")
                    .to_string()
            },
        ),
        ("compress".to_string(), opts.compress.to_string()),
    ]);
    map
}

/// One tensor of the output: what it is and which source tensor it is made from (a rotated
/// model's head is made from a tied embedding).
pub struct Job<'a> {
    pub spec: TensorSpec,
    pub source: &'a SourceTensor,
}

/// The output tensors of a conversion to `model` (the converted config), in canonical order,
/// each with its source.
pub fn jobs<'a>(ckpt: &'a Checkpoint, model: &ModelConfig) -> Result<Vec<Job<'a>>, ConvertError> {
    expected_tensors(model)
        .into_iter()
        .map(|spec| {
            let source = ckpt
                .tensors
                .iter()
                .find(|t| t.spec.name == spec.name)
                .or_else(|| {
                    (spec.role == Role::LmHead)
                        .then(|| ckpt.tensors.iter().find(|t| t.spec.role == Role::Embedding))
                        .flatten()
                })
                .ok_or_else(|| SourceError::MissingTensor {
                    dir: ckpt.dir.clone(),
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                })?;
            Ok(Job { spec, source })
        })
        .collect()
}

/// How one output tensor will be stored.
fn plan(j: &Job<'_>, opts: &ConvertOptions) -> TensorPlan {
    let ternary = j.spec.role.is_ternary();
    let encoding = if ternary {
        Encoding::from_layout(opts.layout)
    } else if opts.q8_outputs && is_q8_role(j.spec.role) {
        Encoding::Q8
    } else {
        Encoding::from_float(opts.keep.unwrap_or(j.source.dtype))
    };
    TensorPlan {
        name: j.spec.name.clone(),
        role: j.spec.role,
        layer: j.spec.layer.map(|l| l as u32),
        encoding,
        shape: j.spec.shape.iter().map(|&d| d as u64).collect(),
        compression: if opts.compress && encoding.float().is_some() {
            Compression::Zstd
        } else {
            Compression::None
        },
    }
}

/// The tensors `--keep q8` stores as `q8_0`: the embedding and the head.
fn is_q8_role(role: Role) -> bool {
    matches!(role, Role::Embedding | Role::LmHead)
}

/// Refuses `--keep q8` before any work where a row of the embedding or head cannot be cut
/// into whole blocks of 32.
fn check_q8(model: &ModelConfig, opts: &ConvertOptions) -> Result<(), ConvertError> {
    if opts.q8_outputs && model.hidden_size % q8::BLOCK != 0 {
        return Err(ConvertError::Refused {
            reason: format!(
                "--keep q8 stores the embedding and the head in blocks of {} values per row, but hidden_size {} is not a multiple of {}; use --keep f16 (or source) for this model",
                q8::BLOCK,
                model.hidden_size,
                q8::BLOCK
            ),
        });
    }
    Ok(())
}

/// Writes the embedding or the head as `q8_0`, a chunk of whole rows at a time, the chunks
/// quantized in parallel (`rotation`: the rotated values, as [`rotated_floats`] gives them).
/// [`make`] has checked that the source values are finite.
fn write_q8(
    ckpt: &Checkpoint,
    job: &Job<'_>,
    rotation: Option<&Rotation>,
    writer: &mut BpkWriter,
    out: &Path,
) -> Result<(), ConvertError> {
    let t = job.source;
    let bytes = ckpt.bytes(t);
    let cols = job.spec.shape[1];
    // A block scale max|x| / 127 beyond f16's range cannot be stored: the first such value.
    let mut first_bad: Option<(usize, f32)> = None;
    let mut quantize = |start: usize, values: &[f32], enc: &mut Vec<u8>| -> io::Result<()> {
        if let Some(p) = values.iter().position(|v| !q8::scale_fits(v.abs())) {
            first_bad = Some((start + p, values[p]));
            return Err(io::Error::other("a value beyond the q8_0 scale's range"));
        }
        enc.resize(values.len() / cols * q8::row_bytes(cols), 0);
        enc.par_chunks_mut(q8::row_bytes(cols))
            .zip(values.par_chunks(cols))
            .for_each(|(o, v)| q8::quantize_row(v, o));
        Ok(())
    };
    let mut enc = Vec::new();
    let written = match rotation {
        None => {
            let size = t.dtype.size();
            let rows_per_chunk = (STREAM_CHUNK * 16 / cols).max(1);
            let mut values = vec![0f32; rows_per_chunk * cols];
            writer.write_tensor(None, |sink| {
                for (i, c) in bytes.chunks(rows_per_chunk * cols * size).enumerate() {
                    let n = c.len() / size;
                    decode_f32(t.dtype, c, &mut values[..n]);
                    quantize(i * rows_per_chunk * cols, &values[..n], &mut enc)?;
                    sink.write_all(&enc)?;
                }
                Ok(())
            })
        }
        Some(rot) => {
            let gain = gain_of(ckpt, job.spec.role, job.spec.layer)?;
            writer.write_tensor(None, |sink| {
                rotated_floats(ckpt, job, rot, gain.as_deref(), &mut |start, values| {
                    quantize(start, values, &mut enc)?;
                    sink.write_all(&enc)
                })
            })
        }
    };
    if let Some((index, value)) = first_bad {
        return Err(ConvertError::Overflow {
            path: ckpt.shards[t.shard].path.clone(),
            tensor: job.spec.name.clone(),
            index: unravel(index, &job.spec.shape),
            value,
            dtype: "q8_0",
        });
    }
    written.map_err(|e| write_error(out, e))?;
    Ok(())
}

/// What [`make`] produced for one output tensor, for [`emit`] to write.
enum Made<'c> {
    /// The bytes to store (a packed projection, or a float tensor kept as it is in the
    /// source), with a ternary tensor's scale.
    Bytes {
        scale: Option<f32>,
        bytes: Cow<'c, [u8]>,
    },
    /// A float tensor re-encoded, compressed or rotated while it is written.
    Streamed,
}

/// Writes every job's tensor in order, as a two-stage pipeline: each step makes tensor `i`
/// ([`make`]) while tensor `i - 1` is written ([`emit`]), the two joined with `rayon::join`
/// so that a free worker takes one of them. The writer is used by one emit at a time, in
/// tensor order, so the file is the same whatever runs where.
#[allow(clippy::too_many_arguments)]
fn write_tensors(
    ckpt: &Checkpoint,
    jobs: &[Job<'_>],
    rotation: Option<&Rotation>,
    writer: &mut BpkWriter,
    out: &Path,
    opts: &ConvertOptions,
    deferred: &[&str],
    progress: &(dyn Fn(u64) + Sync),
    timings: &Timings,
) -> Result<(), ConvertError> {
    let mut pending: Option<(&Job<'_>, Made<'_>)> = None;
    let mut digests = DigestBatch::new();
    let buffers = Buffers::default();
    let emit_one = |(j, m): (&Job<'_>, Made<'_>),
                    writer: &mut BpkWriter,
                    digests: Option<&mut DigestBatch>| {
        emit(
            ckpt, j, m, rotation, writer, out, opts, deferred, digests, progress, timings,
        )
    };
    for job in jobs {
        let previous = pending.take();
        let (emitted, made) = rayon::join(
            || match previous {
                Some(p) => emit_one(p, writer, digests.as_mut()),
                None => Ok(()),
            },
            || make(ckpt, job, rotation, opts, &buffers, timings),
        );
        // The earlier tensor's error first: errors come in tensor order.
        emitted?;
        if let Some(batch) = digests.as_mut().filter(|b| b.bytes >= DIGEST_BATCH_BYTES) {
            batch.hash_into(writer, out, &buffers, timings)?;
        }
        pending = Some((job, made?));
    }
    if let Some(p) = pending {
        emit_one(p, writer, digests.as_mut())?;
    }
    if let Some(batch) = digests.as_mut() {
        batch.hash_into(writer, out, &buffers, timings)?;
    }
    Ok(())
}

/// Packed bytes held for their SHA-256 after they are written: about two blocks of 2B4T.
const DIGEST_BATCH_BYTES: usize = 32 << 20;

/// Packed tensors written without their digest ([`BpkWriter::write_tensor_bytes_digest_later`])
/// and kept until there are enough to hash them together through the lanes of the source's
/// hashing (four messages through the SHA extensions cost about 0.6 times the CPU of one at a
/// time), where the CPU has them.
struct DigestBatch {
    tensors: Vec<(String, Vec<u8>)>,
    bytes: usize,
}

impl DigestBatch {
    /// A batch where the CPU has a multi-message kernel; `None` (digests as each tensor is
    /// written) elsewhere.
    fn new() -> Option<Self> {
        crate::num::digest::Lanes::detect().map(|_| DigestBatch {
            tensors: Vec::new(),
            bytes: 0,
        })
    }

    /// Hashes the tensors held, hands their digests to `writer`, and empties the batch.
    fn hash_into(
        &mut self,
        writer: &mut BpkWriter,
        out: &Path,
        buffers: &Buffers,
        timings: &Timings,
    ) -> Result<(), ConvertError> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let keep = |_: usize, _: usize| {};
        let messages: Vec<Message<'_>> = self
            .tensors
            .iter()
            .map(|(_, b)| Message::Bytes(b, &keep))
            .collect();
        let never = AtomicBool::new(false);
        let hasher = FilesHasher::new(&messages, &never);
        hasher.run_lanes();
        let digests = hasher.into_results();
        timings.output_hash.add(start.elapsed());
        for ((name, bytes), d) in self.tensors.drain(..).zip(digests) {
            // Bytes in memory cannot fail to hash, and nothing cancels this hasher.
            let d = match d {
                Ok(Some(d)) => d,
                _ => String::new(),
            };
            writer
                .set_digest(&name, d)
                .map_err(|e| write_error(out, e))?;
            buffers.give(bytes);
        }
        self.bytes = 0;
        Ok(())
    }
}

/// Packed tensors' buffers, handed back once written and hashed, for the next tensors. A new
/// buffer of a few MB is mapped by the kernel a page at a time, each page zeroed on its first
/// touch (about 4% of a 2B4T conversion's CPU); one used again is only cleared.
#[derive(Default)]
struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

/// Most bytes [`Buffers`] holds: a digest batch's worth and a little more.
const BUFFERS_HELD: usize = DIGEST_BATCH_BYTES + (16 << 20);

impl Buffers {
    /// `len` zero bytes: the smallest buffer held that is large enough, else a new one.
    fn take(&self, len: usize) -> Vec<u8> {
        let found = {
            let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let best = (0..held.len())
                .filter(|&i| held[i].capacity() >= len)
                .min_by_key(|&i| held[i].capacity());
            best.map(|i| held.swap_remove(i))
        };
        match found {
            Some(mut b) => {
                b.clear();
                b.resize(len, 0);
                b
            }
            None => vec![0u8; len],
        }
    }

    /// Keeps `b` for a later [`Buffers::take`], unless that would hold more than
    /// [`BUFFERS_HELD`] bytes.
    fn give(&self, b: Vec<u8>) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = held.iter().map(Vec::capacity).sum();
        if total + b.capacity() <= BUFFERS_HELD {
            held.push(b);
        }
    }
}

/// The error for a non-finite value at flat index `index` of a job's source tensor.
fn non_finite(ckpt: &Checkpoint, job: &Job<'_>, index: usize, value: f32) -> ConvertError {
    let t = job.source;
    ConvertError::NonFinite {
        path: ckpt.shards[t.shard].path.clone(),
        tensor: t.spec.name.clone(),
        index: unravel(index, &t.spec.shape),
        value,
    }
}

/// The error for a value beyond the range of the stored type.
fn overflow(
    ckpt: &Checkpoint,
    job: &Job<'_>,
    index: usize,
    value: f32,
    dtype: FloatDtype,
) -> ConvertError {
    ConvertError::Overflow {
        path: ckpt.shards[job.source.shard].path.clone(),
        tensor: job.spec.name.clone(),
        index: unravel(index, &job.spec.shape),
        value,
        dtype: dtype.as_str(),
    }
}

/// Whether [`make`] hands a tensor's source bytes over unchanged ([`Made::Bytes`] of a float
/// tensor): not ternary, not rotated, not made `q8_0`, not re-encoded, not compressed.
fn stored_as_is(job: &Job<'_>, rotation: Option<&Rotation>, opts: &ConvertOptions) -> bool {
    let role = job.spec.role;
    !role.is_ternary()
        && rotation.is_none()
        && !(opts.q8_outputs && is_q8_role(role))
        && opts.keep.unwrap_or(job.source.dtype) == job.source.dtype
        && !opts.compress
}

/// The first stage for one tensor: ternarizes a projection into its packed bytes, or checks a
/// float tensor's values (and hands over its source bytes when they are stored as they are).
fn make<'c>(
    ckpt: &'c Checkpoint,
    job: &Job<'c>,
    rotation: Option<&Rotation>,
    opts: &ConvertOptions,
    buffers: &Buffers,
    timings: &Timings,
) -> Result<Made<'c>, ConvertError> {
    let t = job.source;
    let bytes = ckpt.bytes(t);
    let role = job.spec.role;
    let target = opts.keep.unwrap_or(t.dtype);
    let packed = |scale: f32, packed: Vec<u8>| Made::Bytes {
        scale: Some(scale),
        bytes: Cow::Owned(packed),
    };
    match (role.is_ternary(), rotation) {
        (true, None) if t.ternary.is_some() => {
            // Already ternary (HF offline quantization): the checkpoint's trits and scale.
            let (rows, k) = (t.spec.shape[0], t.spec.shape[1]);
            let a = t.ternary.as_ref().map(|ts| ts.a).unwrap_or(0.0);
            timings.ternarize.time(|| {
                let trits = ckpt.trits(t)?;
                let rb = opts.layout.row_bytes(k);
                let mut out = vec![0u8; rows * rb];
                for (src, dst) in trits.chunks_exact(k).zip(out.chunks_exact_mut(rb)) {
                    opts.layout.pack_row(src, dst);
                }
                Ok(packed(a, out))
            })
        }
        (true, None) => {
            let (rows, k) = (t.spec.shape[0], t.spec.shape[1]);
            let buf = buffers.take(rows * opts.layout.row_bytes(k));
            let (scale, out) = ternarize_into(
                t.dtype,
                bytes,
                rows,
                k,
                opts.layout,
                &timings.ternarize,
                buf,
            )
            .map_err(|(i, v)| non_finite(ckpt, job, i, v))?;
            Ok(packed(scale.scale, out))
        }
        (true, Some(rot)) => {
            // Transform stage: the whole projection in f32 (a writer's columns mix every
            // row), rotated, then ternarized from f32.
            let f = timings.ternarize.time(|| {
                if let Some((i, v)) = first_non_finite(t.dtype, bytes) {
                    return Err(non_finite(ckpt, job, i, v));
                }
                let (rows, k) = (job.spec.shape[0], job.spec.shape[1]);
                let mut w = vec![0f32; rows * k];
                decode_f32(t.dtype, bytes, &mut w);
                let gain = gain_of(ckpt, role, job.spec.layer)?;
                rot.fold(role, &mut w, k, gain.as_deref());
                let mut f = Vec::with_capacity(w.len() * 4);
                encode_f32(FloatDtype::F32, &w, &mut f);
                Ok(f)
            })?;
            let (rows, k) = (job.spec.shape[0], job.spec.shape[1]);
            let (scale, out) = ternarize_timed(
                FloatDtype::F32,
                &f,
                rows,
                k,
                opts.layout,
                &timings.ternarize,
            )
            .map_err(|(i, v)| non_finite(ckpt, job, i, v))?;
            Ok(packed(scale.scale, out))
        }
        (false, rot) => {
            if let Some((i, v)) = first_non_finite_timed(t.dtype, bytes, &timings.float) {
                return Err(non_finite(ckpt, job, i, v));
            }
            if rot.is_some() || (opts.q8_outputs && is_q8_role(role)) {
                return Ok(Made::Streamed);
            }
            if let Some((i, v)) = timings
                .float
                .time(|| first_overflow(t.dtype, target, bytes))
            {
                return Err(overflow(ckpt, job, i, v, target));
            }
            Ok(if target == t.dtype && !opts.compress {
                Made::Bytes {
                    scale: None,
                    bytes: Cow::Borrowed(bytes),
                }
            } else {
                Made::Streamed
            })
        }
    }
}

/// The second stage for one tensor: writes what [`make`] produced (streaming a re-encoded,
/// compressed or rotated float tensor from the source), then releases the source's pages.
#[allow(clippy::too_many_arguments)]
fn emit(
    ckpt: &Checkpoint,
    job: &Job<'_>,
    made: Made<'_>,
    rotation: Option<&Rotation>,
    writer: &mut BpkWriter,
    out: &Path,
    opts: &ConvertOptions,
    deferred: &[&str],
    digests: Option<&mut DigestBatch>,
    progress: &(dyn Fn(u64) + Sync),
    timings: &Timings,
) -> Result<(), ConvertError> {
    let out_path = |error: WriteError| write_error(out, error);
    let t = job.source;
    let bytes = ckpt.bytes(t);
    let target = opts.keep.unwrap_or(t.dtype);
    if opts.q8_outputs && is_q8_role(job.spec.role) {
        let start = Instant::now();
        let before = writer.times();
        write_q8(ckpt, job, rotation, writer, out)?;
        let after = writer.times();
        let sink = (after.hash + after.write).saturating_sub(before.hash + before.write);
        timings.float.add(start.elapsed().saturating_sub(sink));
        ckpt.release(t);
        progress(bytes.len() as u64);
        return Ok(());
    }
    match made {
        Made::Bytes { scale, bytes } if deferred.contains(&job.spec.name.as_str()) => writer
            .write_tensor_bytes_digest_later(scale, &bytes)
            .map_err(out_path)?,
        // Packed bytes made for the file: kept for a batch of digests.
        Made::Bytes {
            scale,
            bytes: Cow::Owned(bytes),
        } if digests.is_some() => {
            writer
                .write_tensor_bytes_digest_later(scale, &bytes)
                .map_err(out_path)?;
            if let Some(batch) = digests {
                batch.bytes += bytes.len();
                batch.tensors.push((job.spec.name.clone(), bytes));
            }
        }
        Made::Bytes { scale, bytes } => {
            writer.write_tensor_bytes(scale, &bytes).map_err(out_path)?
        }
        Made::Streamed => {
            // The float stage's time is the stream's, less the writer's hashing and writing.
            let before = writer.times();
            let start = Instant::now();
            let result = match rotation {
                None => {
                    let compress = opts.compress;
                    writer
                        .write_tensor(None, |sink| {
                            copy_float(t.dtype, target, compress, bytes, sink)
                        })
                        .map_err(out_path)
                }
                Some(rot) => {
                    let gain = gain_of(ckpt, job.spec.role, job.spec.layer)?;
                    let mut first_bad: Option<(usize, f32)> = None;
                    let total = bytes.len() / t.dtype.size();
                    let written = writer.write_tensor(None, |sink| {
                        let mut out = float_writer(target, opts.compress, total, sink)?;
                        let mut enc = Vec::new();
                        rotated_floats(ckpt, job, rot, gain.as_deref(), &mut |start, values| {
                            if let Some(p) = values.iter().position(|v| !representable(*v, target))
                            {
                                first_bad = Some((start + p, values[p]));
                                return Err(io::Error::other("a value beyond the stored type"));
                            }
                            enc.clear();
                            encode_f32(target, values, &mut enc);
                            out.write_all(&enc)
                        })?;
                        out.flush()
                    });
                    match first_bad {
                        Some((i, v)) => Err(overflow(ckpt, job, i, v, target)),
                        None => written.map_err(out_path),
                    }
                }
            };
            let after = writer.times();
            let sink = (after.hash + after.write).saturating_sub(before.hash + before.write);
            timings.float.add(start.elapsed().saturating_sub(sink));
            result?;
        }
    }
    ckpt.release(t);
    progress(bytes.len() as u64);
    Ok(())
}

/// Whether `v` stays finite when stored as `dtype`.
fn representable(v: f32, dtype: FloatDtype) -> bool {
    let mut enc = Vec::with_capacity(4);
    encode_f32(dtype, &[v], &mut enc);
    let mut back = [0f32];
    decode_f32(dtype, &enc, &mut back);
    back[0].is_finite()
}

/// The norm gain a rotation folds into a reader of `role` (decoded), if any.
pub fn gain_of(
    ckpt: &Checkpoint,
    role: Role,
    layer: Option<usize>,
) -> Result<Option<Vec<f32>>, ConvertError> {
    let Some(norm) = Rotation::gain_role(role) else {
        return Ok(None);
    };
    let layer = if norm == Role::FinalNorm { None } else { layer };
    let t = ckpt
        .tensors
        .iter()
        .find(|t| t.spec.role == norm && t.spec.layer == layer)
        .ok_or_else(|| SourceError::MissingTensor {
            dir: ckpt.dir.clone(),
            name: norm.as_str().to_string(),
            expected: vec![],
        })?;
    let mut g = vec![0f32; t.numel()];
    decode_f32(t.dtype, ckpt.bytes(t), &mut g);
    Ok(Some(g))
}

/// A writer into the sink that zstd-compresses if asked (`total` elements of `target`,
/// declared to the compressor so that readers can check the length up front).
pub(crate) fn float_writer<'s>(
    target: FloatDtype,
    compress: bool,
    total: usize,
    sink: &'s mut TensorSink<'_>,
) -> io::Result<Box<dyn Write + 's>> {
    Ok(if compress {
        let mut enc = zstd::stream::write::Encoder::new(sink, ZSTD_LEVEL)?;
        enc.include_contentsize(true)?;
        enc.set_pledged_src_size(Some((total * target.size()) as u64))?;
        Box::new(enc.auto_finish())
    } else {
        Box::new(sink)
    })
}

/// The values of an output float tensor with `rotation` folded in (`gain`: the norm gain folded
/// into a head), handed to `f(first_element, values)` a chunk of whole rows at a time: the
/// embedding and the head rotate each row on its own, so memory stays at one chunk.
pub fn rotated_floats(
    ckpt: &Checkpoint,
    job: &Job<'_>,
    rotation: &Rotation,
    gain: Option<&[f32]>,
    f: &mut dyn FnMut(usize, &[f32]) -> io::Result<()>,
) -> io::Result<()> {
    let t = job.source;
    let bytes = ckpt.bytes(t);
    let size = t.dtype.size();
    let total = bytes.len() / size;
    let cols = *job.spec.shape.last().expect("a tensor has a shape");
    let chunk = (STREAM_CHUNK / cols).max(1) * cols;
    let mut values = vec![0f32; chunk.min(total)];
    let mut start = 0;
    while start < total {
        let n = (total - start).min(chunk);
        decode_f32(
            t.dtype,
            &bytes[start * size..(start + n) * size],
            &mut values[..n],
        );
        rotation.fold(job.spec.role, &mut values[..n], cols, gain);
        f(start, &values[..n])?;
        start += n;
    }
    Ok(())
}

/// Turns `[i]` into a multi-index for messages.
pub fn unravel(mut index: usize, shape: &[usize]) -> Vec<usize> {
    let mut out = vec![0; shape.len()];
    for (o, &d) in out.iter_mut().zip(shape).rev() {
        *o = index % d.max(1);
        index /= d.max(1);
    }
    out
}

/// Rows in one piece of parallel ternarization work (and one timing reading): 16 rows of 2560
/// bf16 weights are 80 KB of source.
const ROWS_PER_TASK: usize = 16;

/// Ternarizes a `[rows, k]` tensor of `dtype` elements: returns its absmean scale and its rows
/// packed in `layout`, or the flat index and value of the first non-finite element.
pub fn ternarize(
    dtype: FloatDtype,
    bytes: &[u8],
    rows: usize,
    k: usize,
    layout: TernaryLayout,
) -> Result<(AbsmeanScale, Vec<u8>), (usize, f32)> {
    ternarize_timed(dtype, bytes, rows, k, layout, &Busy::default())
}

/// [`ternarize`], adding the time each piece of work took to `busy`.
pub fn ternarize_timed(
    dtype: FloatDtype,
    bytes: &[u8],
    rows: usize,
    k: usize,
    layout: TernaryLayout,
    busy: &Busy,
) -> Result<(AbsmeanScale, Vec<u8>), (usize, f32)> {
    let packed = vec![0u8; rows * layout.row_bytes(k)];
    ternarize_into(dtype, bytes, rows, k, layout, busy, packed)
}

/// [`ternarize_timed`] into `packed`, zeroed and `rows` packed rows long (a buffer used
/// again rather than one the kernel maps and zeroes page by page).
fn ternarize_into(
    dtype: FloatDtype,
    bytes: &[u8],
    rows: usize,
    k: usize,
    layout: TernaryLayout,
    busy: &Busy,
    mut packed: Vec<u8>,
) -> Result<(AbsmeanScale, Vec<u8>), (usize, f32)> {
    assert_eq!(packed.len(), rows * layout.row_bytes(k), "packed rows");
    let src_row = k * dtype.size();
    let src_task = src_row * ROWS_PER_TASK;
    // Pass 1: per-row f64 sums, combined in row order (so independent of the thread count).
    let mut sums = vec![0f64; rows];
    let bad: Vec<Option<(usize, f32)>> = sums
        .par_chunks_mut(ROWS_PER_TASK)
        .zip(bytes.par_chunks(src_task))
        .enumerate()
        .map_init(
            || vec![0f32; k],
            |buf, (c, (dst, src))| {
                let start = Instant::now();
                let mut bad = None;
                for (j, (d, row)) in dst.iter_mut().zip(src.chunks(src_row)).enumerate() {
                    match row_abs_sum(dtype, row, buf) {
                        Ok(s) => *d = s,
                        Err(i) => {
                            // Decoded from the row: the one-pass kernels leave `buf` alone.
                            let size = dtype.size();
                            let mut v = [0f32];
                            decode_f32(dtype, &row[i * size..(i + 1) * size], &mut v);
                            bad = Some(((c * ROWS_PER_TASK + j) * k + i, v[0]));
                            break;
                        }
                    }
                }
                busy.add(start.elapsed());
                bad
            },
        )
        .collect();
    if let Some(first) = bad.into_iter().flatten().next() {
        return Err(first);
    }
    let mut total = 0f64;
    for s in sums {
        total += s;
    }
    let scale = AbsmeanScale::from_abs_sum(total, rows * k);
    // Pass 2: ternarize and pack each row.
    let row_bytes = layout.row_bytes(k);
    packed
        .par_chunks_mut(row_bytes * ROWS_PER_TASK)
        .zip(bytes.par_chunks(src_task))
        .for_each_init(
            || (vec![0f32; k], vec![0i8; k]),
            |(buf, trits), (dst, src)| {
                let start = Instant::now();
                for (d, row) in dst.chunks_mut(row_bytes).zip(src.chunks(src_row)) {
                    row_ternarize(dtype, row, &scale, layout, buf, trits, d);
                }
                busy.add(start.elapsed());
            },
        );
    Ok((scale, packed))
}

/// [`first_non_finite`], adding the time each chunk took to `busy`.
fn first_non_finite_timed(dtype: FloatDtype, bytes: &[u8], busy: &Busy) -> Option<(usize, f32)> {
    let chunk = STREAM_CHUNK * dtype.size();
    bytes
        .par_chunks(chunk)
        .enumerate()
        .map(|(c, src)| {
            busy.time(|| {
                first_non_finite_serial(dtype, src).map(|(i, v)| (c * STREAM_CHUNK + i, v))
            })
        })
        .find_first(Option::is_some)
        .flatten()
}

/// The flat index and value of the first element that is finite in `source` but not in
/// `target` (beyond its range: f16 ends at 65504).
fn first_overflow(source: FloatDtype, target: FloatDtype, bytes: &[u8]) -> Option<(usize, f32)> {
    if source == target || target == FloatDtype::F32 {
        return None;
    }
    let chunk = STREAM_CHUNK * source.size();
    bytes
        .par_chunks(chunk)
        .enumerate()
        .map_init(
            || {
                (
                    vec![0f32; STREAM_CHUNK],
                    Vec::new(),
                    vec![0f32; STREAM_CHUNK],
                )
            },
            |(vals, enc, back), (c, src)| {
                let n = src.len() / source.size();
                decode_f32(source, src, &mut vals[..n]);
                enc.clear();
                encode_f32(target, &vals[..n], enc);
                decode_f32(target, enc, &mut back[..n]);
                back[..n]
                    .iter()
                    .position(|v| !v.is_finite())
                    .map(|i| (c * STREAM_CHUNK + i, vals[i]))
            },
        )
        .find_first(Option::is_some)
        .flatten()
}

/// Streams a float tensor into the sink: as is, re-encoded to `target`, and/or zstd-compressed.
fn copy_float(
    source: FloatDtype,
    target: FloatDtype,
    compress: bool,
    bytes: &[u8],
    sink: &mut TensorSink<'_>,
) -> io::Result<()> {
    let mut out = float_writer(target, compress, bytes.len() / source.size(), sink)?;
    if source == target {
        for c in bytes.chunks(STREAM_CHUNK * source.size()) {
            out.write_all(c)?;
        }
    } else {
        let mut vals = vec![0f32; STREAM_CHUNK];
        let mut enc = Vec::with_capacity(STREAM_CHUNK * target.size());
        for c in bytes.chunks(STREAM_CHUNK * source.size()) {
            let n = c.len() / source.size();
            decode_f32(source, c, &mut vals[..n]);
            enc.clear();
            encode_f32(target, &vals[..n], &mut enc);
            out.write_all(&enc)?;
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unravel_gives_row_and_column() {
        assert_eq!(unravel(7, &[3, 5]), vec![1, 2]);
        assert_eq!(unravel(0, &[4]), vec![0]);
    }

    #[test]
    fn ternarize_reports_the_first_non_finite_value() {
        for dtype in [FloatDtype::F32, FloatDtype::Bf16, FloatDtype::F16] {
            for (k, bad_at, bad) in [(4, 7, f32::NAN), (160, 300, f32::NEG_INFINITY)] {
                let mut vals = vec![0.5f32; 3 * k];
                vals[bad_at] = bad;
                vals[3 * k - 1] = f32::INFINITY;
                let mut bytes = Vec::new();
                encode_f32(dtype, &vals, &mut bytes);
                let err = ternarize(dtype, &bytes, 3, k, TernaryLayout::I2).unwrap_err();
                assert_eq!(err.0, bad_at, "{dtype:?}");
                // The value itself (it used to read 0 for bf16 rows).
                assert!(err.1.is_nan() == bad.is_nan() && (bad.is_nan() || err.1 == bad));
            }
        }
    }

    /// Rows span several pieces of parallel work: the first bad value in row order is the one
    /// reported, whichever piece finishes first, and the result does not depend on the pool.
    #[test]
    fn ternarize_reports_the_first_bad_row_across_pieces_of_work() {
        let (rows, k) = (5 * ROWS_PER_TASK + 3, 130);
        let mut vals: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let mut bytes = Vec::new();
        encode_f32(FloatDtype::F32, &vals, &mut bytes);
        let pool = |n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        };
        let ok1 =
            pool(1).install(|| ternarize(FloatDtype::F32, &bytes, rows, k, TernaryLayout::I2));
        let ok3 =
            pool(3).install(|| ternarize(FloatDtype::F32, &bytes, rows, k, TernaryLayout::I2));
        let (s1, p1) = ok1.unwrap();
        let (s3, p3) = ok3.unwrap();
        assert_eq!(s1.scale.to_bits(), s3.scale.to_bits());
        assert_eq!(p1, p3);

        let late = (4 * ROWS_PER_TASK + 1) * k + 9;
        let early = (2 * ROWS_PER_TASK + 5) * k + 100;
        vals[late] = f32::NAN;
        vals[early] = f32::NEG_INFINITY;
        let mut bytes = Vec::new();
        encode_f32(FloatDtype::F32, &vals, &mut bytes);
        for n in [1, 3] {
            let err = pool(n)
                .install(|| ternarize(FloatDtype::F32, &bytes, rows, k, TernaryLayout::I2))
                .unwrap_err();
            assert_eq!(err.0, early, "{n} threads");
            assert_eq!(err.1, f32::NEG_INFINITY);
        }
    }

    /// The report accounts for the work of a real conversion: every source shard hashed, rows
    /// ternarized, output hashed and written, and no stage longer than the wall time allows.
    #[test]
    fn timings_account_for_a_conversion() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sharded");
        let tmp = tempfile::tempdir().unwrap();
        let opts = ConvertOptions {
            layout: TernaryLayout::I2,
            keep: None,
            q8_outputs: false,
            compress: false,
            force: false,
            scheme: SchemeOptions::default(),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let s = pool
            .install(|| convert(&src, &tmp.path().join("m.bpk"), &opts, &|_| {}))
            .unwrap();
        let t = &s.timings;
        assert_eq!(t.threads, 2);
        assert_eq!(t.source_files, 2);
        for (name, v) in [
            ("source hash", t.source_hash_busy_s),
            ("ternarize", t.ternarize_busy_s),
            ("float", t.float_busy_s),
            ("output hash", t.output_hash_busy_s),
            ("write", t.write_busy_s),
            ("total", t.total_wall_s),
        ] {
            assert!(v > 0.0, "{name}: {v}");
        }
        // Busy time adds over threads: at most the workers (and the direct I/O thread is not
        // counted) times the wall time.
        let busy = t.source_hash_busy_s
            + t.ternarize_busy_s
            + t.float_busy_s
            + t.output_hash_busy_s
            + t.write_busy_s;
        assert!(
            busy <= 2.0 * t.total_wall_s + 0.05,
            "{busy} > 2 x {}",
            t.total_wall_s
        );
        assert!(t.source_hash_wall_s <= t.total_wall_s);
        assert!(t.open_s + t.finalize_s <= t.total_wall_s);
        assert!(
            t.verify_export_s < 0.01,
            "no verification: {}",
            t.verify_export_s
        );
    }

    /// A buffer used again comes back cleared to the length asked, the smallest that fits is
    /// taken, and no more than the cap is held.
    #[test]
    fn buffers_come_back_zeroed_and_within_the_cap() {
        let buffers = Buffers::default();
        let mut dirty = buffers.take(1000);
        assert_eq!(dirty, vec![0u8; 1000]);
        dirty.fill(0xAB);
        let cap = dirty.capacity();
        buffers.give(dirty);
        buffers.give(Vec::with_capacity(5000));
        let again = buffers.take(600);
        assert_eq!(again.capacity(), cap, "the smallest that fits");
        assert_eq!(again, vec![0u8; 600]);
        let big = buffers.take(4000);
        assert!(big.capacity() >= 5000 && big == vec![0u8; 4000]);
        // Nothing held fits: a new one.
        assert_eq!(buffers.take(9000), vec![0u8; 9000]);
        buffers.give(Vec::with_capacity(BUFFERS_HELD));
        buffers.give(Vec::with_capacity(1));
        let held = buffers.0.lock().unwrap();
        assert_eq!(held.len(), 1, "a second buffer past the cap is dropped");
    }

    #[test]
    fn ternarize_matches_a_direct_computation() {
        let vals: Vec<f32> = (0..3 * 130)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let mut bytes = Vec::new();
        encode_f32(FloatDtype::F32, &vals, &mut bytes);
        let (scale, packed) =
            ternarize(FloatDtype::F32, &bytes, 3, 130, TernaryLayout::I8).unwrap();
        let mean = vals.iter().map(|v| f64::from(v.abs())).sum::<f64>() / vals.len() as f64;
        assert_eq!(scale.mean_abs, mean as f32);
        for (p, v) in packed.iter().zip(&vals) {
            assert_eq!(
                *p as i8,
                (v * scale.inv_scale).round_ties_even().clamp(-1.0, 1.0) as i8
            );
        }
    }
}
