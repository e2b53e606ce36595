//! `t5` rows re-laid in tiles of 32 rows at load time, for a table-lookup dot product.
//!
//! The `t5` kernels ([`super::kernels`]) take nine multiplications per 160 weights to get a
//! row's digits out, and on the CPUs measured that arithmetic, not memory, bounds decoding.
//! Here the bytes stay the file's bytes (five weights each, 1.6 bits a weight); only their
//! order changes, so that one 512-bit register holds the same byte of 32 rows, and the sums
//! of a byte's five weights are looked up rather than computed:
//!
//! - **Lines.** Rows go by tiles of [`TILE_ROWS`] = 32. Line `p` of a tile holds, for each of
//!   its rows, the 16-bit word `byte[2p] | byte[2p + 1] << 8` of the row's `t5` bytes (0 past
//!   the row's last byte, and for the rows past the matrix's last). A tile's lines lie
//!   together, and tiles go by groups that share each table load: 8 tiles in matrices of at
//!   least 64 tiles, 4 in those of at least 16, else 1 (each worker still gets several
//!   groups). A run over a group reads one stream per tile: on the CPU measured, four streams
//!   gave one thread 19-21 GB/s against 15-16 for the same lines interleaved into one stream.
//! - **Indices.** A stored byte `s` of base-3 value `v` holds the codes `c0..c4` (`t5`:
//!   `code = trit + 1`, `c0` the most significant digit). `hi = floor(27 s / 256)` is
//!   `floor(v / 9) = 9 c0 + 3 c1 + c2` (0..27), exactly for every valid byte, and
//!   `lo = floor(1293 s / 256) mod 32` falls in a bucket that only bytes of one `v mod 9 =
//!   3 c3 + c4` reach ([`LO_CLASS`]; 1293 is the smallest multiplier with that property,
//!   found by search and checked for all 243 bytes by a test). With `s` in the high byte of a
//!   16-bit lane each is one `vpmulhuw`, and `vpermw` reads only an index's low five bits.
//! - **Tables.** For each token and each byte position `g` of a row (whose five elements are
//!   those [`positions`] gives): `H_g[hi] = (c0 - 1) a0 + (c1 - 1) a1 + (c2 - 1) a2` and
//!   `L_g[lo] = (c3 - 1) a3 + (c4 - 1) a4` (0 in buckets no byte reaches), 32 i16 entries each,
//!   `a_j` the int8 activation of element `j` (0 past the row's end). A row's dot product is
//!   `sum_g H_g[hi(s_g)] + L_g[lo(s_g)]`, the exact `sum_e w_e q_e`.
//! - **Dot.** One `vpermw` looks up one index of 32 rows in a table (64 or 96 multiply-adds in
//!   one instruction). Sums are kept in i16 for [`FLUSH_LINES`] lines, then widened to i32.
//!
//! [`dot_tile_scalar`] and [`build_tables_scalar`] are the scalar twins of the AVX-512 code;
//! both are tested equal to the `t5` dot product of the same rows.

use crate::pack::t5;

/// Rows of a tile (16-bit lanes of a 512-bit register).
pub const TILE_ROWS: usize = 32;
/// Entries of a table (one 512-bit register of i16).
pub const TABLE: usize = 32;
/// Tables per line and token: `H` and `L` of its two byte positions.
pub const LINE_TABLES: usize = 4;
/// Lines summed in i16 before widening: each line adds at most `2 * (3 * 128 + 2 * 128)` =
/// 1280 in magnitude to a row's sum (its two bytes).
pub const FLUSH_LINES: usize = 24;
/// Most tiles of a group (see [`T5Tiles::from_t5`]).
pub const GROUP_TILES: usize = 8;

const _: () = assert!(FLUSH_LINES * 1280 <= i16::MAX as usize);

/// One line of a tile (the words of its 32 rows) or one table: 64 bytes, aligned to a cache
/// line so that each 512-bit load touches one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct Line<T>(pub [T; TILE_ROWS]);

/// One table of sums.
pub type Table = Line<i16>;

