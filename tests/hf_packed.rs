//! HF packed / offline BitNet checkpoints in: both scale conventions (bitlinear divides by
//! `weight_scale`, autobitlinear offline multiplies), packed uint8 and unpacked ternary floats.
//! The goldens are transformers' logits for the same directories, loaded through its own
//! bitnet quantizer (fixtures/make_hf_packed.py).

mod common;

use bitnet_pack::compare::{GOLDEN_LOGITS, compare_logits};
use bitnet_pack::format::BpkFile;
use bitnet_pack::format::header::QuantScheme;
use bitnet_pack::run::{KvCache, SourceMode, packed, source};
use bitnet_pack::source::{Checkpoint, SourceError};
use common::*;

const PACKED: [&str; 3] = [
    "tiny-hf-packed-auto",
    "tiny-hf-packed-bitlinear",
    "tiny-hf-ternary-auto",
];

fn golden(dir: &std::path::Path) -> (Vec<u32>, Vec<f32>) {
    read_logits_json(&dir.join("golden_logits_hf.json"))
}

fn source_logits(dir: &std::path::Path, tokens: &[u32]) -> Vec<f32> {
    let ckpt = Checkpoint::open(dir).unwrap();
    let m = source::load(&ckpt, SourceMode::Qat, &QuantScheme::bitnet_b158()).unwrap();
    m.forward(tokens, &mut KvCache::for_model(&m), false)
        .unwrap()
        .logits
}

fn packed_logits(bpk: &std::path::Path, tokens: &[u32]) -> Vec<f32> {
    let file = BpkFile::open(bpk).unwrap();
    let model = packed::load(&file).unwrap();
    model
        .forward(tokens, &mut KvCache::for_model(&model), false)
        .unwrap()
        .logits
}

/// Both paths on every convention equal transformers loading the same directory.
#[test]
fn both_conventions_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    for name in PACKED {
        let (tokens, want) = golden(&fixture(name));
        let vocab = want.len() / tokens.len();
        let bpk = tmp.path().join(format!("{name}.bpk"));
        convert_ok(&fixture(name), &bpk, &["--verify"]);
        for (path, got) in [
            ("packed", packed_logits(&bpk, &tokens)),
            ("source", source_logits(&fixture(name), &tokens)),
        ] {
            let s = compare_logits(&want, &got, vocab, 10.0);
            println!(
                "{name} {path}: rel L2 {:.1e}, top-1 {:.3}",
                s.stats.rel_l2, s.top1_agreement
            );
            assert!(s.within(&GOLDEN_LOGITS), "{name} {path}: {s:?}");
        }
    }
}

/// The trits are taken as stored, not re-derived: the three checkpoints hold the same trits
/// and scales (bf16 `a` vs bf16 `1/a`), so their files agree tensor by tensor on the trits.
#[test]
fn trits_are_taken_as_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let mut codes = Vec::new();
    for name in PACKED {
        let bpk = tmp.path().join(format!("{name}.bpk"));
        convert_ok(&fixture(name), &bpk, &[]);
        let file = BpkFile::open(&bpk).unwrap();
        let mut all = Vec::new();
        for e in &file.header.tensors {
            if e.encoding.ternary().is_some() {
                all.push((e.name.clone(), file.raw(e).unwrap().to_vec()));
            }
        }
        codes.push(all);
    }
    assert_eq!(codes[0], codes[1]);
    assert_eq!(codes[0], codes[2]);
}

/// The check can fail: reading bitlinear's `weight_scale = 1/a` as if it were `a` (the mix-up
/// other converters make) scales every layer by `a^2`, and the logits leave transformers'.
#[test]
fn the_wrong_convention_is_caught() {
    let dir = copy_fixture("tiny-hf-packed-bitlinear");
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"bitlinear\"", "\"autobitlinear\""),
    )
    .unwrap();
    let (tokens, want) = golden(&fixture("tiny-hf-packed-bitlinear"));
    let got = source_logits(dir.path(), &tokens);
    let s = compare_logits(&want, &got, want.len() / tokens.len(), 10.0);
    assert!(
        !s.within(&GOLDEN_LOGITS) && s.stats.rel_l2 > 0.1,
        "a swapped convention went unnoticed: {s:?}"
    );
}

