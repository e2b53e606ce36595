//! The runner against an independent implementation: logits of HF transformers (float32,
//! BitNet online quantization = the training forward) committed by fixtures/make_hf_goldens.py.
//! Both the packed integer path and the source qat path must match; the fp path must not.

mod common;

use bitnet_pack::compare::{GOLDEN_LOGITS, compare_logits};
use bitnet_pack::format::BpkFile;
use bitnet_pack::format::header::QuantScheme;
use bitnet_pack::run::{KvCache, SourceMode, packed, source};
use bitnet_pack::source::Checkpoint;
use common::*;

const ALL: [&str; 9] = [
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

struct Golden {
    tokens: Vec<u32>,
    logits: Vec<f32>,
}

fn golden(name: &str, mode: &str) -> Golden {
    let (tokens, logits) =
        read_logits_json(&fixture(name).join(format!("golden_logits_hf_{mode}.json")));
    Golden { tokens, logits }
}

#[test]
fn packed_and_qat_paths_match_transformers_and_fp_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ALL {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        let vocab = ckpt.config.vocab_size;
        let (qat, fp) = (golden(name, "qat"), golden(name, "fp"));
        for layout in ["i2", "i8"] {
            let bpk = tmp.path().join(format!("{name}-{layout}.bpk"));
            convert_ok(&fixture(name), &bpk, &["--layout", layout]);
            let file = BpkFile::open(&bpk).unwrap();
            let model = packed::load(&file).unwrap();
            let out = model
                .forward(&qat.tokens, &mut KvCache::for_model(&model), false)
                .unwrap();
            let s = compare_logits(&qat.logits, &out.logits, vocab, 10.0);
            println!(
                "{name} {layout}: packed vs qat golden rel L2 {:.1e}, top-1 {}/{}, KL {:.1e}",
                s.stats.rel_l2,
                (s.top1_agreement * qat.tokens.len() as f64).round(),
                qat.tokens.len(),
                s.kl
            );
            assert!(
                s.within(&GOLDEN_LOGITS),
                "{name} {layout} packed vs transformers: {s:?}"
            );
        }
        let run = |mode, tokens: &[u32]| {
            let m = source::load(&ckpt, mode, &QuantScheme::bitnet_b158()).unwrap();
            m.forward(tokens, &mut KvCache::for_model(&m), false)
                .unwrap()
                .logits
        };
        let s = compare_logits(&qat.logits, &run(SourceMode::Qat, &qat.tokens), vocab, 10.0);
        println!(
            "{name}: qat source vs qat golden rel L2 {:.1e}",
            s.stats.rel_l2
        );
        assert!(
            s.within(&GOLDEN_LOGITS),
            "{name} source qat vs transformers: {s:?}"
        );
        let s = compare_logits(&fp.logits, &run(SourceMode::Fp, &fp.tokens), vocab, 10.0);
        println!(
            "{name}: fp source vs fp golden rel L2 {:.1e}",
            s.stats.rel_l2
        );
        assert!(
            s.within(&GOLDEN_LOGITS),
            "{name} source fp vs transformers fp: {s:?}"
        );
        // The check can fail: without quantization the logits are far from the qat golden.
        let s = compare_logits(&qat.logits, &run(SourceMode::Fp, &qat.tokens), vocab, 10.0);
        assert!(
            !s.within(&GOLDEN_LOGITS) && s.stats.rel_l2 > 0.5,
            "{name}: fp unexpectedly matches qat: {s:?}"
        );
    }
}