/// Lines of a row of `k` weights: its `t5` bytes two at a time.
pub fn lines(k: usize) -> usize {
    t5::row_bytes(k).div_ceil(2)
}

/// Tables of one token for rows of `k` weights.
pub fn tables_len(k: usize) -> usize {
    lines(k) * LINE_TABLES
}

/// Zeroed tables for one token and rows of `k` weights.
pub fn new_tables(k: usize) -> Vec<Table> {
    vec![Line([0; TABLE]); tables_len(k)]
}

/// Whether this CPU runs the AVX-512 kernels (F and BW: `vpermw` on 512 bits).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The elements of a row of `k` weights held by its `t5` byte `g`, digit by digit (`None`
/// past the row's end): `160 B + b + 32 j` in a whole block `B`, `160 full + b + n j` in a
/// short last block of `n` bytes (formats/bpk.md §5.3).
pub fn positions(k: usize, g: usize) -> [Option<usize>; t5::TRITS_PER_BYTE] {
    let full = k / t5::BLOCK;
    let (start, b, n) = if g < full * t5::BLOCK_BYTES {
        (
            g / t5::BLOCK_BYTES * t5::BLOCK,
            g % t5::BLOCK_BYTES,
            t5::BLOCK_BYTES,
        )
    } else {
        let n = t5::block_bytes(k % t5::BLOCK);
        (full * t5::BLOCK, g - full * t5::BLOCK_BYTES, n)
    };
    std::array::from_fn(|j| {
        let e = start + b + n * j;
        (b < n && e < k).then_some(e)
    })
}

/// Multiplier of a byte's `hi` index: `floor(27 s / 256)`.
const HI_MUL: u16 = 27;
/// Multiplier of a byte's `lo` bucket: `floor(1293 s / 256) mod 32`.
const LO_MUL: u16 = 1293;

/// `hi` and `lo` of a stored byte (see the module doc); any byte gives indices below 32.
#[inline]
pub fn indices(s: u8) -> (usize, usize) {
    let s = usize::from(s);
    (
        (s * HI_MUL as usize) >> 8,
        ((s * LO_MUL as usize) >> 8) % TABLE,
    )
}

/// For each `lo` bucket, the `v mod 9` (`3 c3 + c4`) of the valid bytes that reach it, or
/// `None` if none does. Building it fails to compile if two classes shared a bucket.
pub const LO_CLASS: [Option<u8>; TABLE] = {
    let mut class = [None; TABLE];
    let mut v = 0;
    while v < t5::VALUES {
        let s = t5::encode(v as u8) as usize;
        let b = ((s * LO_MUL as usize) >> 8) % TABLE;
        let c = (v % 9) as u8;
        match class[b] {
            None => class[b] = Some(c),
            Some(other) => assert!(other == c, "two classes in one bucket"),
        }
        v += 1;
    }
    class
};

/// `d - 1` of base-3 digit `j` of `c`, of `n` digits, most significant first.
const fn weight(c: usize, n: u32, j: u32) -> i16 {
    (c / 3usize.pow(n - 1 - j) % 3) as i16 - 1
}

/// Rows of `t5` bytes in tiles.
pub struct T5Tiles {
    rows: usize,
    k: usize,
    lines: usize,
    /// Tiles per group: 8, 4 or 1.
    group: usize,
    /// `[tile][line]`, the tile count rounded up to whole groups.
    data: Lines,
}

/// The lines of a [`T5Tiles`]: anonymous memory on transparent huge pages where the OS allows
/// (as the file's weights are read: a decoded token streams every line), else a vector.
enum Lines {
    Mapped(memmap2::MmapMut, usize),
    Vec(Vec<Line<u16>>),
}

impl Lines {
    fn new(len: usize) -> Lines {
        let bytes = len * std::mem::size_of::<Line<u16>>();
        match crate::format::reader::anonymous_huge(bytes) {
            Ok(m) => Lines::Mapped(m, len),
            Err(_) => Lines::Vec(vec![Line([0; TILE_ROWS]); len]),
        }
    }

