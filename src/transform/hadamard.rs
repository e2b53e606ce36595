//! Orthonormal Hadamard transforms `x <- H_n x / sqrt(n)` for `n = m * 2^k`, the matrices
//! defined byte for byte in formats/bpk.md §9.
//!
//! - `H_{2^k}` is the natural-order Sylvester matrix, `H_{2n} = [[H_n, H_n], [H_n, -H_n]]`
//!   (entry `(i, j)` is `(-1)^popcount(i & j)`, as `scipy.linalg.hadamard` and the
//!   fast-hadamard-transform package compute it), applied with O(n log n) butterflies.
//! - For `m > 1`, `H_n = H_m (x) H_{2^k}` (Kronecker product, `H_m` the outer factor): with
//!   `i = a * 2^k + b`, `H_n[i][j] = H_m[a_i][a_j] * H_{2^k}[b_i][b_j]`. `m` is the first of
//!   [`ORDERS`] that divides `n` with a power-of-two quotient (the order QuaRot tries them in).
//! - The stored `H_m` are built by Paley's constructions (Paley I for 12, 20, 60, 108 from the
//!   primes 11, 19, 59, 107; Paley II for 28, 36, 52 from 13, 17 and the field of 25
//!   elements; 40 doubles 20). Most are not symmetric: the activation side and the weight side
//!   must use the same orientation, and both use this module.
//!
//! These matrices are our own: they are not QuaRot's `had_K` (from Sloane's library) nor
//! fast-hadamard-transform's `hadamard_transform_{12,20,28,40}N`, so a checkpoint trained with
//! one of those needs that library's matrix, not this one.

/// The non-power-of-two orders with a stored matrix, in the order they are tried.
pub const ORDERS: [usize; 8] = [108, 60, 52, 36, 28, 40, 20, 12];

/// A size without a supported Hadamard matrix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no Hadamard transform of size {n}: supported sizes are m * 2^k with m one of 1, 12, 20, 28, 36, 40, 52, 60, 108 (e.g. 2560 = 40 * 64, 6912 = 108 * 64, 640 = 40 * 16, 128 = 2^7)"
)]
pub struct UnsupportedSize {
    pub n: usize,
}

/// The transform of one size.
#[derive(Debug, Clone, PartialEq)]
pub struct Hadamard {
    n: usize,
    /// The non-power-of-two factor (1 if `n` is a power of two).
    m: usize,
    /// `n / m`.
    pow2: usize,
    /// `H_m`, row-major, entries +1/-1.
    hm: Vec<i8>,
    /// The same entries as f32 (+1.0/-1.0), for the branch-free mix.
    hm_f32: Vec<f32>,
    /// `1 / sqrt(n)` in f32.
    scale: f32,
}

impl Hadamard {
    /// The transform of size `n`, or an error naming the supported sizes.
    pub fn new(n: usize) -> Result<Self, UnsupportedSize> {
        let (m, pow2) = decompose(n).ok_or(UnsupportedSize { n })?;
        let hm = if m == 1 { vec![1] } else { stored(m) };
        Ok(Hadamard {
            n,
            m,
            pow2,
            hm_f32: hm.iter().map(|&h| f32::from(h)).collect(),
            hm,
            scale: (1.0 / (n as f64).sqrt()) as f32,
        })
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The factor `m` of `n = m * 2^k`.
    pub fn order_m(&self) -> usize {
        self.m
    }

    /// Transforms one vector of length `n` in place: `x <- H_n x / sqrt(n)`.
    ///
    /// The order of operations is fixed (butterflies over each contiguous block of `2^k`, then
    /// the `H_m` mix of each column in row order, then the scale), so the result does not depend
    /// on the CPU or the thread count.
    pub fn apply(&self, x: &mut [f32]) {
        let mut scratch = Vec::new();
        self.apply_with(x, &mut scratch);
    }

    /// [`Hadamard::apply`] with a reusable scratch buffer (grown to `n` when `m > 1`).
    pub(crate) fn apply_with(&self, x: &mut [f32], scratch: &mut Vec<f32>) {
        debug_assert_eq!(x.len(), self.n);
        #[cfg(target_arch = "x86_64")]
        {
            if crate::num::cpu::has_avx2() {
                // SAFETY: the CPU supports AVX2 (checked at run time just above).
                return unsafe { self.apply_avx2(x, scratch) };
            }
        }
        self.apply_body(x, scratch)
    }

    /// The same operations compiled for AVX2 (the same sums in the same order, more lanes).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn apply_avx2(&self, x: &mut [f32], scratch: &mut Vec<f32>) {
        self.apply_body(x, scratch)
    }

