//! The transformer forward shared by the packed and the source paths: embeddings, RMSNorm,
//! rotate-half RoPE, causal grouped-query attention with a KV cache, the gated feed-forward
//! block with the config's activation, BitNet's sub-norms, the final norm and the head.
//!
//! Everything except the seven projections is plain f32 arithmetic written once here; the
//! projections are supplied by the path ([`Linear`]), so that a parity check between the paths
//! isolates exactly the quantized arithmetic. The independent check of this shared code is the
//! comparison with HF transformers' logits (tests/run_goldens.rs).

use std::borrow::Cow;

use rayon::prelude::*;

use super::plan::QuantPlan;
use crate::model::{Activation, ModelConfig, Role};
use crate::num::FloatDtype;
use crate::num::dtype::decode_f32;
use crate::pack::q8;
use crate::quant::attention::{KvCodec, fake_quant_query};
use crate::transform::Hadamard;

/// A projection `y = x W^T` applied to `n` tokens at once (`x` is `[n, in]`, `y` is `[n, out]`).
pub trait Linear: Sync {
    fn in_dim(&self) -> usize;
    fn out_dim(&self) -> usize;
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]);

    /// Several projections of the same input (q, k and v; gate and up): `ys[i]` gets
    /// `parts[i]`'s output, the same values [`Linear::forward`] gives. One after the other
    /// here; an implementation may share the work (one quantization of the input, one
    /// parallel section for all their rows).
    fn forward_shared(parts: &[&Self], x: &[f32], n: usize, ys: &mut [Vec<f32>])
    where
        Self: Sized,
    {
        for (p, y) in parts.iter().zip(ys) {
            p.forward(x, n, y);
        }
    }
}

/// How a [`FloatMatrix`] stores its elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixType {
    /// Plain floats of this type.
    Float(FloatDtype),
    /// `q8_0` blocks ([`crate::pack::q8`]).
    Q8,
}

impl MatrixType {
    /// Bytes of one row of `cols` elements.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            MatrixType::Float(d) => cols * d.size(),
            MatrixType::Q8 => q8::row_bytes(cols),
        }
    }
}

/// A float matrix `[rows, cols]` kept in its stored encoding and decoded row by row
/// (embeddings and the output head).
pub struct FloatMatrix<'a> {
    pub ty: MatrixType,
    pub bytes: Cow<'a, [u8]>,
    pub rows: usize,
    pub cols: usize,
}

impl FloatMatrix<'_> {
    /// A view of the same matrix that borrows its bytes.
    pub fn borrowed(&self) -> FloatMatrix<'_> {
        FloatMatrix {
            ty: self.ty,
            bytes: Cow::Borrowed(&self.bytes),
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// Row `r` as f32.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let rb = self.ty.row_bytes(self.cols);
        let bytes = &self.bytes[r * rb..(r + 1) * rb];
        match self.ty {
            MatrixType::Float(d) => decode_f32(d, bytes, out),
            MatrixType::Q8 => q8::dequantize_row(bytes, out),
        }
    }

    /// `sum_c M[r, c] * x[c]` for one stored row.
    #[inline]
    fn dot(&self, w: &[u8], x: &[f32]) -> f32 {
        match self.ty {
            MatrixType::Float(d) => dot_row(d, w, x),
            MatrixType::Q8 => q8::dot(w, x),
        }
    }

    /// `y[t, r] = sum_c x[t, c] * M[r, c]` for `n` tokens, parallel over rows; f32 accumulation.
    ///
    /// For one token (decoding) each row is converted and multiplied in one pass over its bytes
    /// ([`dot_row`], [`q8::dot`]); for several tokens each float row is converted once and
    /// reused. Both compute the same sums in the same order, so the logits do not depend on
    /// how many tokens are batched.
    pub fn matmul_t(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        let row_bytes = self.ty.row_bytes(cols);
        if n == 1 {
            // Runs of rows for the decoding team (super::team): a few microseconds each.
            const RUN: usize = 128;
            let mut runs: Vec<&mut [f32]> = y[..rows].chunks_mut(RUN).collect();
            super::team::for_each_mut(&mut runs, |c, yc| {
                let w = &self.bytes[c * RUN * row_bytes..];
                for (o, w) in yc.iter_mut().zip(w.chunks_exact(row_bytes)) {
                    *o = self.dot(w, &x[..cols]);
                }
            });
            return;
        }
        let mut yt = vec![0f32; rows * n];
        yt.par_chunks_mut(n).enumerate().for_each_init(
            || vec![0f32; cols],
            |w, (r, out)| {
                if self.ty == MatrixType::Q8 {
                    // q8_0 rows are dotted in their own order (block scales outside the sums).
                    let stored = &self.bytes[r * row_bytes..(r + 1) * row_bytes];
                    for (t, o) in out.iter_mut().enumerate() {
                        *o = q8::dot(stored, &x[t * cols..(t + 1) * cols]);
                    }
                    return;
                }
                self.row(r, w);
                for (t, o) in out.iter_mut().enumerate() {
                    *o = dot_f32(w, &x[t * cols..(t + 1) * cols]);
                }
            },
        );
        for t in 0..n {
            for r in 0..rows {
                y[t * rows + r] = yt[r * n + t];
            }
        }
    }
}

/// Partial sums of the float dot products: four AVX2 vectors (eight SSE2 vectors) of
/// independent additions, enough to hide the adder's latency.
const DOT_LANES: usize = 32;

/// Combines the partial sums pairwise (lane `i` plus lane `i + 16`, then `+ 8`, ...), then
/// adds the products after the last full group in order.
#[inline(always)]
fn reduce_lanes(mut acc: [f32; DOT_LANES], tail: impl Iterator<Item = f32>) -> f32 {
    let mut width = DOT_LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    tail.fold(acc[0], |s, p| s + p)
}

/// f32 dot product with 32 partial sums (lane `i` sums elements `i, i + 32, ...`), combined in
/// a fixed order ([`reduce_lanes`]). The AVX2 build of the same code gives the same result bit
/// for bit: no fused multiply-add, same partial sums.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::num::cpu::has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time just above).
        return unsafe { avx2::dot_f32(a, b) };
    }
    dot_f32_body(a, b)
}

#[inline(always)]
fn dot_f32_body(a: &[f32], b: &[f32]) -> f32 {
    // Over the common length, as the AVX2 build does (callers pass equal lengths).
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; DOT_LANES];
    let mut ca = a.chunks_exact(DOT_LANES);
    let mut cb = b.chunks_exact(DOT_LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..DOT_LANES {
            acc[i] += x[i] * y[i];
        }
    }
    reduce_lanes(
        acc,
        ca.remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x * y),
    )
}

/// Whether `rows` holds `count` rows of `len` values `stride` apart (the last one may end the
/// slice), without overflow whatever the numbers.
fn rows_hold(rows: &[f32], count: usize, stride: usize, len: usize) -> bool {
    match count.checked_sub(1) {
        None => true,
        Some(last) => last
            .checked_mul(stride)
            .and_then(|start| start.checked_add(len))
            .is_some_and(|need| rows.len() >= need),
    }
}