    fn as_slice(&self) -> &[Line<u16>] {
        match self {
            // SAFETY: the map holds `len` lines' bytes, page-aligned (so aligned to 64); any
            // bits are a valid `Line<u16>`; the map lives as long as the borrow.
            Lines::Mapped(m, len) => unsafe { std::slice::from_raw_parts(m.as_ptr().cast(), *len) },
            Lines::Vec(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Line<u16>] {
        match self {
            // SAFETY: as for `as_slice`, borrowed mutably.
            Lines::Mapped(m, len) => unsafe {
                std::slice::from_raw_parts_mut(m.as_mut_ptr().cast(), *len)
            },
            Lines::Vec(v) => v,
        }
    }
}

impl T5Tiles {
    /// Re-lays `rows` rows of `k` weights stored in `t5`, `row_bytes` apart in `data`, in
    /// parallel over the groups. No byte is checked: a byte that encodes no trits still gives
    /// indices in range (a meaningless sum, not a fault), and the runner validates the file
    /// before it loads it.
    pub fn from_t5(data: &[u8], row_bytes: usize, rows: usize, k: usize) -> T5Tiles {
        use rayon::prelude::*;
        let used = t5::row_bytes(k);
        assert!(row_bytes >= used && data.len() >= rows.saturating_sub(1) * row_bytes + used);
        let lines = lines(k);
        let tiles = rows.div_ceil(TILE_ROWS);
        let group = if tiles >= 64 {
            GROUP_TILES
        } else if tiles >= 16 {
            4
        } else {
            1
        };
        let mut out = Lines::new(tiles.div_ceil(group) * group * lines);
        out.as_mut_slice()
            .par_chunks_mut(lines * group)
            .enumerate()
            .for_each(|(gi, out)| {
                out.fill(Line([0; TILE_ROWS]));
                let first = gi * group * TILE_ROWS;
                for i in 0..(group * TILE_ROWS).min(rows.saturating_sub(first)) {
                    let r = first + i;
                    let row = &data[r * row_bytes..r * row_bytes + used];
                    let (tile, i) = (i / TILE_ROWS, i % TILE_ROWS);
                    for (p, two) in row.chunks(2).enumerate() {
                        let hi = two.get(1).copied().unwrap_or(0);
                        out[tile * lines + p].0[i] = u16::from_le_bytes([two[0], hi]);
                    }
                }
            });
        T5Tiles {
            rows,
            k,
            lines,
            group,
            data: out,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE_ROWS)
    }

    /// Tiles per group: a run of [`dot_tiles`] lies within one group.
    pub fn group(&self) -> usize {
        self.group
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.data.as_slice())
    }

    /// The lines from tile `t`'s first line to the end of its group (the next tiles follow,
    /// `lines` lines apart).
    fn tile_lines(&self, t: usize) -> &[Line<u16>] {
        let n = self.lines * self.group;
        &self.data.as_slice()[t * self.lines..(t / self.group + 1) * n]
    }
}

/// The tables of one token (`q`, at least `k` activations; those past `k` are not read) into
/// `out` ([`tables_len`]`(k)` tables).
pub fn build_tables(q: &[i8], k: usize, out: &mut [Table]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the features were just checked.
        unsafe { avx512::build_tables(q, k, out) };
        return;
    }
    build_tables_scalar(q, k, out);
}

/// [`build_tables`] in plain Rust: the reference.
pub fn build_tables_scalar(q: &[i8], k: usize, out: &mut [Table]) {
    assert_eq!(out.len(), tables_len(k), "tables for rows of {k} weights");
    assert!(q.len() >= k, "{k} activations");
    for (g, pair) in out.chunks_exact_mut(2).enumerate() {
        let a = positions(k, g).map(|e| e.map_or(0, |e| i16::from(q[e])));
        let [h_table, l_table] = pair else {
            unreachable!("chunks of two")
        };
        for (c, (h, l)) in h_table.0.iter_mut().zip(l_table.0.iter_mut()).enumerate() {
            *h = if c < 27 {
                (0..3).map(|j| weight(c, 3, j) * a[j as usize]).sum()
            } else {
                0
            };
            *l = LO_CLASS[c].map_or(0, |class| {
                let class = usize::from(class);
                weight(class, 2, 0) * a[3] + weight(class, 2, 1) * a[4]
            });
        }
    }
}

