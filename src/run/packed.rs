//! The packed path: a model executed from a .bpk file with integer arithmetic. Each projection
//! quantizes its input per token (int8 or int4, as the file's scheme says), takes ternary x
//! integer dot products straight from the packed bytes with exact i32 accumulation, and applies
//! `scale / s_x` once per output.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use super::RunError;
use super::assemble::{Parts, assemble};
use super::kernels::{
    DECODE_ROWS, Isa, TILE, dot, dot_multi_rows, dot_rows, dot_small, dot_trits_f32, padded_len,
};
use super::model::{FloatMatrix, Linear, MatrixType, Transformer};
use super::plan::QuantPlan;
use super::tiles::{self, T5Tiles, TILE_ROWS};
use crate::format::header::WeightRule;
use crate::format::{BpkFile, Encoding, TensorEntry, validate_bytes_into};
use crate::model::Role;
use crate::pack::TernaryLayout;
use crate::quant::ActQuant;

/// A ternary projection read in place from the file.
pub struct TernaryLinear<'a> {
    pub layout: TernaryLayout,
    pub rows: usize,
    pub k: usize,
    pub row_bytes: usize,
    pub data: &'a [u8],
    pub scale: f32,
    /// The quantizer of the input (int8 or int4 per token, or none).
    pub act: ActQuant,
    /// The rows re-laid in tiles for the table-lookup kernels ([`super::tiles`]), which then run
    /// every token of this projection, prompts and decoding alike: made at load for `t5`
    /// projections with quantized inputs, in the `avx512` build ([`Isa::active`]).
    pub tiles: Option<T5Tiles>,
}

impl TernaryLinear<'_> {
    /// One output for one quantized token: the scalar-free inner loop of [`Linear::forward`].
    #[inline]
    fn output(&self, r: usize, q: &[i8], q_sum: i32, factor: f32) -> f32 {
        let row = &self.data[r * self.row_bytes..(r + 1) * self.row_bytes];
        let dot = match self.act {
            ActQuant::Absmean4 { .. } => dot_small(self.layout, row, q, q_sum, self.k),
            _ => dot(self.layout, row, q, q_sum, self.k),
        };
        dot as f32 * factor
    }
}