/// `out[p] = dot_f32(q, rows[p * stride..p * stride + q.len()]) * scale` for every `p` of
/// `out`, bit for bit, with one call for all the rows (attention scores: a call per key cost
/// more than its 128 products).
pub fn scaled_dots(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    assert!(rows_hold(rows, out.len(), stride, q.len()));
    #[cfg(target_arch = "x86_64")]
    if crate::num::cpu::has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time just above); lengths asserted.
        unsafe { avx2::scaled_dots(q, rows, stride, scale, out) };
        return;
    }
    for (p, o) in out.iter_mut().enumerate() {
        *o = dot_f32_body(q, &rows[p * stride..p * stride + q.len()]) * scale;
    }
}

/// `out[e] = sum_p weights[p] * rows[p * stride + e]` for `e < out.len()`, each element summed
/// from zero in the order of `p` with a separate multiply and add, so the AVX2 build (which keeps
/// a stretch of `out` in registers over all the rows) gives the same result bit for bit.
pub fn weighted_sum(weights: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    assert!(rows_hold(rows, weights.len(), stride, out.len()));
    #[cfg(target_arch = "x86_64")]
    if crate::num::cpu::has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time just above); lengths asserted.
        unsafe { avx2::weighted_sum(weights, rows, stride, out) };
        return;
    }
    weighted_sum_body(weights, rows, stride, out);
}

#[inline(always)]
fn weighted_sum_body(weights: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (p, &w) in weights.iter().enumerate() {
        let v = &rows[p * stride..p * stride + out.len()];
        for (o, v) in out.iter_mut().zip(v) {
            *o += w * v;
        }
    }
}

/// [`scaled_dots`] for several queries against the same rows: `qs` holds `m` queries of `len`
/// values one after another, `out` holds `m` runs of scores (`out[j * count + p]` for query
/// `j` and row `p`), each equal bit for bit to [`scaled_dots`] of that query. The query heads
/// of a kv group read each key once, not once per head.
pub fn scaled_dots_heads(
    qs: &[f32],
    len: usize,
    rows: &[f32],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    let m = qs.len().checked_div(len).unwrap_or(0);
    assert!(
        m > 0 && m * len == qs.len() && out.len() % m == 0,
        "{m} queries of {len}"
    );
    let count = out.len() / m;
    assert!(rows_hold(rows, count, stride, len));
    if count == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if use_avx512() {
        // SAFETY: the CPU supports AVX-512 F (checked just above); lengths asserted.
        match m {
            2 => unsafe { avx512::scaled_dots::<2>(qs, len, rows, stride, scale, out) },
            4 => unsafe { avx512::scaled_dots::<4>(qs, len, rows, stride, scale, out) },
            _ => {
                for (q, o) in qs.chunks_exact(len).zip(out.chunks_exact_mut(count)) {
                    unsafe { avx512::scaled_dots::<1>(q, len, rows, stride, scale, o) };
                }
            }
        }
        return;
    }
    for (q, o) in qs.chunks_exact(len).zip(out.chunks_exact_mut(count)) {
        scaled_dots(q, rows, stride, scale, o);
    }
}

/// [`weighted_sum`] for several sets of weights over the same rows: `weights` holds `m` runs of
/// `count` weights, `out` `m` outputs of `len` values one after another, each equal bit for bit
/// to [`weighted_sum`] of its weights. Each row is read once for all `m`.
pub fn weighted_sums_heads(
    weights: &[f32],
    count: usize,
    rows: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    let m = weights.len().checked_div(count).unwrap_or(0);
    assert!(m * count == weights.len(), "weights of {count} rows");
    if m == 0 {
        out.fill(0.0);
        return;
    }
    assert!(out.len() % m == 0, "{m} outputs");
    let len = out.len() / m;
    assert!(rows_hold(rows, count, stride, len));
    #[cfg(target_arch = "x86_64")]
    if use_avx512() {
        // SAFETY: the CPU supports AVX-512 F (checked just above); lengths asserted.
        match m {
            2 => unsafe { avx512::weighted_sums::<2>(weights, count, rows, stride, out) },
            4 => unsafe { avx512::weighted_sums::<4>(weights, count, rows, stride, out) },
            _ => {
                for (w, o) in weights.chunks_exact(count).zip(out.chunks_exact_mut(len)) {
                    unsafe { avx512::weighted_sums::<1>(w, count, rows, stride, o) };
                }
            }
        }
        return;
    }
    for (w, o) in weights.chunks_exact(count).zip(out.chunks_exact_mut(len)) {
        weighted_sum(w, rows, stride, o);
    }
}

/// Whether the attention kernels take their AVX-512 build: the `avx512` kernels are in use
/// ([`super::kernels::Isa::active`], which `BITNET_PACK_KERNELS` can lower).
#[cfg(target_arch = "x86_64")]
fn use_avx512() -> bool {
    super::kernels::Isa::active() == super::kernels::Isa::Avx512
}

/// `sum_c decode(w[c]) * x[c]` straight from a stored row of `dtype` elements: equal, bit for
/// bit, to decoding the row with [`decode_f32`] and calling [`dot_f32`], without the
/// intermediate buffer (the head of a 2B4T model is 656 MB of bf16 read once per token).
pub fn dot_row(dtype: FloatDtype, w: &[u8], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len() * dtype.size());
    #[cfg(target_arch = "x86_64")]
    if crate::num::cpu::has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time just above).
        return unsafe { avx2::dot_row(dtype, w, x) };
    }
    dot_row_body(dtype, w, x)
}

#[inline(always)]
fn bf16_at(b: &[u8], i: usize) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])) << 16)
}

