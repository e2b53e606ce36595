//! Keeps formats/bpk.md §9 honest: the Hadamard matrices, the order of operations of `T_n`,
//! the rotation signs and the folding of a rotation are rebuilt here from the spec's text alone
//! (no call into the crate's construction) and compared with the crate's public API.

use bitnet_pack::model::{ModelConfig, Role};
use bitnet_pack::transform::hadamard::{ORDERS, stored};
use bitnet_pack::transform::rotation::signs;
use bitnet_pack::transform::{Hadamard, Rotation};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// §9.2, from the text
// ---------------------------------------------------------------------------------------------

fn pow_mod(b: i64, e: i64, p: i64) -> i64 {
    (0..e).fold(1, |acc, _| acc * b % p)
}

/// The fields of §9.2: `Z/p`, or the field of 25 elements.
#[derive(Clone, Copy)]
enum Field {
    Prime(i64),
    F25,
}

impl Field {
    fn order(self) -> usize {
        match self {
            Field::Prime(p) => p as usize,
            Field::F25 => 25,
        }
    }

    /// `chi(x_i - x_j)`.
    fn chi_of_difference(self, i: usize, j: usize) -> i8 {
        match self {
            Field::Prime(p) => {
                let d = (i as i64 - j as i64).rem_euclid(p);
                if d == 0 {
                    return 0;
                }
                match pow_mod(d, (p - 1) / 2, p) {
                    1 => 1,
                    e => {
                        assert_eq!(e, p - 1, "Euler's criterion gives 1 or p - 1");
                        -1
                    }
                }
            }
            Field::F25 => {
                let p = 5i64;
                // t^2 = r, r the smallest quadratic non-residue modulo 5 (the spec says 2).
                let r = (2..p)
                    .find(|&x| pow_mod(x, (p - 1) / 2, p) == p - 1)
                    .unwrap();
                assert_eq!(r, 2);
                let x = |k: usize| ((k % 5) as i64, (k / 5) as i64);
                let ((ai, bi), (aj, bj)) = (x(i), x(j));
                let d = ((ai - aj).rem_euclid(p), (bi - bj).rem_euclid(p));
                if d == (0, 0) {
                    return 0;
                }
                let mul = |(a, b): (i64, i64), (c, e): (i64, i64)| {
                    (
                        (a * c + r * b * e).rem_euclid(p),
                        (a * e + b * c).rem_euclid(p),
                    )
                };
                let mut power = (1, 0);
                for _ in 0..12 {
                    power = mul(power, d);
                }
                if power == (1, 0) {
                    1
                } else {
                    assert_eq!(power, (4, 0), "d^12 is 1 or -1");
                    -1
                }
            }
        }
    }
}

/// `J[i][j] = chi(x_i - x_j)`, row-major.
fn jacobsthal(f: Field) -> (Vec<i8>, usize) {
    let q = f.order();
    let mut j = vec![0i8; q * q];
    for r in 0..q {
        for c in 0..q {
            j[r * q + c] = f.chi_of_difference(r, c);
        }
    }
    (j, q)
}

/// Paley I: `H = I + [[0, 1^T], [-1, J]]`.
fn paley1(f: Field) -> Vec<i8> {
    let (jm, q) = jacobsthal(f);
    assert_eq!(q % 4, 3);
    let n = q + 1;
    let mut h = vec![0i8; n * n];
    for i in 0..n {
        for j in 0..n {
            h[i * n + j] = match (i, j) {
                (0, 0) => 1,
                (0, _) => 1,
                (_, 0) => -1,
                _ => jm[(i - 1) * q + (j - 1)] + i8::from(i == j),
            };
        }
    }
    h
}

/// Paley II: `H = C (x) A + I (x) B`.
fn paley2(f: Field) -> Vec<i8> {
    let (jm, q) = jacobsthal(f);
    assert_eq!(q % 4, 1);
    let c = |u: usize, v: usize| -> i8 {
        match (u, v) {
            (0, 0) => 0,
            (0, _) | (_, 0) => 1,
            _ => jm[(u - 1) * q + (v - 1)],
        }
    };
    let a = [[1i8, -1], [-1, -1]];
    let b = [[1i8, 1], [1, -1]];
    let n = 2 * (q + 1);
    let mut h = vec![0i8; n * n];
    for i in 0..n {
        for j in 0..n {
            let (u, e, v, g) = (i / 2, i % 2, j / 2, j % 2);
            h[i * n + j] = c(u, v) * a[e][g] + if u == v { b[e][g] } else { 0 };
        }
    }
    h
}