impl Linear for TernaryLinear<'_> {
    fn in_dim(&self) -> usize {
        self.k
    }
    fn out_dim(&self) -> usize {
        self.rows
    }
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (k, rows) = (self.k, self.rows);
        if !self.act.is_quantized() {
            y.par_chunks_mut(rows)
                .zip(x.par_chunks(k))
                .for_each(|(yt, xt)| {
                    for (r, o) in yt.iter_mut().enumerate() {
                        let row = &self.data[r * self.row_bytes..(r + 1) * self.row_bytes];
                        *o = dot_trits_f32(self.layout, row, xt) * self.scale;
                    }
                });
            return;
        }
        let padded = padded_len(self.layout, k);
        let mut q = vec![0i8; n * padded];
        // Tokens are quantized in parallel when there are several (a prompt).
        let quantize = |(xt, qt): (&[f32], &mut [i8])| {
            let s = self.act.quantize(xt, qt);
            (
                self.scale / s,
                qt.iter().map(|&v| i32::from(v)).sum::<i32>(),
            )
        };
        let (factors, sums): (Vec<f32>, Vec<i32>) = if n == 1 {
            x.chunks_exact(k)
                .zip(q.chunks_exact_mut(padded))
                .map(quantize)
                .unzip()
        } else {
            x.par_chunks_exact(k)
                .zip(q.par_chunks_exact_mut(padded))
                .map(quantize)
                .unzip()
        };
        if n == 1
            && let Some(t) = &self.tiles
        {
            forward_tiles(&[(t, factors[0])], &q, &mut [y]);
            return;
        }
        if n == 1 {
            // Runs of DECODE_ROWS rows per kernel call, many more runs than workers.
            let (q_sum, factor) = (sums[0], factors[0]);
            let mut runs: Vec<&mut [f32]> = y.chunks_mut(DECODE_ROWS).collect();
            super::team::for_each_mut(&mut runs, |c, yc| {
                let first = c * DECODE_ROWS;
                if matches!(self.act, ActQuant::Absmean4 { .. }) {
                    for (i, o) in yc.iter_mut().enumerate() {
                        *o = self.output(first + i, &q, q_sum, factor);
                    }
                    return;
                }
                let data = &self.data[first * self.row_bytes..];
                let mut dots = [0i32; DECODE_ROWS];
                let dots = &mut dots[..yc.len()];
                dot_rows(self.layout, data, self.row_bytes, &q, q_sum, k, dots);
                for (o, &d) in yc.iter_mut().zip(dots.iter()) {
                    *o = d as f32 * factor;
                }
            });
            return;
        }
        if let Some(t) = &self.tiles {
            forward_tiles_multi(t, &q, padded, n, &factors, y);
            return;
        }
        // Several tokens: workers take chunks of rows small enough to stay in L2, and run
        // every tile of up to TILE tokens over each row of their chunk with the multi-token
        // kernel, so a block of packed weights is decoded once per tile rather than once per
        // token, and a chunk's bytes come from memory once per call. Each worker writes its
        // rows' outputs straight into `y` (`[n][rows]`): a run of `count` values per token.
        let chunk = chunk_rows(rows, self.row_bytes, rayon::current_num_threads());
        let out = DisjointWrites::new(y);
        (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let first = c * chunk;
            let count = chunk.min(rows - first);
            let data = &self.data[first * self.row_bytes..(first + count) * self.row_bytes];
            let mut dots = vec![0i32; count * TILE];
            for t0 in (0..n).step_by(TILE) {
                let tokens = TILE.min(n - t0);
                let qt = &q[t0 * padded..(t0 + tokens) * padded];
                let d = &mut dots[..count * tokens];
                let s = &sums[t0..t0 + tokens];
                dot_multi_rows(self.layout, data, self.row_bytes, qt, padded, s, k, d);
                for j in 0..tokens {
                    let t = t0 + j;
                    let values = d
                        .iter()
                        .skip(j)
                        .step_by(tokens)
                        .map(|&v| v as f32 * factors[t]);
                    // SAFETY: rows `first..first + count` belong to chunk `c` alone, so every
                    // index `t * rows + first + i` is written by this worker only, once.
                    unsafe { out.write_run(t * rows + first, values) };
                }
            }
        });
    }

    /// One token through projections that all run the table-lookup kernel on inputs
    /// quantized alike (q, k and v; gate and up) takes one quantization, one table build per
    /// worker and one parallel section over all their rows: the k and v projections alone
    /// are too few rows to keep two workers busy. Anything else runs each part on its own.
    fn forward_shared(parts: &[&Self], x: &[f32], n: usize, ys: &mut [Vec<f32>]) {
        let first = parts[0];
        let shared: Option<Vec<&T5Tiles>> = parts
            .iter()
            .map(|p| {
                p.tiles
                    .as_ref()
                    .filter(|_| p.k == first.k && p.act == first.act)
            })
            .collect();
        match shared {
            Some(tiles) if n == 1 && first.act.is_quantized() => {
                let mut q = vec![0i8; padded_len(first.layout, first.k)];
                let s = first.act.quantize(x, &mut q);
                let runs: Vec<(&T5Tiles, f32)> = tiles
                    .into_iter()
                    .zip(parts)
                    .map(|(t, p)| (t, p.scale / s))
                    .collect();
                let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| &mut y[..]).collect();
                forward_tiles(&runs, &q, &mut outs);
            }
            _ => {
                for (p, y) in parts.iter().zip(ys) {
                    p.forward(x, n, y);
                }
            }
        }
    }
}