#[inline(always)]
fn dot_row_body(dtype: FloatDtype, w: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; DOT_LANES];
    let full = x.len() / DOT_LANES * DOT_LANES;
    let size = dtype.size();
    if dtype == FloatDtype::Bf16 {
        for (b, xs) in w[..full * 2]
            .chunks_exact(2 * DOT_LANES)
            .zip(x[..full].chunks_exact(DOT_LANES))
        {
            for i in 0..DOT_LANES {
                acc[i] += bf16_at(b, i) * xs[i];
            }
        }
    } else {
        // f32 and f16 heads are rare in BitNet checkpoints: convert a group at a time.
        let mut buf = [0f32; DOT_LANES];
        for (b, xs) in w[..full * size]
            .chunks_exact(size * DOT_LANES)
            .zip(x[..full].chunks_exact(DOT_LANES))
        {
            decode_f32(dtype, b, &mut buf);
            for i in 0..DOT_LANES {
                acc[i] += buf[i] * xs[i];
            }
        }
    }
    let mut tail_w = [0f32; DOT_LANES];
    let rest = x.len() - full;
    decode_f32(dtype, &w[full * size..], &mut tail_w[..rest]);
    reduce_lanes(
        acc,
        tail_w[..rest].iter().zip(&x[full..]).map(|(a, b)| a * b),
    )
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Explicit AVX2 versions of the float dots: four 8-wide accumulators are lanes
    //! `0..8, 8..16, 16..24, 24..32` of the portable body's 32 partial sums, updated with the
    //! same separate multiply and add, so the results are identical bit for bit.
    use std::arch::x86_64::*;

    use super::{DOT_LANES, FloatDtype};

    /// [`reduce_lanes`] of the 32 lanes the four accumulators hold (lane `i` of vector `j` is
    /// lane `8 j + i`), in vector registers: the same pairwise additions (`i + 16`, `+ 8`, `+ 4`,
    /// `+ 2`, `+ 1`), so the same result bit for bit, then the tail in order.
    ///
    /// # Safety
    /// The CPU must support AVX2 (it is inlined into this module's AVX2 functions).
    #[inline(always)]
    unsafe fn reduce(acc: [__m256; 4], tail: impl Iterator<Item = f32>) -> f32 {
        // SAFETY: the caller's contract.
        unsafe {
            let s8 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2));
            tail.fold(_mm_cvtss_f32(s1), |s, p| s + p)
        }
    }

    /// Elements of `out` a pass of [`weighted_sum`] keeps in registers: eight vectors.
    const SUM_STRETCH: usize = 64;

    /// See [`super::weighted_sum`], whose length checks hold.
    ///
    /// # Safety
    /// The CPU must support AVX2, and `rows` must hold `(weights.len() - 1) * stride +
    /// out.len()` values when `weights` is not empty.
    #[target_feature(enable = "avx2")]
    pub unsafe fn weighted_sum(weights: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
        let full = out.len() / 8 * 8;
        let mut start = 0;
        // SAFETY (both loops): the stretch `start..start + 8 V` lies within `full`.
        while start + SUM_STRETCH <= full {
            unsafe { stretch::<{ SUM_STRETCH / 8 }>(weights, rows, stride, start, out) };
            start += SUM_STRETCH;
        }
        while start < full {
            unsafe { stretch::<1>(weights, rows, stride, start, out) };
            start += 8;
        }
        // The last few elements, in the portable order.
        let tail = &mut out[full..];
        tail.fill(0.0);
        for (p, &w) in weights.iter().enumerate() {
            for (e, o) in tail.iter_mut().enumerate() {
                *o += w * rows[p * stride + full + e];
            }
        }
    }

    /// Elements `start..start + 8 V` of [`weighted_sum`], in `V` registers over every row.
    ///
    /// # Safety
    /// As [`weighted_sum`], and `start + 8 V <= out.len()`.
    #[inline(always)]
    unsafe fn stretch<const V: usize>(
        weights: &[f32],
        rows: &[f32],
        stride: usize,
        start: usize,
        out: &mut [f32],
    ) {
        // SAFETY (the intrinsics): only inlined into the AVX2 build above.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); V];
            let base = rows.as_ptr().wrapping_add(start);
            for (p, &w) in weights.iter().enumerate() {
                let w = _mm256_set1_ps(w);
                for (j, slot) in acc.iter_mut().enumerate() {
                    // Row `p` holds out.len() values from p * stride (the caller's contract).
                    let v = _mm256_loadu_ps(base.add(p * stride + 8 * j));
                    *slot = _mm256_add_ps(*slot, _mm256_mul_ps(w, v));
                }
            }
            for (j, slot) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(start + 8 * j), *slot);
            }
        }
    }

    /// See [`super::scaled_dots`], whose length checks hold: [`dot_f32`] inlined in a loop.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn scaled_dots(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
        for (p, o) in out.iter_mut().enumerate() {
            // SAFETY: the CPU supports AVX2 (this function's contract).
            *o = unsafe { dot_f32(q, &rows[p * stride..p * stride + q.len()]) } * scale;
        }
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let full = n / DOT_LANES * DOT_LANES;
        let mut acc = [_mm256_setzero_ps(); 4];
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut e = 0;
        while e < full {
            for (j, slot) in acc.iter_mut().enumerate() {
                // SAFETY: e + 8 * j + 8 <= full <= len of both slices.
                let (x, y) = unsafe {
                    (
                        _mm256_loadu_ps(pa.add(e + 8 * j)),
                        _mm256_loadu_ps(pb.add(e + 8 * j)),
                    )
                };
                *slot = _mm256_add_ps(*slot, _mm256_mul_ps(x, y));
            }
            e += DOT_LANES;
        }
        // SAFETY: the CPU supports AVX2 (this function's contract).
        unsafe { reduce(acc, a[full..n].iter().zip(&b[full..n]).map(|(x, y)| x * y)) }
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_row(dtype: FloatDtype, w: &[u8], x: &[f32]) -> f32 {
        if dtype != FloatDtype::Bf16 || w.len() != 2 * x.len() {
            return super::dot_row_body(dtype, w, x);
        }
        let full = x.len() / DOT_LANES * DOT_LANES;
        let mut acc = [_mm256_setzero_ps(); 4];
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let mut e = 0;
        while e < full {
            for (j, slot) in acc.iter_mut().enumerate() {
                // SAFETY: elements e + 8j .. e + 8j + 8 are within both rows (e + 32 <= full);
                // the weights are 2 bytes each.
                let (wv, xv) = unsafe {
                    let raw = _mm_loadu_si128(pw.add(2 * (e + 8 * j)) as *const __m128i);
                    let wide = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw));
                    (
                        _mm256_castsi256_ps(wide),
                        _mm256_loadu_ps(px.add(e + 8 * j)),
                    )
                };
                *slot = _mm256_add_ps(*slot, _mm256_mul_ps(wv, xv));
            }
            e += DOT_LANES;
        }
        let tail = w[2 * full..]
            .chunks_exact(2)
            .zip(&x[full..])
            .map(|(b, v)| super::bf16_at(b, 0) * v);
        // SAFETY: the CPU supports AVX2 (this function's contract).
        unsafe { reduce(acc, tail) }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX-512 builds of the attention kernels, for several query heads at once. The dots keep
    //! the 32 partial sums of [`super::dot_f32`] in two 16-wide vectors (lanes `0..16` and
    //! `16..32`) and combine them in its order; the weighted sums keep up to 128 elements of
    //! an output in registers over every row. Same operations, same order: equal bit for bit.
    use std::arch::x86_64::*;

    use super::DOT_LANES;

    /// See [`super::scaled_dots_heads`] for `M` queries, whose length checks hold.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F; `qs` holds `M * len` values, `out` `M * count`, and
    /// `rows` `count` rows of `len` values `stride` apart.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scaled_dots<const M: usize>(
        qs: &[f32],
        len: usize,
        rows: &[f32],
        stride: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let count = out.len() / M;
        let full = len / DOT_LANES * DOT_LANES;
        let q = qs.as_ptr();
        for p in 0..count {
            let row = &rows[p * stride..p * stride + len];
            let r = row.as_ptr();
            let mut lo = [_mm512_setzero_ps(); M];
            let mut hi = [_mm512_setzero_ps(); M];
            let mut e = 0;
            while e < full {
                // SAFETY: e + 32 <= full <= len: within the row and every query.
                unsafe {
                    let (k0, k1) = (_mm512_loadu_ps(r.add(e)), _mm512_loadu_ps(r.add(e + 16)));
                    for j in 0..M {
                        let qj = q.add(j * len + e);
                        lo[j] = _mm512_add_ps(lo[j], _mm512_mul_ps(_mm512_loadu_ps(qj), k0));
                        hi[j] =
                            _mm512_add_ps(hi[j], _mm512_mul_ps(_mm512_loadu_ps(qj.add(16)), k1));
                    }
                }
                e += DOT_LANES;
            }
            for j in 0..M {
                let qj = &qs[j * len..(j + 1) * len];
                let tail = qj[full..].iter().zip(&row[full..]).map(|(x, y)| x * y);
                out[j * count + p] = reduce(lo[j], hi[j], tail) * scale;
            }
        }
    }

    /// [`super::reduce_lanes`] of the 32 partial sums in `lo` (lanes 0..16) and `hi` (16..32):
    /// `i + 16`, then `+ 8`, `+ 4`, `+ 2`, `+ 1`, then the tail in order.
    #[inline(always)]
    fn reduce(lo: __m512, hi: __m512, tail: impl Iterator<Item = f32>) -> f32 {
        // SAFETY: only inlined into this module's AVX-512 functions.
        unsafe {
            let s16 = _mm512_add_ps(lo, hi);
            let s8 = _mm256_add_ps(
                _mm512_castps512_ps256(s16),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s16))),
            );
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2));
            tail.fold(_mm_cvtss_f32(s1), |s, p| s + p)
        }
    }

    /// See [`super::weighted_sums_heads`] for `M` sets of weights, whose length checks hold.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F; `weights` holds `M * count` values, `out` `M * len`,
    /// and `rows` `count` rows of `len` values `stride` apart.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weighted_sums<const M: usize>(
        weights: &[f32],
        count: usize,
        rows: &[f32],
        stride: usize,
        out: &mut [f32],
    ) {
        let len = out.len() / M;
        let full = len / 16 * 16;
        let mut start = 0;
        // Accumulators and one row's stretch in registers: 8 vectors a head up to two heads,
        // 4 for four (32 registers in all).
        let wide = if M > 2 { 64 } else { 128 };
        // SAFETY (both loops): the stretch `start..start + 16 V` lies within `full`.
        while start + wide <= full {
            if M > 2 {
                unsafe { stretch::<M, 4>(weights, count, rows, stride, start, len, out) };
            } else {
                unsafe { stretch::<M, 8>(weights, count, rows, stride, start, len, out) };
            }
            start += wide;
        }
        while start < full {
            unsafe { stretch::<M, 1>(weights, count, rows, stride, start, len, out) };
            start += 16;
        }
        // The last few elements, in the portable order.
        for j in 0..M {
            let (w, o) = (
                &weights[j * count..(j + 1) * count],
                &mut out[j * len..(j + 1) * len],
            );
            let tail = &mut o[full..];
            tail.fill(0.0);
            for (p, &wp) in w.iter().enumerate() {
                for (e, t) in tail.iter_mut().enumerate() {
                    *t += wp * rows[p * stride + full + e];
                }
            }
        }
    }

    /// Elements `start..start + 16 V` of each of the `M` outputs, in `M * V` registers over
    /// every row.
    ///
    /// # Safety
    /// As [`weighted_sums`], and `start + 16 V <= len`.
    #[inline(always)]
    unsafe fn stretch<const M: usize, const V: usize>(
        weights: &[f32],
        count: usize,
        rows: &[f32],
        stride: usize,
        start: usize,
        len: usize,
        out: &mut [f32],
    ) {
        // SAFETY (the intrinsics): only inlined into the AVX-512 build above.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; M];
            let base = rows.as_ptr().wrapping_add(start);
            for p in 0..count {
                let mut v = [_mm512_setzero_ps(); V];
                for (i, slot) in v.iter_mut().enumerate() {
                    // Row `p` holds `len` values from p * stride (the caller's contract).
                    *slot = _mm512_loadu_ps(base.add(p * stride + 16 * i));
                }
                for (j, acc) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*weights.get_unchecked(j * count + p));
                    for (slot, &v) in acc.iter_mut().zip(&v) {
                        *slot = _mm512_add_ps(*slot, _mm512_mul_ps(w, v));
                    }
                }
            }
            for (j, acc) in acc.iter().enumerate() {
                for (i, slot) in acc.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add(j * len + start + 16 * i), *slot);
                }
            }
        }
    }
}

