//! The parity verdict measured both ways: how often it fails a correct file (false failures)
//! and how often it passes a broken one (misses). Correct files: every model x seeds x token
//! lengths. Broken files: each kind of injected defect (tests/common/defects.rs), placed by
//! the seed, on every model it applies to, x seeds x lengths. Both rates must be 0.
//!
//! `cargo test --release --test parity_matrix -- --nocapture` prints the table recorded in
//! docs/parity.md. Environment variables widen the run (none are needed for CI):
//! - `BITNET_PACK_MATRIX_MODELS`: more model directories, `:`-separated (e.g. models made by
//!   `scripts/make_hf_models.py`);
//! - `BITNET_PACK_MATRIX_ONLY_EXTRA=1`: skip the committed fixtures;
//! - `BITNET_PACK_MATRIX_SEEDS` (default 20) and `BITNET_PACK_MATRIX_DEFECT_SEEDS` (default 5);
//! - `BITNET_PACK_MATRIX_LENGTHS` (default `16,64,256`).

mod common;

use std::path::{Path, PathBuf};

use bitnet_pack::compare::parity::{ParityReport, parity, random_tokens};
use bitnet_pack::compare::{PACKED_VS_QAT, Tolerances};
use bitnet_pack::format::BpkFile;
use bitnet_pack::run::SourceMode;
use bitnet_pack::source::Checkpoint;
use common::defects::{ALL_DEFECTS, Defect, inject};
use common::*;

/// Committed models: the fixtures made by our scripts and those saved by transformers itself.
const MODELS: [&str; 9] = [
    "tiny-2b4t-qat",
    "tiny-llama-fp",
    "tiny-awkward",
    "tiny-sharded",
    "tiny-hf-saved",
    "tiny-hf-llama",
    "tiny-ties",
    "tiny-hf-awkward",
    "tiny-outliers",
];

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn models() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = if std::env::var("BITNET_PACK_MATRIX_ONLY_EXTRA").is_ok() {
        Vec::new()
    } else {
        MODELS.iter().map(|m| fixture(m)).collect()
    };
    if let Ok(extra) = std::env::var("BITNET_PACK_MATRIX_MODELS") {
        out.extend(
            extra
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        );
    }
    out
}

