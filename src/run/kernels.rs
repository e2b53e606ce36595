//! Integer kernels of the packed path: per-token int8 activation quantization and
//! ternary x int8 dot products straight from the packed bytes, accumulated exactly in i32.
//!
//! Every optimized kernel has a plain scalar reference beside it; tests compare them on random
//! inputs of awkward sizes. The AVX2 kernels are chosen at run time when the CPU has AVX2.

use crate::pack::{TernaryLayout, i2, t5};

/// Length an activation buffer must have for rows of `k` weights in `layout` (whole `i2` or
/// `t5` blocks).
pub fn padded_len(layout: TernaryLayout, k: usize) -> usize {
    match layout {
        TernaryLayout::I2 => k.div_ceil(i2::BLOCK) * i2::BLOCK,
        TernaryLayout::T5 => k.div_ceil(t5::BLOCK) * t5::BLOCK,
        TernaryLayout::I8 => k,
    }
}

/// Scalar reference: `sum_e trit[e] * q[e]` over one packed row of `k` weights.
pub fn dot_scalar(layout: TernaryLayout, row: &[u8], q: &[i8], k: usize) -> i32 {
    match layout {
        TernaryLayout::I2 => (0..k)
            .map(|e| {
                let (byte, shift) = i2::position(e);
                let trit = ((row[byte] >> shift) & 3) as i32 - 1;
                trit * i32::from(q[e])
            })
            .sum(),
        TernaryLayout::T5 => (0..k)
            .map(|e| {
                let (byte, j) = t5::position(e, k);
                let trit = i32::from(t5::digit(row[byte], j)) - 1;
                trit * i32::from(q[e])
            })
            .sum(),
        TernaryLayout::I8 => row[..k]
            .iter()
            .zip(q)
            .map(|(&w, &a)| i32::from(w as i8) * i32::from(a))
            .sum(),
    }
}

/// `sum_e trit[e] * x[e]` in f32 over one packed row of `x.len()` weights, added in order:
/// the kernel of the `none` activation scheme (no activation quantization). Scalar: that scheme
/// exists for comparison, not for speed.
pub fn dot_trits_f32(layout: TernaryLayout, row: &[u8], x: &[f32]) -> f32 {
    let trit = |e: usize| -> f32 {
        match layout {
            TernaryLayout::I2 => {
                let (byte, shift) = i2::position(e);
                f32::from(((row[byte] >> shift) & 3) as i8 - 1)
            }
            TernaryLayout::T5 => {
                let (byte, j) = t5::position(e, x.len());
                f32::from(t5::digit(row[byte], j) as i8 - 1)
            }
            TernaryLayout::I8 => f32::from(row[e] as i8),
        }
    };
    x.iter()
        .enumerate()
        .fold(0f32, |acc, (e, &v)| acc + trit(e) * v)
}

/// An instruction-set build of the integer kernels. Every build gives the same integers (the
/// sums are exact); they differ only in speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 `maddubs` with 16-bit partial sums.
    Avx2,
    /// AVX-512 VNNI `vpdpbusd` (u8 x i8 products summed straight into i32 lanes); `t5` codes
    /// come from 16-bit products (`vpmulhuw`, `vpmullw`) joined with `vpternlogd`.
    Avx512,
}

impl Isa {
    /// Every build this CPU can run, the portable one first.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        if crate::num::cpu::has_avx2() {
            v.push(Isa::Avx2);
        }
        if crate::num::cpu::has_avx512_vnni() {
            v.push(Isa::Avx512);
        }
        v
    }

    /// The build in use: the fastest this CPU runs, unless the environment variable
    /// `BITNET_PACK_KERNELS` names another (`portable`, `avx2` or `avx512`; one the CPU lacks
    /// falls back to the fastest it has). Decided once per process.
    pub fn active() -> Isa {
        static ACTIVE: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let available = Isa::available();
            let best = *available
                .last()
                .expect("the portable build is always there");
            match std::env::var("BITNET_PACK_KERNELS").ok().as_deref() {
                Some(name) => available
                    .iter()
                    .copied()
                    .find(|isa| isa.name() == name)
                    .unwrap_or(best),
                None => best,
            }
        })
    }

    /// The name `BITNET_PACK_KERNELS` and `bench` use.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// The dot-product kernel in use ([`Isa::active`]).
/// `q` must come from [`crate::quant::ActQuant::quantize`] (so it never holds -128), padded to
/// [`padded_len`], and `q_sum` must be its sum.
pub fn dot(layout: TernaryLayout, row: &[u8], q: &[i8], q_sum: i32, k: usize) -> i32 {
    dot_with(Isa::active(), layout, row, q, q_sum, k)
}

/// [`dot`] with a given build, which the CPU must support (one of [`Isa::available`]).
pub fn dot_with(
    isa: Isa,
    layout: TernaryLayout,
    row: &[u8],
    q: &[i8],
    q_sum: i32,
    k: usize,
) -> i32 {
    #[cfg(target_arch = "x86_64")]
    match (isa, layout) {
        (Isa::Portable, _) => {}
        // One `i2` token is bound by memory, not arithmetic, and the AVX2 build streams it
        // faster on the CPU measured (examples/bench_kernels.rs): the AVX-512 build serves
        // `t5` (16-bit products) and several tokens at once.
        (Isa::Avx512, TernaryLayout::T5) => {
            assert!(
                crate::num::cpu::has_avx512_vnni(),
                "the CPU has no AVX-512 VNNI"
            );
            assert!(q.len() >= padded_len(layout, k) && row.len() >= layout.row_bytes(k));
            // SAFETY: the CPU supports the extensions and the lengths hold (asserted above).
            return unsafe { avx512::dot_t5(row, q, q_sum, k) };
        }
        // AVX-512 brings nothing to the `i8` layout either.
        (Isa::Avx2 | Isa::Avx512, _) => {
            assert!(crate::num::cpu::has_avx2(), "the CPU has no AVX2");
            // SAFETY: the CPU supports AVX2 (asserted just above).
            return unsafe { avx2::dot(layout, row, q, q_sum, k) };
        }
    }
    let _ = isa;
    dot_portable(layout, row, q, q_sum, k)
}

/// Tokens one call of a multi-token kernel takes at most.
pub const TILE: usize = 4;

/// The multi-token kernel of prefill: `out[t] = sum_e trit[e] * q[t * stride + e]` for each of
/// the `out.len()` (1..=[`TILE`]) tokens whose padded activations lie `stride` apart in `q`.
/// A block of packed weights is decoded once into registers and applied to every token.
/// `q_sums[t]` is the sum of token `t`'s activations. Same integers as [`dot_scalar`] per token.
#[allow(clippy::too_many_arguments)]
pub fn dot_multi(
    layout: TernaryLayout,
    row: &[u8],
    q: &[i8],
    stride: usize,
    q_sums: &[i32],
    k: usize,
    out: &mut [i32],
) {
    dot_multi_with(Isa::active(), layout, row, q, stride, q_sums, k, out)
}

/// [`dot_multi`] with a given build, which the CPU must support (one of [`Isa::available`]).
#[allow(clippy::too_many_arguments)]
pub fn dot_multi_with(
    isa: Isa,
    layout: TernaryLayout,
    row: &[u8],
    q: &[i8],
    stride: usize,
    q_sums: &[i32],
    k: usize,
    out: &mut [i32],
) {
    let tokens = out.len();
    assert!((1..=TILE).contains(&tokens) && q_sums.len() == tokens);
    let padded = padded_len(layout, k);
    assert!(stride >= padded && q.len() >= (tokens - 1) * stride + padded);
    assert!(row.len() >= layout.row_bytes(k));
    #[cfg(target_arch = "x86_64")]
    match (isa, layout) {
        (Isa::Avx512, TernaryLayout::I2 | TernaryLayout::T5) => {
            assert!(
                crate::num::cpu::has_avx512_vnni(),
                "the CPU has no AVX-512 VNNI"
            );
            // SAFETY: the CPU supports the extensions (asserted just above); the lengths of
            // `row` and `q` were checked above.
            unsafe { avx512::dot_multi(layout, row, q, stride, k, out) };
            for (o, s) in out.iter_mut().zip(q_sums) {
                *o -= s;
            }
            return;
        }
        (Isa::Avx2, TernaryLayout::I2) => {
            assert!(crate::num::cpu::has_avx2(), "the CPU has no AVX2");
            // SAFETY: the CPU supports AVX2 (asserted just above); lengths checked above.
            unsafe { avx2::dot_i2_multi(row, q, stride, k, out) };
            for (o, s) in out.iter_mut().zip(q_sums) {
                *o -= s;
            }
            return;
        }
        _ => {}
    }
    for (t, o) in out.iter_mut().enumerate() {
        let qt = &q[t * stride..t * stride + padded];
        *o = match isa {
            Isa::Portable => dot_portable(layout, row, qt, q_sums[t], k),
            _ => dot_with(isa, layout, row, qt, q_sums[t], k),
        };
    }
}