/// The weights of one transformer block.
pub struct Block<L> {
    pub attn_norm: Vec<f32>,
    pub q: L,
    pub k: L,
    pub v: L,
    pub attn_sub_norm: Option<Vec<f32>>,
    pub o: L,
    pub ffn_norm: Vec<f32>,
    pub gate: L,
    pub up: L,
    pub ffn_sub_norm: Option<Vec<f32>>,
    pub down: L,
}

impl<L> Block<L> {
    /// The projection with `role`, if `role` is one of the seven.
    pub fn projection(&self, role: Role) -> Option<&L> {
        match role {
            Role::QProj => Some(&self.q),
            Role::KProj => Some(&self.k),
            Role::VProj => Some(&self.v),
            Role::OProj => Some(&self.o),
            Role::GateProj => Some(&self.gate),
            Role::UpProj => Some(&self.up),
            Role::DownProj => Some(&self.down),
            _ => None,
        }
    }
}

/// A whole model, generic over how projections are computed.
pub struct Transformer<'a, L> {
    pub config: ModelConfig,
    pub embed: FloatMatrix<'a>,
    pub blocks: Vec<Block<L>>,
    pub final_norm: Vec<f32>,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<FloatMatrix<'a>>,
    /// Online transforms and attention-state quantizers (the activation quantizers live in the
    /// projections, which each path builds from the same plan).
    pub plan: QuantPlan,
}

impl<L> Transformer<'_, L> {
    /// An empty attention state for one block of this model.
    pub fn new_attention_state(&self) -> AttentionState {
        AttentionState::new(
            self.config.num_kv_heads,
            self.config.head_dim,
            self.plan.attention.kv_bits,
        )
    }
}

/// A projection of the model: its block and its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    pub layer: usize,
    pub role: Role,
}

/// Watches a forward pass: sees the input and output of every projection as it runs, in
/// execution order. Parity records one path with it and replays the inputs on the other.
pub trait Probe {
    fn projection(&mut self, site: Site, input: &[f32], output: &[f32]);
}

/// A probe that looks at nothing.
pub struct NoProbe;

impl Probe for NoProbe {
    fn projection(&mut self, _: Site, _: &[f32], _: &[f32]) {}
}

/// The attention state of one block: the keys (after RoPE) and values of past positions, with
/// the two operations attention needs of them. With `kv_bits` it stores codes
/// ([`crate::quant::attention::KvCodec`]), not floats, and decodes a vector when it is used.
#[derive(Debug, Clone)]
pub struct AttentionState {
    store: KvStore,
    head_dim: usize,
    kv_heads: usize,
    len: usize,
}

#[derive(Debug, Clone)]
enum KvStore {
    /// One `[len, head_dim]` array per kv head, so that attention streams a head's keys and
    /// values from consecutive addresses.
    F32 { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    Codes {
        codec: KvCodec,
        k: Vec<u8>,
        v: Vec<u8>,
        /// `(lo, step)` per stored head vector.
        k_params: Vec<(f32, f32)>,
        v_params: Vec<(f32, f32)>,
    },
}

impl AttentionState {
    pub fn new(num_kv_heads: usize, head_dim: usize, kv_bits: Option<u8>) -> Self {
        let store = match kv_bits {
            None => KvStore::F32 {
                k: vec![Vec::new(); num_kv_heads],
                v: vec![Vec::new(); num_kv_heads],
            },
            Some(bits) => KvStore::Codes {
                codec: KvCodec::new(bits, head_dim),
                k: Vec::new(),
                v: Vec::new(),
                k_params: Vec::new(),
                v_params: Vec::new(),
            },
        };
        AttentionState {
            store,
            head_dim,
            kv_heads: num_kv_heads,
            len: 0,
        }
    }