/// The dot products of the rows of tile `t` with `T` tokens' tables, into `out[token][row]`
/// (rows past the matrix's last give whatever their zero bytes sum to), in plain Rust: the
/// reference.
pub fn dot_tile_scalar<const T: usize>(
    tiles: &T5Tiles,
    t: usize,
    tables: [&[Table]; T],
    out: &mut [[i32; TILE_ROWS]; T],
) {
    let lines = tiles.tile_lines(t);
    for (tok, o) in out.iter_mut().enumerate() {
        for (r, o) in o.iter_mut().enumerate() {
            *o = (0..tiles.lines)
                .map(|p| {
                    let [even, odd] = lines[p].0[r].to_le_bytes();
                    [even, odd]
                        .iter()
                        .enumerate()
                        .map(|(half, &s)| {
                            let (hi, lo) = indices(s);
                            let at = LINE_TABLES * p + 2 * half;
                            i32::from(tables[tok][at].0[hi]) + i32::from(tables[tok][at + 1].0[lo])
                        })
                        .sum::<i32>()
                })
                .sum();
        }
    }
}

/// [`dot_tile_scalar`] of `R` consecutive tiles from `first` (`R * T <= 8`, `T <= 4`),
/// `out[r][t]`,
/// with the AVX-512 kernel where the CPU has it: each token's tables are read once for all
/// `R` tiles. The run lies within one group: `R` divides the matrix's [`T5Tiles::group`],
/// and `first` is a multiple of `R`.
pub fn dot_tiles<const T: usize, const R: usize>(
    tiles: &T5Tiles,
    first: usize,
    tables: [&[Table]; T],
    out: &mut [[[i32; TILE_ROWS]; T]; R],
) {
    const { assert!(T * R <= 8 && T <= 4 && T > 0 && R > 0) };
    let len = tables_len(tiles.k);
    assert!(
        tables.iter().all(|tb| tb.len() >= len),
        "tables of every line"
    );
    assert!(
        tiles.group % R == 0 && first % R == 0,
        "a run of {R} tiles from tile {first} within groups of {}",
        tiles.group
    );
    assert!(first < tiles.tiles(), "tile {first} of {}", tiles.tiles());
    #[cfg(target_arch = "x86_64")]
    if available() {
        let lines = tiles.tile_lines(first);
        // SAFETY: the features were just checked; the run lies within a group, so the slice
        // holds the `lines` lines of each of its `R` tiles, and each token's tables are
        // `LINE_TABLES * lines` (asserted above).
        unsafe { avx512::dot_tiles::<T, R>(lines, tiles.lines, tables, out) };
        return;
    }
    for (r, o) in out.iter_mut().enumerate() {
        dot_tile_scalar(tiles, first + r, tables, o);
    }
}

