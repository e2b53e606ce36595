//! Parity between a source checkpoint and a packed file: run both on the same tokens and
//! compare every block's output and the logits.

use serde::Serialize;

use super::{PACKED_VS_QAT, Stats, Tolerances, compare};
use crate::format::BpkFile;
use crate::run::{InputError, KvCache, RunError, SourceMode, packed, source};
use crate::source::{Checkpoint, SourceError, sha256_file};

/// Parity could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    #[error("the packed file was not made from this checkpoint: {reason}")]
    Mismatch { reason: String },
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// The outcome of a parity run.
#[derive(Debug, Clone, Serialize)]
pub struct ParityReport {
    /// What the packed model was compared against.
    pub against: SourceMode,
    pub tokens: Vec<u32>,
    /// Hidden state after each block: packed vs source.
    pub layers: Vec<Stats>,
    pub logits: Stats,
    /// The tolerances of the verdict (`None` for the informational `fp` comparison).
    pub tolerances: Option<Tolerances>,
    /// Layers whose hidden-state error exceeds the tolerance.
    pub failing_layers: Vec<usize>,
    pub pass: bool,
}

/// Checks that `file` was converted from `ckpt`: same model config, same tensor shapes and
/// (unless `check_provenance` is false) the same source file checksums.
pub fn check_pair(
    ckpt: &Checkpoint,
    file: &BpkFile,
    check_provenance: bool,
) -> Result<(), ParityError> {
    let (a, b) = (&ckpt.config, &file.header.model);
    if a != b {
        let (ja, jb) = (
            serde_json::to_value(a).unwrap_or_default(),
            serde_json::to_value(b).unwrap_or_default(),
        );
        let field = ja
            .as_object()
            .and_then(|o| {
                o.iter()
                    .find(|(k, v)| jb.get(k.as_str()) != Some(v))
                    .map(|(k, v)| format!("{k}: source {v}, packed {}", jb[k.as_str()]))
            })
            .unwrap_or_else(|| "a field differs".into());
        return Err(ParityError::Mismatch {
            reason: format!("model configs differ ({field})"),
        });
    }
    for t in &ckpt.tensors {
        let shape: Vec<u64> = t.spec.shape.iter().map(|&d| d as u64).collect();
        match file.tensor(&t.spec.name) {
            Some(e) if e.shape == shape => {}
            Some(e) => {
                return Err(ParityError::Mismatch {
                    reason: format!(
                        "`{}` is {:?} in the source, {:?} packed",
                        t.spec.name, shape, e.shape
                    ),
                });
            }
            None => {
                return Err(ParityError::Mismatch {
                    reason: format!("`{}` is not in the packed file", t.spec.name),
                });
            }
        }
    }
    if check_provenance {
        for f in &file.header.provenance.source_files {
            let path = ckpt.dir.join(&f.name);
            let actual = if path.exists() {
                Some(sha256_file(&path)?)
            } else {
                None
            };
            if actual.as_deref() != Some(f.sha256.as_str()) {
                return Err(ParityError::Mismatch {
                    reason: format!(
                        "{} {} (recorded sha256 {}); if the weights are the same but the files were rewritten, pass --no-provenance-check",
                        path.display(),
                        if actual.is_some() {
                            "has a different checksum"
                        } else {
                            "is missing"
                        },
                        f.sha256
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Runs the packed model and the source model (in `against` mode) on `tokens` and compares them.
pub fn parity(
    ckpt: &Checkpoint,
    file: &BpkFile,
    tokens: &[u32],
    against: SourceMode,
    check_provenance: bool,
) -> Result<ParityReport, ParityError> {
    check_pair(ckpt, file, check_provenance)?;
    let packed_model = packed::load(file)?;
    let source_model = source::load(ckpt, against)?;
    let cfg = &ckpt.config;
    let p = packed_model.forward(tokens, &mut KvCache::new(cfg), true)?;
    let s = source_model.forward(tokens, &mut KvCache::new(cfg), true)?;
    let layers: Vec<Stats> = s
        .hidden
        .iter()
        .zip(&p.hidden)
        .map(|(sh, ph)| compare(sh, ph, cfg.hidden_size, false))
        .collect();
    let logits = compare(&s.logits, &p.logits, cfg.vocab_size, true);
    let tolerances = (against == SourceMode::Qat).then_some(PACKED_VS_QAT);
    let failing_layers: Vec<usize> = match &tolerances {
        Some(t) => layers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.rel_l2 > t.hidden_rel_l2)
            .map(|(i, _)| i)
            .collect(),
        None => Vec::new(),
    };
    let pass = match &tolerances {
        Some(t) => failing_layers.is_empty() && logits.logits_pass(t),
        None => true,
    };
    Ok(ParityReport {
        against,
        tokens: tokens.to_vec(),
        layers,
        logits,
        tolerances,
        failing_layers,
        pass,
    })
}

/// `n` pseudo-random token ids below `vocab`, reproducible from `seed` (SplitMix64).
pub fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % vocab as u64) as u32
        })
        .collect()
}
