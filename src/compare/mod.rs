//! Compare: numerical parity between two runs of a model, as data.
//!
//! [`compare`] measures the difference of two `[n, dim]` arrays (relative L2, the largest
//! difference and where it is, the largest difference in units of the reference's RMS);
//! [`compare_logits`] adds what matters for logits (top-1 agreement, with and without the
//! near-ties that a small logit error can explain, and KL). [`parity`] runs a packed file
//! against its source checkpoint and gives a verdict against the named [`Tolerances`].

pub mod parity;

use serde::Serialize;

/// The tolerances of the parity verdict (packed file vs its source in `qat` mode). Each number
/// is justified by measurements in docs/parity.md (correct files: fixtures and models made by
/// transformers, 20 seeds, 16/64/256 tokens, and a full-size 2B4T-shaped model; injected
/// defects); the comments give the gist.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerances {
    /// Each projection given the source's exact input: relative L2 of its output. Both paths
    /// quantize the identical input to the identical int8 values, so only the float path's
    /// summation order differs (measured at most ~1e-6); the smallest injected defect (a scale
    /// off by 20%, two swapped rows, unquantized activations) is above 1e-3.
    pub projection_rel_l2: f64,
    /// Each projection given the source's exact input: the largest single output difference in
    /// units of the output's RMS (catches a defect confined to a few rows of a wide layer).
    pub projection_max_over_rms: f64,
    /// The input a projection receives when the packed model runs a block half (attention or
    /// feed-forward) from the source's residual stream, vs the source's: float arithmetic only
    /// between quantization points, so rounding-level (measured at most ~1e-5); a wrong
    /// activation function, a missing norm or a broken attention gives errors near 1.
    pub input_rel_l2: f64,
    /// What a block half adds to the residual stream, given the source's residual stream. The
    /// last projection of each half (`o_proj`, `down_proj`) quantizes an input that differs
    /// from the source's by float rounding, so an activation that sits on a rounding boundary
    /// can round to the neighbouring quantization step in one path: the projection and input checks
    /// above are the tight ones; this one catches what lies between them (the residual adds).
    pub half_rel_l2: f64,
    /// The final norm and the head given the source's last hidden state (float arithmetic
    /// shared by both paths: zero unless the file stores the head at another precision).
    pub head_rel_l2: f64,
    /// End to end, a top-1 disagreement counts against the file only where the reference's
    /// margin between its top token and the packed model's choice exceeds this many RMS of
    /// the position's logit error: a diffuse error (propagated rounding) of that size cannot
    /// flip such a position, a defect concentrated on a few logits can.
    pub top1_margin_rms: f64,
}

/// The parity verdict's tolerances (see [`Tolerances`] and docs/parity.md).
pub const PACKED_VS_QAT: Tolerances = Tolerances {
    projection_rel_l2: 1e-4,
    projection_max_over_rms: 1e-3,
    input_rel_l2: 1e-3,
    half_rel_l2: 5e-2,
    head_rel_l2: 1e-5,
    top1_margin_rms: 10.0,
};

/// Logits of either path against HF transformers' logits on the golden tokens
/// (tests/run_goldens.rs): an end-to-end comparison of two independent implementations, where
/// a rounding-boundary flip propagates through every later block (measured worst: 2.0e-2 on
/// tiny-sharded, docs/parity.md); defects give 0.5 and more.
pub const GOLDEN_LOGITS: LogitsTolerance = LogitsTolerance {
    rel_l2: 5e-2,
    top1_agreement: 1.0,
    kl: 2e-2,
};

/// A plain end-to-end logits tolerance.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LogitsTolerance {
    pub rel_l2: f64,
    pub top1_agreement: f64,
    pub kl: f64,
}

/// Differences between two `[n, dim]` arrays.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// `||candidate - reference|| / ||reference||` over all positions.
    pub rel_l2: f64,
    pub max_abs_diff: f64,
    /// `max_abs_diff` divided by the RMS of the reference.
    pub max_over_rms: f64,
    /// Position (row) and index (column) of the largest absolute difference.
    pub worst_position: usize,
    pub worst_index: usize,
}