/// One token through the table-lookup kernel of one or more projections of the same input
/// (`parts`: tiles and output factor; `ys`: their outputs): runs of tiles (a group at a time,
/// each table load serving the group's tiles) of every part spread over the workers. Each
/// worker builds the token's tables itself, in its own cache, on its first run of the call:
/// 1.5 ms a token faster on the 2B4T shapes than tables built once and read from the other
/// core's cache.
fn forward_tiles(parts: &[(&T5Tiles, f32)], q: &[i8], ys: &mut [&mut [f32]]) {
    let call = new_call();
    let k = parts[0].0.k();
    let len = tiles::tables_len(k);
    // Every run of every part, as one list for the workers to share.
    let mut runs = Vec::new();
    for (&(t, factor), y) in parts.iter().zip(ys.iter_mut()) {
        debug_assert_eq!(t.k(), k);
        let run = t.group() * TILE_ROWS;
        runs.extend(
            y.chunks_mut(run)
                .enumerate()
                .map(move |(c, yc)| (t, factor, c * t.group(), yc)),
        );
    }
    super::team::for_each_mut(&mut runs, |_, (t, factor, first, yc)| {
        let (t, factor, first) = (*t, *factor, *first);
        with_tables(call, len, |tables, built| {
            if !built {
                tiles::build_tables(q, k, tables);
            }
            let mut dots = [[0i32; TILE_ROWS]; tiles::GROUP_TILES];
            tiles::dot_group(t, first, tables, &mut dots);
            for (i, o) in yc.iter_mut().enumerate() {
                *o = dots[i / TILE_ROWS][i % TILE_ROWS] as f32 * factor;
            }
        })
    });
}

/// A number for one call of the table-lookup kernel, different from every other call's.
fn new_call() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    CALLS.fetch_add(1, Ordering::Relaxed) + 1
}

thread_local! {
    /// This thread's tables for the table-lookup kernel, with the call they were built for
    /// (0: none). Kept between calls: a fresh allocation of this size costs page faults on
    /// every projection.
    static TABLES: RefCell<(u64, Vec<tiles::Table>)> = const { RefCell::new((0, Vec::new())) };
}

/// Runs `f` on `len` of this thread's tables, and whether they already hold those of `call`
/// (built by `f` on an earlier run of the same call); afterwards they count as `call`'s. A
/// call nested in another's parallel section, which finds them in use, gets a fresh buffer.
fn with_tables(call: u64, len: usize, f: impl FnOnce(&mut [tiles::Table], bool)) {
    let zero = tiles::Line([0i16; tiles::TABLE]);
    TABLES.with(|cell| match cell.try_borrow_mut() {
        Ok(mut local) => {
            let (built, v) = &mut *local;
            if v.len() < len {
                v.resize(len, zero);
            }
            f(&mut v[..len], *built == call);
            *built = call;
        }
        Err(_) => f(&mut vec![zero; len], false),
    });
}

/// Tokens whose tables [`forward_tiles_multi`] builds at a time: every weight is read once
/// per step, and the step's tables (up to 8 x 177 KB for rows of 6912 weights) stay in the
/// caches while the workers sweep the rows.
const TILES_STEP: usize = 8;

/// Several tokens (a prompt) through the table-lookup kernel: for each step of
/// [`TILES_STEP`] tokens, their tables (in parallel), then pairs of tiles spread over the
/// workers, each pair run against two tokens at a time (one token for an odd last one), so
/// that each table load serves two tiles and each line's indices two tokens.
fn forward_tiles_multi(
    t: &T5Tiles,
    q: &[i8],
    padded: usize,
    n: usize,
    factors: &[f32],
    y: &mut [f32],
) {
    let len = tiles::tables_len(t.k());
    with_tables(new_call(), TILES_STEP * len, |tables, _| {
        dot_tiles_multi(t, q, padded, n, factors, tables, y)
    });
}

