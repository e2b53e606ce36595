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
    use crate::num::sha256x8::K;

    /// [`super::compress`] of `N` messages, their rounds interleaved four at a time (one
    /// `sha256rnds2` pair per message in turn). Each state is held as the two vectors the SHA
    /// extensions take, (A, B, E, F) and (C, D, G, H), high word first.
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
    use crate::num::sha256x8::{random_case, reference_states};

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
                let (data, mut states) = random_case(n, blocks, &mut rng);
                // Stream 1 idle when there are several: it compresses its first block again.
                let lanes: Vec<Lane<'_>> = (0..n)
                    .map(|l| Lane {
                        data: &data[l],
                        step: if n > 1 && l == 1 { 0 } else { 64 },
                    })
                    .collect();
                let expected = reference_states(&states, &lanes, blocks);
                compress(&mut states, &lanes, blocks);
                assert_eq!(states, expected, "{n} streams, {blocks} blocks");
            }
        }
    }
}
