//! Micro-benchmark of the ternary dot kernels alone, one thread: GMAC/s (weights times
//! activations per second) and packed GB/s of `run::kernels::dot` for each layout on the
//! projection shapes of BitNet b1.58 2B4T, int8 activations (and int4 with `dot_small`).
//!
//! cargo run --release --example bench_kernels -- [--reps 5] [--mib 256]
//!
//! Two regimes per shape: `cached`, 64 rows swept again and again (L2-resident, compute
//! bound), and `streamed`, as many rows as fill `--mib` MiB of i2 bytes, each read once per
//! sweep (memory bound, as in decoding). Best of `--reps` timings (of 2000 sweeps when cached).

use std::time::Instant;

use bitnet_pack::pack::TernaryLayout;
use bitnet_pack::quant::{ACTIVATION_EPS, ActQuant};
use bitnet_pack::run::kernels::{dot, dot_small, padded_len};

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Best seconds per sweep of `dot` over every row (timing `inner` sweeps together, best of
/// `reps`), and the checksum of one sweep.
fn sweep(
    layout: TernaryLayout,
    data: &[u8],
    k: usize,
    q: &[i8],
    small: bool,
    (reps, inner): (usize, usize),
) -> (f64, i64) {
    let row_bytes = layout.row_bytes(k);
    let q_sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
    let mut best = f64::MAX;
    let mut check = 0i64;
    for _ in 0..reps {
        let t = Instant::now();
        for _ in 0..inner {
            let mut acc = 0i64;
            for row in data.chunks_exact(row_bytes) {
                let q = std::hint::black_box(q);
                let d = if small {
                    dot_small(layout, row, q, q_sum, k)
                } else {
                    dot(layout, row, q, q_sum, k)
                };
                acc += i64::from(d);
            }
            check = std::hint::black_box(acc);
        }
        best = best.min(t.elapsed().as_secs_f64() / inner as f64);
    }
    (best, check)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = arg(&args, "--reps", 5);
    let mib = arg(&args, "--mib", 256);
    let mut rng = Lcg(1);
    println!(
        "{:<8} {:<6} {:<9} {:<4} {:>7} {:>9} {:>8} {:>8}",
        "k", "rows", "regime", "act", "layout", "bits/w", "GMAC/s", "GB/s"
    );
    for k in [2560usize, 6912] {
        let rows_streamed = (mib << 20) / TernaryLayout::I2.row_bytes(k);
        for (regime, rows, reps) in [
            ("cached", 64, (reps, 2000)),
            ("streamed", rows_streamed, (reps, 1)),
        ] {
            let trits: Vec<i8> = (0..rows * k).map(|_| (rng.next() % 3) as i8 - 1).collect();
            let x: Vec<f32> = (0..k)
                .map(|_| rng.next() as f32 / u32::MAX as f32 - 0.5)
                .collect();
            for (act_name, act, small) in [
                (
                    "a8",
                    ActQuant::Absmax8 {
                        eps: ACTIVATION_EPS,
                    },
                    false,
                ),
                (
                    "a4",
                    ActQuant::Absmean4 {
                        eps: ACTIVATION_EPS,
                    },
                    true,
                ),
            ] {
                let mut checks = Vec::new();
                for layout in [TernaryLayout::I2, TernaryLayout::T5] {
                    let row_bytes = layout.row_bytes(k);
                    let mut data = vec![0u8; rows * row_bytes];
                    for (t, d) in trits.chunks_exact(k).zip(data.chunks_exact_mut(row_bytes)) {
                        layout.pack_row(t, d);
                    }
                    let mut q = vec![0i8; padded_len(layout, k)];
                    act.quantize(&x, &mut q);
                    let (secs, check) = sweep(layout, &data, k, &q, small, reps);
                    checks.push(check);
                    println!(
                        "{:<8} {:<6} {:<9} {:<4} {:>7} {:>9.4} {:>8.2} {:>8.2}",
                        k,
                        rows,
                        regime,
                        act_name,
                        layout.as_str(),
                        8.0 * row_bytes as f64 / k as f64,
                        (rows * k) as f64 / secs / 1e9,
                        data.len() as f64 / secs / 1e9,
                    );
                }
                assert!(checks.windows(2).all(|w| w[0] == w[1]), "layouts disagree");
            }
        }
    }
}