/// [`dot_multi`] over consecutive packed rows (`row_bytes` apart in `data`, as many as
/// `out.len() / q_sums.len()`): `out[i * tokens + t]` is row `i` with token `t`. The build is
/// chosen and the lengths checked once for the whole run of rows, which matters for short rows.
#[allow(clippy::too_many_arguments)]
pub fn dot_multi_rows(
    layout: TernaryLayout,
    data: &[u8],
    row_bytes: usize,
    q: &[i8],
    stride: usize,
    q_sums: &[i32],
    k: usize,
    out: &mut [i32],
) {
    dot_multi_rows_with(
        Isa::active(),
        layout,
        data,
        row_bytes,
        q,
        stride,
        q_sums,
        k,
        out,
    )
}

/// [`dot_multi_rows`] with a given build, which the CPU must support.
#[allow(clippy::too_many_arguments)]
pub fn dot_multi_rows_with(
    isa: Isa,
    layout: TernaryLayout,
    data: &[u8],
    row_bytes: usize,
    q: &[i8],
    stride: usize,
    q_sums: &[i32],
    k: usize,
    out: &mut [i32],
) {
    let tokens = q_sums.len();
    assert!((1..=TILE).contains(&tokens) && out.len() % tokens == 0);
    let rows = out.len() / tokens;
    let padded = padded_len(layout, k);
    assert!(stride >= padded && q.len() >= (tokens - 1) * stride + padded);
    assert!(row_bytes >= layout.row_bytes(k) && data.len() >= rows * row_bytes);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && layout != TernaryLayout::I8 {
        assert!(
            crate::num::cpu::has_avx512_vnni(),
            "the CPU has no AVX-512 VNNI"
        );
        // SAFETY: the CPU supports the extensions (asserted just above); the lengths of
        // `data` and `q` were checked above.
        unsafe { avx512::dot_multi_rows(layout, data, row_bytes, q, stride, k, tokens, out) };
        for o in out.chunks_exact_mut(tokens) {
            for (o, s) in o.iter_mut().zip(q_sums) {
                *o -= s;
            }
        }
        return;
    }
    for (row, o) in data
        .chunks_exact(row_bytes)
        .zip(out.chunks_exact_mut(tokens))
    {
        dot_multi_with(isa, layout, row, q, stride, q_sums, k, o);
    }
}

/// Rows of one decoded token per kernel call: a few KB to a few tens of KB of packed weights,
/// and still 20 runs for the workers to share in 2B4T's smallest projections (640 rows).
pub const DECODE_ROWS: usize = 32;

/// [`dot`] of one token over consecutive packed rows (`row_bytes` apart in `data`, one per
/// element of `out`): `out[i]` is row `i`'s dot product. The build is chosen and the lengths
/// checked once for the run of rows; the AVX2 `i2` kernel and the AVX-512 `t5` kernel (two
/// rows at a time) loop over them without a call per row.
pub fn dot_rows(
    layout: TernaryLayout,
    data: &[u8],
    row_bytes: usize,
    q: &[i8],
    q_sum: i32,
    k: usize,
    out: &mut [i32],
) {
    dot_rows_with(Isa::active(), layout, data, row_bytes, q, q_sum, k, out)
}