    /// Number of positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the stored keys and values take.
    pub fn bytes(&self) -> usize {
        match &self.store {
            KvStore::F32 { k, v } => 4 * k.iter().chain(v).map(Vec::len).sum::<usize>(),
            KvStore::Codes {
                k,
                v,
                k_params,
                v_params,
                ..
            } => k.len() + v.len() + 8 * (k_params.len() + v_params.len()),
        }
    }

    /// Appends `n` positions: `k` and `v` are `[n, kv_heads * head_dim]`.
    pub fn append(&mut self, k: &[f32], v: &[f32], n: usize) {
        debug_assert_eq!(k.len(), n * self.kv_heads * self.head_dim);
        match &mut self.store {
            KvStore::F32 { k: ks, v: vs } => {
                for (src, heads) in [(k, ks), (v, vs)] {
                    for (h, vector) in src.chunks_exact(self.head_dim).enumerate() {
                        heads[h % self.kv_heads].extend_from_slice(vector);
                    }
                }
            }
            KvStore::Codes {
                codec,
                k: kc,
                v: vc,
                k_params,
                v_params,
            } => {
                let per = codec.bytes_per_vector();
                for (src, codes, params) in [(k, kc, k_params), (v, vc, v_params)] {
                    for head in src.chunks_exact(self.head_dim) {
                        let at = codes.len();
                        codes.resize(at + per, 0);
                        params.push(codec.encode(head, &mut codes[at..]));
                    }
                }
            }
        }
        self.len += n;
    }

    /// The stored keys and values as one f32 `[len, head_dim]` matrix per kv head: borrowed
    /// when they are stored as floats, decoded once (for this forward call of this block) when
    /// they are codes, so that every query head of a group reads them without decoding again.
    pub fn view(&self) -> KvView<'_> {
        use std::borrow::Cow;
        match &self.store {
            KvStore::F32 { k, v } => KvView {
                k: k.iter().map(|h| Cow::Borrowed(h.as_slice())).collect(),
                v: v.iter().map(|h| Cow::Borrowed(h.as_slice())).collect(),
                head_dim: self.head_dim,
            },
            KvStore::Codes {
                codec,
                k,
                v,
                k_params,
                v_params,
            } => {
                let per = codec.bytes_per_vector();
                let (hd, heads) = (self.head_dim, self.kv_heads);
                // Vector `pos * heads + h` of the codes is position `pos` of head `h`.
                let decode = |codes: &[u8], params: &[(f32, f32)]| -> Vec<Cow<'_, [f32]>> {
                    (0..heads)
                        .map(|h| {
                            let mut out = vec![0f32; self.len * hd];
                            out.par_chunks_mut(hd).enumerate().for_each(|(pos, o)| {
                                let i = pos * heads + h;
                                let (lo, step) = params[i];
                                codec.decode(&codes[i * per..(i + 1) * per], lo, step, o);
                            });
                            Cow::Owned(out)
                        })
                        .collect()
                };
                KvView {
                    k: decode(k, k_params),
                    v: decode(v, v_params),
                    head_dim: self.head_dim,
                }
            }
        }
    }
}

/// The keys and values of an [`AttentionState`] as floats (see [`AttentionState::view`]):
/// one `[len, head_dim]` matrix per kv head.
pub struct KvView<'a> {
    k: Vec<std::borrow::Cow<'a, [f32]>>,
    v: Vec<std::borrow::Cow<'a, [f32]>>,
    head_dim: usize,
}

impl KvView<'_> {
    /// `scores[p] = (q . k_p) * scale` for the first `visible` positions of `kv_head`.
    pub fn scores(&self, q: &[f32], kv_head: usize, visible: usize, scale: f32) -> Vec<f32> {
        let mut out = vec![0f32; visible];
        let hd = self.head_dim;
        scaled_dots(&q[..hd], &self.k[kv_head], hd, scale, &mut out);
        out
    }

    /// `out = sum_p weights[p] * v_p` over the positions of `kv_head` that `weights` covers.
    pub fn weighted_sum(&self, weights: &[f32], kv_head: usize, out: &mut [f32]) {
        weighted_sum(weights, &self.v[kv_head], self.head_dim, out);
    }

    /// [`KvView::scores`] of the `qs.len() / head_dim` query heads of `qs` (one after another),
    /// which share `kv_head`: `visible` scores per head, one head's after another's.
    pub fn scores_heads(&self, qs: &[f32], kv_head: usize, visible: usize, scale: f32) -> Vec<f32> {
        let hd = self.head_dim;
        let mut out = vec![0f32; qs.len() / hd * visible];
        scaled_dots_heads(qs, hd, &self.k[kv_head], hd, scale, &mut out);
        out
    }

    /// [`KvView::weighted_sum`] of several heads' weights (`visible` each, one head's after
    /// another's) into their outputs (`head_dim` each).
    pub fn weighted_sums_heads(
        &self,
        weights: &[f32],
        visible: usize,
        kv_head: usize,
        out: &mut [f32],
    ) {
        weighted_sums_heads(weights, visible, &self.v[kv_head], self.head_dim, out);
    }
}

/// The attention states of every block.
pub struct KvCache {
    pub layers: Vec<AttentionState>,
    /// Number of positions stored (the same in every block).
    pub len: usize,
}

impl KvCache {
    /// An empty cache for `model` (its attention states quantized as its plan says).
    pub fn for_model<L>(model: &Transformer<'_, L>) -> Self {
        let cfg = &model.config;
        KvCache {
            layers: (0..cfg.num_layers)
                .map(|_| model.new_attention_state())
                .collect(),
            len: 0,
        }
    }
}

/// Input that a model cannot run.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error(
        "token id {token} at position {position} is outside the vocabulary (vocab_size {vocab})"
    )]
    TokenOutOfRange {
        token: u32,
        position: usize,
        vocab: usize,
    },
    #[error("the sequence would reach {len} positions, beyond max_position_embeddings = {max}")]
    TooLong { len: usize, max: usize },
    #[error("no tokens given")]
    Empty,
    #[error(transparent)]
    Memory(#[from] super::budget::TooLarge),
}

/// What a forward pass returns: logits per new position, and optionally the hidden state after
/// each block (for layer-by-layer parity).
pub struct ForwardOutput {
    /// `[n, vocab]`.
    pub logits: Vec<f32>,
    /// One `[n, hidden]` entry per block, if requested.
    pub hidden: Vec<Vec<f32>>,
}

/// `x.exp()` for the shifted scores of a softmax (`x <= 0`), without libm's slow underflow
/// path: below -104 the result rounds to +0 (the least subnormal f32 is `e^-103.28`), which
/// is what `exp` returns there too, so the values are the same. A peaked attention row has
/// many such scores, and the slow path was about a third of the exponentials' time.
#[inline]
fn exp_below_zero(x: f32) -> f32 {
    if x < -104.0 { 0.0 } else { x.exp() }
}

/// RMSNorm of each `dim`-row of `x` into `out`: `w * x / sqrt(mean(x^2) + eps)` in f32, as HF
/// computes it.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    let norm = |(xr, or): (&[f32], &mut [f32])| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * r);
        }
    };
    // Rows in parallel for a prompt (each row's sum in order, so the result does not depend
    // on threads); one row (decoding) is not worth a fork.
    if x.len() >= PARALLEL_MIN {
        x.par_chunks_exact(dim)
            .zip(out.par_chunks_exact_mut(dim))
            .for_each(norm);
    } else {
        x.chunks_exact(dim)
            .zip(out.chunks_exact_mut(dim))
            .for_each(norm);
    }
}