fn lengths() -> Vec<usize> {
    std::env::var("BITNET_PACK_MATRIX_LENGTHS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![16, 64, 256])
}

/// The local checks, each as "measured / tolerance" (above 1 fails).
const CHECKS: [&str; 8] = [
    "declarations",
    "float tensors",
    "projection output",
    "projection input",
    "block halves",
    "embedding",
    "head",
    "top-1 margin",
];

fn ratios(r: &ParityReport, t: &Tolerances) -> [f64; 8] {
    let (mut out, mut input, mut half) = (0f64, 0f64, 0f64);
    for b in &r.blocks {
        for p in &b.projections {
            out = out
                .max(p.output.rel_l2 / t.projection_rel_l2)
                .max(p.output.max_over_rms / t.projection_max_over_rms);
            input = input.max(p.input.rel_l2 / t.input_rel_l2);
        }
        half = half.max(b.attention.rel_l2.max(b.ffn.rel_l2) / t.half_rel_l2);
    }
    let flag = |bad: bool| if bad { f64::INFINITY } else { 0.0 };
    let nan_inf = |v: f64| if v.is_nan() { f64::INFINITY } else { v };
    [
        flag(!r.declarations.is_empty()),
        flag(!r.floats.mismatches.is_empty()),
        nan_inf(out),
        nan_inf(input),
        nan_inf(half),
        if r.embedding.rel_l2 > 0.0 {
            f64::INFINITY
        } else {
            0.0
        },
        nan_inf(r.head.rel_l2 / t.head_rel_l2),
        nan_inf(r.logits.worst_flip_margin_rms / t.top1_margin_rms),
    ]
}

#[derive(Default)]
struct Tally {
    runs: usize,
    wrong: usize,
    /// Per check: worst ratio seen (correct files) or runs that flagged it (defects).
    per_check: [f64; 8],
    /// Correct files: the closest any run came to failing; defects: the weakest catch.
    extreme: Option<f64>,
    flips: u64,
    near: u64,
    top1_differ: usize,
    positions: usize,
}

fn run(ckpt: &Checkpoint, bpk: &Path, tokens: &[u32]) -> ParityReport {
    let file = BpkFile::open(bpk).unwrap();
    parity(ckpt, &file, tokens, SourceMode::Qat, true)
        .unwrap_or_else(|e| panic!("{}: parity could not run: {e}", bpk.display()))
}

/// The conversions every model goes through: BitNet b1.58, and the BitNet v2 schemes and
/// rotations where the model's widths have Hadamard matrices.
const VARIANTS: [(&str, &[&str]); 7] = [
    ("b1.58", &[]),
    ("a4", &["--activations", "a4"]),
    ("a8+H", &["--online-hadamard", "o_proj,down_proj"]),
    (
        "a4+H",
        &[
            "--activations",
            "a4",
            "--online-hadamard",
            "o_proj,down_proj",
        ],
    ),
    (
        "a4.8+H kv4",
        &[
            "--activations",
            "qkv=a4,o=a8,gate_up=a4,down=a8",
            "--online-hadamard",
            "o_proj,down_proj",
            "--kv-bits",
            "4",
        ],
    ),
    ("kv3 q4", &["--kv-bits", "3", "--q-bits", "4"]),
    (
        "rotated a4",
        &[
            "--rotate",
            "hadamard",
            "--seed",
            "7",
            "--force-requantize",
            "--activations",
            "a4",
        ],
    ),
];

/// Records one correct-file run.
fn record(tally: &mut Tally, r: &ParityReport, rs: &[f64; 8], len: usize) {
    tally.runs += 1;
    for (w, v) in tally.per_check.iter_mut().zip(rs) {
        *w = w.max(*v);
    }
    let worst = rs.iter().cloned().fold(0f64, f64::max);
    tally.extreme = Some(tally.extreme.map_or(worst, |e| e.max(worst)));
    for b in &r.blocks {
        for f in b.projections.iter().filter_map(|p| p.flips.as_ref()) {
            tally.flips += f.flipped;
            tally.near += f.near_boundary;
        }
    }
    tally.positions += len;
    tally.top1_differ += ((1.0 - r.logits.top1_agreement) * len as f64).round() as usize;
    tally.wrong += usize::from(!r.verdict.pass);
}

#[test]
fn parity_verdict_has_no_false_failures_and_no_misses() {
    let seeds = env_usize("BITNET_PACK_MATRIX_SEEDS", 20);
    let variant_seeds = env_usize("BITNET_PACK_MATRIX_VARIANT_SEEDS", 3);
    let defect_seeds = env_usize("BITNET_PACK_MATRIX_DEFECT_SEEDS", 5);
    let lengths = lengths();
    let tmp = tempfile::tempdir().unwrap();
    let t = PACKED_VS_QAT;
    let mut correct = Tally::default();
    let mut by_model = Vec::new();
    let mut by_defect: Vec<(Defect, Tally, usize)> = ALL_DEFECTS
        .iter()
        .map(|&d| (d, Tally::default(), 0))
        .collect();
    let mut problems = Vec::new();
    let mut skipped = Vec::new();
    for (m, dir) in models().iter().enumerate() {
        let ckpt = Checkpoint::open(dir).unwrap();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let vocab = ckpt.config.vocab_size;
        for (v, (variant, flags)) in VARIANTS.iter().enumerate() {
            let bpk = tmp.path().join(format!("{m}-{v}.bpk"));
            let mut args = vec![
                "convert",
                dir.to_str().unwrap(),
                "-o",
                bpk.to_str().unwrap(),
            ];
            args.extend_from_slice(&["--quiet", "--force"]);
            args.extend_from_slice(flags);
            let o = bin(&args);
            if code(&o) != 0 {
                // Only a width without a Hadamard matrix may stop a variant.
                assert!(
                    stderr(&o).contains("no Hadamard transform of size"),
                    "{name} {variant}: {}",
                    stderr(&o)
                );
                skipped.push(format!("{name} {variant}"));
                continue;
            }
            let n_seeds = if v == 0 { seeds } else { variant_seeds };
            let mut model_tally = Tally::default();
            for seed in 0..n_seeds as u64 {
                for &len in &lengths {
                    let tokens = random_tokens(len, vocab, seed);
                    let r = run(&ckpt, &bpk, &tokens);
                    let rs = ratios(&r, &t);
                    record(&mut correct, &r, &rs, len);
                    record(&mut model_tally, &r, &rs, len);
                    if !r.verdict.pass {
                        problems.push(format!(
                            "FALSE FAILURE {name} {variant} seed {seed} len {len}: {}",
                            r.verdict.diagnosis
                        ));
                    }
                }
            }
            by_model.push((format!("{name} {variant}"), model_tally));

            // Defects: every kind on the b1.58 file, and on one extended file each kind that
            // only exists there.
            let header = BpkFile::open(&bpk).unwrap().header;
            let extended = *variant == "a4.8+H kv4" || *variant == "a4+H";
            let bad = tmp.path().join(format!("{m}-{v}-bad.bpk"));
            for (defect, tally, unchanged) in by_defect.iter_mut() {
                let scheme_defect = matches!(defect, Defect::OnlineDropped | Defect::Int4AsInt8);
                let wanted = (v == 0 && !scheme_defect) || (extended && scheme_defect);
                if !wanted || !defect.applies_to(&header) {
                    continue;
                }
                for seed in 0..defect_seeds as u64 {
                    let injected = inject(&bpk, &bad, &ckpt, *defect, seed);
                    if !injected.changed {
                        // The file is byte-identical to the correct one: nothing to catch, and
                        // the verdict must pass it.
                        *unchanged += 1;
                        let r = run(&ckpt, &bad, &random_tokens(16, vocab, seed));
                        assert!(r.verdict.pass, "{name}: an unchanged file failed");
                        continue;
                    }
                    for &len in &lengths {
                        let r = run(&ckpt, &bad, &random_tokens(len, vocab, seed));
                        let rs = ratios(&r, &t);
                        tally.runs += 1;
                        for (c, v) in tally.per_check.iter_mut().zip(rs) {
                            *c += f64::from(u8::from(v > 1.0));
                        }
                        // The numeric checks alone (without the declarations and the exact
                        // float comparison): how far outside its tolerance the strongest was.
                        let strongest = rs[2..].iter().cloned().fold(0f64, f64::max);
                        tally.extreme = Some(tally.extreme.map_or(strongest, |e| e.min(strongest)));
                        if r.verdict.pass {
                            tally.wrong += 1;
                            problems.push(format!(
                                "MISS {name} {variant} {} ({}) seed {seed} len {len}",
                                defect.name(),
                                injected.site
                            ));
                        }
                    }
                }
            }
        }
    }

    println!(
        "\nparity matrix: {} models x {} conversions; {seeds} seeds (b1.58) or {variant_seeds} seeds (other conversions) x lengths {lengths:?} for correct files, {defect_seeds} seeds x the same lengths per defect\n",
        models().len(),
        VARIANTS.len()
    );
    if !skipped.is_empty() {
        println!(
            "not converted (a width without a Hadamard matrix): {}\n",
            skipped.join(", ")
        );
    }
    println!("correct files");
    println!(
        "| model and conversion | runs | false failures | closest to a tolerance | flips / near a boundary | top-1 differs (all explained) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, tl) in &by_model {
        println!(
            "| {name} | {} | {} | {:.3} | {} / {} | {} of {} |",
            tl.runs,
            tl.wrong,
            tl.extreme.unwrap_or(0.0),
            tl.flips,
            tl.near,
            tl.top1_differ,
            tl.positions
        );
    }
    println!(
        "| **all** | {} | {} ({:.1}%) | {:.3} | {} / {} | {} of {} |",
        correct.runs,
        correct.wrong,
        100.0 * correct.wrong as f64 / correct.runs.max(1) as f64,
        correct.extreme.unwrap_or(0.0),
        correct.flips,
        correct.near,
        correct.top1_differ,
        correct.positions
    );
    println!("\nworst measured / tolerance on correct files, per check");
    println!("| check | worst ratio |");
    println!("|---|---:|");
    for (c, v) in CHECKS.iter().zip(correct.per_check) {
        println!("| {c} | {v:.3e} |");
    }
    println!("\ninjected defects (each run must fail)");
    print!("| defect | runs | missed | weakest numeric catch (x tolerance) |");
    for c in CHECKS {
        print!(" {c} |");
    }
    println!();
    println!("|---|---:|---:|---:|{}", "---:|".repeat(CHECKS.len()));
    let (mut runs, mut missed) = (0, 0);
    for (d, tl, unchanged) in &by_defect {
        runs += tl.runs;
        missed += tl.wrong;
        print!(
            "| {}{} | {} | {} | {:.3e} |",
            d.name(),
            if *unchanged > 0 {
                format!(" ({unchanged} injections changed nothing)")
            } else {
                String::new()
            },
            tl.runs,
            tl.wrong,
            tl.extreme.unwrap_or(f64::NAN)
        );
        for v in tl.per_check {
            print!(" {v} |");
        }
        println!();
    }
    println!(
        "\nfalse-failure rate {}/{} = {:.1}%; miss rate {missed}/{runs} = {:.1}%",
        correct.wrong,
        correct.runs,
        100.0 * correct.wrong as f64 / correct.runs.max(1) as f64,
        100.0 * missed as f64 / runs.max(1) as f64
    );
    for p in &problems {
        println!("{p}");
    }
    // The committed fixtures include one where each defect changes the file (tiny-ties for
    // the rounding rule); a run on other models alone may have none.
    if std::env::var("BITNET_PACK_MATRIX_ONLY_EXTRA").is_err() {
        for (d, tl, _) in &by_defect {
            assert!(tl.runs > 0, "{} was never injected", d.name());
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems (listed above)",
        problems.len()
    );
}

/// On a failure, the report names the block and the projection where the defect is.
#[test]
fn the_diagnosis_names_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny-2b4t-qat", "tiny-hf-llama"] {
        let dir = fixture(name);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let good = tmp.path().join(format!("{name}.bpk"));
        let bad = tmp.path().join(format!("{name}-bad.bpk"));
        convert_ok(&dir, &good, &[]);
        for defect in [Defect::ScaleOff, Defect::SwapRows] {
            for seed in 0..6 {
                let injected = inject(&good, &bad, &ckpt, defect, seed);
                let (layer, role) = injected.projection.unwrap();
                let tokens = random_tokens(32, ckpt.config.vocab_size, seed);
                let r = run(&ckpt, &bad, &tokens);
                assert!(!r.verdict.pass);
                assert_eq!(
                    r.verdict.first_failing_block,
                    Some(layer),
                    "{}",
                    injected.site
                );
                assert_eq!(
                    r.verdict.culprit_projection,
                    Some(role),
                    "{}",
                    injected.site
                );
                assert!(
                    r.verdict.diagnosis.contains(role.as_str()),
                    "{}",
                    r.verdict.diagnosis
                );
            }
        }
    }
}