    #[inline(always)]
    fn apply_body(&self, x: &mut [f32], scratch: &mut Vec<f32>) {
        for block in x.chunks_exact_mut(self.pow2) {
            fwht(block);
        }
        if self.m > 1 {
            scratch.clear();
            scratch.extend_from_slice(x);
            mix_body(&self.hm_f32, self.m, self.pow2, scratch, x);
        }
        for v in x.iter_mut() {
            *v *= self.scale;
        }
    }

    /// Transforms every consecutive `n`-vector of `x` (rows of a `[tokens, n]` matrix), rows
    /// spread over the worker threads (each row is transformed on its own: the result does not
    /// depend on the thread count).
    pub fn apply_rows(&self, x: &mut [f32]) {
        use rayon::prelude::*;
        if x.len() <= self.n {
            let mut scratch = Vec::new();
            for row in x.chunks_exact_mut(self.n) {
                self.apply_with(row, &mut scratch);
            }
            return;
        }
        x.par_chunks_exact_mut(self.n)
            .for_each_init(Vec::new, |scratch, row| self.apply_with(row, scratch));
    }

    /// Entry `(i, j)` of the unnormalized `H_n` (+1 or -1).
    pub fn entry(&self, i: usize, j: usize) -> i8 {
        let (ai, bi) = (i / self.pow2, i % self.pow2);
        let (aj, bj) = (j / self.pow2, j % self.pow2);
        let sylvester = if (bi & bj).count_ones() % 2 == 0 {
            1
        } else {
            -1
        };
        self.hm[ai * self.m + aj] * sylvester
    }
}

/// The `H_m` stage: `out[a][b] = sum over a' of H_m[a][a'] * src[a'][b]` for `src` and `out`
/// of `m` blocks of `p` values, each sum accumulated from 0 in the order `a' = 0, 1, ...`
/// (formats/bpk.md §9.4). `H_m[a][a'] * v` is `+v` or `-v` exactly, so the sums are exactly
/// the specified ones whatever the vector width: lanes only run several `b` at once.
/// Lanes of `b` accumulated together, in registers across the whole sum over `a'`.
const MIX_LANES: usize = 16;

#[inline(always)]
fn mix_body(hm: &[f32], m: usize, p: usize, src: &[f32], out: &mut [f32]) {
    let full = p / MIX_LANES * MIX_LANES;
    for (a, out_block) in out.chunks_exact_mut(p).enumerate() {
        let row = &hm[a * m..(a + 1) * m];
        for b0 in (0..full).step_by(MIX_LANES) {
            let mut acc = [0f32; MIX_LANES];
            for (a2, &h) in row.iter().enumerate() {
                let s = &src[a2 * p + b0..a2 * p + b0 + MIX_LANES];
                for (acc, &v) in acc.iter_mut().zip(s) {
                    *acc += h * v;
                }
            }
            out_block[b0..b0 + MIX_LANES].copy_from_slice(&acc);
        }
        for b in full..p {
            let mut acc = 0f32;
            for (a2, &h) in row.iter().enumerate() {
                acc += h * src[a2 * p + b];
            }
            out_block[b] = acc;
        }
    }
}

/// `n = m * 2^k` with `m` the first of [`ORDERS`] that fits, or `m = 1` for a power of two.
fn decompose(n: usize) -> Option<(usize, usize)> {
    if n == 0 {
        return None;
    }
    if n.is_power_of_two() {
        return Some((1, n));
    }
    ORDERS
        .iter()
        .find(|&&m| n % m == 0 && (n / m).is_power_of_two())
        .map(|&m| (m, n / m))
}

/// In-place unnormalized fast Walsh-Hadamard transform in natural (Sylvester) order.
#[inline(always)]
fn fwht(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for pair in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = pair.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
}

/// The stored `H_m` of an order in [`ORDERS`], row-major.
pub fn stored(m: usize) -> Vec<i8> {
    match m {
        12 | 20 | 60 | 108 => paley1(&jacobsthal(&PrimeField(m as u32 - 1))),
        28 => paley2(&jacobsthal(&PrimeField(13))),
        36 => paley2(&jacobsthal(&PrimeField(17))),
        52 => paley2(&jacobsthal(&SquareField::new(5))),
        40 => double(&stored(20), 20),
        _ => panic!("order {m} is not stored; callers take it from ORDERS"),
    }
}