fn open_err(dir: &std::path::Path) -> SourceError {
    match Checkpoint::open(dir) {
        Err(e) => e,
        Ok(_) => panic!("{} opened", dir.display()),
    }
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight";

/// Every way an offline checkpoint can be broken is refused with exit 2 and a message that
/// names the tensor.
#[test]
fn broken_offline_checkpoints_are_refused() {
    let set_scale = |v: f32| {
        move |t: &mut Vec<Raw>| {
            let s = t
                .iter_mut()
                .find(|r| r.name == format!("{Q}_scale"))
                .unwrap();
            s.dtype = safetensors::Dtype::F32;
            s.data = v.to_le_bytes().to_vec();
        }
    };
    type Edit = Box<dyn Fn(&mut Vec<Raw>)>;
    let cases: Vec<(&str, &str, Edit, &str)> = vec![
        (
            "missing scale",
            "tiny-hf-packed-auto",
            Box::new(|t: &mut Vec<Raw>| t.retain(|r| r.name != format!("{Q}_scale"))),
            "is missing",
        ),
        (
            "zero scale",
            "tiny-hf-packed-auto",
            Box::new(set_scale(0.0)),
            "finite and positive",
        ),
        (
            "NaN scale",
            "tiny-hf-packed-bitlinear",
            Box::new(set_scale(f32::NAN)),
            "finite and positive",
        ),
        (
            "negative scale",
            "tiny-hf-packed-auto",
            Box::new(set_scale(-0.5)),
            "finite and positive",
        ),
        (
            "two scales",
            "tiny-hf-packed-auto",
            Box::new(|t: &mut Vec<Raw>| {
                let s = t
                    .iter_mut()
                    .find(|r| r.name == format!("{Q}_scale"))
                    .unwrap();
                s.shape = vec![2];
                s.data = [s.data.clone(), s.data.clone()].concat();
            }),
            "single value",
        ),
        (
            "packed shape",
            "tiny-hf-packed-auto",
            Box::new(|t: &mut Vec<Raw>| {
                let w = t.iter_mut().find(|r| r.name == Q).unwrap();
                w.shape = vec![w.shape[0] * 2, w.shape[1] / 2];
            }),
            "has shape",
        ),
        (
            "code 3",
            "tiny-hf-packed-auto",
            Box::new(|t: &mut Vec<Raw>| {
                t.iter_mut().find(|r| r.name == Q).unwrap().data[5] = 0xff;
            }),
            "code 3",
        ),
        (
            "float non-trit",
            "tiny-hf-ternary-auto",
            Box::new(|t: &mut Vec<Raw>| {
                let w = t.iter_mut().find(|r| r.name == Q).unwrap();
                // bf16 0.5
                w.data[2] = 0x00;
                w.data[3] = 0x3f;
            }),
            "not -1, 0 or 1",
        ),
    ];
    for (what, base, edit, needle) in cases {
        let dir = copy_fixture(base);
        edit_tensors(dir.path(), |t| edit(t));
        let out = dir.path().join("out.bpk");
        let o = bin(&[
            "convert",
            dir.path().to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{what}: {err}");
        assert!(err.contains(needle), "{what}: {err}");
        assert!(err.contains("q_proj"), "{what}: names no tensor: {err}");
        assert!(!out.exists(), "{what}: left a file");
    }
}

/// Config contradictions: packed weights with an online (master-weight) config or with no
/// quantization_config, bitlinear with float weights, an unknown linear class.
#[test]
fn contradicting_configs_are_refused() {
    let edit_cfg = |base: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let dir = copy_fixture(base);
        let p = dir.path().join("config.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        dir
    };
    let online = edit_cfg("tiny-hf-packed-auto", &|v| {
        v["quantization_config"]["quantization_mode"] = "online".into()
    });
    assert!(matches!(
        open_err(online.path()),
        SourceError::PackedCheckpoint { .. }
    ));
    let none = edit_cfg("tiny-hf-packed-auto", &|v| {
        v.as_object_mut().unwrap().remove("quantization_config");
    });
    assert!(matches!(
        open_err(none.path()),
        SourceError::PackedCheckpoint { .. }
    ));
    let bitlinear_floats = edit_cfg("tiny-hf-ternary-auto", &|v| {
        v["quantization_config"]["linear_class"] = "bitlinear".into()
    });
    assert!(matches!(
        open_err(bitlinear_floats.path()),
        SourceError::Offline { .. }
    ));
    let bad_mode = edit_cfg("tiny-hf-packed-auto", &|v| {
        v["quantization_config"]["quantization_mode"] = "Offline".into()
    });
    assert!(matches!(
        open_err(bad_mode.path()),
        SourceError::Offline { .. }
    ));
    let unknown = edit_cfg("tiny-hf-packed-auto", &|v| {
        v["quantization_config"]["linear_class"] = "fancylinear".into()
    });
    assert!(matches!(
        open_err(unknown.path()),
        SourceError::Offline { .. }
    ));
    // A rotation needs float weights.
    let out = tempfile::tempdir().unwrap();
    let o = bin(&[
        "convert",
        fixture("tiny-hf-packed-auto").to_str().unwrap(),
        "-o",
        out.path().join("r.bpk").to_str().unwrap(),
        "--rotate",
        "hadamard",
        "--force-requantize",
    ]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("already ternary"), "{}", stderr(&o));
}

/// `--to hf` writes what the packed reader reads back: the same trits, `a` exactly with
/// autobitlinear (weight_scale = a in F32), and with bitlinear `1/(1/a)` within one f32 step;
/// the re-imported model computes the logits of the .bpk it came from. (That transformers loads
/// the export and agrees is checked by scripts/check_interop.py; see docs/interop.md.)
#[test]
fn hf_export_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny-hf-saved");
    let first = tmp.path().join("first.bpk");
    convert_ok(&src, &first, &[]);
    let a = BpkFile::open(&first).unwrap();
    let tokens = [0u32, 5, 17, 42, 99, 3];
    let want = packed_logits(&first, &tokens);
    for class in ["autobitlinear", "bitlinear"] {
        let dir = tmp.path().join(class);
        convert_ok(&src, &dir, &["--to", "hf", "--linear-class", class]);
        assert!(dir.join("tokenizer.json").exists());
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["quantization_config"]["linear_class"], class);
        assert_eq!(cfg["quantization_config"]["quantization_mode"], "offline");
        let back = tmp.path().join(format!("{class}.bpk"));
        convert_ok(&dir, &back, &["--verify"]);
        let b = BpkFile::open(&back).unwrap();
        for (x, y) in a.header.tensors.iter().zip(&b.header.tensors) {
            assert_eq!(x.name, y.name);
            if x.encoding.ternary().is_some() {
                assert_eq!(a.raw(x).unwrap(), b.raw(y).unwrap(), "{} trits", x.name);
                let (sx, sy) = (x.scale_f32().unwrap(), y.scale_f32().unwrap());
                let ulps = (sx.to_bits() as i64 - sy.to_bits() as i64).abs();
                assert!(
                    ulps <= if class == "autobitlinear" { 0 } else { 1 },
                    "{} scale {sx} -> {sy}",
                    x.name
                );
            } else {
                assert_eq!(a.raw(x).unwrap(), b.raw(y).unwrap(), "{}", x.name);
            }
        }
        let got = packed_logits(&back, &tokens);
        let s = compare_logits(&want, &got, want.len() / tokens.len(), 10.0);
        assert!(s.within(&GOLDEN_LOGITS), "{class}: {s:?}");
    }
    // A .bpk exports directly, with a config.json written from its model section.
    let dir = tmp.path().join("from-bpk");
    convert_ok(&first, &dir, &["--to", "hf"]);
    let again = tmp.path().join("again.bpk");
    convert_ok(&dir, &again, &[]);
    let got = packed_logits(&again, &tokens);
    assert_eq!(got, want, "export of a .bpk and back changed the logits");
}

/// What transformers cannot compute is refused before any work, and nothing is left behind.
#[test]
fn hf_export_refuses_what_transformers_cannot_run() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny-hf-saved");
    for extra in [
        &["--activations", "a4"][..],
        &["--online-hadamard", "o_proj"],
        &["--kv-bits", "4"],
    ] {
        let dir = tmp.path().join("out");
        let mut args = vec![
            "convert",
            src.to_str().unwrap(),
            "-o",
            dir.to_str().unwrap(),
            "--to",
            "hf",
        ];
        args.extend_from_slice(extra);
        let o = bin(&args);
        assert_eq!(code(&o), 2, "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--to hf"), "{}", stderr(&o));
        assert!(!dir.exists());
    }
    // The same scheme recorded in a .bpk is refused on export, naming the file.
    let a4 = tmp.path().join("a4.bpk");
    convert_ok(&src, &a4, &["--activations", "a4"]);
    let dir = tmp.path().join("out");
    let o = bin(&[
        "convert",
        a4.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--to",
        "hf",
    ]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("a4.bpk") && stderr(&o).contains("activations a4"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.exists());
    // Projection rows not in fours (tiny-awkward's intermediate size is 135, so gate_proj and
    // up_proj have 135 rows): refused before the work, naming the tensor.
    let dir = tmp.path().join("out");
    let o = bin(&[
        "convert",
        fixture("tiny-awkward").to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--to",
        "hf",
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("not a multiple of 4"), "{}", stderr(&o));
    assert!(!dir.exists());
    // A non-empty target directory is refused.
    let full = tempfile::tempdir().unwrap();
    std::fs::write(full.path().join("keep"), b"x").unwrap();
    let o = bin(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        full.path().to_str().unwrap(),
        "--to",
        "hf",
    ]);
    assert_eq!(code(&o), 2);
    assert!(full.path().join("keep").exists());
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// transformers' default quantization_mode is offline: ternary floats with a weight_scale and
/// no quantization_mode key are read as offline trits, and give the same file.
#[test]
fn absent_quantization_mode_means_offline() {
    let dir = copy_fixture("tiny-hf-ternary-auto");
    let p = dir.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["quantization_config"]
        .as_object_mut()
        .unwrap()
        .remove("quantization_mode");
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a.bpk"), tmp.path().join("b.bpk"));
    convert_ok(&fixture("tiny-hf-ternary-auto"), &a, &[]);
    convert_ok(dir.path(), &b, &[]);
    let (fa, fb) = (BpkFile::open(&a).unwrap(), BpkFile::open(&b).unwrap());
    for (x, y) in fa.header.tensors.iter().zip(&fb.header.tensors) {
        assert_eq!((&x.sha256, x.scale), (&y.sha256, y.scale), "{}", x.name);
    }
}