/// Decoding one token at a time through the KV cache gives the same logits as one prefill.
#[test]
fn incremental_decoding_equals_prefill() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = tmp.path().join("m.bpk");
    convert_ok(&fixture("tiny-2b4t-qat"), &bpk, &[]);
    let file = BpkFile::open(&bpk).unwrap();
    let model = packed::load(&file).unwrap();
    let tokens = golden("tiny-2b4t-qat", "qat").tokens;
    let full = model
        .forward(&tokens, &mut KvCache::for_model(&model), false)
        .unwrap()
        .logits;
    let mut cache = KvCache::for_model(&model);
    let mut step = Vec::new();
    for t in &tokens {
        step.extend(model.forward(&[*t], &mut cache, false).unwrap().logits);
    }
    let s = compare_logits(&full, &step, model.config.vocab_size, 10.0);
    assert!(s.stats.rel_l2 < 1e-5 && s.top1_agreement == 1.0, "{s:?}");
    // The head for the last position only (generation, bench) is that position's row of the
    // full head, bit for bit, in prefill and in a decode step.
    let vocab = model.config.vocab_size;
    let mut cache = KvCache::for_model(&model);
    let last = model.forward_last(&tokens, &mut cache).unwrap();
    assert_eq!(last, full[full.len() - vocab..]);
    let mut c1 = KvCache::for_model(&model);
    let mut c2 = KvCache::for_model(&model);
    model.forward(&tokens[..3], &mut c1, false).unwrap();
    model.forward(&tokens[..3], &mut c2, false).unwrap();
    let one = model.forward(&tokens[3..5], &mut c1, false).unwrap().logits;
    assert_eq!(
        model.forward_last(&tokens[3..5], &mut c2).unwrap(),
        one[vocab..]
    );
}

/// `bench` runs the packed model and reports what the issue asks for, as text and JSON; bad
/// counts are refused with exit 2.
#[test]
fn bench_reports_prefill_and_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = tmp.path().join("m.bpk");
    convert_ok(&fixture("tiny-2b4t-qat"), &bpk, &[]);
    let p = bpk.to_str().unwrap();
    // A successful `bench --json` run with `extra` arguments: its report.
    let report = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "bench",
            p,
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
            "--json",
            "--no-memcpy",
        ];
        args.extend_from_slice(extra);
        let o = bin(&args);
        assert_eq!(code(&o), 0, "{extra:?}: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let v = report(&[]);
    for key in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "threads",
        "prompt_tokens",
        "gen_tokens",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    assert_eq!(v["decode_ms"].as_array().unwrap().len(), 4);
    // Read into memory by default; `--mmap` runs from the mapping.
    assert_eq!(v["storage"], "memory", "{v}");
    let v = report(&["--mmap"]);
    assert_eq!(v["storage"], "mapped", "{v}");
    let o = bin(&["bench", p, "--gen-tokens", "0"]);
    assert_eq!(code(&o), 2);
    let o = bin(&["bench", p, "--prompt-tokens", "1000", "--no-memcpy"]);
    assert_eq!(code(&o), 2, "beyond the context: {}", stderr(&o));
}