/// The command line: exit 1 on a broken file, with the diagnosis in the text and the JSON.
#[test]
fn the_parity_command_fails_a_broken_file_and_says_where() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("tiny-sharded");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let (good, bad) = (tmp.path().join("good.bpk"), tmp.path().join("bad.bpk"));
    convert_ok(&dir, &good, &[]);
    let injected = inject(&good, &bad, &ckpt, Defect::ScaleOff, 3);
    let (layer, role) = injected.projection.unwrap();
    let src = dir.to_str().unwrap();
    let o = bin(&[
        "parity",
        src,
        bad.to_str().unwrap(),
        "--random-tokens",
        "64",
    ]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let text = stdout(&o);
    println!("{} ({}):\n{text}", injected.site, Defect::ScaleOff.name());
    assert!(text.contains("verdict: FAIL"), "{text}");
    assert!(
        text.contains(&format!("first failing block: {layer}")) && text.contains(role.as_str()),
        "{text}"
    );
    let o = bin(&["parity", src, bad.to_str().unwrap(), "--json"]);
    assert_eq!(code(&o), 1);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["schema_version"], 2);
    assert_eq!(v["verdict"]["pass"], false);
    assert_eq!(v["verdict"]["first_failing_block"], layer);
    assert_eq!(v["verdict"]["culprit_projection"], role.as_str());
    // The same file passes nothing at conversion time either: --verify on the good one passes.
    let o = bin(&[
        "parity",
        src,
        good.to_str().unwrap(),
        "--random-tokens",
        "64",
    ]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
}
