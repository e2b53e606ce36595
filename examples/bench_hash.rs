//! Micro-benchmark of the SHA-256 kernels alone, one thread, in GB/s of message bytes: the
//! eight-lane AVX-512 kernel (`num::sha256x8::compress8`), one to four messages interleaved
//! through the SHA extensions (`num::sha256ni::compress`), and the `sha2` crate on one message.
//!
//! cargo run --release --example bench_hash -- [--reps 5] [--mib 32]
//!
//! Two regimes: `cached`, 16 KiB per lane hashed again and again (L1/L2-resident, bound by the
//! arithmetic), and `streamed`, `--mib` MiB per lane read once per pass. Best of `--reps`.

mod common;

use std::time::Instant;

use common::arg;

use bitnet_pack::num::sha256ni;
use bitnet_pack::num::sha256x8::{IV, Lane, available, compress8};
use sha2::Digest;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = arg(&args, "--reps", 5);
    let mib = arg(&args, "--mib", 32);
    if !available() {
        eprintln!("no AVX-512 F and VL: the eight-lane kernel does not run here");
        return;
    }
    let mut x = 0x9e3779b97f4a7c15u64;
    let streamed: Vec<Vec<u8>> = (0..8)
        .map(|_| {
            (0..mib << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        })
        .collect();
    for (name, len, passes) in [
        ("cached", 16usize << 10, 4096usize),
        ("streamed", mib << 20, 1),
    ] {
        let lanes: [Lane<'_>; 8] = std::array::from_fn(|l| Lane {
            data: &streamed[l][..len],
            step: 64,
        });
        let mut best = f64::INFINITY;
        let mut check = 0u32;
        for _ in 0..reps {
            let mut states = [IV; 8];
            let t = Instant::now();
            for _ in 0..passes {
                compress8(&mut states, &lanes, len / 64);
            }
            best = best.min(t.elapsed().as_secs_f64());
            check = states.iter().flatten().fold(0, |a, &b| a ^ b);
        }
        let bytes = (8 * len * passes) as f64;
        println!(
            "sha256x8 {name:<8} {:6.2} GB/s ({:5.1} cycles per round at 3.67 GHz)  [check {check:08x}]",
            bytes / best / 1e9,
            best * 3.67e9 / (bytes / 64.0 / 8.0) / 64.0
        );
        for n in 1..=sha256ni::MAX_STREAMS {
            let lanes: Vec<Lane<'_>> = (0..n)
                .map(|l| Lane {
                    data: &streamed[l][..len],
                    step: 64,
                })
                .collect();
            let mut best = f64::INFINITY;
            let mut check = 0u32;
            for _ in 0..reps {
                let mut states = vec![IV; n];
                let t = Instant::now();
                for _ in 0..passes {
                    sha256ni::compress(&mut states, &lanes, len / 64);
                }
                best = best.min(t.elapsed().as_secs_f64());
                check = states.iter().flatten().fold(0, |a, &b| a ^ b);
            }
            println!(
                "sha-ni x{n}  {name:<8} {:6.2} GB/s  [check {check:08x}]",
                (n * len * passes) as f64 / best / 1e9
            );
        }
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = Instant::now();
            let mut h = sha2::Sha256::new();
            for _ in 0..passes {
                h.update(&streamed[0][..len]);
            }
            std::hint::black_box(h.finalize());
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "sha2 one  {name:<8} {:6.2} GB/s",
            (len * passes) as f64 / best / 1e9
        );
    }
}