/// Element count from which the element-wise steps of a forward run on every thread.
const PARALLEL_MIN: usize = 1 << 15;

/// `x += d` element by element, in parallel chunks (the residual stream of a prompt).
fn add_into(x: &mut [f32], d: &[f32]) {
    x.par_chunks_mut(PARALLEL_MIN)
        .zip(d.par_chunks(PARALLEL_MIN))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// Rotate-half RoPE in place on the heads of one token's queries `q` and keys `k` (`head_dim`
/// apart) at position `pos`. The angles depend on the position and the frequency only, so
/// each `sin_cos` is computed once per token and shared by every head.
fn rope(q: &mut [f32], k: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f32]) {
    let half = head_dim / 2;
    let angles: Vec<(f32, f32)> = inv_freq[..half]
        .iter()
        .map(|&f| (pos as f32 * f).sin_cos())
        .collect();
    for head in q
        .chunks_exact_mut(head_dim)
        .chain(k.chunks_exact_mut(head_dim))
    {
        for (i, &(sin, cos)) in angles.iter().enumerate() {
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos - b * sin;
            head[i + half] = b * cos + a * sin;
        }
    }
}

/// Runs one projection on `n` tokens and shows it to the probe. An online transform of the
/// site is applied to the input first (the probe sees the transformed input: what the
/// projection's quantizer receives).
fn project<L: Linear>(
    lin: &L,
    site: Site,
    x: &[f32],
    n: usize,
    online: Option<&Hadamard>,
    probe: &mut dyn Probe,
) -> Vec<f32> {
    let transformed;
    let input = match online {
        Some(h) => {
            let mut t = x.to_vec();
            h.apply_rows(&mut t);
            transformed = t;
            &transformed[..]
        }
        None => x,
    };
    let mut y = vec![0f32; n * lin.out_dim()];
    lin.forward(input, n, &mut y);
    probe.projection(site, input, &y);
    y
}

/// [`project`] for several projections of the same input, shared through
/// [`Linear::forward_shared`] when none of their sites has an online transform.
fn project_shared<L: Linear, const P: usize>(
    parts: [(&L, Site, Option<&Hadamard>); P],
    x: &[f32],
    n: usize,
    probe: &mut dyn Probe,
) -> [Vec<f32>; P] {
    if parts.iter().any(|(_, _, online)| online.is_some()) {
        return parts.map(|(lin, site, online)| project(lin, site, x, n, online, probe));
    }
    let mut ys = parts.map(|(lin, _, _)| vec![0f32; n * lin.out_dim()]);
    L::forward_shared(&parts.map(|(lin, _, _)| lin), x, n, &mut ys);
    for ((_, site, _), y) in parts.iter().zip(&ys) {
        probe.projection(*site, x, y);
    }
    ys
}