/// Doubling: `D[i][j] = H[i mod m][j mod m]`, negated when `i >= m` and `j >= m`.
fn doubling(h: &[i8], m: usize) -> Vec<i8> {
    let n = 2 * m;
    let mut d = vec![0i8; n * n];
    for i in 0..n {
        for j in 0..n {
            let v = h[(i % m) * m + (j % m)];
            d[i * n + j] = if i >= m && j >= m { -v } else { v };
        }
    }
    d
}

/// The table of §9.2.
fn spec_stored(m: usize) -> Vec<i8> {
    match m {
        12 => paley1(Field::Prime(11)),
        20 => paley1(Field::Prime(19)),
        28 => paley2(Field::Prime(13)),
        36 => paley2(Field::Prime(17)),
        40 => doubling(&spec_stored(20), 20),
        52 => paley2(Field::F25),
        60 => paley1(Field::Prime(59)),
        108 => paley1(Field::Prime(107)),
        _ => panic!("{m} is not in the table"),
    }
}

const SPEC_ORDERS: [usize; 8] = [108, 60, 52, 36, 28, 40, 20, 12];

/// The SHA-256 values printed in §9.2.
const SPEC_DIGESTS: [(usize, &str); 8] = [
    (
        12,
        "db7478025ce74776a8a2669368885b71737288dabf1e23985366a367b4f78ab9",
    ),
    (
        20,
        "d04b560308676ee7cb59dd0f11653ead6c5f5efcbe97f1b57fe11bd39ee46faa",
    ),
    (
        28,
        "db393c59352ae46bb16d3e14cfc96e76542acf10f4840a416015d6140d4d9bbf",
    ),
    (
        36,
        "056051ac3be0a7753b515269f6a857530abf1d1ffa417e41479d5b24e3bd6739",
    ),
    (
        40,
        "3c2e966aff899a31dcc64a9536d7f95ee8b86b6b1d0f35991fef2de1b351cf96",
    ),
    (
        52,
        "526103096f2dbb35e0b7269239dfc1be2d94eee747505080449114f126d8f83c",
    ),
    (
        60,
        "91a505ae266d3871fefff665af8234c0af0e225d5b5438311f0a63a803939a2f",
    ),
    (
        108,
        "7deb180ca8331131e11b581731bbc5a32d5d2c0a6c1e19b9e79c1a6718fee996",
    ),
];

/// `H_12` as printed in §9.2.
const SPEC_H12: [&str; 12] = [
    "++++++++++++",
    "-+-+---+++-+",
    "-++-+---+++-",
    "--++-+---+++",
    "-+-++-+---++",
    "-++-++-+---+",
    "-+++-++-+---",
    "--+++-++-+--",
    "---+++-++-+-",
    "----+++-++-+",
    "-+---+++-++-",
    "--+---+++-++",
];

// ---------------------------------------------------------------------------------------------
// §9.1 and §9.4, from the text
// ---------------------------------------------------------------------------------------------

/// `n = m * p`, or `None` when unsupported.
fn spec_decompose(n: usize) -> Option<(usize, usize)> {
    if n == 0 {
        return None;
    }
    if n.is_power_of_two() {
        return Some((1, n));
    }
    SPEC_ORDERS
        .iter()
        .find(|&&m| n % m == 0 && (n / m).is_power_of_two())
        .map(|&m| (m, n / m))
}

fn spec_hm(m: usize) -> Vec<i8> {
    if m == 1 { vec![1] } else { spec_stored(m) }
}

/// Dense `H_n = H_m (x) S_p`, `H_m` outer.
fn spec_dense(n: usize) -> Vec<i8> {
    let (m, p) = spec_decompose(n).expect("a supported size");
    let hm = spec_hm(m);
    let mut h = vec![0i8; n * n];
    for i in 0..n {
        for j in 0..n {
            let (ai, bi, aj, bj) = (i / p, i % p, j / p, j % p);
            let s = if (bi & bj).count_ones() % 2 == 0 {
                1
            } else {
                -1
            };
            h[i * n + j] = hm[ai * m + aj] * s;
        }
    }
    h
}