/// The body of [`forward_tiles_multi`], with room for [`TILES_STEP`] tokens' tables.
fn dot_tiles_multi(
    t: &T5Tiles,
    q: &[i8],
    padded: usize,
    n: usize,
    factors: &[f32],
    tables: &mut [tiles::Table],
    y: &mut [f32],
) {
    let (k, rows) = (t.k(), t.rows());
    let len = tiles::tables_len(k);
    // Two tiles a run where the matrix's groups allow it.
    let run = if t.group() % 2 == 0 { 2 } else { 1 };
    let out = DisjointWrites::new(y);
    for t0 in (0..n).step_by(TILES_STEP) {
        let tokens = TILES_STEP.min(n - t0);
        tables[..tokens * len]
            .par_chunks_mut(len)
            .enumerate()
            .for_each(|(j, tb)| tiles::build_tables(&q[(t0 + j) * padded..], k, tb));
        let tables = &tables[..tokens * len];
        (0..t.tiles().div_ceil(run)).into_par_iter().for_each(|c| {
            let first = c * run;
            let mut j = 0;
            while j < tokens {
                let pair = (tokens - j).min(2);
                let tb = |i: usize| &tables[(j + i) * len..(j + i + 1) * len];
                let mut dots = [[[0i32; TILE_ROWS]; 2]; 2];
                match (run, pair) {
                    (2, 2) => tiles::dot_tiles::<2, 2>(t, first, [tb(0), tb(1)], &mut dots),
                    (2, _) => {
                        let mut d = [[[0i32; TILE_ROWS]; 1]; 2];
                        tiles::dot_tiles::<1, 2>(t, first, [tb(0)], &mut d);
                        dots[0][0] = d[0][0];
                        dots[1][0] = d[1][0];
                    }
                    (_, 2) => {
                        let mut d = [[[0i32; TILE_ROWS]; 2]; 1];
                        tiles::dot_tiles::<2, 1>(t, first, [tb(0), tb(1)], &mut d);
                        dots[0] = d[0];
                    }
                    _ => {
                        let mut d = [[[0i32; TILE_ROWS]; 1]; 1];
                        tiles::dot_tiles::<1, 1>(t, first, [tb(0)], &mut d);
                        dots[0][0] = d[0][0];
                    }
                }
                let start = first * TILE_ROWS;
                let count = (run * TILE_ROWS).min(rows - start);
                for (i, tok) in (t0 + j..t0 + j + pair).enumerate() {
                    let values = (0..count)
                        .map(|r| dots[r / TILE_ROWS][i][r % TILE_ROWS] as f32 * factors[tok]);
                    // SAFETY: rows `start..start + count` belong to this run alone, so each
                    // index `tok * rows + start + r` is written by this worker only, once.
                    unsafe { out.write_run(tok * rows + start, values) };
                }
                j += pair;
            }
        });
    }
}

/// An output buffer that parallel workers fill at disjoint indices.
struct DisjointWrites<'a> {
    ptr: *mut f32,
    len: usize,
    _buffer: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the workers write disjoint indices (the contract of `write_run`); the buffer is
// borrowed mutably for the lifetime of the value, so nothing else reads or writes it meanwhile.
unsafe impl Send for DisjointWrites<'_> {}
unsafe impl Sync for DisjointWrites<'_> {}

impl<'a> DisjointWrites<'a> {
    fn new(buffer: &'a mut [f32]) -> Self {
        DisjointWrites {
            ptr: buffer.as_mut_ptr(),
            len: buffer.len(),
            _buffer: std::marker::PhantomData,
        }
    }

    /// Writes `values` at `start`, `start + 1`, ...
    ///
    /// # Safety
    /// No other thread writes any of these indices while `self` lives.
    unsafe fn write_run(&self, start: usize, values: impl ExactSizeIterator<Item = f32>) {
        assert!(start + values.len() <= self.len, "write past the output");
        for (i, v) in values.enumerate() {
            // SAFETY: in bounds (asserted above); exclusive by the caller's contract.
            unsafe { self.ptr.add(start + i).write(v) };
        }
    }
}

/// Rows per chunk of a multi-token projection: at most 256 KiB of packed rows (a share of
/// the L2 cache that every token tile reuses), and at least 8 chunks per worker thread so that
/// the work spreads evenly.
fn chunk_rows(rows: usize, row_bytes: usize, threads: usize) -> usize {
    let by_cache = (256 * 1024 / row_bytes.max(1)).max(1);
    let by_balance = rows.div_ceil(8 * threads.max(1)).max(1);
    by_cache.min(by_balance)
}

/// Loads a model from a .bpk file. The whole file is validated first (checksums, codes, finite
/// values, the scheme against the model), so a damaged file is refused rather than run.
pub fn load(file: &BpkFile) -> Result<Transformer<'_, TernaryLinear<'_>>, RunError> {
    let q = &file.header.quantization;
    if q.weights.rule != WeightRule::AbsmeanPerTensor {
        return Err(RunError::UnsupportedScheme {
            reason: format!("weight rule {:?}", q.weights.rule),
        });
    }
    let mut first_finding = None;
    validate_bytes_into(file.bytes(), &mut |f| {
        first_finding.get_or_insert(f);
    });
    if let Some(first) = first_finding {
        return Err(RunError::Invalid {
            path: file.path.clone(),
            first: first.message.clone(),
        });
    }
    load_checked(file)
}