/// A finite field of `q` elements, numbered `0..q`, with its quadratic character.
trait Field {
    fn order(&self) -> u32;
    /// `chi(x_i - x_j)`: 0 if equal, +1 if the difference is a nonzero square, else -1.
    fn chi_of_difference(&self, i: u32, j: u32) -> i8;
}

/// The integers modulo a prime `p`; element `i` is `i`.
struct PrimeField(u32);

impl Field for PrimeField {
    fn order(&self) -> u32 {
        self.0
    }
    fn chi_of_difference(&self, i: u32, j: u32) -> i8 {
        let p = u64::from(self.0);
        let d = (u64::from(i) + p - u64::from(j)) % p;
        if d == 0 {
            return 0;
        }
        if pow_mod(d, (p - 1) / 2, p) == 1 {
            1
        } else {
            -1
        }
    }
}

fn pow_mod(mut b: u64, mut e: u64, p: u64) -> u64 {
    let mut r = 1;
    b %= p;
    while e > 0 {
        if e & 1 == 1 {
            r = r * b % p;
        }
        b = b * b % p;
        e >>= 1;
    }
    r
}

/// The field of `p^2` elements `a + b t` with `t^2 = r`, `r` the smallest quadratic non-residue
/// modulo `p`; element `i` is `(i mod p) + (i div p) t`.
struct SquareField {
    p: u32,
    r: u32,
}

impl SquareField {
    fn new(p: u32) -> Self {
        let pp = u64::from(p);
        let r = (2..p)
            .find(|&x| pow_mod(u64::from(x), (pp - 1) / 2, pp) == pp - 1)
            .expect("an odd prime has a non-residue");
        SquareField { p, r }
    }

    fn mul(&self, (a, b): (u64, u64), (c, d): (u64, u64)) -> (u64, u64) {
        let (p, r) = (u64::from(self.p), u64::from(self.r));
        ((a * c + r * b % p * d) % p, (a * d + b * c) % p)
    }
}

impl Field for SquareField {
    fn order(&self) -> u32 {
        self.p * self.p
    }
    fn chi_of_difference(&self, i: u32, j: u32) -> i8 {
        let p = u64::from(self.p);
        let (ai, bi) = (u64::from(i) % p, u64::from(i) / p);
        let (aj, bj) = (u64::from(j) % p, u64::from(j) / p);
        let d = ((ai + p - aj) % p, (bi + p - bj) % p);
        if d == (0, 0) {
            return 0;
        }
        // d^((q - 1) / 2) is 1 for squares and -1 otherwise.
        let mut x = (1, 0);
        for _ in 0..(u64::from(self.order()) - 1) / 2 {
            x = self.mul(x, d);
        }
        if x == (1, 0) { 1 } else { -1 }
    }
}

/// The Jacobsthal matrix `Q[i][j] = chi(x_i - x_j)`, `q x q`.
fn jacobsthal(f: &dyn Field) -> Vec<i8> {
    let q = f.order();
    (0..q)
        .flat_map(|i| (0..q).map(move |j| (i, j)))
        .map(|(i, j)| f.chi_of_difference(i, j))
        .collect()
}

/// Paley I (`q = 3 mod 4`): `H = I + [[0, 1^T], [-1, Q]]`, order `q + 1`.
fn paley1(jq: &[i8]) -> Vec<i8> {
    let q = (jq.len() as f64).sqrt() as usize;
    let n = q + 1;
    let mut h = vec![0i8; n * n];
    for i in 0..n {
        for j in 0..n {
            let s = match (i, j) {
                (0, 0) => 0,
                (0, _) => 1,
                (_, 0) => -1,
                _ => jq[(i - 1) * q + (j - 1)],
            };
            h[i * n + j] = s + i8::from(i == j);
        }
    }
    h
}

/// Paley II (`q = 1 mod 4`): with `C = [[0, 1^T], [1, Q]]`,
/// `H = C (x) [[1, -1], [-1, -1]] + I (x) [[1, 1], [1, -1]]`, order `2 (q + 1)`.
fn paley2(jq: &[i8]) -> Vec<i8> {
    let q = (jq.len() as f64).sqrt() as usize;
    let c = |i: usize, j: usize| -> i8 {
        match (i, j) {
            (0, 0) => 0,
            (0, _) | (_, 0) => 1,
            _ => jq[(i - 1) * q + (j - 1)],
        }
    };
    const A: [[i8; 2]; 2] = [[1, -1], [-1, -1]];
    const B: [[i8; 2]; 2] = [[1, 1], [1, -1]];
    let n = 2 * (q + 1);
    let mut h = vec![0i8; n * n];
    for i in 0..n {
        for j in 0..n {
            let (bi, bj, si, sj) = (i / 2, j / 2, i % 2, j % 2);
            let identity = if bi == bj { B[si][sj] } else { 0 };
            h[i * n + j] = c(bi, bj) * A[si][sj] + identity;
        }
    }
    h
}