/// `T_n(x)` in the order of operations of §9.4.
fn spec_apply(n: usize, x: &mut [f32]) {
    let (m, p) = spec_decompose(n).expect("a supported size");
    let hm = spec_hm(m);
    for a in 0..m {
        let block = &mut x[a * p..(a + 1) * p];
        let mut h = 1;
        while h < p {
            let mut i = 0;
            while i < p {
                for j in i..i + h {
                    let (u, v) = (block[j], block[j + h]);
                    block[j] = u + v;
                    block[j + h] = u - v;
                }
                i += 2 * h;
            }
            h *= 2;
        }
    }
    if m > 1 {
        for b in 0..p {
            let c: Vec<f32> = (0..m).map(|a| x[a * p + b]).collect();
            for a in 0..m {
                let mut acc = 0f32;
                for (a2, &ca) in c.iter().enumerate() {
                    acc += f32::from(hm[a * m + a2]) * ca;
                }
                x[a * p + b] = acc;
            }
        }
    }
    let scale = (1.0 / (n as f64).sqrt()) as f32;
    for v in x.iter_mut() {
        *v *= scale;
    }
}

// ---------------------------------------------------------------------------------------------
// §9.3, from the text
// ---------------------------------------------------------------------------------------------

fn splitmix_outputs(seed: u64, n: usize) -> Vec<u64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        })
        .collect()
}

fn spec_signs(seed: u64, n: usize) -> Vec<f32> {
    splitmix_outputs(seed, n)
        .into_iter()
        .map(|o| if o & 1 == 0 { 1.0 } else { -1.0 })
        .collect()
}

/// `R(v) = T_h(s * v)` of §9.5.
fn spec_rotate(s: &[f32], v: &mut [f32]) {
    for (x, s) in v.iter_mut().zip(s) {
        *x *= s;
    }
    spec_apply(s.len(), v);
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn config(hidden: usize, intermediate: usize) -> ModelConfig {
    ModelConfig::from_json(
        format!(
            r#"{{"architectures":["BitNetForCausalLM"],"model_type":"bitnet","hidden_size":{hidden},
            "intermediate_size":{intermediate},"num_hidden_layers":1,"num_attention_heads":4,
            "num_key_value_heads":2,"vocab_size":10}}"#
        )
        .as_bytes(),
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn orders_are_the_documented_list() {
    assert_eq!(ORDERS, SPEC_ORDERS);
}

#[test]
fn stored_matrices_are_the_spec_constructions() {
    for (m, digest) in SPEC_DIGESTS {
        let spec = spec_stored(m);
        // A Hadamard matrix: H H^T = m I.
        for i in 0..m {
            for j in 0..m {
                let dot: i32 = (0..m)
                    .map(|k| i32::from(spec[i * m + k]) * i32::from(spec[j * m + k]))
                    .sum();
                assert_eq!(dot, if i == j { m as i32 } else { 0 }, "m={m} ({i}, {j})");
            }
        }
        assert_eq!(
            stored(m),
            spec,
            "H_{m} differs from the spec's construction"
        );
        let bytes: Vec<u8> = spec
            .iter()
            .map(|&v| if v == 1 { 0x01 } else { 0xFF })
            .collect();
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, digest, "SHA-256 of H_{m}");
        let symmetric = (0..m).all(|i| (0..m).all(|j| spec[i * m + j] == spec[j * m + i]));
        assert_eq!(symmetric, matches!(m, 28 | 36 | 52), "symmetry of H_{m}");
    }
    let h12 = stored(12);
    for (i, row) in SPEC_H12.iter().enumerate() {
        let want: Vec<i8> = row.chars().map(|c| if c == '+' { 1 } else { -1 }).collect();
        assert_eq!(&h12[i * 12..(i + 1) * 12], &want[..], "row {i} of H_12");
    }
}

