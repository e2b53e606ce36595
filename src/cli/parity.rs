//! `bitnet-pack parity`: compare a packed file with its source checkpoint.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{Context, bail};

use super::{
    EXIT_CHECK_FAILED, ModeArg, ParityArgs, check_token_count, load_tokenizer, print, say,
    with_threads,
};
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
    for note in &ckpt.notes {
        say(&format!("note: {note}"));
    }
    let file = BpkFile::open(&a.packed)
        .with_context(|| format!("could not read {}", a.packed.display()))?;
    let tokens = match (&a.tokens, &a.text, a.random_tokens) {
        (Some(t), None, None) => t.clone(),
        (None, Some(text), None) => {
            let path = ckpt.dir.join("tokenizer.json");
            let tok = load_tokenizer(&path).context("--text needs the source's tokenizer")?;
            tok.encode(text.as_str(), true)
                .map_err(|e| anyhow::anyhow!("could not tokenize: {e}"))?
                .get_ids()
                .to_vec()
        }
        (None, None, n) => {
            let n = n.unwrap_or(DEFAULT_RANDOM_TOKENS);
            check_token_count("--random-tokens", n, ckpt.config.max_position_embeddings)?;
            random_tokens(n, ckpt.config.vocab_size, a.seed.unwrap_or(0))
        }
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
        print(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    } else {
        print(&human(&report))?;
    }
    Ok(if report.verdict.pass {
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
    if r.declarations.is_empty() {
        let _ = writeln!(
            s,
            "declarations: config, quantization scheme and tensors as the source implies"
        );
    } else {
        let _ = writeln!(
            s,
            "declarations: {} difference(s) from the source",
            r.declarations.len()
        );
        for d in &r.declarations {
            let _ = writeln!(s, "  {d}");
        }
    }
    let _ = writeln!(
        s,
        "float tensors: {} compared, {}{}",
        r.floats.tensors,
        if r.floats.mismatches.is_empty() {
            "all equal to the source at their stored precision".to_string()
        } else {
            format!("{} differ", r.floats.mismatches.len())
        },
        if r.floats.narrowing > 0.0 {
            format!(
                " (some stored in a narrower type than the source's, unit roundoff {:.1e}: the local checks use them, the end-to-end figures include their cost)",
                r.floats.narrowing
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        "\nlocal checks: each piece runs on the source's exact input (rel L2)      end to end"
    );
    let _ = writeln!(
        s,
        "{:<6} {:<22} {:<22} {:>10} {:>10} {:>15}   {:>10}",
        "block",
        "worst projection out",
        "worst projection in",
        "attention",
        "ffn",
        "flips/near",
        "hidden"
    );
    for b in &r.blocks {
        let worst = |f: &dyn Fn(&crate::compare::parity::ProjectionReport) -> f64| {
            b.projections
                .iter()
                .max_by(|x, y| f(x).total_cmp(&f(y)))
                .map(|p| format!("{:<9} {:>10.3e}", p.role.as_str(), f(p)))
                .unwrap_or_default()
        };
        let (flipped, near) = b
            .projections
            .iter()
            .filter_map(|p| p.flips.as_ref())
            .fold((0, 0), |(f, n), x| (f + x.flipped, n + x.near_boundary));
        let _ = writeln!(
            s,
            "{:<6} {:<22} {:<22} {:>10.3e} {:>10.3e} {:>15}   {:>10.3e}{}",
            b.layer,
            worst(&|p| p.output.rel_l2),
            worst(&|p| p.input.rel_l2),
            b.attention.rel_l2,
            b.ffn.rel_l2,
            format!("{flipped}/{near}"),
            b.end_to_end.rel_l2,
            if b.failures.is_empty() { "" } else { "  FAIL" }
        );
    }
    let _ = writeln!(
        s,
        "embedding {:.3e}; head on the source's last hidden state {:.3e}",
        r.embedding.rel_l2, r.head.rel_l2
    );
    let l = &r.logits;
    let differ = ((1.0 - l.top1_agreement) * r.tokens.len() as f64).round() as usize;
    let _ = writeln!(
        s,
        "logits, end to end: rel L2 {:.3e}, max |diff| {:.3e} at {}:{}, KL {:.3e}, top-1 agreement {:.1}%{}",
        l.stats.rel_l2,
        l.stats.max_abs_diff,
        l.stats.worst_position,
        l.stats.worst_index,
        l.kl,
        100.0 * l.top1_agreement,
        if differ == 0 {
            String::new()
        } else {
            format!(
                " ({differ} differ; {} beyond what the logit error explains; largest margin {:.2} x RMS error)",
                l.top1_unexplained.len(),
                l.worst_flip_margin_rms
            )
        }
    );
    if let Some(c) = &r.float_cost {
        let _ = writeln!(
            s,
            "cost of the file's narrower float tensors (the source model with them vs with its own; largest unit roundoff {:.1e}): logits rel L2 {:.3e}, KL {:.3e}, top-1 agreement {:.1}%",
            r.floats.narrowing,
            c.stats.rel_l2,
            c.kl,
            100.0 * c.top1_agreement
        );
    }
    let _ = writeln!(
        s,
        "(flips/near: activations that rounded to a neighbouring quantization step in the two paths / that sat within float rounding of a rounding boundary)"
    );
    match &r.tolerances {
        Some(t) => {
            let v = &r.verdict;
            let _ = writeln!(
                s,
                "\nverdict: {} (tolerances: projection out rel L2 <= {:.0e} and max <= {:.0e} x RMS, projection in <= {:.1e}, halves <= {:.1e}, head <= {:.1e}, top-1 flips only within {} x RMS logit error)",
                if v.pass { "PASS" } else { "FAIL" },
                t.projection_rel_l2,
                t.projection_max_over_rms,
                t.input_rel_l2,
                t.half_rel_l2,
                t.head_rel_l2,
                t.top1_margin_rms
            );
            if !v.pass {
                let _ = writeln!(s, "diagnosis: {}", v.diagnosis);
                for f in v.failures.iter().take(12) {
                    let _ = writeln!(s, "  {f}");
                }
                if v.failures.len() > 12 {
                    let _ = writeln!(
                        s,
                        "  ... and {} more (--json lists all)",
                        v.failures.len() - 12
                    );
                }
            }
        }
        None => {
            let _ = writeln!(
                s,
                "\n(informational: this is the cost of quantization, not a defect)"
            );
        }
    }
    s
}