/// `[[H, H], [H, -H]]` of an order-`m` matrix.
fn double(h: &[i8], m: usize) -> Vec<i8> {
    let n = 2 * m;
    let mut out = vec![0i8; n * n];
    for i in 0..n {
        for j in 0..n {
            let v = h[(i % m) * m + (j % m)];
            out[i * n + j] = if i >= m && j >= m { -v } else { v };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `H H^T = m I` with entries +-1.
    fn is_hadamard(h: &[i8], m: usize) -> bool {
        h.iter().all(|&v| v == 1 || v == -1)
            && (0..m).all(|i| {
                (0..m).all(|j| {
                    let dot: i32 = (0..m)
                        .map(|k| i32::from(h[i * m + k]) * i32::from(h[j * m + k]))
                        .sum();
                    dot == if i == j { m as i32 } else { 0 }
                })
            })
    }

    #[test]
    fn every_stored_matrix_is_a_hadamard_matrix() {
        for m in ORDERS {
            assert!(is_hadamard(&stored(m), m), "order {m}");
        }
    }

    fn dense(h: &Hadamard) -> Vec<f64> {
        let n = h.len();
        (0..n * n)
            .map(|e| f64::from(h.entry(e / n, e % n)) / (n as f64).sqrt())
            .collect()
    }

    /// The fast transform equals the dense matrix, is orthogonal and is undone by its transpose.
    fn check_size(n: usize, x: &[f32]) {
        let h = Hadamard::new(n).unwrap();
        let d = dense(&h);
        let mut y = x.to_vec();
        h.apply(&mut y);
        let norm_x: f64 = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        for i in 0..n {
            let want: f64 = (0..n).map(|j| d[i * n + j] * f64::from(x[j])).sum();
            assert!(
                (f64::from(y[i]) - want).abs() <= 1e-5 * norm_x.max(1.0),
                "n={n} i={i}: {} vs {want}",
                y[i]
            );
        }
        let norm_y: f64 = y.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        assert!(
            (norm_x - norm_y).abs() <= 1e-5 * norm_x.max(1.0),
            "n={n}: norm changed"
        );
        // The inverse is the transpose: x = H^T y.
        for j in 0..n {
            let back: f64 = (0..n).map(|i| d[i * n + j] * f64::from(y[i])).sum();
            assert!((back - f64::from(x[j])).abs() <= 1e-5 * norm_x.max(1.0));
        }
    }

    #[test]
    fn sizes_of_2b4t_and_awkward_ones_decompose_as_documented() {
        let parts = |n| {
            let h = Hadamard::new(n).unwrap();
            (h.order_m(), n / h.order_m())
        };
        assert_eq!(parts(2560), (40, 64));
        assert_eq!(parts(6912), (108, 64));
        assert_eq!(parts(640), (40, 16));
        assert_eq!(parts(128), (1, 128));
        assert_eq!(parts(320), (40, 8));
        assert_eq!(parts(864), (108, 8));
        assert_eq!(parts(60), (60, 1));
        for bad in [0usize, 3, 10, 168, 100, 6913] {
            let e = Hadamard::new(bad).unwrap_err();
            assert_eq!(e, UnsupportedSize { n: bad });
            assert!(e.to_string().contains("108"));
        }
    }

    #[test]
    fn sylvester_order_is_natural() {
        // H_4 of scipy.linalg.hadamard.
        let h = Hadamard::new(4).unwrap();
        let want = [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]];
        for (i, row) in want.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                assert_eq!(h.entry(i, j), v);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn fast_equals_dense_and_inverts(
            m in prop::sample::select(vec![1usize, 12, 20, 28, 36, 40, 52, 60, 108]),
            k in 0u32..4,
            seed in any::<u64>(),
        ) {
            let n = m << k;
            prop_assume!(Hadamard::new(n).map(|h| h.order_m() == m || m == 1).unwrap_or(false));
            let mut s = seed;
            let x: Vec<f32> = (0..n)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
                })
                .collect();
            check_size(n, &x);
        }
    }
}