/// [`dot_rows`] with a given build, which the CPU must support.
#[allow(clippy::too_many_arguments)]
pub fn dot_rows_with(
    isa: Isa,
    layout: TernaryLayout,
    data: &[u8],
    row_bytes: usize,
    q: &[i8],
    q_sum: i32,
    k: usize,
    out: &mut [i32],
) {
    assert!(q.len() >= padded_len(layout, k));
    let needed = out.len().checked_mul(row_bytes);
    assert!(row_bytes >= layout.row_bytes(k) && needed.is_some_and(|n| data.len() >= n));
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && layout == TernaryLayout::T5 {
        assert!(
            crate::num::cpu::has_avx512_vnni(),
            "the CPU has no AVX-512 VNNI"
        );
        // SAFETY: the CPU supports the extensions (asserted just above); lengths checked above.
        unsafe { avx512::dot_t5_rows(data, row_bytes, q, q_sum, k, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512) && layout == TernaryLayout::I2 {
        assert!(crate::num::cpu::has_avx2(), "the CPU has no AVX2");
        // SAFETY: the CPU supports AVX2 (asserted just above); lengths checked above.
        unsafe { avx2::dot_i2_rows(data, row_bytes, q, q_sum, k, out) };
        return;
    }
    let (used, q) = (layout.row_bytes(k), &q[..padded_len(layout, k)]);
    for (row, o) in data.chunks_exact(row_bytes).zip(out.iter_mut()) {
        let row = &row[..used];
        *o = match isa {
            Isa::Portable => dot_portable(layout, row, q, q_sum, k),
            _ => dot_with(isa, layout, row, q, q_sum, k),
        };
    }
}

/// Largest activation magnitude [`dot_small`] takes (the int4 range is -8..=7).
pub const SMALL_ACTIVATION: i32 = 8;

/// [`dot`] for activations of at most [`SMALL_ACTIVATION`] in magnitude (int4): the AVX2 `i2`
/// build keeps its partial sums in 16-bit lanes across up to [`SMALL_BLOCKS`] blocks before
/// widening them, which small activations allow. Same result as [`dot_scalar`].
pub fn dot_small(layout: TernaryLayout, row: &[u8], q: &[i8], q_sum: i32, k: usize) -> i32 {
    dot_small_with(Isa::active(), layout, row, q, q_sum, k)
}

/// [`dot_small`] with a given build, which the CPU must support.
pub fn dot_small_with(
    isa: Isa,
    layout: TernaryLayout,
    row: &[u8],
    q: &[i8],
    q_sum: i32,
    k: usize,
) -> i32 {
    debug_assert!(q.iter().all(|&v| i32::from(v).abs() <= SMALL_ACTIVATION));
    #[cfg(target_arch = "x86_64")]
    {
        // One `i2` token goes to the AVX2 build under AVX-512 too (see `dot_with`).
        if matches!(isa, Isa::Avx2 | Isa::Avx512) && layout == TernaryLayout::I2 {
            assert!(crate::num::cpu::has_avx2(), "the CPU has no AVX2");
            // SAFETY: the CPU supports AVX2 (asserted just above).
            return unsafe { avx2::dot_i2_small(row, q, q_sum) };
        }
    }
    dot_with(isa, layout, row, q, q_sum, k)
}

/// Blocks of 128 weights summed in 16-bit lanes before they are widened: each lane gains at
/// most 4 planes x 2 pairs x code 2 x 8 = 128 in magnitude per block, so 255 blocks stay
/// within an i16 (32,767); 128 leaves a margin.
pub const SMALL_BLOCKS: usize = 128;

/// Portable block kernel: `i2` rows are processed by whole blocks as `sum code * q - sum q`
/// (padding codes are 1 and padded activations 0, so the identity holds over whole blocks).
/// `q` must have `padded_len(layout, k)` elements and `q_sum` be their sum.
pub fn dot_portable(layout: TernaryLayout, row: &[u8], q: &[i8], q_sum: i32, k: usize) -> i32 {
    match layout {
        TernaryLayout::I2 => {
            let mut acc = 0i32;
            for (block, qb) in row
                .chunks_exact(i2::BLOCK_BYTES)
                .zip(q.chunks_exact(i2::BLOCK))
            {
                for (j, &b) in block.iter().enumerate() {
                    for p in 0..4 {
                        acc += i32::from((b >> (2 * p)) & 3) * i32::from(qb[p * i2::PLANE + j]);
                    }
                }
            }
            acc - q_sum
        }
        TernaryLayout::T5 => {
            let full = k / t5::BLOCK;
            let (whole, tail) = row[..t5::row_bytes(k)].split_at(full * t5::BLOCK_BYTES);
            let mut acc = 0i32;
            for (block, qb) in whole
                .chunks_exact(t5::BLOCK_BYTES)
                .zip(q.chunks_exact(t5::BLOCK))
            {
                for (b, &v) in block.iter().enumerate() {
                    for (j, c) in t5::codes(v).into_iter().enumerate() {
                        acc += i32::from(c) * i32::from(qb[b + t5::BLOCK_BYTES * j]);
                    }
                }
            }
            acc + t5_tail(tail, &q[full * t5::BLOCK..]) - q_sum
        }
        TernaryLayout::I8 => dot_scalar(layout, row, q, k),
    }
}

/// `sum code * q` over the short last block of a `t5` row (`tail` holds its `n` bytes, `q` the
/// block's activations padded to 160): every slot, padding included, since padded activations
/// count in `q_sum` and a padding code is 1. Zero for an empty tail.
#[inline]
fn t5_tail(tail: &[u8], q: &[i8]) -> i32 {
    let n = tail.len();
    let mut acc = 0i32;
    for (b, &v) in tail.iter().enumerate() {
        for (j, c) in t5::codes(v).into_iter().enumerate() {
            acc += i32::from(c) * i32::from(q[b + n * j]);
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::pack::{TernaryLayout, i2, t5};

    /// How far ahead of the block being read the single-token kernels ask for packed
    /// weights: the rows a decoded token streams are read once, and the hardware prefetchers
    /// alone left the kernel waiting on memory. 2 KiB (a few rows ahead on the next row's bytes,
    /// rows being consecutive) took the projections of a decoded 2B4T-shaped token from 25.7 to
    /// 21.9 ms (file mapping) and from 20.3 to 19.1 ms (huge pages) on 2 threads; 4-16 KiB and
    /// the L2 hint did no better.
    const PREFETCH_AHEAD: usize = 2048;

    /// Asks for the bytes [`PREFETCH_AHEAD`] past the start of `block`. A hint only: an address
    /// past the end of the data is never dereferenced (prefetches do not fault), and the
    /// pointer is formed with wrapping arithmetic.
    #[inline(always)]
    pub(super) fn prefetch_ahead(block: &[u8]) {
        // SAFETY: `_mm_prefetch` reads nothing the program can observe and never faults.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(block.as_ptr().wrapping_add(PREFETCH_AHEAD).cast());
        }
    }

    /// Horizontal sum of eight i32 lanes.
    #[target_feature(enable = "avx2")]
    pub(super) fn hsum(v: __m256i) -> i32 {
        let lo = _mm256_castsi256_si128(v);
        let hi = _mm256_extracti128_si256::<1>(v);
        let s = _mm_add_epi32(lo, hi);
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// See [`super::dot_portable`] for the contract.
    ///
    /// # Safety
    /// The CPU must support AVX2. `row` must hold the packed row and `q` the padded activations.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot(layout: TernaryLayout, row: &[u8], q: &[i8], q_sum: i32, k: usize) -> i32 {
        match layout {
            TernaryLayout::I2 => dot_i2(row, q, q_sum),
            TernaryLayout::T5 => dot_t5(row, q, q_sum, k),
            TernaryLayout::I8 => dot_i8(row, q, k),
        }
    }

    /// The five code vectors of a 32-byte `t5` block: vector `j` holds digit `j` of each byte,
    /// i.e. the codes of elements `32j..32j+32` of the block, as unsigned bytes 0..=2.
    ///
    /// Digit `j` of a stored byte `w` is `floor(3 p / 256)` with `p = w * 3^j mod 256`, which
    /// is 1 when `p >= 86` and 2 when `p >= 171`. Bytes are compared signed, so the vectors
    /// carry `s = p ^ 0x80`; that bias survives the multiplication by 3
    /// (`3 (s + 128) + 128 = 3 s + 512 = 3 s mod 256`), so `s` steps from digit to digit with
    /// two wrapping byte additions and no 16-bit multiply.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn t5_codes(w: __m256i) -> [__m256i; t5::TRITS_PER_BYTE] {
        let one_third = _mm256_set1_epi8((85u8 ^ 0x80) as i8); // p > 85: digit >= 1
        let two_thirds = _mm256_set1_epi8((170u8 ^ 0x80) as i8); // p > 170: digit 2
        let zero = _mm256_setzero_si256();
        let mut s = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
        let mut out = [zero; t5::TRITS_PER_BYTE];
        for o in out.iter_mut() {
            let ge1 = _mm256_cmpgt_epi8(s, one_third);
            let ge2 = _mm256_cmpgt_epi8(s, two_thirds);
            // masks are -1 where true: code = 0 - ge1 - ge2.
            *o = _mm256_sub_epi8(_mm256_sub_epi8(zero, ge1), ge2);
            s = _mm256_add_epi8(s, _mm256_add_epi8(s, s));
            // Left alone, LLVM turns this chain of additions into a byte multiplication by
            // 3^j from `w` (16-bit multiplies, masks and shifts: five instructions where the
            // two additions suffice), about 10% slower here. An empty asm block hides the
            // value from the optimizer.
            // SAFETY: the block has no instructions; it only claims to modify `s` in place.
            unsafe {
                std::arch::asm!("/* {0} */", inout(ymm_reg) s, options(pure, nomem, nostack, preserves_flags));
            }
        }
        out
    }

    /// Blocks whose 16-bit partial sums [`dot_t5`] adds before widening them: a block adds at
    /// most 5 digits x 2 pairs x code 2 x 128 = 2,560 to a lane, so 12 blocks stay within an
    /// i16 (30,720 <= 32,767) whatever the int8 activations.
    const T5_BLOCKS_PER_WIDENING: usize = 12;

    #[target_feature(enable = "avx2")]
    fn dot_t5(row: &[u8], q: &[i8], q_sum: i32, k: usize) -> i32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_si256();
        let full = k / t5::BLOCK;
        let (whole, tail) = row[..t5::row_bytes(k)].split_at(full * t5::BLOCK_BYTES);
        let group_bytes = T5_BLOCKS_PER_WIDENING * t5::BLOCK_BYTES;
        for (group, qg) in whole
            .chunks(group_bytes)
            .zip(q.chunks(T5_BLOCKS_PER_WIDENING * t5::BLOCK))
        {
            let mut acc16 = _mm256_setzero_si256();
            for (block, qb) in group
                .chunks_exact(t5::BLOCK_BYTES)
                .zip(qg.chunks_exact(t5::BLOCK))
            {
                // SAFETY: both chunks are exactly 32 and 160 bytes long; unaligned loads.
                let w = unsafe { _mm256_loadu_si256(block.as_ptr().cast()) };
                let a = |j: usize| unsafe {
                    _mm256_loadu_si256(qb.as_ptr().add(j * t5::BLOCK_BYTES).cast())
                };
                let [c0, c1, c2, c3, c4] = t5_codes(w);
                // codes are 0..=2 (unsigned), activations -128..=127: pair sums fit in i16.
                let p01 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(c0, a(0)),
                    _mm256_maddubs_epi16(c1, a(1)),
                );
                let p23 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(c2, a(2)),
                    _mm256_maddubs_epi16(c3, a(3)),
                );
                let p4 = _mm256_maddubs_epi16(c4, a(4));
                acc16 = _mm256_add_epi16(acc16, _mm256_add_epi16(_mm256_add_epi16(p01, p23), p4));
            }
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(acc16, ones));
        }
        hsum(acc) + super::t5_tail(tail, &q[full * t5::BLOCK..]) - q_sum
    }

    /// [`super::dot_rows`] for `i2`: [`dot_i2`] over each row, inlined.
    ///
    /// # Safety
    /// The CPU must support AVX2; `data` must hold `out.len()` rows `row_bytes` apart, and `q`
    /// the padded activations of `k` weights.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_i2_rows(
        data: &[u8],
        row_bytes: usize,
        q: &[i8],
        q_sum: i32,
        k: usize,
        out: &mut [i32],
    ) {
        let used = i2::row_bytes(k);
        let q = &q[..k.div_ceil(i2::BLOCK) * i2::BLOCK];
        for (row, o) in data.chunks_exact(row_bytes).zip(out.iter_mut()) {
            *o = dot_i2(&row[..used], q, q_sum);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot_i2(row: &[u8], q: &[i8], q_sum: i32) -> i32 {
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_si256();
        for (block, qb) in row
            .chunks_exact(i2::BLOCK_BYTES)
            .zip(q.chunks_exact(i2::BLOCK))
        {
            // SAFETY: both chunks are exactly 32 and 128 bytes long; unaligned loads.
            let w = unsafe { _mm256_loadu_si256(block.as_ptr().cast()) };
            prefetch_ahead(block);
            let a = |p: usize| unsafe { _mm256_loadu_si256(qb.as_ptr().add(p * i2::PLANE).cast()) };
            let c0 = _mm256_and_si256(w, mask);
            let c1 = _mm256_and_si256(_mm256_srli_epi16::<2>(w), mask);
            let c2 = _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask);
            let c3 = _mm256_and_si256(_mm256_srli_epi16::<6>(w), mask);
            // codes are 0..=2 (unsigned), activations -128..=127: pair sums fit in i16.
            let p01 = _mm256_add_epi16(
                _mm256_maddubs_epi16(c0, a(0)),
                _mm256_maddubs_epi16(c1, a(1)),
            );
            let p23 = _mm256_add_epi16(
                _mm256_maddubs_epi16(c2, a(2)),
                _mm256_maddubs_epi16(c3, a(3)),
            );
            // each i16 lane is at most 4 * 2 * 128 = 1024 in magnitude: no overflow.
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(p01, p23), ones));
        }
        hsum(acc) - q_sum
    }

    /// See [`super::dot_small`].
    ///
    /// # Safety
    /// The CPU must support AVX2; activations are at most 8 in magnitude.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_i2_small(row: &[u8], q: &[i8], q_sum: i32) -> i32 {
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_si256();
        let nblocks = (row.len() / i2::BLOCK_BYTES).min(q.len() / i2::BLOCK);
        let mut start = 0;
        while start < nblocks {
            let end = (start + super::SMALL_BLOCKS).min(nblocks);
            let mut acc16 = _mm256_setzero_si256();
            for i in start..end {
                let block = &row[i * i2::BLOCK_BYTES..(i + 1) * i2::BLOCK_BYTES];
                let qb = &q[i * i2::BLOCK..(i + 1) * i2::BLOCK];
                // SAFETY: both chunks are exactly 32 and 128 bytes long; unaligned loads.
                let w = unsafe { _mm256_loadu_si256(block.as_ptr().cast()) };
                prefetch_ahead(block);
                let a =
                    |p: usize| unsafe { _mm256_loadu_si256(qb.as_ptr().add(p * i2::PLANE).cast()) };
                let c0 = _mm256_and_si256(w, mask);
                let c1 = _mm256_and_si256(_mm256_srli_epi16::<2>(w), mask);
                let c2 = _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask);
                let c3 = _mm256_and_si256(_mm256_srli_epi16::<6>(w), mask);
                let p01 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(c0, a(0)),
                    _mm256_maddubs_epi16(c1, a(1)),
                );
                let p23 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(c2, a(2)),
                    _mm256_maddubs_epi16(c3, a(3)),
                );
                acc16 = _mm256_add_epi16(acc16, _mm256_add_epi16(p01, p23));
            }
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(acc16, ones));
            start = end;
        }
        hsum(acc) - q_sum
    }

    /// `out[t] = sum code * q_t` (without the `- q_sum` of the identity) over whole `i2`
    /// blocks for `out.len()` (1..=4) tokens `stride` apart in `q`.
    ///
    /// # Safety
    /// The CPU must support AVX2; `q` must hold `out.len()` tokens of `padded_len(I2, k)`
    /// activations `stride` apart, and `row` the packed row.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_i2_multi(row: &[u8], q: &[i8], stride: usize, k: usize, out: &mut [i32]) {
        let blocks = k.div_ceil(i2::BLOCK);
        debug_assert!(row.len() >= blocks * i2::BLOCK_BYTES);
        debug_assert!(q.len() >= (out.len() - 1) * stride + blocks * i2::BLOCK);
        // SAFETY (all four): the caller's contract.
        match out.len() {
            1 => out.copy_from_slice(&unsafe { i2_multi::<1>(row, q, stride, blocks) }),
            2 => out.copy_from_slice(&unsafe { i2_multi::<2>(row, q, stride, blocks) }),
            3 => out.copy_from_slice(&unsafe { i2_multi::<3>(row, q, stride, blocks) }),
            _ => out.copy_from_slice(&unsafe { i2_multi::<4>(row, q, stride, blocks) }),
        }
    }

    /// Blocks whose 16-bit partial sums [`i2_multi`] adds before widening: a block adds at
    /// most 4 planes x 2 pairs x code 2 x 128 = 2,048 to a lane, so 15 blocks stay within an
    /// i16; 8 leaves a margin.
    const I2_BLOCKS_PER_WIDENING: usize = 8;

    /// # Safety
    /// See [`dot_i2_multi`]: `blocks` whole blocks of `row`, `T` tokens of `q`.
    #[target_feature(enable = "avx2")]
    unsafe fn i2_multi<const T: usize>(
        row: &[u8],
        q: &[i8],
        stride: usize,
        blocks: usize,
    ) -> [i32; T] {
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); T];
        let (w_ptr, q_ptr) = (row.as_ptr(), q.as_ptr());
        let mut start = 0;
        while start < blocks {
            let end = (start + I2_BLOCKS_PER_WIDENING).min(blocks);
            let mut acc16 = [_mm256_setzero_si256(); T];
            for b in start..end {
                // SAFETY: block `b < blocks` lies within `row`; unaligned load.
                let w = unsafe { _mm256_loadu_si256(w_ptr.add(b * i2::BLOCK_BYTES).cast()) };
                let c = [
                    _mm256_and_si256(w, mask),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(w), mask),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask),
                    _mm256_and_si256(_mm256_srli_epi16::<6>(w), mask),
                ];
                for (t, a16) in acc16.iter_mut().enumerate() {
                    // SAFETY: token `t < T`, block `b < blocks`: within `q` (caller's contract).
                    let a = |p: usize| unsafe {
                        _mm256_loadu_si256(
                            q_ptr.add(t * stride + b * i2::BLOCK + p * i2::PLANE).cast(),
                        )
                    };
                    let p01 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(c[0], a(0)),
                        _mm256_maddubs_epi16(c[1], a(1)),
                    );
                    let p23 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(c[2], a(2)),
                        _mm256_maddubs_epi16(c[3], a(3)),
                    );
                    *a16 = _mm256_add_epi16(*a16, _mm256_add_epi16(p01, p23));
                }
            }
            for (a, a16) in acc.iter_mut().zip(acc16) {
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(a16, ones));
            }
            start = end;
        }
        acc.map(|a| hsum(a))
    }

    #[target_feature(enable = "avx2")]
    fn dot_i8(row: &[u8], q: &[i8], k: usize) -> i32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_si256();
        let full = k / 32 * 32;
        for (w, a) in row[..full].chunks_exact(32).zip(q[..full].chunks_exact(32)) {
            // SAFETY: both chunks are exactly 32 bytes; unaligned loads.
            let (w, a) = unsafe {
                (
                    _mm256_loadu_si256(w.as_ptr().cast()),
                    _mm256_loadu_si256(a.as_ptr().cast()),
                )
            };
            // |w| in {0, 1} times a with w's sign. Precondition: no activation is -128 (whose
            // negation wraps); `ActQuant::quantize` never produces it since |x * s| <= 127.
            let prod = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(prod, ones));
        }
        let tail: i32 = row[full..k]
            .iter()
            .zip(&q[full..k])
            .map(|(&w, &a)| i32::from(w as i8) * i32::from(a))
            .sum();
        hsum(acc) + tail
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::pack::{TernaryLayout, i2, t5};

    /// `out[t] = sum code * q_t` (without the `- q_sum` of the identity) for `out.len()`
    /// (1..=4) tokens `stride` apart in `q`, `i2` or `t5` rows.
    ///
    /// # Safety
    /// The CPU must support AVX2, AVX-512 F/BW/VL/VNNI; `q` must hold `out.len()` tokens
    /// of `padded_len(layout, k)` activations `stride` apart, and `row` the packed row.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_multi(
        layout: TernaryLayout,
        row: &[u8],
        q: &[i8],
        stride: usize,
        k: usize,
        out: &mut [i32],
    ) {
        let tails = match layout {
            TernaryLayout::T5 if out.len() > 1 => tails_of(q, stride, k, out.len()),
            _ => [[0; t5::BLOCK]; 4],
        };
        // SAFETY (every arm): the caller's contract.
        unsafe {
            match (layout, out.len()) {
                (TernaryLayout::I2, 1) => out.copy_from_slice(&i2_multi::<1, 4>(row, q, stride, k)),
                (TernaryLayout::I2, 2) => out.copy_from_slice(&i2_multi::<2, 2>(row, q, stride, k)),
                (TernaryLayout::I2, 3) => out.copy_from_slice(&i2_multi::<3, 2>(row, q, stride, k)),
                (TernaryLayout::I2, _) => out.copy_from_slice(&i2_multi::<4, 2>(row, q, stride, k)),
                (_, 1) => out[0] = dot_t5(row, q, 0, k),
                (_, 2) => out.copy_from_slice(&t5_multi::<2>(row, q, stride, k, &tails)),
                (_, 3) => out.copy_from_slice(&t5_multi::<3>(row, q, stride, k, &tails)),
                (_, _) => out.copy_from_slice(&t5_multi::<4>(row, q, stride, k, &tails)),
            }
        }
    }

    /// [`dot_multi`] over consecutive rows `row_bytes` apart; `out` holds `tokens` sums per row.
    ///
    /// # Safety
    /// As [`dot_multi`], for every row.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_multi_rows(
        layout: TernaryLayout,
        data: &[u8],
        row_bytes: usize,
        q: &[i8],
        stride: usize,
        k: usize,
        tokens: usize,
        out: &mut [i32],
    ) {
        let rows = out.len() / tokens;
        if layout == TernaryLayout::T5 {
            if tokens == 1 {
                // SAFETY: the caller's contract; `q_sum` 0 leaves the sums without it.
                unsafe { dot_t5_rows(data, row_bytes, q, 0, k, out) };
                return;
            }
            // The short last blocks' activations, laid out once for every row.
            let tails = tails_of(q, stride, k, tokens);
            for (row, o) in data
                .chunks_exact(row_bytes)
                .zip(out.chunks_exact_mut(tokens))
            {
                // SAFETY: the caller's contract, row by row.
                unsafe {
                    match tokens {
                        2 => o.copy_from_slice(&t5_multi::<2>(row, q, stride, k, &tails)),
                        3 => o.copy_from_slice(&t5_multi::<3>(row, q, stride, k, &tails)),
                        _ => o.copy_from_slice(&t5_multi::<4>(row, q, stride, k, &tails)),
                    }
                }
            }
            return;
        }
        let mut first = 0;
        if layout == TernaryLayout::I2 {
            // Two rows at a time: twice the arithmetic per activation loaded, and one
            // reduction for all their sums.
            while first + 2 <= rows {
                let pair = &data[first * row_bytes..(first + 2) * row_bytes];
                let (r0, r1) = pair.split_at(row_bytes);
                let o = &mut out[first * tokens..(first + 2) * tokens];
                // SAFETY: the caller's contract, for both rows.
                let sums = unsafe {
                    match tokens {
                        1 => i2_pair::<1>(r0, r1, q, stride, k),
                        2 => i2_pair::<2>(r0, r1, q, stride, k),
                        3 => i2_pair::<3>(r0, r1, q, stride, k),
                        _ => i2_pair::<4>(r0, r1, q, stride, k),
                    }
                };
                for (r, o) in o.chunks_exact_mut(tokens).enumerate() {
                    o.copy_from_slice(&sums[r * 4..r * 4 + tokens]);
                }
                first += 2;
            }
        }
        for (row, o) in data[first * row_bytes..]
            .chunks_exact(row_bytes)
            .zip(out[first * tokens..].chunks_exact_mut(tokens))
        {
            // SAFETY: the caller's contract, row by row.
            unsafe { dot_multi(layout, row, q, stride, k, o) };
        }
    }

    /// Horizontal sums of eight vectors of eight i32 lanes: lane `i` of the result is the
    /// sum of `v[i]`'s lanes.
    #[target_feature(enable = "avx2")]
    fn hsum8(v: [__m256i; 8]) -> __m256i {
        let h01 = _mm256_hadd_epi32(v[0], v[1]);
        let h23 = _mm256_hadd_epi32(v[2], v[3]);
        let h45 = _mm256_hadd_epi32(v[4], v[5]);
        let h67 = _mm256_hadd_epi32(v[6], v[7]);
        // Each 128-bit half now holds partial sums of v0..v3 (and v4..v7) in lane order.
        let a = _mm256_hadd_epi32(h01, h23);
        let b = _mm256_hadd_epi32(h45, h67);
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(a, b),
            _mm256_permute2x128_si256::<0x31>(a, b),
        )
    }

    /// `i2`, two rows `r0`, `r1` times `T` (1..=4) tokens: each block's codes are decoded for
    /// both rows, and each activation vector loaded feeds two `vpdpbusd`. Returns the sums
    /// (without the `- q_sum` of the identity) as `[r0 t0..t3, r1 t0..t3]`, zero past `T`.
    ///
    /// # Safety
    /// See [`dot_multi`], for both rows.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn i2_pair<const T: usize>(
        r0: &[u8],
        r1: &[u8],
        q: &[i8],
        stride: usize,
        k: usize,
    ) -> [i32; 8] {
        let blocks = k.div_ceil(i2::BLOCK);
        debug_assert!(r0.len() >= blocks * i2::BLOCK_BYTES);
        debug_assert!(r1.len() >= blocks * i2::BLOCK_BYTES);
        debug_assert!(q.len() >= (T - 1) * stride + blocks * i2::BLOCK);
        let mask = _mm256_set1_epi8(3);
        // Two accumulators per row and token (even and odd planes) halve the chains.
        let mut acc = [[[_mm256_setzero_si256(); 2]; 2]; T];
        let (w0, w1, q_ptr) = (r0.as_ptr(), r1.as_ptr(), q.as_ptr());
        let codes = |w: __m256i| {
            [
                _mm256_and_si256(w, mask),
                _mm256_and_si256(_mm256_srli_epi16::<2>(w), mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask),
                _mm256_and_si256(_mm256_srli_epi16::<6>(w), mask),
            ]
        };
        for b in 0..blocks {
            // SAFETY: block `b < blocks` lies within both rows; unaligned loads.
            let c = unsafe {
                [
                    codes(_mm256_loadu_si256(w0.add(b * i2::BLOCK_BYTES).cast())),
                    codes(_mm256_loadu_si256(w1.add(b * i2::BLOCK_BYTES).cast())),
                ]
            };
            for (t, at) in acc.iter_mut().enumerate() {
                for p in 0..4 {
                    // SAFETY: token `t < T`, block `b < blocks`: within `q`.
                    let a = unsafe {
                        _mm256_loadu_si256(
                            q_ptr.add(t * stride + b * i2::BLOCK + p * i2::PLANE).cast(),
                        )
                    };
                    for (ar, cr) in at.iter_mut().zip(&c) {
                        ar[p % 2] = _mm256_dpbusd_epi32(ar[p % 2], cr[p], a);
                    }
                }
            }
        }
        let mut v = [_mm256_setzero_si256(); 8];
        for (t, at) in acc.iter().enumerate() {
            for (r, ar) in at.iter().enumerate() {
                v[r * 4 + t] = _mm256_add_epi32(ar[0], ar[1]);
            }
        }
        let mut sums = [0i32; 8];
        // SAFETY: `sums` holds eight i32; unaligned store.
        unsafe { _mm256_storeu_si256(sums.as_mut_ptr().cast(), hsum8(v)) };
        sums
    }

    /// `i2`: per block, four masks and shifts give the code vectors of the four planes, and
    /// each token takes four `vpdpbusd` (codes 0..=2 unsigned, activations signed, exact i32
    /// sums). `A` accumulators per token break the dependency chains.
    ///
    /// # Safety
    /// See [`dot_multi`].
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn i2_multi<const T: usize, const A: usize>(
        row: &[u8],
        q: &[i8],
        stride: usize,
        k: usize,
    ) -> [i32; T] {
        let blocks = k.div_ceil(i2::BLOCK);
        debug_assert!(row.len() >= blocks * i2::BLOCK_BYTES);
        debug_assert!(q.len() >= (T - 1) * stride + blocks * i2::BLOCK);
        let mask = _mm256_set1_epi8(3);
        let mut acc = [[_mm256_setzero_si256(); A]; T];
        let (w_ptr, q_ptr) = (row.as_ptr(), q.as_ptr());
        for b in 0..blocks {
            // SAFETY: block `b < blocks` lies within `row`; unaligned load.
            let w = unsafe { _mm256_loadu_si256(w_ptr.add(b * i2::BLOCK_BYTES).cast()) };
            let c = [
                _mm256_and_si256(w, mask),
                _mm256_and_si256(_mm256_srli_epi16::<2>(w), mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask),
                _mm256_and_si256(_mm256_srli_epi16::<6>(w), mask),
            ];
            for (t, at) in acc.iter_mut().enumerate() {
                for (p, &cp) in c.iter().enumerate() {
                    // SAFETY: token `t < T`, block `b < blocks`: within `q`.
                    let a = unsafe {
                        _mm256_loadu_si256(
                            q_ptr.add(t * stride + b * i2::BLOCK + p * i2::PLANE).cast(),
                        )
                    };
                    at[p % A] = _mm256_dpbusd_epi32(at[p % A], cp, a);
                }
            }
        }
        acc.map(|at| {
            let sum = at
                .into_iter()
                .fold(_mm256_setzero_si256(), |s, v| _mm256_add_epi32(s, v));
            super::avx2::hsum(sum)
        })
    }

    /// `t5`, one token (decoding). With `F_j(w) = floor(3^j w / 256)`, digit `j` of a stored
    /// byte `w` is `F_{j+1}(w) - 3 F_j(w)` (its definition `floor(3 (3^j w mod 256) / 256)`,
    /// with `3^j w mod 256 = 3^j w - 256 F_j`), and `F_0 = 0`, so
    /// `sum_j digit_j a_j = sum_{j=1..5} F_j a_{j-1} - 3 sum_{j=1..4} F_j a_j`.
    /// Each `F_j` (0..=242) is the high byte of the exact 16-bit product `3^j w`: `vpmulhuw` of
    /// `w << 8` leaves it in the low byte of a 16-bit lane for the even bytes, `vpmullw` of
    /// `w >> 8` in the high byte for the odd ones, and one `vpternlogd` joins them in place.
    /// Nine `vpdpbusd` (unsigned `F_j`, signed activations, exact i32 sums) then take the two
    /// sums. With one token, on the CPU measured, about 15% faster than the `vpermi2b` lookups
    /// in a 256-entry table it replaced, and than making the codes in bytes as [`t5_multi`]
    /// does for several tokens.
    ///
    /// # Safety
    /// The CPU must support AVX2, AVX-512 F/BW/VL/VNNI; `q` must hold the padded activations
    /// and `row` the packed row of `k` weights.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_t5(row: &[u8], q: &[i8], q_sum: i32, k: usize) -> i32 {
        let full = k / t5::BLOCK;
        let (whole, tail) = row[..t5::row_bytes(k)].split_at(full * t5::BLOCK_BYTES);
        let c = T5Consts::new();
        // One accumulator per sum and digit: no dependency chain longer than one per block.
        let mut prev_acc = [_mm256_setzero_si256(); t5::TRITS_PER_BYTE];
        let mut same_acc = [_mm256_setzero_si256(); t5::TRITS_PER_BYTE - 1];
        for (block, qb) in whole
            .chunks_exact(t5::BLOCK_BYTES)
            .zip(q.chunks_exact(t5::BLOCK))
        {
            // SAFETY: both chunks are exactly 32 and 160 bytes long; unaligned loads.
            let w = unsafe { _mm256_loadu_si256(block.as_ptr().cast()) };
            super::avx2::prefetch_ahead(block);
            let a = |j: usize| unsafe {
                _mm256_loadu_si256(qb.as_ptr().add(j * t5::BLOCK_BYTES).cast())
            };
            let even = _mm256_slli_epi16::<8>(w);
            let odd = _mm256_srli_epi16::<8>(w);
            let mut prev = a(0);
            for j in 0..t5::TRITS_PER_BYTE {
                let f = c.f(even, odd, j);
                prev_acc[j] = _mm256_dpbusd_epi32(prev_acc[j], f, prev);
                if j + 1 < t5::TRITS_PER_BYTE {
                    let same = a(j + 1);
                    same_acc[j] = _mm256_dpbusd_epi32(same_acc[j], f, same);
                    prev = same;
                }
            }
        }
        let sum = |v: &[__m256i]| {
            v.iter()
                .fold(_mm256_setzero_si256(), |s, &x| _mm256_add_epi32(s, x))
        };
        let (p, s) = (sum(&prev_acc), sum(&same_acc));
        let total = _mm256_sub_epi32(p, _mm256_add_epi32(s, _mm256_add_epi32(s, s)));
        super::avx2::hsum(total) + super::t5_tail(tail, &q[full * t5::BLOCK..]) - q_sum
    }

    /// A short last block of `n` bytes holds digit `j` of its byte `b` against activation
    /// `b + n j`. Laid out as a whole block's activations (`b + 32 j`), zero elsewhere, it runs
    /// through the whole blocks' arithmetic with its bytes loaded by [`tail_bytes`]. `q` holds
    /// one token's padded activations for rows of `k` weights.
    fn tail_activations(q: &[i8], k: usize) -> [i8; t5::BLOCK] {
        let (start, n) = (k / t5::BLOCK * t5::BLOCK, t5::block_bytes(k % t5::BLOCK));
        let mut out = [0i8; t5::BLOCK];
        if k % t5::BLOCK > 0 {
            for j in 0..t5::TRITS_PER_BYTE {
                for b in 0..n {
                    out[b + t5::BLOCK_BYTES * j] = q[start + b + n * j];
                }
            }
        }
        out
    }

    /// [`tail_activations`] of `tokens` (1..=4) tokens `stride` apart in `q`; the rest zero.
    fn tails_of(q: &[i8], stride: usize, k: usize, tokens: usize) -> [[i8; t5::BLOCK]; 4] {
        std::array::from_fn(|t| {
            if t < tokens {
                tail_activations(&q[t * stride..], k)
            } else {
                [0; t5::BLOCK]
            }
        })
    }

    /// The bytes of a short last block (`tail`, 1 to 32 of them), the rest of the vector
    /// zero: digits of a zero byte are zero, so the lanes past the tail add nothing.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn tail_bytes(tail: &[u8]) -> __m256i {
        let n = tail.len().min(t5::BLOCK_BYTES) as u32;
        let mask = u32::MAX.checked_shr(32 - n).unwrap_or(0);
        // SAFETY: the mask selects the first `n <= tail.len()` bytes; masked bytes are not read.
        unsafe { _mm256_maskz_loadu_epi8(mask, tail.as_ptr().cast()) }
    }

    /// The constants of the `t5` arithmetic ([`dot_t5`]): the 16-bit mask of high bytes and
    /// `3^(j+1)` for each digit `j`.
    struct T5Consts {
        high_bytes: __m256i,
        pow3: [__m256i; t5::TRITS_PER_BYTE],
    }

    impl T5Consts {
        #[inline]
        #[target_feature(enable = "avx2")]
        fn new() -> Self {
            T5Consts {
                high_bytes: _mm256_set1_epi16(0xff00u16 as i16),
                pow3: std::array::from_fn(|j| _mm256_set1_epi16(3i16.pow(j as u32 + 1))),
            }
        }

        /// `F_{j+1}` of every byte of `w` in place, from `even = w << 8` and `odd = w >> 8` (16-bit
        /// shifts): the even bytes' from `vpmulhuw`, the odd ones' from `vpmullw`, joined by one
        /// `vpternlogd` as `(even result) | (odd result & 0xff00)`.
        #[inline]
        #[target_feature(enable = "avx2,avx512f,avx512vl")]
        fn f(&self, even: __m256i, odd: __m256i, j: usize) -> __m256i {
            _mm256_ternarylogic_epi32::<0xF8>(
                _mm256_mulhi_epu16(even, self.pow3[j]),
                _mm256_mullo_epi16(odd, self.pow3[j]),
                self.high_bytes,
            )
        }
    }

    /// The partial sums of two `t5` rows against one token, by row and digit parity.
    #[derive(Clone, Copy)]
    struct T5PairAcc {
        prev: [[__m256i; 2]; 2],
        same: [[__m256i; 2]; 2],
    }

    impl Default for T5PairAcc {
        fn default() -> Self {
            // SAFETY: an all-zero `__m256i` is a valid value.
            let zero = unsafe { std::mem::zeroed::<__m256i>() };
            T5PairAcc {
                prev: [[zero; 2]; 2],
                same: [[zero; 2]; 2],
            }
        }
    }

    impl T5PairAcc {
        /// Adds one block: `w` holds each row's 32 stored bytes, `qb` the block's 160
        /// activations (digit `j` of byte `b` against `qb[b + 32 j]`).
        ///
        /// # Safety
        /// The CPU must support AVX2, AVX-512 F/BW/VL/VNNI.
        #[inline]
        #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn block(&mut self, c: &T5Consts, w: [__m256i; 2], qb: &[i8]) {
            let qb = &qb[..t5::BLOCK];
            // SAFETY: digit `j < 5`: 32 bytes within the block's 160.
            let a = |j: usize| unsafe {
                _mm256_loadu_si256(qb.as_ptr().add(j * t5::BLOCK_BYTES).cast())
            };
            let even = w.map(|v| _mm256_slli_epi16::<8>(v));
            let odd = w.map(|v| _mm256_srli_epi16::<8>(v));
            let mut prev = a(0);
            for j in 0..t5::TRITS_PER_BYTE {
                let same = if j + 1 < t5::TRITS_PER_BYTE {
                    a(j + 1)
                } else {
                    prev
                };
                for r in 0..2 {
                    let f = c.f(even[r], odd[r], j);
                    self.prev[r][j % 2] = _mm256_dpbusd_epi32(self.prev[r][j % 2], f, prev);
                    if j + 1 < t5::TRITS_PER_BYTE {
                        self.same[r][j % 2] = _mm256_dpbusd_epi32(self.same[r][j % 2], f, same);
                    }
                }
                prev = same;
            }
        }

        /// Each row's `sum_j digit_j a_j`: the `prev` sums less three times the `same` ones.
        #[inline]
        #[target_feature(enable = "avx2")]
        fn sums(&self) -> [i32; 2] {
            std::array::from_fn(|r| {
                let p = _mm256_add_epi32(self.prev[r][0], self.prev[r][1]);
                let s = _mm256_add_epi32(self.same[r][0], self.same[r][1]);
                super::avx2::hsum(_mm256_sub_epi32(
                    p,
                    _mm256_add_epi32(s, _mm256_add_epi32(s, s)),
                ))
            })
        }
    }

    /// `t5`, one token over consecutive rows `row_bytes` apart (decoding), into `out` (one sum
    /// per row, with the `- q_sum` of the identity): [`dot_t5`]'s arithmetic, two rows at a time
    /// so that each block of activations is loaded once for both, with the constants kept in
    /// registers across the whole run and no call per row; an odd last row goes through
    /// [`dot_t5`].
    ///
    /// # Safety
    /// The CPU must support AVX2, AVX-512 F/BW/VL/VNNI; `q` must hold the padded activations,
    /// and `data` `out.len()` rows of `k` weights `row_bytes >= t5::row_bytes(k)` apart.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_t5_rows(
        data: &[u8],
        row_bytes: usize,
        q: &[i8],
        q_sum: i32,
        k: usize,
        out: &mut [i32],
    ) {
        let (full, used) = (k / t5::BLOCK, t5::row_bytes(k));
        debug_assert!(row_bytes >= used && q.len() >= super::padded_len(TernaryLayout::T5, k));
        let row = |r: usize| &data[r * row_bytes..r * row_bytes + used];
        let n = used - full * t5::BLOCK_BYTES;
        let tail_q = tail_activations(q, k);
        let c = T5Consts::new();
        let last = out.len().saturating_sub(1);
        let mut pairs = out.chunks_exact_mut(2);
        for (p, o) in (&mut pairs).enumerate() {
            let rows = [row(2 * p), row(2 * p + 1)];
            // Four chains per row (sum and digit parity): eight in all, against `dot_t5`'s nine.
            let mut acc = T5PairAcc::default();
            for b in 0..full {
                let (wa, wb) = (rows[0].as_ptr(), rows[1].as_ptr());
                // SAFETY: block `b < full` lies within both rows (`used` bytes each); unaligned
                // loads.
                let w = unsafe {
                    [
                        _mm256_loadu_si256(wa.add(b * t5::BLOCK_BYTES).cast()),
                        _mm256_loadu_si256(wb.add(b * t5::BLOCK_BYTES).cast()),
                    ]
                };
                super::avx2::prefetch_ahead(&rows[0][b * t5::BLOCK_BYTES..]);
                super::avx2::prefetch_ahead(&rows[1][b * t5::BLOCK_BYTES..]);
                // SAFETY: block `b < full` of the padded activations.
                unsafe { acc.block(&c, w, &q[b * t5::BLOCK..(b + 1) * t5::BLOCK]) };
            }
            if n > 0 {
                let at = full * t5::BLOCK_BYTES;
                let w = [tail_bytes(&rows[0][at..]), tail_bytes(&rows[1][at..])];
                // SAFETY: `tail_q` is one whole block.
                unsafe { acc.block(&c, w, &tail_q) };
            }
            o.copy_from_slice(&acc.sums().map(|s| s - q_sum));
        }
        if let [o] = pairs.into_remainder() {
            // SAFETY: as for the pairs; the caller's contract covers the last row.
            *o = unsafe { dot_t5(row(last), q, q_sum, k) };
        }
    }

    /// `t5`, `T` (2..=4) tokens `stride` apart (prefill). The codes of a block are made once
    /// for all tokens, from the same 16-bit products as [`dot_t5`]: code `j` of a byte is
    /// `F_{j+1} - 3 F_j` (0..=2; `3 F_j <= 240` for `j <= 4`, so wrapping byte arithmetic is
    /// exact), and each token takes one `vpdpbusd` per digit. Returns the sums without the
    /// `- q_sum` of the identity; a short last block goes through the scalar tail. It replaced
    /// `vpermi2b` lookups in a 256-entry table, which were 16-20% slower with four tokens on
    /// the CPU measured.
    ///
    /// # Safety
    /// See [`dot_multi`].
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn t5_multi<const T: usize>(
        row: &[u8],
        q: &[i8],
        stride: usize,
        k: usize,
        tails: &[[i8; t5::BLOCK]],
    ) -> [i32; T] {
        let full = k / t5::BLOCK;
        debug_assert!(row.len() >= t5::row_bytes(k));
        debug_assert!(q.len() >= (T - 1) * stride + super::padded_len(TernaryLayout::T5, k));
        debug_assert!(tails.len() >= T);
        let c = T5Consts::new();
        // Two accumulators per token (even and odd digits) halve the chains.
        let mut acc = [[_mm256_setzero_si256(); 2]; T];
        // One block's 32 stored bytes, against the activations of token `t` and digit `j` at
        // `a(t, j)` (32 bytes).
        let mut add_block = |w: __m256i, a: &dyn Fn(usize, usize) -> *const i8| {
            let even = _mm256_slli_epi16::<8>(w);
            let odd = _mm256_srli_epi16::<8>(w);
            let mut f_prev = _mm256_setzero_si256();
            for j in 0..t5::TRITS_PER_BYTE {
                // F_{j+1} of every byte, then the codes.
                let f = c.f(even, odd, j);
                let three = _mm256_add_epi8(f_prev, _mm256_add_epi8(f_prev, f_prev));
                let codes = _mm256_sub_epi8(f, three);
                f_prev = f;
                for (t, at) in acc.iter_mut().enumerate() {
                    // SAFETY: `a` gives 32 readable bytes for every token and digit.
                    let v = unsafe { _mm256_loadu_si256(a(t, j).cast()) };
                    at[j % 2] = _mm256_dpbusd_epi32(at[j % 2], codes, v);
                }
            }
        };
        let (w_ptr, q_ptr) = (row.as_ptr(), q.as_ptr());
        for b in 0..full {
            // SAFETY: whole block `b < full` lies within `row`; unaligned load.
            let w = unsafe { _mm256_loadu_si256(w_ptr.add(b * t5::BLOCK_BYTES).cast()) };
            // Token `t < T`, whole block `b`: within `q`.
            let a = |t: usize, j: usize| {
                q_ptr.wrapping_add(t * stride + b * t5::BLOCK + j * t5::BLOCK_BYTES)
            };
            add_block(w, &a);
        }
        let tail = &row[full * t5::BLOCK_BYTES..t5::row_bytes(k)];
        if !tail.is_empty() {
            // The short last block, through the same arithmetic (see [`tail_activations`]).
            let a = |t: usize, j: usize| tails[t][j * t5::BLOCK_BYTES..].as_ptr();
            add_block(tail_bytes(tail), &a);
        }
        std::array::from_fn(|t| super::avx2::hsum(_mm256_add_epi32(acc[t][0], acc[t][1])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{ACTIVATION_EPS, ActQuant};

    const A8: ActQuant = ActQuant::Absmax8 {
        eps: ACTIVATION_EPS,
    };
    const A4: ActQuant = ActQuant::Absmean4 {
        eps: ACTIVATION_EPS,
    };

    /// A small deterministic generator (no extra dependency needed for tests).
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

    #[test]
    fn optimized_kernels_equal_the_scalar_reference() {
        let mut rng = Lcg(42);
        let random_k: Vec<usize> = (0..6).map(|_| 1 + rng.next() as usize % 3000).collect();
        for layout in TernaryLayout::ALL {
            for act in [A8, A4] {
                for &k in [
                    1usize, 2, 5, 31, 32, 33, 127, 128, 129, 159, 160, 161, 255, 256, 300, 319,
                    640, 1000, 2560, 6912,
                ]
                .iter()
                .chain(&random_k)
                {
                    let trits: Vec<i8> = (0..k).map(|_| (rng.next() % 3) as i8 - 1).collect();
                    let mut row = vec![0u8; layout.row_bytes(k)];
                    layout.pack_row(&trits, &mut row);
                    let x: Vec<f32> = (0..k)
                        .map(|_| rng.next() as f32 / u32::MAX as f32 * 8.0 - 4.0)
                        .collect();
                    let mut q = vec![0i8; padded_len(layout, k)];
                    act.quantize(&x, &mut q);
                    let q_sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
                    let want: i32 = trits
                        .iter()
                        .zip(&q)
                        .map(|(&t, &a)| i32::from(t) * i32::from(a))
                        .sum();
                    let what = format!("{layout:?} {} k={k}", act.name());
                    assert_eq!(dot_scalar(layout, &row, &q, k), want, "{what}");
                    assert_eq!(dot_portable(layout, &row, &q, q_sum, k), want, "{what}");
                    assert_eq!(dot(layout, &row, &q, q_sum, k), want, "{what}");
                    for isa in Isa::available() {
                        let got = dot_with(isa, layout, &row, &q, q_sum, k);
                        assert_eq!(got, want, "{what} {isa:?}");
                        if act == A4 {
                            let got = dot_small_with(isa, layout, &row, &q, q_sum, k);
                            assert_eq!(got, want, "{what} {isa:?} small");
                        }
                    }
                    if act == A4 {
                        assert_eq!(dot_small(layout, &row, &q, q_sum, k), want, "{what}");
                    }
                }
            }
        }
    }

    /// The multi-token kernels of every build against [`dot_scalar`] token by token: 1 to 4
    /// tokens, strides with and without slack, int8 (down to -128, which the unsigned-code
    /// kernels take) and int4 activations, awkward and real row lengths.
    #[test]
    fn multi_token_kernels_equal_the_scalar_reference() {
        let mut rng = Lcg(1234);
        let random_k: Vec<usize> = (0..6).map(|_| 1 + rng.next() as usize % 3000).collect();
        for layout in TernaryLayout::ALL {
            for &k in [
                1usize, 31, 127, 128, 129, 159, 160, 161, 319, 320, 321, 480, 481, 2560, 6912,
            ]
            .iter()
            .chain(&random_k)
            {
                let padded = padded_len(layout, k);
                for (tokens, slack, range) in [(1, 0, 256), (2, 7, 256), (3, 0, 16), (4, 33, 256)] {
                    let trits: Vec<i8> = (0..k).map(|_| (rng.next() % 3) as i8 - 1).collect();
                    let mut row = vec![0u8; layout.row_bytes(k)];
                    layout.pack_row(&trits, &mut row);
                    let stride = padded + slack;
                    let mut q = vec![0i8; (tokens - 1) * stride + padded];
                    for t in 0..tokens {
                        for v in &mut q[t * stride..t * stride + k] {
                            *v = ((rng.next() % range) as i32 - (range / 2) as i32) as i8;
                            // The i8 layout's sign trick needs -128 kept out (as `dot` says).
                            if layout == TernaryLayout::I8 {
                                *v = (*v).max(-127);
                            }
                        }
                    }
                    let want: Vec<i32> = (0..tokens)
                        .map(|t| dot_scalar(layout, &row, &q[t * stride..], k))
                        .collect();
                    let sums: Vec<i32> = (0..tokens)
                        .map(|t| {
                            q[t * stride..t * stride + padded]
                                .iter()
                                .map(|&v| i32::from(v))
                                .sum()
                        })
                        .collect();
                    for isa in Isa::available() {
                        let mut got = vec![0i32; tokens];
                        dot_multi_with(isa, layout, &row, &q, stride, &sums, k, &mut got);
                        assert_eq!(got, want, "{layout:?} k={k} tokens={tokens} {isa:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn float_activation_dot_equals_the_unpacked_sum() {
        let mut rng = Lcg(7);
        for layout in TernaryLayout::ALL {
            for k in [1usize, 5, 31, 128, 129, 159, 161, 300] {
                let trits: Vec<i8> = (0..k).map(|_| (rng.next() % 3) as i8 - 1).collect();
                let mut row = vec![0u8; layout.row_bytes(k)];
                layout.pack_row(&trits, &mut row);
                let x: Vec<f32> = (0..k)
                    .map(|_| rng.next() as f32 / u32::MAX as f32 - 0.5)
                    .collect();
                let want = trits
                    .iter()
                    .zip(&x)
                    .fold(0f32, |acc, (&t, &v)| acc + f32::from(t) * v);
                assert_eq!(dot_trits_f32(layout, &row, &x).to_bits(), want.to_bits());
            }
        }
    }

    /// The run-of-rows entry point against the scalar reference, row by row and token by token.
    #[test]
    fn multi_row_kernels_equal_the_scalar_reference() {
        let mut rng = Lcg(99);
        for layout in TernaryLayout::ALL {
            for k in [31usize, 159, 160, 320, 481, 2560, 6912] {
                let (rows, padded) = (5, padded_len(layout, k));
                // Rows further apart than they are long: the bytes between must be ignored.
                let (used, rb) = (layout.row_bytes(k), layout.row_bytes(k) + 3);
                let mut data = vec![0xffu8; rows * rb];
                for row in data.chunks_exact_mut(rb) {
                    let trits: Vec<i8> = (0..k).map(|_| (rng.next() % 3) as i8 - 1).collect();
                    layout.pack_row(&trits, &mut row[..used]);
                }
                for tokens in 1..=TILE {
                    let stride = padded + 3;
                    let mut q = vec![0i8; (tokens - 1) * stride + padded];
                    for t in 0..tokens {
                        for v in &mut q[t * stride..t * stride + k] {
                            *v = ((rng.next() % 255) as i32 - 127) as i8;
                        }
                    }
                    let sums: Vec<i32> = (0..tokens)
                        .map(|t| {
                            q[t * stride..t * stride + padded]
                                .iter()
                                .map(|&v| i32::from(v))
                                .sum()
                        })
                        .collect();
                    let mut want = Vec::new();
                    for row in data.chunks_exact(rb) {
                        for t in 0..tokens {
                            want.push(dot_scalar(layout, &row[..used], &q[t * stride..], k));
                        }
                    }
                    for isa in Isa::available() {
                        let mut got = vec![0i32; rows * tokens];
                        dot_multi_rows_with(isa, layout, &data, rb, &q, stride, &sums, k, &mut got);
                        assert_eq!(got, want, "{layout:?} k={k} tokens={tokens} {isa:?}");
                        if tokens == 1 {
                            // The single-token run of rows, as decoding calls it: every count
                            // of rows, odd and even.
                            for n in 0..=rows {
                                let mut one = vec![0i32; n];
                                dot_rows_with(isa, layout, &data, rb, &q, sums[0], k, &mut one);
                                assert_eq!(one, want[..n], "{layout:?} k={k} {isa:?} {n} rows");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Many blocks of the largest int4 products: the 16-bit partial sums are widened in time.
    #[test]
    fn the_int4_kernel_does_not_overflow_its_16_bit_lanes() {
        for layout in TernaryLayout::ALL {
            for k in [128 * SMALL_BLOCKS, 128 * SMALL_BLOCKS + 128, 128 * 600 + 5] {
                for (t, a) in [(1i8, -8i8), (-1, -8), (1, 7), (-1, 7)] {
                    let mut row = vec![0u8; layout.row_bytes(k)];
                    layout.pack_row(&vec![t; k], &mut row);
                    let mut q = vec![a; padded_len(layout, k)];
                    q[k..].fill(0);
                    let q_sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
                    let want = i32::from(t) * i32::from(a) * k as i32;
                    for isa in Isa::available() {
                        let got = dot_small_with(isa, layout, &row, &q, q_sum, k);
                        assert_eq!(got, want, "{layout:?} k={k} {isa:?}");
                        let mut multi = [0i32; 2];
                        let n = padded_len(layout, k);
                        let q2 = [&q[..], &q[..]].concat();
                        dot_multi_with(isa, layout, &row, &q2, n, &[q_sum; 2], k, &mut multi);
                        assert_eq!(multi, [want; 2], "{layout:?} k={k} {isa:?} multi");
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_activations_do_not_overflow() {
        // All activations at +-127 and all weights +-1 maximize every partial sum; k = 4099
        // and 6912 add a short last block to the whole ones.
        for layout in TernaryLayout::ALL {
            for k in [4096, 4099, 6912] {
                for (t, a) in [(1i8, 127i8), (-1, 127), (1, -127), (-1, -127)] {
                    let mut row = vec![0u8; layout.row_bytes(k)];
                    layout.pack_row(&vec![t; k], &mut row);
                    let mut q = vec![a; padded_len(layout, k)];
                    q[k..].fill(0);
                    let q_sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
                    let want = i32::from(t) * i32::from(a) * k as i32;
                    let what = format!("{layout:?} k={k} t={t} a={a}");
                    assert_eq!(dot_scalar(layout, &row, &q, k), want, "{what}");
                    assert_eq!(dot_portable(layout, &row, &q, q_sum, k), want, "{what}");
                    assert_eq!(dot(layout, &row, &q, q_sum, k), want, "{what}");
                    for isa in Isa::available() {
                        assert_eq!(dot_with(isa, layout, &row, &q, q_sum, k), want, "{what}");
                        let mut multi = [0i32; 4];
                        let n = padded_len(layout, k);
                        let q4 = [&q[..], &q[..], &q[..], &q[..]].concat();
                        dot_multi_with(isa, layout, &row, &q4, n, &[q_sum; 4], k, &mut multi);
                        assert_eq!(multi, [want; 4], "{what} {isa:?} multi");
                        // A run of three rows: a pair and a last row alone.
                        let rows = [&row[..], &row[..], &row[..]].concat();
                        let mut dots = [0i32; 3];
                        dot_rows_with(isa, layout, &rows, row.len(), &q, q_sum, k, &mut dots);
                        assert_eq!(dots, [want; 3], "{what} {isa:?} rows");
                    }
                }
            }
        }
    }

    /// The AVX2 `t5` decoder and the scalar digit extraction agree on every valid byte value
    /// at every digit position (one row per value, all 32 bytes of each block equal).
    #[test]
    fn t5_kernels_decode_every_byte_value() {
        // Two whole blocks and a short one of two whole bytes, every byte holding `v`.
        let k = 2 * t5::BLOCK + 10;
        for v in 0..t5::VALUES as u8 {
            let row = {
                let mut trits = vec![0i8; k];
                let mut packed = vec![0u8; t5::row_bytes(k)];
                t5::pack_row(&trits, &mut packed);
                packed.fill(t5::encode(v));
                t5::unpack_row(&packed, &mut trits).unwrap();
                packed
            };
            let mut q = vec![0i8; padded_len(TernaryLayout::T5, k)];
            // Every activation from -128 (which the t5 kernel takes, its codes being unsigned)
            // to 127, shifted by one for odd `v`.
            for (i, a) in q[..k].iter_mut().enumerate() {
                *a = ((i + usize::from(v % 2)) % 256) as u8 as i8;
            }
            let q_sum: i32 = q.iter().map(|&a| i32::from(a)).sum();
            let want = dot_scalar(TernaryLayout::T5, &row, &q, k);
            assert_eq!(dot(TernaryLayout::T5, &row, &q, q_sum, k), want, "v={v}");
            for isa in Isa::available() {
                let got = dot_with(isa, TernaryLayout::T5, &row, &q, q_sum, k);
                assert_eq!(got, want, "v={v} {isa:?}");
                let rows = [&row[..], &row[..], &row[..]].concat();
                let mut dots = [0i32; 3];
                dot_rows_with(
                    isa,
                    TernaryLayout::T5,
                    &rows,
                    row.len(),
                    &q,
                    q_sum,
                    k,
                    &mut dots,
                );
                assert_eq!(dots, [want; 3], "v={v} {isa:?} rows");
            }
            assert_eq!(
                dot_portable(TernaryLayout::T5, &row, &q, q_sum, k),
                want,
                "v={v}"
            );
        }
    }
}
