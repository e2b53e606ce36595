//! SHA-256 of eight independent messages at once ("multi-buffer"), one message per 32-bit lane
//! of a 256-bit vector, with AVX-512 F and VL.
//!
//! SHA-256 is sequential within a message, so one file's hash can use one core only; the SHA
//! extensions hash about 1.5 GB/s on the machines we measure. A checkpoint of several shards,
//! though, has several messages: run in lock step, one lane each, the rounds are plain 32-bit
//! adds, rotates (`vprord`) and three-input logic (`vpternlogd`), and eight messages move
//! through one core at once. [`super::digest::FilesHasher`] feeds this kernel on CPUs with
//! AVX-512 and without the SHA extensions; where they are present, four messages interleaved
//! through them ([`super::sha256ni`]) are as fast in all and twice as fast per message. It is
//! tested against the `sha2` crate.
//!
//! Each lane has its own pointer and step in bytes per block: 64 for a message, 0 for an idle
//! lane that hashes the same block again (its state is then thrown away).

/// The round constants of FIPS 180-4, section 4.2.2.
pub(crate) const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// The initial hash value of FIPS 180-4, section 5.3.3.
pub const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// Whether this CPU runs [`compress8`].
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One lane of [`compress8`]: where its next block starts and how far to move per block.
#[derive(Debug, Clone, Copy)]
pub struct Lane<'a> {
    pub data: &'a [u8],
    /// 64 for a message; 0 for an idle lane, which reads `data[..64]` for every block.
    pub step: usize,
}