/// [`load`] without the validation, for a caller that has just validated `file` (and times the
/// two apart, as `bench` does).
pub(crate) fn load_checked(file: &BpkFile) -> Result<Transformer<'_, TernaryLinear<'_>>, RunError> {
    let q = &file.header.quantization;
    if q.weights.rule != WeightRule::AbsmeanPerTensor {
        return Err(RunError::UnsupportedScheme {
            reason: format!("weight rule {:?}", q.weights.rule),
        });
    }
    let cfg = file.header.model.clone();
    let plan = QuantPlan::new(q, &cfg)?;
    assemble(cfg, plan, &FileParts { file })
}

/// Tensors of a validated .bpk file.
struct FileParts<'a> {
    file: &'a BpkFile,
}

impl FileParts<'_> {
    fn find(&self, role: Role, layer: Option<usize>) -> Result<&TensorEntry, RunError> {
        self.file
            .header
            .tensors
            .iter()
            .find(|t| t.role == role && t.layer.map(|l| l as usize) == layer)
            .ok_or_else(|| RunError::Missing {
                what: super::describe_site(role, layer),
            })
    }
}

impl<'a> Parts<'a> for FileParts<'a> {
    type Linear = TernaryLinear<'a>;

    fn floats(&self, role: Role, layer: Option<usize>) -> Result<Vec<f32>, RunError> {
        Ok(self.file.dequantize_f32(self.find(role, layer)?)?)
    }

    fn matrix(&self, role: Role) -> Result<FloatMatrix<'a>, RunError> {
        let e = self.find(role, None)?;
        let ty = match (e.encoding, e.encoding.float()) {
            (_, Some(dtype)) => MatrixType::Float(dtype),
            (Encoding::Q8, None) => MatrixType::Q8,
            _ => {
                return Err(RunError::Missing {
                    what: format!("float data for {}", e.name),
                });
            }
        };
        Ok(FloatMatrix {
            ty,
            bytes: self.file.raw(e)?,
            rows: e.shape[0] as usize,
            cols: e.shape[1] as usize,
        })
    }

    fn linear(
        &self,
        role: Role,
        layer: usize,
        act: ActQuant,
    ) -> Result<TernaryLinear<'a>, RunError> {
        let e = self.find(role, Some(layer))?;
        let layout = e.encoding.ternary().ok_or_else(|| RunError::Missing {
            what: format!("ternary data for {}", e.name),
        })?;
        let (rows, k) = (e.shape[0] as usize, e.shape[1] as usize);
        let (data, row_bytes) = (self.file.stored(e), layout.row_bytes(k));
        // The tiles belong to the avx512 build: `BITNET_PACK_KERNELS` naming another keeps
        // `t5` rows on that build's kernels.
        let tiled = Isa::active() == Isa::Avx512 && tiles::available();
        let tiles = (layout == TernaryLayout::T5 && act.is_quantized() && tiled).then(|| {
            let t = T5Tiles::from_t5(data, row_bytes, rows, k);
            // The runner reads these rows from the tiles only: their memory in the file's
            // copy goes back to the OS (they stay readable, from the file).
            self.file.release(e);
            t
        });
        Ok(TernaryLinear {
            layout,
            rows,
            k,
            row_bytes,
            data,
            tiles,
            scale: e
                .scale_f32()
                .expect("validated: ternary tensors have an f32 scale"),
            act,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::ACTIVATION_EPS;

    /// The table-lookup path (one token, and prompts in steps of [`TILES_STEP`] tokens, two
    /// tiles and two tokens at a time) gives the `t5` kernels' outputs bit for bit, on matrices
    /// with groups of four and of eight tiles, with a partial last tile, a short last block,
    /// and an odd token count past one step; with int8 and int4 inputs.
    #[test]
    fn tiles_give_the_t5_kernels_outputs() {
        if !tiles::available() {
            eprintln!("skipped: this CPU has no AVX-512 BW");
            return;
        }
        for (rows, group) in [(1030, 4), (2050, 8)] {
            tiles_equal_t5(rows, group);
        }
    }

    /// Projections of one input run together (one quantization, one parallel section) give
    /// each projection's own outputs bit for bit: tiled parts of 8-, 4- and 1-tile groups with
    /// different scales, and the fallbacks (a part without tiles, a different quantizer).
    #[test]
    fn shared_projections_give_each_ones_outputs() {
        if !tiles::available() {
            eprintln!("skipped: this CPU has no AVX-512 BW");
            return;
        }
        let k = 700;
        let row_bytes = TernaryLayout::T5.row_bytes(k);
        let mut rng = crate::num::SplitMix64(5);
        let shapes = [(2050usize, 0.75f32), (600, 1.5), (70, 0.125)];
        let data: Vec<Vec<u8>> = shapes
            .iter()
            .map(|&(rows, _)| {
                let mut d = vec![0u8; rows * row_bytes];
                for row in d.chunks_exact_mut(row_bytes) {
                    let trits: Vec<i8> = (0..k).map(|_| (rng.next_u64() % 3) as i8 - 1).collect();
                    TernaryLayout::T5.pack_row(&trits, row);
                }
                d
            })
            .collect();
        let x: Vec<f32> = (0..2 * k)
            .map(|_| (rng.next_u64() % 2001) as f32 / 500.0 - 2.0)
            .collect();
        let int8 = ActQuant::Absmax8 {
            eps: ACTIVATION_EPS,
        };
        let int4 = ActQuant::Absmean4 {
            eps: ACTIVATION_EPS,
        };
        let part = |i: usize, act, tiled: bool| {
            let (rows, scale) = shapes[i];
            TernaryLinear {
                layout: TernaryLayout::T5,
                rows,
                k,
                row_bytes,
                data: &data[i],
                scale,
                act,
                tiles: tiled.then(|| T5Tiles::from_t5(&data[i], row_bytes, rows, k)),
            }
        };
        let cases = [
            [(int8, true), (int8, true), (int8, true)],
            [(int4, true), (int4, true), (int4, true)],
            [(int8, true), (int8, false), (int8, true)],
            [(int8, true), (int4, true), (int8, true)],
        ];
        for case in cases {
            let parts: Vec<TernaryLinear> = case
                .iter()
                .enumerate()
                .map(|(i, &(act, tiled))| part(i, act, tiled))
                .collect();
            let refs: Vec<&TernaryLinear> = parts.iter().collect();
            for n in [1, 2] {
                let mut got: Vec<Vec<f32>> = parts.iter().map(|p| vec![0f32; n * p.rows]).collect();
                TernaryLinear::forward_shared(&refs, &x[..n * k], n, &mut got);
                for (p, g) in parts.iter().zip(&got) {
                    let mut want = vec![0f32; n * p.rows];
                    p.forward(&x[..n * k], n, &mut want);
                    assert!(
                        want.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "rows={} n={n} case={case:?}",
                        p.rows
                    );
                }
            }
        }
    }

    fn tiles_equal_t5(rows: usize, group: usize) {
        let k = 700;
        let mut rng = crate::num::SplitMix64(11);
        let row_bytes = TernaryLayout::T5.row_bytes(k);
        let mut data = vec![0u8; rows * row_bytes];
        for row in data.chunks_exact_mut(row_bytes) {
            let trits: Vec<i8> = (0..k).map(|_| (rng.next_u64() % 3) as i8 - 1).collect();
            TernaryLayout::T5.pack_row(&trits, row);
        }
        let x: Vec<f32> = (0..19 * k)
            .map(|_| (rng.next_u64() % 2001) as f32 / 500.0 - 2.0)
            .collect();
        let acts = [
            ActQuant::Absmax8 {
                eps: ACTIVATION_EPS,
            },
            ActQuant::Absmean4 {
                eps: ACTIVATION_EPS,
            },
        ];
        for act in acts {
            let linear = |tiles| TernaryLinear {
                layout: TernaryLayout::T5,
                rows,
                k,
                row_bytes,
                data: &data,
                scale: 0.75,
                act,
                tiles,
            };
            let plain = linear(None);
            let tiled = linear(Some(T5Tiles::from_t5(&data, row_bytes, rows, k)));
            assert_eq!(tiled.tiles.as_ref().map(T5Tiles::group), Some(group));
            for n in [1, 2, 19] {
                let (mut want, mut got) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                plain.forward(&x[..n * k], n, &mut want);
                tiled.forward(&x[..n * k], n, &mut got);
                assert!(
                    want.iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} rows={rows} n={n}",
                    act.name()
                );
            }
        }
    }
}