/// One token's dot products with the tiles of the group that starts at tile `first`, into
/// `out[tile of the group][row]` (the first [`T5Tiles::group`] entries): [`dot_tiles`] with
/// `R` the matrix's group.
pub fn dot_group(
    tiles: &T5Tiles,
    first: usize,
    tables: &[Table],
    out: &mut [[i32; TILE_ROWS]; GROUP_TILES],
) {
    fn run<const R: usize>(
        tiles: &T5Tiles,
        first: usize,
        tables: &[Table],
        out: &mut [[i32; TILE_ROWS]],
    ) {
        let mut dots = [[[0i32; TILE_ROWS]; 1]; R];
        dot_tiles::<1, R>(tiles, first, [tables], &mut dots);
        for (o, d) in out.iter_mut().zip(dots) {
            *o = d[0];
        }
    }
    match tiles.group {
        8 => run::<8>(tiles, first, tables, out),
        4 => run::<4>(tiles, first, tables, out),
        _ => run::<1>(tiles, first, tables, out),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{
        FLUSH_LINES, HI_MUL, LINE_TABLES, LO_CLASS, LO_MUL, Line, TABLE, TILE_ROWS, Table,
        positions, tables_len, weight,
    };

    /// [`super::build_tables_scalar`]: `H = a0 P0 + a1 P1 + a2 P2` and `L = a3 Q0 + a4 Q1`,
    /// where `P_j` and `Q_j` hold the digits' `d - 1` of the 32 entries (0 where unused).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn build_tables(q: &[i8], k: usize, out: &mut [Table]) {
        assert_eq!(out.len(), tables_len(k), "tables for rows of {k} weights");
        assert!(q.len() >= k, "{k} activations");
        let load = |v: [i16; TABLE]| {
            // SAFETY: 64 readable bytes.
            unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
        };
        let p: [__m512i; 3] = std::array::from_fn(|j| {
            load(std::array::from_fn(|c| {
                if c < 27 { weight(c, 3, j as u32) } else { 0 }
            }))
        });
        let l: [__m512i; 2] = std::array::from_fn(|j| {
            load(std::array::from_fn(|b| {
                LO_CLASS[b].map_or(0, |c| weight(usize::from(c), 2, j as u32))
            }))
        });
        let full = k / crate::pack::t5::BLOCK * crate::pack::t5::BLOCK_BYTES;
        for (g, pair) in out.chunks_exact_mut(2).enumerate() {
            let a: [__m512i; 5] = if g < full {
                // A whole block: the five elements are `32` apart, all within the row.
                let e = g / 32 * 160 + g % 32;
                std::array::from_fn(|j| _mm512_set1_epi16(i16::from(q[e + 32 * j])))
            } else {
                let e = positions(k, g);
                std::array::from_fn(|j| _mm512_set1_epi16(e[j].map_or(0, |e| i16::from(q[e]))))
            };
            let h = _mm512_add_epi16(
                _mm512_mullo_epi16(a[0], p[0]),
                _mm512_add_epi16(
                    _mm512_mullo_epi16(a[1], p[1]),
                    _mm512_mullo_epi16(a[2], p[2]),
                ),
            );
            let lo = _mm512_add_epi16(
                _mm512_mullo_epi16(a[3], l[0]),
                _mm512_mullo_epi16(a[4], l[1]),
            );
            // SAFETY: a table is 64 bytes, aligned to 64.
            unsafe {
                _mm512_store_si512(pair[0].0.as_mut_ptr().cast(), h);
                _mm512_store_si512(pair[1].0.as_mut_ptr().cast(), lo);
            }
        }
    }

    /// How far ahead of the line being read the kernel asks for its tile's lines (in lines of
    /// 64 bytes): 512 bytes. On the CPU measured (one thread, streamed rows), 1 and 2 KiB
    /// were 1-14% slower, 256 bytes 1-5% slower.
    const PREFETCH_LINES: usize = 8;

    /// `vpermw`: entry `idx & 31` of `table` for each 16-bit lane. Written out so that the
    /// table stays a register: LLVM would fold its load into the instruction, and `vpermw` with
    /// a memory table runs at half the rate on the CPU measured.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn lookup(idx: __m512i, table: __m512i) -> __m512i {
        let out: __m512i;
        // SAFETY: a register-only instruction of AVX-512 BW, enabled here.
        unsafe {
            std::arch::asm!(
                "vpermw {out}, {idx}, {table}",
                out = lateout(zmm_reg) out,
                idx = in(zmm_reg) idx,
                table = in(zmm_reg) table,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        out
    }

    /// Adds the i16 lanes of `a` to the i32 sums `lo` (lanes 0..16) and `hi` (16..32).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn widen(lo: &mut __m512i, hi: &mut __m512i, a: __m512i) {
        *lo = _mm512_add_epi32(*lo, _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a)));
        *hi = _mm512_add_epi32(
            *hi,
            _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(a)),
        );
    }

    /// The dot products of `R` tiles with `T` tokens (`R * T <= 8`): for each line, the four
    /// tables of each token are loaded once for all the tiles; each tile's line takes one
    /// 512-bit load, four multiplications for the indices of its two bytes, and per token four
    /// `vpermw` lookups added in i16 (one sum per tile and token), widened to i32 every
    /// [`FLUSH_LINES`] lines. `out[r][t]`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and BW; `lines` must hold line `p` of tile `r` at
    /// `r * count + p` for every `p < count` and `r < R`, and every token `count * 4` tables.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dot_tiles<const T: usize, const R: usize>(
        lines: &[Line<u16>],
        count: usize,
        tables: [&[Table]; T],
        out: &mut [[[i32; TILE_ROWS]; T]; R],
    ) {
        debug_assert!(lines.len() >= count * R);
        debug_assert!(tables.iter().all(|t| t.len() >= count * LINE_TABLES));
        let mut lo = [[_mm512_setzero_si512(); T]; R];
        let mut hi = [[_mm512_setzero_si512(); T]; R];
        let (l_ptr, t_ptr) = (lines.as_ptr(), tables.map(|t| t.as_ptr()));
        let (hi_mul, lo_mul) = (
            _mm512_set1_epi16(HI_MUL as i16),
            _mm512_set1_epi16(LO_MUL as i16),
        );
        let high = _mm512_set1_epi16(0xff00u16 as i16);
        let mut p0 = 0;
        while p0 < count {
            let end = (p0 + FLUSH_LINES).min(count);
            let mut acc = [[_mm512_setzero_si512(); T]; R];
            for p in p0..end {
                // SAFETY: line `p < count` of each of the `R` tiles and tables `4p..4p + 4` of
                // each token (the caller's contract), all aligned to 64.
                unsafe {
                    let tb: [[__m512i; LINE_TABLES]; T] = std::array::from_fn(|t| {
                        std::array::from_fn(|j| {
                            _mm512_load_si512(t_ptr[t].add(p * LINE_TABLES + j).cast())
                        })
                    });
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let at = l_ptr.add(r * count + p);
                        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH_LINES).cast());
                        let w = _mm512_load_si512(at.cast());
                        // Each byte in the high byte of its lane: `s << 8`.
                        let bytes = [_mm512_slli_epi16::<8>(w), _mm512_and_si512(w, high)];
                        for (half, &s) in bytes.iter().enumerate() {
                            let hi_idx = _mm512_mulhi_epu16(s, hi_mul);
                            let lo_idx = _mm512_mulhi_epu16(s, lo_mul);
                            for (a, tb) in acc.iter_mut().zip(&tb) {
                                *a = _mm512_add_epi16(*a, lookup(hi_idx, tb[2 * half]));
                                *a = _mm512_add_epi16(*a, lookup(lo_idx, tb[2 * half + 1]));
                            }
                        }
                    }
                }
            }
            for r in 0..R {
                for t in 0..T {
                    // At most FLUSH_LINES * 1280 in magnitude: exact in i16.
                    widen(&mut lo[r][t], &mut hi[r][t], acc[r][t]);
                }
            }
            p0 = end;
        }
        for r in 0..R {
            for t in 0..T {
                // SAFETY: 16 + 16 i32 into the 32 of `out[r][t]`.
                unsafe {
                    _mm512_storeu_si512(out[r][t].as_mut_ptr().cast(), lo[r][t]);
                    _mm512_storeu_si512(out[r][t].as_mut_ptr().add(16).cast(), hi[r][t]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::TernaryLayout;
    use crate::run::kernels::dot_scalar;

    /// Random rows of trits and four tokens of int8 activations (the extremes included),
    /// packed in `t5`, `row_bytes` a little more than the rows need.
    fn case(rows: usize, k: usize, seed: u64) -> (Vec<u8>, usize, Vec<Vec<i8>>) {
        let mut rng = crate::num::SplitMix64(seed);
        let rb = t5::row_bytes(k) + 3;
        let mut data = vec![0xa5u8; rows * rb];
        for r in 0..rows {
            let trits: Vec<i8> = (0..k).map(|_| (rng.next_u64() % 3) as i8 - 1).collect();
            TernaryLayout::T5.pack_row(&trits, &mut data[r * rb..r * rb + t5::row_bytes(k)]);
        }
        let tokens = (0..4)
            .map(|t| {
                (0..k)
                    .map(|e| match (t, e % 7) {
                        (0, _) => -128,
                        (1, 0) => 127,
                        (1, _) => -128,
                        _ => rng.next_u64() as i8,
                    })
                    .collect()
            })
            .collect();
        (data, rb, tokens)
    }

    /// For every valid byte, `hi` is the base-3 number of its top three digits and `lo` a
    /// bucket of its low two, as the `t5` digit formula gives them; every byte's indices are
    /// below 32.
    #[test]
    fn indices_are_the_digits() {
        for s in 0..=255u8 {
            let (hi, lo) = indices(s);
            assert!(hi < TABLE && lo < TABLE, "byte {s}");
            if !t5::is_valid(s) {
                continue;
            }
            let d: [usize; 5] = std::array::from_fn(|j| usize::from(t5::digit(s, j)));
            assert_eq!(hi, 9 * d[0] + 3 * d[1] + d[2], "byte {s}");
            assert_eq!(LO_CLASS[lo], Some((3 * d[3] + d[4]) as u8), "byte {s}");
        }
    }

    /// Every shape edge (rows not a multiple of the tile, `k` with short last blocks and odd
    /// byte counts, `k` below one block), one to four tokens, extreme activations: the kernel,
    /// its scalar twin and the `t5` dot product of the same rows agree exactly, as do the two
    /// table builders.
    #[test]
    fn lookups_equal_the_t5_dot_product() {
        let shapes = [
            (1, 1),
            (5, 8),
            (32, 9),
            (33, 160),
            (70, 257),
            (64, 2560),
            (3, 6912),
            (130, 100),
            (1030, 165),
            (1024, 20),
            (2050, 37),
        ];
        let mut groups = std::collections::BTreeSet::new();
        for (rows, k) in shapes {
            let (data, rb, tokens) = case(rows, k, (rows * 1000 + k) as u64);
            let tiles = T5Tiles::from_t5(&data, rb, rows, k);
            groups.insert(tiles.group());
            let tables: Vec<Vec<Table>> = tokens
                .iter()
                .map(|q| {
                    let mut t = new_tables(k);
                    build_tables(q, k, &mut t);
                    let mut s = new_tables(k);
                    build_tables_scalar(q, k, &mut s);
                    assert_eq!(t, s, "tables, k {k}");
                    t
                })
                .collect();
            let tb: [&[Table]; 4] = std::array::from_fn(|t| tables[t].as_slice());
            for tile in 0..tiles.tiles() {
                let mut four = [[[0i32; TILE_ROWS]; 4]; 1];
                dot_tiles(&tiles, tile, tb, &mut four);
                let fast = four[0];
                let mut slow = [[0i32; TILE_ROWS]; 4];
                dot_tile_scalar(&tiles, tile, tb, &mut slow);
                assert_eq!(fast, slow, "{rows} x {k}, tile {tile}");
                let mut one = [[[0i32; TILE_ROWS]; 1]; 1];
                dot_tiles(&tiles, tile, [tb[2]], &mut one);
                assert_eq!(one[0][0], fast[2], "one token against four");
                // A whole group at once, as decoding runs it.
                if tile % tiles.group() == 0 {
                    let mut run = [[0i32; TILE_ROWS]; GROUP_TILES];
                    dot_group(&tiles, tile, tb[3], &mut run);
                    for (r, o) in run.iter().take(tiles.group()).enumerate() {
                        let mut s = [[0i32; TILE_ROWS]; 1];
                        dot_tile_scalar(&tiles, tile + r, [tb[3]], &mut s);
                        assert_eq!(*o, s[0], "{rows} x {k}, group tile {r}");
                    }
                }
                for (t, q) in tokens.iter().enumerate() {
                    let live = TILE_ROWS.min(rows - tile * TILE_ROWS);
                    for (i, &got) in fast[t].iter().take(live).enumerate() {
                        let r = tile * TILE_ROWS + i;
                        let want = dot_scalar(TernaryLayout::T5, &data[r * rb..(r + 1) * rb], q, k);
                        assert_eq!(got, want, "{rows} x {k}, row {r}, token {t}");
                    }
                }
            }
        }
        assert_eq!(
            groups.into_iter().collect::<Vec<_>>(),
            [1, 4, 8],
            "every group size"
        );
    }
}