#[test]
fn greedy_generation_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture("tiny-hf-saved").join("golden_generate_hf.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<u64> = v["generated_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    let prompt = v["prompt"].as_str().unwrap();
    let n = want.len().to_string();
    let bpk = tmp.path().join("m.bpk");
    convert_ok(&fixture("tiny-hf-saved"), &bpk, &[]);
    // The t5 layout gives the same logits, through its own decoding kernels.
    let t5 = tmp.path().join("m-t5.bpk");
    convert_ok(&fixture("tiny-hf-saved"), &t5, &["--layout", "t5"]);
    let tokenizer = fixture("tiny-hf-saved").join("tokenizer.json");
    for model in [
        bpk.to_str().unwrap(),
        t5.to_str().unwrap(),
        fixture("tiny-hf-saved").to_str().unwrap(),
    ] {
        let o = bin(&[
            "run",
            model,
            "--prompt",
            prompt,
            "--max-new-tokens",
            &n,
            "--tokenizer",
            tokenizer.to_str().unwrap(),
        ]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let line = stderr(&o)
            .lines()
            .find(|l| l.contains("generated tokens"))
            .unwrap()
            .to_string();
        let got: Vec<u64> = line
            .rsplit('[')
            .next()
            .unwrap()
            .trim_end_matches(']')
            .split(", ")
            .map(|t| t.parse().unwrap())
            .collect();
        assert_eq!(got, want, "{model}");
    }
}

#[test]
fn parity_command_passes_on_every_fixture_and_reports_fp_loss() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ALL {
        let bpk = tmp.path().join(format!("{name}.bpk"));
        convert_ok(&fixture(name), &bpk, &[]);
        let (src, p) = (fixture(name), bpk.to_str().unwrap().to_string());
        let o = bin(&["parity", src.to_str().unwrap(), &p, "--json"]);
        assert_eq!(code(&o), 0, "{name}: {}", stdout(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(v["verdict"]["pass"], true);
        assert_eq!(v["schema_version"], 2);
        assert_eq!(
            v["blocks"].as_array().unwrap().len(),
            Checkpoint::open(&src).unwrap().config.num_layers
        );
        let o = bin(&["parity", src.to_str().unwrap(), &p, "--against", "fp"]);
        assert_eq!(code(&o), 0, "{name}: {}", stdout(&o));
        assert!(stdout(&o).contains("informational"));
    }
}

#[test]
fn convert_verify_runs_parity() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = tmp.path().join("m.bpk");
    convert_ok(&fixture("tiny-awkward"), &bpk, &["--verify"]);
    assert_eq!(code(&bin(&["validate", bpk.to_str().unwrap()])), 0);
}

#[test]
fn run_rejects_bad_input_with_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = tmp.path().join("m.bpk");
    convert_ok(&fixture("tiny-awkward"), &bpk, &[]);
    let p = bpk.to_str().unwrap();
    // vocab_size is 301; max_position_embeddings is 256.
    let o = bin(&["run", p, "--tokens", "1,301"]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("301") && stderr(&o).contains("vocab"),
        "{}",
        stderr(&o)
    );
    let long: Vec<String> = (0..257).map(|i| (i % 300).to_string()).collect();
    let o = bin(&["run", p, "--tokens", &long.join(",")]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("max_position_embeddings"),
        "{}",
        stderr(&o)
    );
    let o = bin(&["run", p, "--tokens", "1,2", "--mode", "fp"]);
    assert_eq!(code(&o), 2);
    // A packed file from another checkpoint is not its pair.
    let other = tmp.path().join("other.bpk");
    convert_ok(&fixture("tiny-llama-fp"), &other, &[]);
    let o = bin(&[
        "parity",
        fixture("tiny-awkward").to_str().unwrap(),
        other.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("not made from this checkpoint"),
        "{}",
        stderr(&o)
    );
    // Same model, rewritten weights: provenance catches it unless told otherwise.
    let copy = copy_fixture("tiny-awkward");
    edit_tensors(copy.path(), |_| {});
    let o = bin(&["parity", copy.path().to_str().unwrap(), p]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("--no-provenance-check"));
    assert_eq!(
        code(&bin(&[
            "parity",
            copy.path().to_str().unwrap(),
            p,
            "--no-provenance-check"
        ])),
        0
    );
}

#[test]
fn unsupported_activation_scheme_is_refused() {
    use bitnet_pack::format::header::RotationSite;
    let tmp = tempfile::tempdir().unwrap();
    let bpk = tmp.path().join("m.bpk");
    convert_ok(&fixture("tiny-awkward"), &bpk, &[]);
    let mut file = BpkFile::open(&bpk).unwrap();
    file.header
        .quantization
        .online_rotations
        .push(RotationSite {
            role: bitnet_pack::model::Role::DownProj,
            layer: None,
            transform: "hadamard".into(),
            dim: 135,
        });
    assert!(matches!(
        packed::load(&file),
        Err(bitnet_pack::run::RunError::UnsupportedScheme { .. })
    ));
    let mut file = BpkFile::open(&bpk).unwrap();
    file.header.quantization.activations.bits = 4;
    assert!(matches!(
        packed::load(&file),
        Err(bitnet_pack::run::RunError::UnsupportedScheme { .. })
    ));
}

/// The BitNet v2 schemes (int4 activations, online Hadamard transforms with the stored matrices
/// of order 52 and 108, a4.8's per-site mix, quantized keys and values) against an independent
/// numpy forward written from formats/bpk.md (fixtures/make_numpy_goldens.py).
#[test]
fn v2_schemes_match_the_independent_numpy_forward() {
    let cases: [(&str, &str, &[&str]); 8] = [
        ("tiny-hf-awkward", "a4", &["--activations", "a4"]),
        (
            "tiny-hf-awkward",
            "a8h",
            &["--online-hadamard", "o_proj,down_proj"],
        ),
        (
            "tiny-hf-awkward",
            "a4h",
            &[
                "--activations",
                "a4",
                "--online-hadamard",
                "o_proj,down_proj",
            ],
        ),
        (
            "tiny-hf-awkward",
            "a48",
            &[
                "--activations",
                "qkv=a4,o=a8,gate_up=a4,down=a8",
                "--online-hadamard",
                "o_proj,down_proj",
            ],
        ),
        ("tiny-sharded", "a4", &["--activations", "a4"]),
        (
            "tiny-sharded",
            "a8h",
            &["--online-hadamard", "o_proj,down_proj"],
        ),
        (
            "tiny-sharded",
            "a4h_kv4",
            &[
                "--activations",
                "a4",
                "--online-hadamard",
                "o_proj,down_proj",
                "--kv-bits",
                "4",
            ],
        ),
        ("tiny-sharded", "a8_kv3", &["--kv-bits", "3"]),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (name, scheme, flags) in cases {
        let bpk = tmp.path().join(format!("{name}-{scheme}.bpk"));
        convert_ok(&fixture(name), &bpk, flags);
        let g: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture(name).join(format!("golden_logits_numpy_{scheme}.json")))
                .unwrap(),
        )
        .unwrap();
        let tokens: Vec<u32> = g["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let want: Vec<f32> = g["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
            })
            .collect();
        let file = BpkFile::open(&bpk).unwrap();
        let model = packed::load(&file).unwrap();
        let out = model
            .forward(&tokens, &mut KvCache::for_model(&model), false)
            .unwrap();
        let s = compare_logits(&want, &out.logits, model.config.vocab_size, 10.0);
        println!(
            "{name} {scheme}: packed vs numpy rel L2 {:.1e}, top-1 {:.0}%, KL {:.1e}",
            s.stats.rel_l2,
            100.0 * s.top1_agreement,
            s.kl
        );
        assert!(s.within(&GOLDEN_LOGITS), "{name} {scheme}: {s:?}");
    }
}

