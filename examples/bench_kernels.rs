//! Micro-benchmark of the ternary dot kernels alone, one thread: GMAC/s (weights times
//! activations per second) and packed GB/s, for each layout, each instruction-set build the
//! CPU has (`run::kernels::Isa`), one token (`dot_rows_with` over runs of `DECODE_ROWS` rows, as
//! decoding runs it) and a tile of four
//! (`dot_multi_rows_with` over every row, as prefill runs it), on the projection shapes of BitNet b1.58 2B4T, int8
//! activations; and for one token, the `t5` rows re-laid in tiles for the table-lookup kernel
//! (`run::tiles`, isa `tiles`), where the CPU has AVX-512 BW.
//!
//! cargo run --release --example bench_kernels -- [--reps 5] [--mib 256]
//!
//! Two regimes per shape: `cached`, 64 rows swept again and again (L2-resident, compute
//! bound), and `streamed`, as many rows as fill `--mib` MiB of i2 bytes, each read once per
//! sweep (memory bound, as in decoding). Best of `--reps` timings (of 500 sweeps when cached).

mod common;

use std::time::Instant;

use common::arg;

use bitnet_pack::pack::TernaryLayout;
use bitnet_pack::quant::{ACTIVATION_EPS, ActQuant};
use bitnet_pack::run::kernels::{
    DECODE_ROWS, Isa, TILE, dot_multi_rows_with, dot_rows_with, padded_len,
};
use bitnet_pack::run::tiles;

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

/// One kernel configuration to time.
struct Case<'a> {
    isa: Isa,
    layout: TernaryLayout,
    data: &'a [u8],
    k: usize,
    /// `tokens` quantized tokens, `padded_len` apart.
    q: &'a [i8],
    tokens: usize,
}

/// Best seconds per sweep over every row (timing `inner` sweeps together, best of `reps`),
/// and the checksum of one sweep.
fn sweep(c: &Case<'_>, (reps, inner): (usize, usize)) -> (f64, i64) {
    let row_bytes = c.layout.row_bytes(c.k);
    let padded = padded_len(c.layout, c.k);
    let sums: Vec<i32> =
        c.q.chunks_exact(padded)
            .map(|t| t.iter().map(|&v| i32::from(v)).sum())
            .collect();
    let mut best = f64::MAX;
    let mut check = 0i64;
    let rows = c.data.len() / row_bytes;
    let mut out = vec![0i32; rows * c.tokens];
    for _ in 0..reps {
        let t = Instant::now();
        for _ in 0..inner {
            let mut acc = 0i64;
            let q = std::hint::black_box(c.q);
            if c.tokens == 1 {
                // As decoding runs it: one call per run of DECODE_ROWS rows.
                let mut dots = [0i32; DECODE_ROWS];
                for run in c.data.chunks(DECODE_ROWS * row_bytes) {
                    let dots = &mut dots[..run.len() / row_bytes];
                    dot_rows_with(c.isa, c.layout, run, row_bytes, q, sums[0], c.k, dots);
                    acc += dots.iter().map(|&v| i64::from(v)).sum::<i64>();
                }
            } else {
                // As prefill runs it: one call per run of rows.
                dot_multi_rows_with(
                    c.isa, c.layout, c.data, row_bytes, q, padded, &sums, c.k, &mut out,
                );
                acc += out.iter().map(|&v| i64::from(v)).sum::<i64>();
            }
            check = std::hint::black_box(acc);
        }
        best = best.min(t.elapsed().as_secs_f64() / inner as f64);
    }
    (best, check)
}

/// [`sweep`] for one token through `t5` rows re-laid in tiles (`run::tiles`), as decoding
/// runs it: the token's tables, then a group of tiles per kernel call.
fn sweep_tiles(t: &tiles::T5Tiles, q: &[i8], (reps, inner): (usize, usize)) -> (f64, i64) {
    let mut best = f64::MAX;
    let mut check = 0i64;
    let mut tables = tiles::new_tables(t.k());
    for _ in 0..reps {
        let start = Instant::now();
        for _ in 0..inner {
            let q = std::hint::black_box(q);
            tiles::build_tables(q, t.k(), &mut tables);
            let mut acc = 0i64;
            for first in (0..t.tiles()).step_by(t.group()) {
                let mut dots = [[0i32; tiles::TILE_ROWS]; tiles::GROUP_TILES];
                tiles::dot_group(t, first, &tables, &mut dots);
                // Only the matrix's rows: the padding rows of a short last group hold zero
                // bytes, which are not zero weights.
                acc += dots
                    .iter()
                    .take(t.group())
                    .flatten()
                    .take(t.rows() - first * tiles::TILE_ROWS)
                    .map(|&v| i64::from(v))
                    .sum::<i64>();
            }
            check = std::hint::black_box(acc);
        }
        best = best.min(start.elapsed().as_secs_f64() / inner as f64);
    }
    (best, check)
}