impl<L: Linear> Transformer<'_, L> {
    /// Runs `tokens` at the positions after those in `cache`, appending to the cache.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        keep_hidden: bool,
    ) -> Result<ForwardOutput, InputError> {
        self.forward_probed(tokens, cache, keep_hidden, &mut NoProbe)
    }

    /// [`Transformer::forward`], showing every projection to `probe`.
    pub fn forward_probed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        keep_hidden: bool,
        probe: &mut dyn Probe,
    ) -> Result<ForwardOutput, InputError> {
        let mut x = self.embed(tokens, cache.len)?;
        let n = tokens.len();
        let inv_freq = self.rope_inv_freq();
        let mut hidden = Vec::new();
        for (layer, state) in cache.layers.iter_mut().enumerate() {
            let attn = self.attention_update(layer, &x, n, state, &inv_freq, probe);
            add_into(&mut x, &attn);
            let ffn = self.ffn_update(layer, &x, n, probe);
            add_into(&mut x, &ffn);
            if keep_hidden {
                hidden.push(x.clone());
            }
        }
        cache.len += n;
        Ok(ForwardOutput {
            logits: self.head(&x, n),
            hidden,
        })
    }

    /// [`Transformer::forward`] that computes the head for the last position only: what
    /// generation needs. The head (vocabulary x hidden) is the largest matrix of a small model;
    /// for an n-token prompt this saves n - 1 passes over it.
    pub fn forward_last(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, InputError> {
        let mut x = self.embed(tokens, cache.len)?;
        let n = tokens.len();
        let inv_freq = self.rope_inv_freq();
        for (layer, state) in cache.layers.iter_mut().enumerate() {
            let attn = self.attention_update(layer, &x, n, state, &inv_freq, &mut NoProbe);
            add_into(&mut x, &attn);
            let ffn = self.ffn_update(layer, &x, n, &mut NoProbe);
            add_into(&mut x, &ffn);
        }
        cache.len += n;
        let h = self.config.hidden_size;
        Ok(self.head(&x[(n - 1) * h..], 1))
    }

    /// Checks `tokens` for positions `start..` and returns their embeddings, `[n, hidden]`.
    pub fn embed(&self, tokens: &[u32], start: usize) -> Result<Vec<f32>, InputError> {
        let cfg = &self.config;
        let n = tokens.len();
        if n == 0 {
            return Err(InputError::Empty);
        }
        if start + n > cfg.max_position_embeddings {
            return Err(InputError::TooLong {
                len: start + n,
                max: cfg.max_position_embeddings,
            });
        }
        super::budget::check(cfg, n, start, false)?;
        if let Some((i, &t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= cfg.vocab_size)
        {
            return Err(InputError::TokenOutOfRange {
                token: t,
                position: start + i,
                vocab: cfg.vocab_size,
            });
        }
        let h = cfg.hidden_size;
        let mut x = vec![0f32; n * h];
        for (t, row) in tokens.iter().zip(x.chunks_exact_mut(h)) {
            self.embed.row(*t as usize, row);
        }
        Ok(x)
    }

    /// RoPE inverse frequencies, as HF computes them in f32: `1 / theta^(arange(0, d, 2) / d)`.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let (hd, theta) = (self.config.head_dim, self.config.rope_theta as f32);
        (0..hd / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / hd as f32))
            .collect()
    }

    /// The attention half of block `layer` for `n` new tokens of the residual stream `x`
    /// (`[n, hidden]`), at the positions after those in `state`: returns what it adds to the
    /// residual stream (`o_proj`'s output), and appends the new keys and values to `state`.
    pub fn attention_update(
        &self,
        layer: usize,
        x: &[f32],
        n: usize,
        state: &mut AttentionState,
        inv_freq: &[f32],
        probe: &mut dyn Probe,
    ) -> Vec<f32> {
        let (q, k, v) = self.qkv(layer, x, n, probe);
        self.attention_output(layer, q, k, v, n, state, inv_freq, probe)
    }

    /// The q, k and v projections of block `layer` on the residual stream `x` (`[n, hidden]`).
    pub fn qkv(
        &self,
        layer: usize,
        x: &[f32],
        n: usize,
        probe: &mut dyn Probe,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let b = &self.blocks[layer];
        let site = |role| Site { layer, role };
        let online = |role| self.plan.online_of(layer, role);
        let mut normed = vec![0f32; x.len()];
        rms_norm(
            x,
            &b.attn_norm,
            self.config.rms_norm_eps as f32,
            &mut normed,
        );
        let part = |lin, role| (lin, site(role), online(role));
        let [q, k, v] = project_shared(
            [
                part(&b.q, Role::QProj),
                part(&b.k, Role::KProj),
                part(&b.v, Role::VProj),
            ],
            &normed,
            n,
            probe,
        );
        (q, k, v)
    }

    /// The rest of the attention half of block `layer` from the q, k and v projections' outputs:
    /// RoPE, the attention-state quantizers, causal attention over `state` (to which the new
    /// keys and values are appended), the sub-norm and `o_proj`. Returns what the half adds to
    /// the residual stream.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_output(
        &self,
        layer: usize,
        mut q: Vec<f32>,
        mut k: Vec<f32>,
        v: Vec<f32>,
        n: usize,
        state: &mut AttentionState,
        inv_freq: &[f32],
        probe: &mut dyn Probe,
    ) -> Vec<f32> {
        let cfg = &self.config;
        let b = &self.blocks[layer];
        let eps = cfg.rms_norm_eps as f32;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let site = |role| Site { layer, role };
        let online = |role| self.plan.online_of(layer, role);
        let start = state.len();
        let rope_token = |(t, (qt, kt)): (usize, (&mut [f32], &mut [f32]))| {
            rope(qt, kt, hd, start + t, inv_freq)
        };
        if n > 1 {
            q.par_chunks_exact_mut(qd)
                .zip(k.par_chunks_exact_mut(kvd))
                .enumerate()
                .for_each(rope_token);
        } else {
            q.chunks_exact_mut(qd)
                .zip(k.chunks_exact_mut(kvd))
                .enumerate()
                .for_each(rope_token);
        }
        if let Some(bits) = self.plan.attention.q_bits {
            q.chunks_exact_mut(hd)
                .for_each(|head| fake_quant_query(head, bits));
        }
        state.append(&k, &v, n);
        let state = state.view();
        let scale = 1.0 / (hd as f32).sqrt();
        let group = nh / nkv;
        let mut out = vec![0f32; n * qd];
        // Query heads go by sets of `together` (up to four) that share a kv head, whose keys
        // and values are then read once per set. A decoded token's sets are the only work of
        // the section, so they must split evenly over the threads: two of a group of four
        // leave ten sets (2B4T's 20 heads) for two threads.
        let threads = rayon::current_num_threads();
        let together = [4, 2, 1]
            .into_iter()
            .find(|&m| group % m == 0 && (n > 1 || (nh / m) % threads == 0))
            .unwrap_or(1);
        let sets = nh / together;
        let set_output = |i: usize, o: &mut [f32]| {
            let (t, head) = (i / sets, i % sets * together);
            let kvh = head / group;
            let visible = start + t + 1;
            let qs = &q[t * qd + head * hd..t * qd + (head + together) * hd];
            let mut scores = state.scores_heads(qs, kvh, visible, scale);
            for scores in scores.chunks_exact_mut(visible) {
                let m = scores.iter().fold(f32::NEG_INFINITY, |a, &s| a.max(s));
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = exp_below_zero(*s - m);
                    sum += *s;
                }
                for s in scores.iter_mut() {
                    *s /= sum;
                }
            }
            state.weighted_sums_heads(&scores, visible, kvh, o);
        };
        // One token's heads on the decoding team (super::team); a prompt's on rayon.
        if n == 1 {
            let mut parts: Vec<&mut [f32]> = out.chunks_mut(together * hd).collect();
            super::team::for_each_mut(&mut parts, |i, o| set_output(i, o));
        } else {
            out.par_chunks_mut(together * hd)
                .enumerate()
                .for_each(|(i, o)| set_output(i, o));
        }
        if let Some(w) = &b.attn_sub_norm {
            let mut s = vec![0f32; n * qd];
            rms_norm(&out, w, eps, &mut s);
            out = s;
        }
        project(&b.o, site(Role::OProj), &out, n, online(Role::OProj), probe)
    }

    /// The feed-forward half of block `layer` for the residual stream `x` (`[n, hidden]`):
    /// returns what it adds to the residual stream (`down_proj`'s output).
    pub fn ffn_update(&self, layer: usize, x: &[f32], n: usize, probe: &mut dyn Probe) -> Vec<f32> {
        let cfg = &self.config;
        let b = &self.blocks[layer];
        let eps = cfg.rms_norm_eps as f32;
        let site = |role| Site { layer, role };
        let online = |role| self.plan.online_of(layer, role);
        let mut normed = vec![0f32; x.len()];
        rms_norm(x, &b.ffn_norm, eps, &mut normed);
        let part = |lin, role| (lin, site(role), online(role));
        let [mut g, u] = project_shared(
            [part(&b.gate, Role::GateProj), part(&b.up, Role::UpProj)],
            &normed,
            n,
            probe,
        );
        let act = cfg.hidden_act;
        g.par_chunks_mut(PARALLEL_MIN)
            .zip(u.par_chunks(PARALLEL_MIN))
            .for_each(|(gc, uc)| {
                for (gv, uv) in gc.iter_mut().zip(uc) {
                    let a = match act {
                        Activation::Relu2 => {
                            let r = gv.max(0.0);
                            r * r
                        }
                        Activation::Silu => *gv / (1.0 + (-*gv).exp()),
                    };
                    *gv = a * uv;
                }
            });
        if let Some(w) = &b.ffn_sub_norm {
            let mut s = vec![0f32; g.len()];
            rms_norm(&g, w, eps, &mut s);
            g = s;
        }
        project(
            &b.down,
            site(Role::DownProj),
            &g,
            n,
            online(Role::DownProj),
            probe,
        )
    }

    /// The final norm and the head on the residual stream `x` (`[n, hidden]`): `[n, vocab]`.
    pub fn head(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut normed = vec![0f32; x.len()];
        rms_norm(
            x,
            &self.final_norm,
            self.config.rms_norm_eps as f32,
            &mut normed,
        );
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; n * head.rows];
        head.matmul_t(&normed, n, &mut logits);
        logits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::num::dtype::encode_f32;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        crate::test_util::uniform(n, seed, -2.0, 2.0)
    }

    /// The fused row kernel (portable and AVX2 builds) equals decode-then-dot bit for bit.
    #[test]
    fn dot_row_equals_decode_then_dot() {
        for dtype in [FloatDtype::Bf16, FloatDtype::F16, FloatDtype::F32] {
            for n in [0usize, 1, 7, 8, 9, 255, 256, 257, 300, 2560, 2567] {
                let mut w = Vec::new();
                encode_f32(dtype, &values(n, 3 + n as u32), &mut w);
                let x = values(n, 11);
                let mut decoded = vec![0f32; n];
                decode_f32(dtype, &w, &mut decoded);
                let expected = dot_f32_body(&decoded, &x);
                assert_eq!(dot_row_body(dtype, &w, &x).to_bits(), expected.to_bits());
                assert_eq!(dot_row(dtype, &w, &x).to_bits(), expected.to_bits());
                assert_eq!(dot_f32(&decoded, &x).to_bits(), expected.to_bits());
            }
        }
    }

    /// The weighted sum of attention (portable and AVX2 builds) equals the plain loop bit for
    /// bit: lengths around the 8-lane vectors and the 64-element stretches, rows packed and
    /// strided, no rows at all.
    #[test]
    fn weighted_sum_builds_agree() {
        for len in [0usize, 1, 7, 8, 9, 63, 64, 65, 72, 128, 130, 200] {
            for (count, slack) in [(0usize, 0usize), (1, 0), (5, 3), (300, 0), (77, 640)] {
                let stride = len + slack;
                let rows = values(count * stride, 5 + len as u32);
                let weights = values(count, 9 + count as u32);
                let mut want = vec![f32::NAN; len];
                for (e, w) in want.iter_mut().enumerate() {
                    *w = 0.0;
                    for (p, &wp) in weights.iter().enumerate() {
                        *w += wp * rows[p * stride + e];
                    }
                }
                let mut body = vec![f32::NAN; len];
                weighted_sum_body(&weights, &rows, stride, &mut body);
                let mut got = vec![f32::NAN; len];
                weighted_sum(&weights, &rows, stride, &mut got);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let what = format!("len {len} rows {count} stride {stride}");
                assert_eq!(bits(&body), bits(&want), "{what}");
                assert_eq!(bits(&got), bits(&want), "{what}");
            }
        }
    }

    /// The attention scores (portable and AVX2 builds) equal one `dot_f32` per row, bit for bit.
    #[test]
    fn scaled_dots_equal_dot_f32() {
        for len in [1usize, 31, 32, 33, 64, 128, 130] {
            for (count, slack) in [(0usize, 0usize), (1, 0), (7, 5), (200, 640)] {
                let stride = len + slack;
                let rows = values(count * stride, 7 + len as u32);
                let q = values(len, 21);
                let scale = 1.0 / (len as f32).sqrt();
                let want: Vec<u32> = (0..count)
                    .map(|p| {
                        (dot_f32_body(&q, &rows[p * stride..p * stride + len]) * scale).to_bits()
                    })
                    .collect();
                let mut got = vec![f32::NAN; count];
                scaled_dots(&q, &rows, stride, scale, &mut got);
                let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "len {len} rows {count} stride {stride}");
            }
        }
    }

    /// Several heads' scores and weighted sums at once (the AVX-512 build where it runs, else
    /// one head at a time) equal the portable loops of one head, bit for bit: one to four
    /// heads, lengths around the 16- and 32-lane vectors and the 64- and 128-element
    /// stretches, rows packed and strided, one row or none.
    #[test]
    fn heads_together_equal_one_head_at_a_time() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for m in 1usize..=4 {
            for len in [1usize, 15, 16, 17, 31, 32, 33, 64, 100, 128, 130, 200, 256] {
                for (count, slack) in [(0usize, 0usize), (1, 0), (7, 5), (150, 0), (40, 640)] {
                    let stride = len + slack;
                    let what = format!("{m} heads, len {len}, rows {count}, stride {stride}");
                    let rows = values(count * stride, 3 + len as u32);
                    let qs = values(m * len, 17 + m as u32);
                    let scale = 1.0 / (len as f32).sqrt();
                    let mut want = Vec::new();
                    for q in qs.chunks_exact(len) {
                        for p in 0..count {
                            let r = &rows[p * stride..p * stride + len];
                            want.push((dot_f32_body(q, r) * scale).to_bits());
                        }
                    }
                    let mut got = vec![f32::NAN; m * count];
                    scaled_dots_heads(&qs, len, &rows, stride, scale, &mut got);
                    assert_eq!(bits(&got), want, "scores: {what}");

                    let weights = values(m * count, 29 + count as u32);
                    let mut want = vec![f32::NAN; m * len];
                    for (j, o) in want.chunks_exact_mut(len).enumerate() {
                        weighted_sum_body(&weights[j * count..(j + 1) * count], &rows, stride, o);
                    }
                    let mut got = vec![f32::NAN; m * len];
                    weighted_sums_heads(&weights, count, &rows, stride, &mut got);
                    assert_eq!(bits(&got), bits(&want), "weighted sums: {what}");
                }
            }
        }
    }

    /// The shortcut of the softmax's exponential equals `exp` wherever it applies, and around
    /// where it starts.
    #[test]
    fn exp_below_zero_equals_exp() {
        let mut x = -120.0f32;
        while x <= 0.0 {
            assert_eq!(exp_below_zero(x).to_bits(), x.exp().to_bits(), "x = {x}");
            x += 0.001;
        }
        for x in [f32::NEG_INFINITY, f32::MIN, -1e6, -104.0, -103.98, -103.97] {
            assert_eq!(exp_below_zero(x).to_bits(), x.exp().to_bits(), "x = {x}");
        }
    }

    /// One token at a time and a batch of tokens give the same logits.
    #[test]
    fn matmul_t_single_and_batched_agree() {
        let (rows, cols, n) = (37, 133, 3);
        let mut bytes = Vec::new();
        encode_f32(FloatDtype::Bf16, &values(rows * cols, 5), &mut bytes);
        let m = FloatMatrix {
            ty: MatrixType::Float(FloatDtype::Bf16),
            bytes: Cow::Owned(bytes),
            rows,
            cols,
        };
        let x = values(n * cols, 9);
        let mut batched = vec![0f32; n * rows];
        m.matmul_t(&x, n, &mut batched);
        for t in 0..n {
            let mut single = vec![0f32; rows];
            m.matmul_t(&x[t * cols..(t + 1) * cols], 1, &mut single);
            assert_eq!(single, batched[t * rows..(t + 1) * rows]);
        }
    }

    /// A q8_0 matrix: batched and single-token heads agree bit for bit, rows decode to the
    /// dequantized values, and each output is the scalar reference dot.
    #[test]
    fn q8_matrix_rows_and_products() {
        let (rows, cols, n) = (37, 160, 3);
        let w = values(rows * cols, 5);
        let mut bytes = vec![0u8; rows * q8::row_bytes(cols)];
        for (r, b) in w
            .chunks_exact(cols)
            .zip(bytes.chunks_exact_mut(q8::row_bytes(cols)))
        {
            q8::quantize_row(r, b);
        }
        let m = FloatMatrix {
            ty: MatrixType::Q8,
            bytes: Cow::Owned(bytes.clone()),
            rows,
            cols,
        };
        let x = values(n * cols, 9);
        let mut batched = vec![0f32; n * rows];
        m.matmul_t(&x, n, &mut batched);
        for t in 0..n {
            let mut single = vec![0f32; rows];
            m.matmul_t(&x[t * cols..(t + 1) * cols], 1, &mut single);
            assert_eq!(single, batched[t * rows..(t + 1) * rows]);
            for (r, &v) in single.iter().enumerate() {
                let row = &bytes[r * q8::row_bytes(cols)..(r + 1) * q8::row_bytes(cols)];
                let want = q8::dot_scalar(row, &x[t * cols..(t + 1) * cols]);
                assert_eq!(v.to_bits(), want.to_bits());
            }
        }
        let (mut got, mut want) = (vec![0f32; cols], vec![0f32; cols]);
        m.row(5, &mut got);
        q8::dequantize_row(
            &bytes[5 * q8::row_bytes(cols)..6 * q8::row_bytes(cols)],
            &mut want,
        );
        assert_eq!(got, want);
    }
}