/// Logits differences: [`Stats`] plus agreement of the arg max and KL.
#[derive(Debug, Clone, Serialize)]
pub struct LogitsStats {
    #[serde(flatten)]
    pub stats: Stats,
    /// Fraction of positions whose arg max agrees.
    pub top1_agreement: f64,
    /// First position whose arg max differs, if any.
    pub first_top1_mismatch: Option<usize>,
    /// Positions whose arg max differs although the reference's margin between its top token
    /// and the candidate's exceeds `margin_rms` RMS of that position's logit error.
    pub top1_unexplained: Vec<usize>,
    /// The largest margin, in RMS of the position's logit error, among positions whose arg max
    /// differs (0 if none differs).
    pub worst_flip_margin_rms: f64,
    /// Mean over positions of KL(softmax(reference) || softmax(candidate)), in nats.
    pub kl: f64,
}

/// Index of the largest value (the first one on ties).
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

fn log_softmax(v: &[f32]) -> Vec<f64> {
    let m = v
        .iter()
        .fold(f64::NEG_INFINITY, |a, &x| a.max(f64::from(x)));
    let lse = m + v
        .iter()
        .map(|&x| (f64::from(x) - m).exp())
        .sum::<f64>()
        .ln();
    v.iter().map(|&x| f64::from(x) - lse).collect()
}

/// Compares `candidate` against `reference`, both `[n, dim]` row-major (equal lengths).
pub fn compare(reference: &[f32], candidate: &[f32], dim: usize) -> Stats {
    debug_assert_eq!(reference.len(), candidate.len());
    let dim = dim.max(1);
    let (mut max_abs, mut worst, mut diff2, mut ref2) = (0f64, 0usize, 0f64, 0f64);
    for (i, (&r, &c)) in reference.iter().zip(candidate).enumerate() {
        let d = (f64::from(c) - f64::from(r)).abs();
        // A NaN difference is the worst there is.
        if d > max_abs || (d.is_nan() && !max_abs.is_nan()) {
            max_abs = d;
            worst = i;
        }
        diff2 += d * d;
        ref2 += f64::from(r) * f64::from(r);
    }
    let count = reference.len().max(1) as f64;
    let rms = (ref2 / count).sqrt();
    Stats {
        rel_l2: (diff2 / ref2.max(f64::MIN_POSITIVE)).sqrt(),
        max_abs_diff: max_abs,
        max_over_rms: max_abs / rms.max(f64::MIN_POSITIVE),
        worst_position: worst / dim,
        worst_index: worst % dim,
    }
}

/// Compares two `[n, vocab]` logits arrays; `margin_rms` is the top-1 rule's threshold
/// ([`Tolerances::top1_margin_rms`]).
pub fn compare_logits(
    reference: &[f32],
    candidate: &[f32],
    vocab: usize,
    margin_rms: f64,
) -> LogitsStats {
    let stats = compare(reference, candidate, vocab);
    let vocab = vocab.max(1);
    let n = reference.len() / vocab;
    let (mut agree, mut first, mut unexplained, mut worst_margin, mut kl) =
        (0usize, None, Vec::new(), 0f64, 0f64);
    for (p, (r, c)) in reference
        .chunks_exact(vocab)
        .zip(candidate.chunks_exact(vocab))
        .enumerate()
    {
        let (tr, tc) = (argmax(r), argmax(c));
        if tr == tc {
            agree += 1;
        } else {
            first.get_or_insert(p);
            let margin = f64::from(r[tr]) - f64::from(r[tc]);
            let err_rms = (r
                .iter()
                .zip(c)
                .map(|(&a, &b)| (f64::from(b) - f64::from(a)).powi(2))
                .sum::<f64>()
                / vocab as f64)
                .sqrt();
            let in_rms = margin / err_rms.max(f64::MIN_POSITIVE);
            worst_margin = worst_margin.max(in_rms);
            if in_rms > margin_rms || in_rms.is_nan() {
                unexplained.push(p);
            }
        }
        let (lr, lc) = (log_softmax(r), log_softmax(c));
        kl += lr
            .iter()
            .zip(&lc)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
    }
    LogitsStats {
        stats,
        top1_agreement: agree as f64 / n.max(1) as f64,
        first_top1_mismatch: first,
        top1_unexplained: unexplained,
        worst_flip_margin_rms: worst_margin,
        kl: kl / n.max(1) as f64,
    }
}