/// Runs `blocks` compression rounds on eight states at once: lane `l` compresses the blocks of
/// `lanes[l]` into `states[l]`.
///
/// # Panics
/// If a lane's data is shorter than its blocks (`step * (blocks - 1) + 64` bytes), if a step
/// is not 0 or 64, or if [`available`] is false.
pub fn compress8(states: &mut [[u32; 8]; 8], lanes: &[Lane<'_>; 8], blocks: usize) {
    if blocks == 0 {
        return;
    }
    for lane in lanes {
        assert!(
            lane.step == 0 || lane.step == 64,
            "a lane moves 0 or 64 bytes per block"
        );
        let need = lane.step * (blocks - 1) + 64;
        assert!(
            lane.data.len() >= need,
            "a lane holds fewer bytes than its blocks"
        );
    }
    assert!(available(), "sha256x8 needs AVX-512 F and VL");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the features were checked just above and every lane holds its blocks.
    unsafe {
        x86::compress8(states, lanes, blocks)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{K, Lane};

    /// Transposes an 8 x 8 matrix of 32-bit words held as eight rows.
    #[inline(always)]
    unsafe fn transpose(r: [__m256i; 8]) -> [__m256i; 8] {
        unsafe {
            let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
            let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
            let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
            let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
            let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
            let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
            let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
            let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
            let u0 = _mm256_unpacklo_epi64(t0, t2);
            let u1 = _mm256_unpackhi_epi64(t0, t2);
            let u2 = _mm256_unpacklo_epi64(t1, t3);
            let u3 = _mm256_unpackhi_epi64(t1, t3);
            let u4 = _mm256_unpacklo_epi64(t4, t6);
            let u5 = _mm256_unpackhi_epi64(t4, t6);
            let u6 = _mm256_unpacklo_epi64(t5, t7);
            let u7 = _mm256_unpackhi_epi64(t5, t7);
            [
                _mm256_permute2x128_si256::<0x20>(u0, u4),
                _mm256_permute2x128_si256::<0x20>(u1, u5),
                _mm256_permute2x128_si256::<0x20>(u2, u6),
                _mm256_permute2x128_si256::<0x20>(u3, u7),
                _mm256_permute2x128_si256::<0x31>(u0, u4),
                _mm256_permute2x128_si256::<0x31>(u1, u5),
                _mm256_permute2x128_si256::<0x31>(u2, u6),
                _mm256_permute2x128_si256::<0x31>(u3, u7),
            ]
        }
    }

    /// Loads 32 bytes at `offset` of each lane's current block, as eight big-endian words per
    /// lane, transposed: word `j` of every lane in vector `j`.
    #[inline(always)]
    unsafe fn load_words(ptrs: &[*const u8; 8], offset: usize, bswap: __m256i) -> [__m256i; 8] {
        unsafe {
            let mut r = [_mm256_setzero_si256(); 8];
            for (l, row) in r.iter_mut().enumerate() {
                let v = _mm256_loadu_si256(ptrs[l].add(offset) as *const __m256i);
                *row = _mm256_shuffle_epi8(v, bswap);
            }
            transpose(r)
        }
    }

    #[target_feature(enable = "avx2,avx512f,avx512vl")]
    pub(super) unsafe fn compress8(
        states: &mut [[u32; 8]; 8],
        lanes: &[Lane<'_>; 8],
        blocks: usize,
    ) {
        unsafe {
            let bswap = _mm256_setr_epi8(
                3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12, 3, 2, 1, 0, 7, 6, 5, 4, 11,
                10, 9, 8, 15, 14, 13, 12,
            );
            let mut rows = [_mm256_setzero_si256(); 8];
            for (row, s) in rows.iter_mut().zip(states.iter()) {
                *row = _mm256_loadu_si256(s.as_ptr() as *const __m256i);
            }
            let st = transpose(rows);
            let (mut a, mut b, mut c, mut d) = (st[0], st[1], st[2], st[3]);
            let (mut e, mut f, mut g, mut h) = (st[4], st[5], st[6], st[7]);
            let mut ptrs = [std::ptr::null::<u8>(); 8];
            for (p, lane) in ptrs.iter_mut().zip(lanes) {
                *p = lane.data.as_ptr();
            }
            for _ in 0..blocks {
                let lo = load_words(&ptrs, 0, bswap);
                let hi = load_words(&ptrs, 32, bswap);
                let mut w = [
                    lo[0], lo[1], lo[2], lo[3], lo[4], lo[5], lo[6], lo[7], hi[0], hi[1], hi[2],
                    hi[3], hi[4], hi[5], hi[6], hi[7],
                ];
                let (a0, b0, c0, d0, e0, f0, g0, h0) = (a, b, c, d, e, f, g, h);

                // One round: T1 = h + S1(e) + Ch(e, f, g) + K[t] + W[t]; d += T1;
                // h = T1 + S0(a) + Maj(a, b, c). The callers rotate the names.
                macro_rules! round {
                    ($a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident, $t:expr) => {{
                        let t: usize = $t;
                        if t >= 16 {
                            let w15 = w[(t + 1) & 15];
                            let w2 = w[(t + 14) & 15];
                            let s0 = _mm256_ternarylogic_epi32::<0x96>(
                                _mm256_ror_epi32::<7>(w15),
                                _mm256_ror_epi32::<18>(w15),
                                _mm256_srli_epi32::<3>(w15),
                            );
                            let s1 = _mm256_ternarylogic_epi32::<0x96>(
                                _mm256_ror_epi32::<17>(w2),
                                _mm256_ror_epi32::<19>(w2),
                                _mm256_srli_epi32::<10>(w2),
                            );
                            w[t & 15] = _mm256_add_epi32(
                                _mm256_add_epi32(w[t & 15], s0),
                                _mm256_add_epi32(w[(t + 9) & 15], s1),
                            );
                        }
                        let kw = _mm256_add_epi32(w[t & 15], _mm256_set1_epi32(K[t] as i32));
                        // h + K + W and d + h + K + W do not wait for this round's e: only
                        // two adds follow S1(e) and Ch(e, f, g) on the way to the new e.
                        let hk = _mm256_add_epi32($h, kw);
                        let dhk = _mm256_add_epi32($d, hk);
                        let s1 = _mm256_ternarylogic_epi32::<0x96>(
                            _mm256_ror_epi32::<6>($e),
                            _mm256_ror_epi32::<11>($e),
                            _mm256_ror_epi32::<25>($e),
                        );
                        let ch = _mm256_ternarylogic_epi32::<0xca>($e, $f, $g);
                        let sc = _mm256_add_epi32(s1, ch);
                        let t1 = _mm256_add_epi32(hk, sc);
                        let s0 = _mm256_ternarylogic_epi32::<0x96>(
                            _mm256_ror_epi32::<2>($a),
                            _mm256_ror_epi32::<13>($a),
                            _mm256_ror_epi32::<22>($a),
                        );
                        let maj = _mm256_ternarylogic_epi32::<0xe8>($a, $b, $c);
                        $d = _mm256_add_epi32(dhk, sc);
                        $h = _mm256_add_epi32(t1, _mm256_add_epi32(s0, maj));
                    }};
                }
                macro_rules! eight {
                    ($t:expr) => {
                        round!(a, b, c, d, e, f, g, h, $t);
                        round!(h, a, b, c, d, e, f, g, $t + 1);
                        round!(g, h, a, b, c, d, e, f, $t + 2);
                        round!(f, g, h, a, b, c, d, e, $t + 3);
                        round!(e, f, g, h, a, b, c, d, $t + 4);
                        round!(d, e, f, g, h, a, b, c, $t + 5);
                        round!(c, d, e, f, g, h, a, b, $t + 6);
                        round!(b, c, d, e, f, g, h, a, $t + 7);
                    };
                }
                eight!(0);
                eight!(8);
                eight!(16);
                eight!(24);
                eight!(32);
                eight!(40);
                eight!(48);
                eight!(56);
                a = _mm256_add_epi32(a, a0);
                b = _mm256_add_epi32(b, b0);
                c = _mm256_add_epi32(c, c0);
                d = _mm256_add_epi32(d, d0);
                e = _mm256_add_epi32(e, e0);
                f = _mm256_add_epi32(f, f0);
                g = _mm256_add_epi32(g, g0);
                h = _mm256_add_epi32(h, h0);
                for (p, lane) in ptrs.iter_mut().zip(lanes) {
                    *p = p.wrapping_add(lane.step);
                }
            }
            let out = transpose([a, b, c, d, e, f, g, h]);
            for (s, v) in states.iter_mut().zip(out) {
                _mm256_storeu_si256(s.as_mut_ptr() as *mut __m256i, v);
            }
        }
    }
}

/// The states `lanes` should end in after `blocks` compressions from `states`, by the `sha2`
/// crate's compression function: the reference the multi-message kernels are tested against.
/// An idle lane (step 0) compresses its first block `blocks` times.
#[cfg(test)]
pub(crate) fn reference_states(
    states: &[[u32; 8]],
    lanes: &[Lane<'_>],
    blocks: usize,
) -> Vec<[u32; 8]> {
    use sha2::digest::generic_array::GenericArray;
    states
        .iter()
        .zip(lanes)
        .map(|(s, lane)| {
            let mut s = *s;
            for b in 0..blocks {
                let block = &lane.data[lane.step * b..lane.step * b + 64];
                sha2::compress256(&mut s, &[GenericArray::clone_from_slice(block)]);
            }
            s
        })
        .collect()
}

/// `n` random messages of `blocks` blocks and a few bytes more, and `n` random states.
#[cfg(test)]
pub(crate) fn random_case(
    n: usize,
    blocks: usize,
    rng: &mut crate::num::SplitMix64,
) -> (Vec<Vec<u8>>, Vec<[u32; 8]>) {
    let data = (0..n)
        .map(|_| (0..blocks * 64 + 5).map(|_| rng.next_u64() as u8).collect())
        .collect();
    let states = (0..n)
        .map(|_| std::array::from_fn(|_| rng.next_u64() as u32))
        .collect();
    (data, states)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every lane, message or idle, ends in the state the `sha2` crate's compression function
    /// gives for the same blocks from the same starting state.
    #[test]
    fn eight_lanes_match_the_sha2_crate() {
        if !available() {
            eprintln!("skipped: no AVX-512 F and VL on this CPU");
            return;
        }
        let mut rng = crate::num::SplitMix64(7);
        for blocks in [1usize, 2, 5, 17] {
            let (data, states) = random_case(8, blocks, &mut rng);
            let mut states: [[u32; 8]; 8] = std::array::from_fn(|l| states[l]);
            // Lanes 2 and 5 idle: they compress their first block `blocks` times.
            let lanes: [Lane<'_>; 8] = std::array::from_fn(|l| Lane {
                data: &data[l],
                step: if l == 2 || l == 5 { 0 } else { 64 },
            });
            let expected = reference_states(&states, &lanes, blocks);
            compress8(&mut states, &lanes, blocks);
            assert_eq!(states.to_vec(), expected, "{blocks} blocks");
        }
    }
}
