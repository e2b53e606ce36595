//! `bitnet-pack parity`: compare a packed file with its source checkpoint.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{Context, bail};

use super::{EXIT_CHECK_FAILED, ModeArg, ParityArgs, print, with_threads};
use crate::compare::parity::{ParityReport, parity, random_tokens};
use crate::format::BpkFile;
use crate::run::SourceMode;
use crate::source::Checkpoint;

/// Default length of the random token sequence when no input is given.
pub const DEFAULT_RANDOM_TOKENS: usize = 16;

pub fn run(a: ParityArgs) -> anyhow::Result<ExitCode> {
    with_threads(a.threads, || execute(&a))?
}

fn execute(a: &ParityArgs) -> anyhow::Result<ExitCode> {
    let ckpt = Checkpoint::open(&a.source)
        .with_context(|| format!("could not open {}", a.source.display()))?;
    let file = BpkFile::open(&a.packed)
        .with_context(|| format!("could not read {}", a.packed.display()))?;
    let tokens = match (&a.tokens, &a.text, a.random_tokens) {
        (Some(t), None, None) => t.clone(),
        (None, Some(text), None) => {
            let path = ckpt.dir.join("tokenizer.json");
            let tok = tokenizers::Tokenizer::from_file(&path)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("--text needs {}", path.display()))?;
            tok.encode(text.as_str(), true)
                .map_err(|e| anyhow::anyhow!("could not tokenize: {e}"))?
                .get_ids()
                .to_vec()
        }
        (None, None, n) => random_tokens(
            n.unwrap_or(DEFAULT_RANDOM_TOKENS),
            ckpt.config.vocab_size,
            a.seed,
        ),
        _ => bail!("give at most one of --tokens, --text, --random-tokens"),
    };
    let against = match a.against {
        ModeArg::Qat => SourceMode::Qat,
        ModeArg::Fp => SourceMode::Fp,
    };
    let report =
        parity(&ckpt, &file, &tokens, against, !a.no_provenance_check).with_context(|| {
            format!(
                "could not compare {} with {}",
                a.packed.display(),
                a.source.display()
            )
        })?;
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["schema_version"] = 1.into();
        print(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
    } else {
        print(&human(&report))?;
    }
    Ok(if report.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CHECK_FAILED)
    })
}

fn human(r: &ParityReport) -> String {
    let mut s = String::new();
    let against = match r.against {
        SourceMode::Qat => "source in qat mode (the training forward)",
        SourceMode::Fp => "source in full precision (quantization loss, informational)",
    };
    let _ = writeln!(s, "packed vs {against}, {} tokens", r.tokens.len());
    let _ = writeln!(
        s,
        "{:<8} {:>12} {:>12} {:>10}",
        "block", "rel L2", "max |diff|", "at pos:idx"
    );
    for (i, l) in r.layers.iter().enumerate() {
        let flag = if r.failing_layers.contains(&i) {
            "  FAIL"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "{i:<8} {:>12.3e} {:>12.3e} {:>10}{flag}",
            l.rel_l2,
            l.max_abs_diff,
            format!("{}:{}", l.worst_position, l.worst_index)
        );
    }
    let l = &r.logits;
    let _ = writeln!(
        s,
        "logits   {:>12.3e} {:>12.3e} {:>10}  top-1 agreement {:.1}%  KL {:.3e}",
        l.rel_l2,
        l.max_abs_diff,
        format!("{}:{}", l.worst_position, l.worst_index),
        100.0 * l.top1_agreement,
        l.kl.unwrap_or(0.0)
    );
    match &r.tolerances {
        Some(t) => {
            let _ = writeln!(
                s,
                "verdict: {} (tolerances: logits rel L2 <= {:e}, block rel L2 <= {:e}, top-1 >= {:.0}%, KL <= {:e})",
                if r.pass { "PASS" } else { "FAIL" },
                t.logits_rel_l2,
                t.hidden_rel_l2,
                100.0 * t.top1_agreement,
                t.kl
            );
        }
        None => {
            let _ = writeln!(
                s,
                "(informational: this is the cost of quantization, not a defect)"
            );
        }
    }
    s
}