/// One line of the table: the case (k, rows, regime, tokens), the layout and build, and the
/// rates of `macs` multiply-adds over `bytes` packed bytes in `secs`.
fn print_row(
    (k, rows, regime, tokens): (usize, usize, &str, usize),
    layout: &str,
    isa: &str,
    macs: f64,
    bytes: usize,
    secs: f64,
) {
    println!(
        "{:<6} {:<6} {:<9} {:>6} {:>7} {:>8} {:>8.2} {:>8.2}",
        k,
        rows,
        regime,
        tokens,
        layout,
        isa,
        macs / secs / 1e9,
        bytes as f64 / secs / 1e9,
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = arg(&args, "--reps", 5);
    let mib = arg(&args, "--mib", 256);
    let mut rng = Lcg(1);
    println!(
        "{:<6} {:<6} {:<9} {:>6} {:>7} {:>8} {:>8} {:>8}",
        "k", "rows", "regime", "tokens", "layout", "isa", "GMAC/s", "GB/s"
    );
    let act = ActQuant::Absmax8 {
        eps: ACTIVATION_EPS,
    };
    for k in [2560usize, 6912] {
        let rows_streamed = (mib << 20) / TernaryLayout::I2.row_bytes(k) / 128 * 128;
        for (regime, rows, reps) in [
            ("cached", 64, (reps, 500)),
            ("streamed", rows_streamed, (reps, 1)),
        ] {
            let trits: Vec<i8> = (0..rows * k).map(|_| (rng.next() % 3) as i8 - 1).collect();
            let x: Vec<f32> = (0..TILE * k)
                .map(|_| rng.next() as f32 / u32::MAX as f32 - 0.5)
                .collect();
            for tokens in [1, TILE] {
                let mut checks = Vec::new();
                for layout in [TernaryLayout::I2, TernaryLayout::T5] {
                    let row_bytes = layout.row_bytes(k);
                    // 64-byte aligned, as tensors are in a .bpk file.
                    let mut storage = vec![0u8; rows * row_bytes + 63];
                    let skip = storage.as_ptr().align_offset(64);
                    let data = &mut storage[skip..skip + rows * row_bytes];
                    for (t, d) in trits.chunks_exact(k).zip(data.chunks_exact_mut(row_bytes)) {
                        layout.pack_row(t, d);
                    }
                    let padded = padded_len(layout, k);
                    let mut q = vec![0i8; tokens * padded];
                    for (xt, qt) in x.chunks_exact(k).zip(q.chunks_exact_mut(padded)) {
                        act.quantize(xt, qt);
                    }
                    if layout == TernaryLayout::T5 && tokens == 1 && tiles::available() {
                        let t = tiles::T5Tiles::from_t5(data, row_bytes, rows, k);
                        let (secs, check) = sweep_tiles(&t, &q[..k], reps);
                        checks.push(check);
                        let (at, macs) = ((k, rows, regime, tokens), (rows * k) as f64);
                        print_row(at, "t5", "tiles", macs, data.len(), secs);
                    }
                    for isa in Isa::available() {
                        let case = Case {
                            isa,
                            layout,
                            data,
                            k,
                            q: &q,
                            tokens,
                        };
                        let (secs, check) = sweep(&case, reps);
                        checks.push(check);
                        let (at, macs) = ((k, rows, regime, tokens), (rows * k * tokens) as f64);
                        let (name, isa) = (layout.as_str(), isa.name());
                        print_row(at, name, isa, macs, data.len(), secs);
                    }
                }
                assert!(
                    checks.windows(2).all(|w| w[0] == w[1]),
                    "layouts or builds disagree"
                );
            }
        }
    }
}
