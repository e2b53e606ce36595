//! `bench`: how fast the packed runner is on a .bpk file, measured the way llama-bench
//! measures llama.cpp: load (validation reported apart), prefill of a prompt, greedy decode,
//! median milliseconds per token, the bytes of weights read per decoded token, and the
//! machine's memory-copy rate as the floor those bytes imply. Numbers, not assertions.

use std::time::Instant;

use super::{KvCache, RunError, packed};
use crate::format::{BpkFile, Storage};
use crate::model::Role;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Measure the memory-copy rate (1 GiB copied five times; about a second).
    pub memcpy: bool,
    /// Read the file into memory first ([`Storage::read_into_memory`]) rather than run from
    /// its mapping.
    pub in_memory: bool,
}

/// What was measured. Times in milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub threads: usize,
    pub kernel: &'static str,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Mapping (or reading) the file and parsing its header.
    pub open_ms: f64,
    /// Where the weights were read from: `memory` (read in first) or `mapped`.
    pub storage: &'static str,
    /// Checking every checksum and code (what `validate` does).
    pub validate_ms: f64,
    /// Building the model from the checked file.
    pub load_ms: f64,
    pub prefill_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// Per decoded token, sorted.
    pub decode_ms: Vec<f64>,
    pub decode_ms_median: f64,
    pub decode_tokens_per_s: f64,
    /// Bytes of stored weights a decoded token reads: every tensor but an untied embedding
    /// (whose one row read is a lookup, not counted).
    pub bytes_per_decoded_token: u64,
    pub memcpy_gb_per_s: Option<f64>,
    /// `bytes_per_decoded_token / memcpy rate`: the decode time if weights streamed at the
    /// copy rate and nothing else cost anything.
    pub decode_floor_ms: Option<f64>,
}

/// Best-of-5 single-thread memcpy rate over a 1 GiB buffer, in bytes per second.
pub fn memcpy_rate() -> Option<f64> {
    let n = 1 << 30;
    // Two buffers of 1 GiB: on a machine without the memory, no figure rather than an abort.
    let (mut src, mut dst) = (Vec::new(), Vec::new());
    src.try_reserve_exact(n).ok()?;
    dst.try_reserve_exact(n).ok()?;
    src.resize(n, 1u8);
    dst.resize(n, 0u8);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Some(n as f64 / best)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Index of the largest logit (the first of equals).
fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
        .0 as u32
}

/// Runs the benchmark on the file at `path` with the current rayon pool.
pub fn bench(path: &std::path::Path, opts: BenchOptions) -> Result<BenchReport, RunError> {
    let t = Instant::now();
    let storage = if opts.in_memory {
        Storage::read_into_memory(path)?
    } else {
        Storage::map(path)?
    };
    let file = BpkFile::from_storage(path, storage)?;
    let open_ms = ms(t);
    let t = Instant::now();
    let mut first = None;
    crate::format::validate_bytes_into(file.bytes(), &mut |f| {
        first.get_or_insert(f);
    });
    if let Some(f) = first {
        return Err(RunError::Invalid {
            path: path.to_path_buf(),
            first: f.message,
        });
    }
    let validate_ms = ms(t);
    let t = Instant::now();
    let model = packed::load_checked(&file)?;
    let load_ms = ms(t);
    let cfg = &model.config;
    // Both lengths fit the context, checked before any work.
    let total = opts.prompt_tokens + opts.gen_tokens;
    if total > cfg.max_position_embeddings {
        return Err(RunError::Input(super::InputError::TooLong {
            len: total,
            max: cfg.max_position_embeddings,
        }));
    }
    let bytes_per_decoded_token: u64 = file
        .header
        .tensors
        .iter()
        .filter(|t| t.role != Role::Embedding || cfg.tie_word_embeddings)
        .map(|t| t.encoding.raw_len(&t.shape).unwrap_or(0))
        .sum();
    // A fixed, spread-out prompt: the same work on every run.
    let prompt: Vec<u32> = (0..opts.prompt_tokens as u64)
        .map(|i| ((i * 7919 + 1) % cfg.vocab_size as u64) as u32)
        .collect();
    let mut cache = KvCache::for_model(&model);
    let t = Instant::now();
    let logits = model.forward_last(&prompt, &mut cache)?;
    let prefill_ms = ms(t);
    let mut next = argmax(&logits);
    let mut decode_ms = Vec::with_capacity(opts.gen_tokens);
    for _ in 0..opts.gen_tokens {
        let t = Instant::now();
        let logits = model.forward_last(&[next], &mut cache)?;
        decode_ms.push(ms(t));
        next = argmax(&logits);
    }
    decode_ms.sort_by(|a, b| a.total_cmp(b));
    let decode_ms_median = decode_ms.get(decode_ms.len() / 2).copied().unwrap_or(0.0);
    let rate = if opts.memcpy { memcpy_rate() } else { None };
    Ok(BenchReport {
        threads: rayon::current_num_threads(),
        kernel: crate::run::kernels::Isa::active().name(),
        storage: file.storage_kind(),
        prompt_tokens: opts.prompt_tokens,
        gen_tokens: opts.gen_tokens,
        open_ms,
        validate_ms,
        load_ms,
        prefill_ms,
        prefill_tokens_per_s: opts.prompt_tokens as f64 / (prefill_ms / 1e3),
        decode_ms_median,
        decode_tokens_per_s: if decode_ms_median > 0.0 {
            1e3 / decode_ms_median
        } else {
            0.0
        },
        decode_ms,
        bytes_per_decoded_token,
        memcpy_gb_per_s: rate.map(|r| r / 1e9),
        decode_floor_ms: rate.map(|r| bytes_per_decoded_token as f64 / r * 1e3),
    })
}