#[test]
fn sizes_decompose_as_documented() {
    let mut supported = 0;
    for n in (0..=4096).chain([2560, 6912, 6913, 8192, 13824]) {
        let spec = spec_decompose(n);
        match Hadamard::new(n) {
            Ok(h) => {
                let (m, _) = spec.unwrap_or_else(|| panic!("{n} is supported but not by the spec"));
                assert_eq!(h.order_m(), m, "m of {n}");
                assert_eq!(h.len(), n);
                supported += 1;
            }
            Err(_) => assert_eq!(spec, None, "{n} is unsupported but the spec has it"),
        }
    }
    assert!(supported > 60, "{supported}");
    // The examples in §9.1.
    for (n, m) in [
        (80, 40),
        (640, 40),
        (2560, 40),
        (20, 20),
        (6912, 108),
        (864, 108),
        (104, 52),
        (24, 12),
        (128, 1),
    ] {
        assert_eq!(spec_decompose(n).map(|d| d.0), Some(m), "{n}");
        assert_eq!(Hadamard::new(n).unwrap().order_m(), m, "{n}");
    }
    for n in [10, 100, 168, 352] {
        assert_eq!(spec_decompose(n), None);
        assert!(Hadamard::new(n).is_err(), "{n}");
    }
}

#[test]
fn dense_matrices_entries_and_unit_vectors_match() {
    for n in [
        1usize, 2, 8, 12, 20, 24, 28, 36, 40, 52, 60, 80, 104, 108, 128, 160, 216,
    ] {
        let h = Hadamard::new(n).unwrap();
        let dense = spec_dense(n);
        for i in 0..n {
            for j in 0..n {
                assert_eq!(h.entry(i, j), dense[i * n + j], "n={n} entry ({i}, {j})");
            }
        }
        // T_n(e_j) is column j of H_n / sqrt(n), exactly.
        let scale = (1.0 / (n as f64).sqrt()) as f32;
        for j in 0..n {
            let mut e = vec![0f32; n];
            e[j] = 1.0;
            h.apply(&mut e);
            for i in 0..n {
                assert_eq!(
                    e[i],
                    f32::from(dense[i * n + j]) * scale,
                    "n={n}: T(e_{j})[{i}]"
                );
            }
        }
    }
}

#[test]
fn apply_follows_the_documented_order_of_operations() {
    for n in [
        1usize, 4, 12, 20, 24, 28, 36, 40, 52, 60, 104, 108, 128, 640, 864, 2560,
    ] {
        let h = Hadamard::new(n).unwrap();
        for seed in 0..3u64 {
            let x = pseudo_random(n, seed * 1000 + n as u64);
            let mut got = x.clone();
            h.apply(&mut got);
            let mut want = x.clone();
            spec_apply(n, &mut want);
            assert_eq!(bits(&got), bits(&want), "n={n} seed={seed}");
        }
        // apply_rows transforms each row on its own.
        let x = pseudo_random(3 * n, 77);
        let mut got = x.clone();
        h.apply_rows(&mut got);
        let mut want = x;
        want.chunks_exact_mut(n).for_each(|r| spec_apply(n, r));
        assert_eq!(bits(&got), bits(&want), "rows, n={n}");
    }
}

#[test]
fn signs_are_splitmix64_bit_zero() {
    assert_eq!(
        splitmix_outputs(0, 3),
        [
            0xE220_A839_7B1D_CDAF,
            0x6E78_9E6A_A1B9_65F4,
            0x06C4_5D18_8009_454F
        ]
    );
    let mut rng = bitnet_pack::num::SplitMix64(0);
    assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
    for (seed, text) in [
        (0u64, "-+-+-+-+-+-+----"),
        (7, "-++-+-++---+++++"),
        (42, "--++++-+-+-++-++"),
    ] {
        let want: Vec<f32> = text
            .chars()
            .map(|c| if c == '+' { 1.0 } else { -1.0 })
            .collect();
        assert_eq!(spec_signs(seed, 16), want, "spec, seed {seed}");
        assert_eq!(signs(seed, 16), want, "crate, seed {seed}");
    }
    for seed in [0u64, 1, 7, 42, 0x9E37_79B9_7F4A_7C15, u64::MAX] {
        for n in [1usize, 40, 2560] {
            assert_eq!(signs(seed, n), spec_signs(seed, n), "seed {seed} n {n}");
        }
    }
}

