//! Benchmark of the packed runner: prefill and decode tokens/s on a .bpk file, next to the
//! decode floor (bytes of weights read per decoded token / measured memory copy bandwidth).
//!
//! cargo run --release --example bench_run -- MODEL.bpk [--threads N] [--prefill 64] [--decode 16]
//! The model comes from `scripts/bench_convert.sh` (or any .bpk); see docs/benchmarks.md.

use std::time::Instant;

use anyhow::{Context, ensure};

use bitnet_pack::format::BpkFile;
use bitnet_pack::run::{KvCache, packed};

/// The value after `name`, or `default` when the flag is absent.
fn arg(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => {
            let v = args
                .get(i + 1)
                .with_context(|| format!("{name} needs a value"))?;
            v.parse()
                .with_context(|| format!("{name}: `{v}` is not a count"))
        }
    }
}

/// Best-of-5 memcpy rate (bytes copied per second) over a 1 GiB buffer, single-threaded.
fn memcpy_bandwidth() -> f64 {
    let n = 1 << 30;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    n as f64 / best
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .context("usage: bench_run MODEL.bpk [--threads N] [--prefill N] [--decode N]")?;
    let threads = arg(&args, "--threads", 0)?;
    let (n_prefill, n_decode) = (arg(&args, "--prefill", 64)?, arg(&args, "--decode", 16)?);
    ensure!(
        n_prefill >= 1 && n_decode >= 1,
        "--prefill and --decode must be at least 1"
    );
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()?;
    }
    let file = BpkFile::open(path.as_ref()).with_context(|| format!("could not open {path}"))?;
    let t = Instant::now();
    let model = packed::load(&file).with_context(|| format!("could not load {path}"))?;
    let load_s = t.elapsed().as_secs_f64();
    let cfg = &model.config;
    // Bytes read from weights per decoded token: every ternary tensor, every norm, the head.
    let per_token: u64 = file
        .header
        .tensors
        .iter()
        .filter(|t| t.role != bitnet_pack::model::Role::Embedding || cfg.tie_word_embeddings)
        .map(|t| t.encoding.raw_len(&t.shape).unwrap_or(0))
        .sum();
    let bw = memcpy_bandwidth();
    let tokens: Vec<u32> = (0..n_prefill as u32)
        .map(|i| (i * 7919) % cfg.vocab_size as u32)
        .collect();

    let mut cache = KvCache::for_model(&model);
    let t = Instant::now();
    let out = model
        .forward(&tokens, &mut cache, false)
        .context("prefill")?;
    let prefill_s = t.elapsed().as_secs_f64();
    let mut next = out.logits[out.logits.len() - cfg.vocab_size..]
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
        .0 as u32;
    let mut times = Vec::new();
    for _ in 0..n_decode {
        let t = Instant::now();
        let out = model
            .forward(&[next], &mut cache, false)
            .context("decode")?;
        times.push(t.elapsed().as_secs_f64());
        next = out
            .logits
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as u32;
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let floor = per_token as f64 / bw;
    println!(
        "model            {path} ({} layers, hidden {}, vocab {})",
        cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    );
    let q = &file.header.quantization;
    let name = |a: &bitnet_pack::format::header::ActivationScheme| {
        a.quantizer().map(|q| q.name()).unwrap_or("?").to_string()
    };
    let sites: Vec<String> = q
        .activation_sites
        .iter()
        .map(|(role, a)| format!("{}={}", role.as_str(), name(a)))
        .collect();
    let online: std::collections::BTreeSet<&str> =
        q.online_rotations.iter().map(|s| s.role.as_str()).collect();
    println!(
        "scheme           activations {}{}; online transforms: {}; kv bits {}, q bits {}",
        name(&q.activations),
        if sites.is_empty() {
            String::new()
        } else {
            format!(" ({})", sites.join(", "))
        },
        if online.is_empty() {
            "none".to_string()
        } else {
            online.into_iter().collect::<Vec<_>>().join(", ")
        },
        q.attention
            .as_ref()
            .and_then(|a| a.kv_bits)
            .map_or("f32".to_string(), |b| b.to_string()),
        q.attention
            .as_ref()
            .and_then(|a| a.q_bits)
            .map_or("f32".to_string(), |b| b.to_string()),
    );
    println!("threads          {}", rayon::current_num_threads());
    println!(
        "kernel           {}",
        if bitnet_pack::num::cpu::has_avx2() {
            "avx2"
        } else {
            "portable"
        }
    );
    println!("load+validate    {load_s:.2} s");
    println!(
        "prefill          {n_prefill} tokens in {prefill_s:.2} s = {:.1} tokens/s",
        n_prefill as f64 / prefill_s
    );
    println!(
        "decode           median {:.1} ms/token = {:.2} tokens/s (over {n_decode} tokens)",
        median * 1e3,
        1.0 / median
    );
    println!("weights/token    {:.1} MB", per_token as f64 / 1e6);
    println!(
        "memcpy           {:.2} GB/s (best of 5, 1 GiB, one thread)",
        bw / 1e9
    );
    println!(
        "decode floor     {:.1} ms/token; decode / floor = {:.2}",
        floor * 1e3,
        median / floor
    );
    Ok(())
}