/// `rotate` writes a checkpoint that computes the same function in full precision: its f32
/// logits equal transformers' logits of the original (an independent golden) to 1e-4.
#[test]
fn rotated_checkpoints_compute_the_original_function() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, seed) in [
        ("tiny-hf-llama", "3"),
        ("tiny-outliers", "11"),
        ("tiny-sharded", "5"),
    ] {
        let out = tmp.path().join(name);
        let o = bin(&[
            "rotate",
            fixture(name).to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--seed",
            seed,
        ]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let fp = golden(name, "fp");
        let ckpt = Checkpoint::open(&out).unwrap();
        assert!(!ckpt.config.tie_word_embeddings);
        let m = source::load(&ckpt, SourceMode::Fp, &QuantScheme::bitnet_b158()).unwrap();
        let logits = m
            .forward(&fp.tokens, &mut KvCache::for_model(&m), false)
            .unwrap()
            .logits;
        let s = compare_logits(&fp.logits, &logits, ckpt.config.vocab_size, 10.0);
        println!(
            "{name} rotated (seed {seed}), fp vs transformers fp of the original: rel L2 {:.1e}, top-1 {:.0}%",
            s.stats.rel_l2,
            100.0 * s.top1_agreement
        );
        assert!(
            s.stats.rel_l2 <= 1e-4 && s.top1_agreement == 1.0,
            "{name}: {s:?}"
        );
    }
}

/// `run` reads a .bpk file into memory unless told `--mmap`; both give the same logits.
/// `--mmap` on a source checkpoint, where it would be ignored, is refused.
#[test]
fn run_from_memory_and_from_the_mapping_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = tmp.path().join("m.bpk");
    convert_ok(&fixture("tiny-2b4t-qat"), &bpk, &[]);
    let p = bpk.to_str().unwrap();
    let mut logits = Vec::new();
    for extra in [&[][..], &["--mmap"][..]] {
        let out = tmp.path().join(format!("logits{}.json", logits.len()));
        let mut args = vec![
            "run",
            p,
            "--tokens",
            "1,5,9,2,7",
            "--logits-json",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = bin(&args);
        assert_eq!(code(&o), 0, "{extra:?}: {}", stderr(&o));
        logits.push(read_logits_json(&out));
    }
    assert_eq!(logits[0], logits[1]);
    assert!(!logits[0].1.is_empty());
    let o = bin(&[
        "run",
        fixture("tiny-2b4t-qat").to_str().unwrap(),
        "--tokens",
        "1,2",
        "--mmap",
    ]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("--mmap applies to .bpk files"),
        "{}",
        stderr(&o)
    );
}