#[test]
fn the_rotation_is_diag_s_times_h_transpose() {
    // Q = diag(s) H_h^T / sqrt(h): row j of Q is e_j Q = T_h(s * e_j), entry i = s_j H[i][j] / sqrt(h).
    for (hidden, seed) in [(40usize, 7u64), (24, 0), (104, u64::MAX), (128, 42)] {
        let cfg = config(hidden, 96);
        let rot = Rotation::new(&cfg, seed, &[]).unwrap();
        let s = spec_signs(seed, hidden);
        let dense = spec_dense(hidden);
        let scale = (1.0 / (hidden as f64).sqrt()) as f32;
        for j in 0..hidden {
            let mut e = vec![0f32; hidden];
            e[j] = 1.0;
            rot.rotate(&mut e);
            for i in 0..hidden {
                assert_eq!(
                    e[i],
                    s[j] * f32::from(dense[i * hidden + j]) * scale,
                    "h={hidden}: Q[{j}][{i}]"
                );
            }
        }
        let v = pseudo_random(hidden, seed);
        let mut got = v.clone();
        rot.rotate(&mut got);
        let mut want = v;
        spec_rotate(&s, &mut want);
        assert_eq!(bits(&got), bits(&want), "h={hidden}");
    }
}

#[test]
fn folding_follows_the_documented_table() {
    // hidden 40 (doubling of H_20), q_dim 40, intermediate 104 (Paley II over the field of 25).
    let (h, inter, seed) = (40usize, 104usize, 11u64);
    let cfg = config(h, inter);
    let rot = Rotation::new(&cfg, seed, &[Role::OProj, Role::DownProj]).unwrap();
    let s = spec_signs(seed, h);
    let g = pseudo_random(h, 5);

    // Readers: every row w <- R(w * g).
    for role in [
        Role::QProj,
        Role::KProj,
        Role::VProj,
        Role::GateProj,
        Role::UpProj,
        Role::LmHead,
    ] {
        let w = pseudo_random(3 * h, 9);
        let mut got = w.clone();
        rot.fold(role, &mut got, h, Some(&g));
        let mut want = w;
        for row in want.chunks_exact_mut(h) {
            row.iter_mut().zip(&g).for_each(|(x, g)| *x *= g);
            spec_rotate(&s, row);
        }
        assert_eq!(bits(&got), bits(&want), "{}", role.as_str());
    }

    // Embedding: every row rotated, no gain.
    let e = pseudo_random(4 * h, 3);
    let mut got = e.clone();
    rot.fold(Role::Embedding, &mut got, h, None);
    let mut want = e;
    want.chunks_exact_mut(h).for_each(|r| spec_rotate(&s, r));
    assert_eq!(bits(&got), bits(&want), "embedding");

    // Writers [h, n]: every column rotated first, then every row through T_n (both are listed
    // in `online`).
    for (role, n) in [
        (Role::OProj, cfg.num_heads * cfg.head_dim),
        (Role::DownProj, inter),
    ] {
        let w = pseudo_random(h * n, 21);
        let mut got = w.clone();
        rot.fold(role, &mut got, n, None);
        let mut want = w;
        for c in 0..n {
            let mut col: Vec<f32> = (0..h).map(|r| want[r * n + c]).collect();
            spec_rotate(&s, &mut col);
            for (r, v) in col.iter().enumerate() {
                want[r * n + c] = *v;
            }
        }
        want.chunks_exact_mut(n).for_each(|r| spec_apply(n, r));
        assert_eq!(bits(&got), bits(&want), "{}", role.as_str());
    }

    // Without the online transform, a writer only has its columns rotated.
    let plain = Rotation::new(&cfg, seed, &[]).unwrap();
    let w = pseudo_random(h * inter, 22);
    let mut got = w.clone();
    plain.fold(Role::DownProj, &mut got, inter, None);
    let mut want = w;
    for c in 0..inter {
        let mut col: Vec<f32> = (0..h).map(|r| want[r * inter + c]).collect();
        spec_rotate(&s, &mut col);
        for (r, v) in col.iter().enumerate() {
            want[r * inter + c] = *v;
        }
    }
    assert_eq!(bits(&got), bits(&want), "down_proj without online");

    // Norm gains in front of readers become ones; sub-norms are untouched.
    for role in [Role::AttnNorm, Role::FfnNorm, Role::FinalNorm] {
        let mut v = pseudo_random(h, 1);
        rot.fold(role, &mut v, h, None);
        assert!(v.iter().all(|&x| x == 1.0), "{}", role.as_str());
    }
    for role in [Role::AttnSubNorm, Role::FfnSubNorm] {
        let v = pseudo_random(h, 2);
        let mut got = v.clone();
        rot.fold(role, &mut got, h, None);
        assert_eq!(bits(&got), bits(&v), "{}", role.as_str());
    }
}