impl LogitsStats {
    /// Whether these logits are within a plain end-to-end tolerance.
    pub fn within(&self, tol: &LogitsTolerance) -> bool {
        self.stats.rel_l2 <= tol.rel_l2
            && self.top1_agreement >= tol.top1_agreement
            && self.kl <= tol.kl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_inputs_give_zero_error() {
        let a = [1.0f32, 2.0, 3.0, 0.5, -1.0, 4.0];
        let s = compare_logits(&a, &a, 3, 10.0);
        assert_eq!(s.stats.max_abs_diff, 0.0);
        assert_eq!(s.stats.rel_l2, 0.0);
        assert_eq!(s.top1_agreement, 1.0);
        assert!(s.kl.abs() < 1e-12);
        assert!(s.within(&GOLDEN_LOGITS));
    }

    #[test]
    fn differences_are_located_and_top1_flips_counted() {
        let r = [1.0f32, 2.0, 3.0, 0.5, -1.0, 4.0];
        let c = [1.0f32, 2.0, 3.0, 0.5, 9.0, 4.0];
        let s = compare_logits(&r, &c, 3, 10.0);
        assert_eq!((s.stats.worst_position, s.stats.worst_index), (1, 1));
        assert_eq!(s.stats.max_abs_diff, 10.0);
        assert_eq!(s.top1_agreement, 0.5);
        assert_eq!(s.first_top1_mismatch, Some(1));
        assert!(s.kl > 0.1);
        assert!(!s.within(&GOLDEN_LOGITS));
    }

    /// A near-tie flipped by a diffuse error is explained; a wide margin overturned by an error
    /// on one logit is not.
    #[test]
    fn the_top1_rule_separates_near_ties_from_concentrated_errors() {
        let vocab = 1000;
        let mut r: Vec<f32> = (0..vocab).map(|i| (i % 7) as f32 * 0.1).collect();
        r[10] = 5.0;
        r[11] = 4.999;
        // Diffuse noise of RMS ~0.01 that swaps the near-tie.
        let mut c: Vec<f32> = r
            .iter()
            .enumerate()
            .map(|(i, v)| v + if i % 2 == 0 { 0.01 } else { -0.01 })
            .collect();
        c[10] = 4.99;
        c[11] = 5.0;
        let s = compare_logits(&r, &c, vocab, 10.0);
        assert_eq!(s.top1_agreement, 0.0);
        assert!(s.top1_unexplained.is_empty(), "{s:?}");
        // One logit pushed far up: margin 4.4 against an RMS error of ~0.16.
        let mut c = r.clone();
        c[3] = 6.0;
        let s = compare_logits(&r, &c, vocab, 10.0);
        assert_eq!(s.top1_unexplained, vec![0]);
        assert!(s.worst_flip_margin_rms > 20.0);
    }

    #[test]
    fn max_over_rms_is_in_units_of_the_reference() {
        let r = [3.0f32, -3.0, 3.0, -3.0];
        let c = [3.0f32, -3.0, 3.3, -3.0];
        let s = compare(&r, &c, 2);
        assert!((s.max_over_rms - 0.1).abs() < 1e-6);
        assert_eq!((s.worst_position, s.worst_index), (1, 0));
    }
}
