//! `bitnet-pack bench`.

use std::process::ExitCode;

use anyhow::Context;

use super::{BenchArgs, print, with_threads};
use crate::run::bench::{BenchOptions, bench};

/// Largest prompt and generation lengths accepted (the model's context bounds them anyway).
const MAX_TOKENS: usize = 1 << 16;

pub fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    for (flag, v) in [
        ("--prompt-tokens", a.prompt_tokens),
        ("--gen-tokens", a.gen_tokens),
    ] {
        if !(1..=MAX_TOKENS).contains(&v) {
            anyhow::bail!("{flag} {v}: give 1 to {MAX_TOKENS}");
        }
    }
    let opts = BenchOptions {
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        memcpy: !a.no_memcpy,
        in_memory: !a.mmap,
    };
    let r = with_threads(a.threads, || bench(&a.file, opts))?
        .with_context(|| format!("could not benchmark {}", a.file.display()))?;
    if a.json {
        print(&(serde_json::to_string_pretty(&r)? + "\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let (lo, hi) = (
        r.decode_ms.first().copied().unwrap_or(0.0),
        r.decode_ms.last().copied().unwrap_or(0.0),
    );
    let mut s = format!(
        "{}: {} threads, {} kernel\n\
         open            {:>9.1} ms ({})\n\
         validate        {:>9.1} ms\n\
         load            {:>9.1} ms\n\
         prefill         {:>9.1} ms for {} tokens = {:.1} tokens/s\n\
         decode          {:>9.1} ms/token median over {} tokens (min {:.1}, max {:.1}) = {:.2} tokens/s\n\
         weights/token   {:>9.1} MB read per decoded token\n",
        a.file.display(),
        r.threads,
        r.kernel,
        r.open_ms,
        r.storage,
        r.validate_ms,
        r.load_ms,
        r.prefill_ms,
        r.prompt_tokens,
        r.prefill_tokens_per_s,
        r.decode_ms_median,
        r.gen_tokens,
        lo,
        hi,
        r.decode_tokens_per_s,
        r.bytes_per_decoded_token as f64 / 1e6,
    );
    if let (Some(bw), Some(floor)) = (r.memcpy_gb_per_s, r.decode_floor_ms) {
        s += &format!(
            "memcpy          {bw:>9.2} GB/s (one thread, best of 5 over 1 GiB)\n\
             decode floor    {floor:>9.1} ms/token at that rate; median / floor = {:.2}\n",
            r.decode_ms_median / floor
        );
    }
    print(&s)?;
    Ok(ExitCode::SUCCESS)
}
