//! SHA-256 of up to four independent messages at once with the SHA extensions, their rounds
//! interleaved in one instruction stream.
//!
//! One message through the SHA extensions is bound by latency, not throughput: each
//! `sha256rnds2` (two rounds) waits about four cycles for the one before it, 32 of them per
//! block, while the unit could start one per cycle. Interleaving the rounds of independent
//! messages fills those cycles. [`super::digest::FilesHasher`] feeds this kernel with the
//! files of a checkpoint; it is tested against the `sha2` crate.

use super::sha256x8::Lane;

/// How many messages [`compress`] interleaves at most.
pub const MAX_STREAMS: usize = 4;

/// Whether this CPU runs [`compress`].
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("sha")
            && std::is_x86_feature_detected!("sse4.1")
            && std::is_x86_feature_detected!("ssse3")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `blocks` compressions on `states.len()` (1 to [`MAX_STREAMS`]) states at once: state
/// `l` compresses the blocks of `lanes[l]`, as [`super::sha256x8::compress8`] does.
///
/// # Panics
/// If the counts differ or exceed [`MAX_STREAMS`], if a lane's data is shorter than its blocks
/// (`step * (blocks - 1) + 64` bytes), if a step is not 0 or 64, or if [`available`] is false.
pub fn compress(states: &mut [[u32; 8]], lanes: &[Lane<'_>], blocks: usize) {
    assert!(
        states.len() == lanes.len() && (1..=MAX_STREAMS).contains(&lanes.len()),
        "one to four states, one lane each"
    );
    if blocks == 0 {
        return;
    }
    for lane in lanes {
        assert!(
            lane.step == 0 || lane.step == 64,
            "a lane moves 0 or 64 bytes per block"
        );
        assert!(
            lane.data.len() >= lane.step * (blocks - 1) + 64,
            "a lane holds fewer bytes than its blocks"
        );
    }
    assert!(available(), "sha256ni needs the SHA extensions");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the features were checked just above and every lane holds its blocks.
    unsafe {
        match lanes.len() {
            1 => x86::compress::<1>(states, lanes, blocks),
            2 => x86::compress::<2>(states, lanes, blocks),
            3 => x86::compress::<3>(states, lanes, blocks),
            _ => x86::compress::<4>(states, lanes, blocks),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Lane;

    /// The round constants of FIPS 180-4, four per vector.
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    /// `N` states, each as the two vectors the SHA extensions take: (A, B, E, F) and
    /// (C, D, G, H), high word first.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn compress<const N: usize>(
        states: &mut [[u32; 8]],
        lanes: &[Lane<'_>],
        blocks: usize,
    ) {
        unsafe {
            let bswap = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
            let mut abef = [_mm_setzero_si128(); N];
            let mut cdgh = [_mm_setzero_si128(); N];
            let mut ptrs = [std::ptr::null::<u8>(); N];
            for l in 0..N {
                // Little-endian loads: (D, C, B, A) and (H, G, F, E) from the lowest word up.
                let dcba = _mm_loadu_si128(states[l].as_ptr().cast());
                let hgfe = _mm_loadu_si128(states[l].as_ptr().add(4).cast());
                let cdab = _mm_shuffle_epi32::<0xB1>(dcba);
                let efgh = _mm_shuffle_epi32::<0x1B>(hgfe);
                abef[l] = _mm_alignr_epi8::<8>(cdab, efgh);
                cdgh[l] = _mm_blend_epi16::<0xF0>(efgh, cdab);
                ptrs[l] = lanes[l].data.as_ptr();
            }
            for _ in 0..blocks {
                let (abef0, cdgh0) = (abef, cdgh);
                // The message words of each stream, four per vector, in a ring of four.
                let mut w = [[_mm_setzero_si128(); 4]; N];
                for g in 0..16 {
                    let k = _mm_loadu_si128(K.as_ptr().add(4 * g).cast());
                    for l in 0..N {
                        let m = if g < 4 {
                            let v = _mm_loadu_si128(ptrs[l].add(16 * g).cast());
                            _mm_shuffle_epi8(v, bswap)
                        } else {
                            // W[4g..4g+4] from the four groups before it.
                            let s = _mm_sha256msg1_epu32(w[l][g % 4], w[l][(g + 1) % 4]);
                            let s = _mm_add_epi32(
                                s,
                                _mm_alignr_epi8::<4>(w[l][(g + 3) % 4], w[l][(g + 2) % 4]),
                            );
                            _mm_sha256msg2_epu32(s, w[l][(g + 3) % 4])
                        };
                        w[l][g % 4] = m;
                        let mk = _mm_add_epi32(m, k);
                        cdgh[l] = _mm_sha256rnds2_epu32(cdgh[l], abef[l], mk);
                        abef[l] =
                            _mm_sha256rnds2_epu32(abef[l], cdgh[l], _mm_shuffle_epi32::<0x0E>(mk));
                    }
                }
                for l in 0..N {
                    abef[l] = _mm_add_epi32(abef[l], abef0[l]);
                    cdgh[l] = _mm_add_epi32(cdgh[l], cdgh0[l]);
                    ptrs[l] = ptrs[l].wrapping_add(lanes[l].step);
                }
            }
            for l in 0..N {
                let feba = _mm_shuffle_epi32::<0x1B>(abef[l]);
                let dchg = _mm_shuffle_epi32::<0xB1>(cdgh[l]);
                let dcba = _mm_blend_epi16::<0xF0>(feba, dchg);
                let hgfe = _mm_alignr_epi8::<8>(dchg, feba);
                _mm_storeu_si128(states[l].as_mut_ptr().cast(), dcba);
                _mm_storeu_si128(states[l].as_mut_ptr().add(4).cast(), hgfe);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::digest::generic_array::GenericArray;

    fn reference(state: &mut [u32; 8], data: &[u8]) {
        let blocks: Vec<_> = data
            .chunks_exact(64)
            .map(GenericArray::clone_from_slice)
            .collect();
        sha2::compress256(state, &blocks);
    }

    /// Every stream count, with message and idle lanes, ends in the states the `sha2` crate's
    /// compression function gives for the same blocks from the same starting states.
    #[test]
    fn interleaved_streams_match_the_sha2_crate() {
        if !available() {
            eprintln!("skipped: no SHA extensions on this CPU");
            return;
        }
        let mut rng = crate::num::SplitMix64(11);
        for n in 1..=MAX_STREAMS {
            for blocks in [1usize, 2, 3, 17] {
                let data: Vec<Vec<u8>> = (0..n)
                    .map(|_| (0..blocks * 64 + 5).map(|_| rng.next_u64() as u8).collect())
                    .collect();
                let mut states: Vec<[u32; 8]> = (0..n)
                    .map(|_| std::array::from_fn(|_| rng.next_u64() as u32))
                    .collect();
                let lanes: Vec<Lane<'_>> = (0..n)
                    .map(|l| Lane {
                        data: &data[l],
                        step: if n > 1 && l == 1 { 0 } else { 64 },
                    })
                    .collect();
                let mut expected = states.clone();
                for (l, s) in expected.iter_mut().enumerate() {
                    if lanes[l].step == 0 {
                        for _ in 0..blocks {
                            reference(s, &data[l][..64]);
                        }
                    } else {
                        reference(s, &data[l][..blocks * 64]);
                    }
                }
                compress(&mut states, &lanes, blocks);
                assert_eq!(states, expected, "{n} streams, {blocks} blocks");
            }
        }
    }
}
