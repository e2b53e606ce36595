//! GGUF out and in on the real binary: what the files hold (read back with our hardened reader
//! and, when a Python with the `gguf` package is named in BITNET_PACK_GGUF_PY, with gguf-py),
//! the round trip bf16 HF -> .bpk -> GGUF -> .bpk -> HF packed -> .bpk, and the refusals.
//! That llama.cpp loads and runs these files is checked by scripts/check_interop.py (opt-in;
//! see docs/interop.md).

mod common;

use std::path::{Path, PathBuf};

use bitnet_pack::format::BpkFile;
use bitnet_pack::gguf::{GgmlType, Value, parse};
use common::*;

/// GGUF names of the seven projections, in the .bpk's (canonical) order within a block.
const PROJECTIONS: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// Every ternary tensor of a .bpk: name, trits (row-major) and scale.
fn bpk_trits(path: &Path) -> Vec<(String, Vec<i8>, f32)> {
    let f = BpkFile::open(path).unwrap();
    f.header
        .tensors
        .iter()
        .filter_map(|e| {
            let layout = e.encoding.ternary()?;
            let k = e.shape[1] as usize;
            let raw = f.raw(e).unwrap();
            let mut trits = vec![0i8; e.shape[0] as usize * k];
            for (row, dst) in raw
                .chunks_exact(layout.row_bytes(k))
                .zip(trits.chunks_exact_mut(k))
            {
                layout.unpack_row(row, dst).unwrap();
            }
            Some((e.name.clone(), trits, e.scale_f32().unwrap()))
        })
        .collect()
}

fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

fn run(args: &[&str]) -> std::process::Output {
    let o = bin(args);
    assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
    o
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// What a GGUF written from the SiLU fixture holds: llama.cpp's `bitnet` architecture keys and
/// tensor names, F32 norms, F16 embedding, the trits of the .bpk, and each block's scale equal
/// to the tensor's scale rounded to fp16 (I2_S: the f32 scale itself).
#[test]
fn gguf_holds_the_trits_and_the_metadata_llama_cpp_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny-gguf-bitnet");
    let bpk = tmp.path().join("m.bpk");
    convert_ok(&src, &bpk, &[]);
    let want = bpk_trits(&bpk);
    for (ty, ggml) in [
        ("tq2_0", GgmlType::TQ2_0),
        ("tq1_0", GgmlType::TQ1_0),
        ("i2_s", GgmlType::I2_S),
    ] {
        let out = tmp.path().join(format!("m-{ty}.gguf"));
        run(&["convert", s(&src), "-o", s(&out), "--gguf-type", ty]);
        let bytes = std::fs::read(&out).unwrap();
        let g = parse(&bytes).unwrap();
        assert_eq!(g.get_str("general.architecture"), Some("bitnet"));
        assert_eq!(g.get_uint("bitnet.block_count"), Some(2));
        assert_eq!(g.get_uint("bitnet.embedding_length"), Some(256));
        assert_eq!(g.get_uint("bitnet.attention.head_count_kv"), Some(2));
        assert_eq!(g.get_str("tokenizer.ggml.model"), Some("gpt2"));
        assert!(matches!(g.get("tokenizer.ggml.tokens"), Some(Value::Array(a)) if a.len() == 400));
        assert_eq!(g.tensor("token_embd.weight").unwrap().ty, GgmlType::F16);
        assert_eq!(
            g.tensor("blk.1.ffn_sub_norm.weight").unwrap().ty,
            GgmlType::F32
        );
        assert!(g.tensor("output.weight").is_none(), "tied head written");
        let mut n = 0;
        for layer in 0..2 {
            for (i, short) in PROJECTIONS.iter().enumerate() {
                let info = g.tensor(&format!("blk.{layer}.{short}.weight")).unwrap();
                assert_eq!(info.ty, ggml);
                let t = g.ternary(info).unwrap().unwrap();
                let (name, trits, a) = &want[layer * 7 + i];
                assert_eq!(&t.trits, trits, "{ty} {name}");
                let expect = if ggml == GgmlType::I2_S {
                    *a
                } else {
                    f16_round(*a)
                };
                assert!(t.scales.iter().all(|&x| x == expect), "{ty} {name} scales");
                n += 1;
            }
        }
        assert_eq!(n, 14);
    }
}

/// The round trip of the issue: bf16 HF -> .bpk -> GGUF -> .bpk -> HF packed -> .bpk keeps
/// every trit; scales equal up to what each format stores (fp16 in TQ blocks, f32 in HF
/// autobitlinear); and the 2B4T family's GGUF names its ReLU² architecture.
#[test]
fn round_trip_keeps_every_trit() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);
    let src = fixture("tiny-gguf-2b4t");
    convert_ok(&src, &p("a.bpk"), &[]);
    // A tokenizer.json beside a .bpk goes into the GGUF it is exported to.
    std::fs::copy(src.join("tokenizer.json"), p("tokenizer.json")).unwrap();
    for ty in ["tq2_0", "tq1_0", "i2_s"] {
        let gguf = p(&format!("x-{ty}.gguf"));
        let o = run(&["convert", s(&p("a.bpk")), "-o", s(&gguf), "--gguf-type", ty]);
        assert!(stderr(&o).contains("bitnet-b1.58"), "{}", stderr(&o));
        let g_bytes = std::fs::read(&gguf).unwrap();
        let g = parse(&g_bytes).unwrap();
        assert_eq!(g.get_str("general.architecture"), Some("bitnet-b1.58"));
        assert_eq!(g.get_str("bitnet-b1.58.hidden_activation"), Some("relu2"));
        convert_ok(&gguf, &p("b.bpk"), &["--force"]);
        let hf = p(&format!("hf-{ty}"));
        convert_ok(&p("b.bpk"), &hf, &["--to", "hf"]);
        convert_ok(&hf, &p("c.bpk"), &["--force"]);
        let (a, b, c) = (
            bpk_trits(&p("a.bpk")),
            bpk_trits(&p("b.bpk")),
            bpk_trits(&p("c.bpk")),
        );
        for ((x, y), z) in a.iter().zip(&b).zip(&c) {
            assert_eq!(x.1, y.1, "{ty} {}: trits changed in GGUF", x.0);
            assert_eq!(y.1, z.1, "{ty} {}: trits changed in HF", x.0);
            let through = if ty == "i2_s" { x.2 } else { f16_round(x.2) };
            assert_eq!(y.2, through, "{ty} {} scale", x.0);
            assert_eq!(z.2, y.2, "{ty} {} scale through HF", x.0);
        }
        // GGUF -> GGUF of another type, and back to .bpk: the same trits again.
        let other = p(&format!("y-{ty}.gguf"));
        let to = if ty == "tq1_0" { "tq2_0" } else { "tq1_0" };
        run(&["convert", s(&gguf), "-o", s(&other), "--gguf-type", to]);
        convert_ok(&other, &p("d.bpk"), &["--force"]);
        let d = bpk_trits(&p("d.bpk"));
        for (x, y) in a.iter().zip(&d) {
            assert_eq!(x.1, y.1, "{ty} -> {to} {}", x.0);
        }
        // The vocabulary goes along.
        let o_bytes = std::fs::read(&other).unwrap();
        let og = parse(&o_bytes).unwrap();
        assert_eq!(og.get_str("tokenizer.ggml.model"), Some("gpt2"));
    }
    // And the model runs: the .bpk made from the GGUF computes the original's logits up to
    // the fp16 rounding of the scales.
    let logits = |f: &Path| -> Vec<f64> {
        let out = p("l.json");
        run(&[
            "run",
            s(f),
            "--tokens",
            "0,5,17,42,99",
            "--logits-json",
            s(&out),
        ]);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect()
    };
    let (x, y) = (logits(&p("a.bpk")), logits(&p("b.bpk")));
    let num: f64 = x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = x.iter().map(|a| a * a).sum();
    assert!((num / den).sqrt() < 1e-2, "rel L2 {}", (num / den).sqrt());
}

/// gguf-py, the independent reader, on the files we write (opt-in: BITNET_PACK_GGUF_PY names
/// a Python with `gguf` and numpy; `.ci/run` installs one). It must read every file, its
/// dequantization of every TQ tensor must equal fp16(scale) x trit, and its own quantizer
/// applied to those values must give our bytes back.
#[test]
fn gguf_py_reads_what_we_write() {
    let Some(py) = std::env::var_os("BITNET_PACK_GGUF_PY") else {
        // CI sets BITNET_PACK_REQUIRE_GGUF_PY, so that there this check cannot be skipped.
        assert!(
            std::env::var_os("BITNET_PACK_REQUIRE_GGUF_PY").is_none(),
            "BITNET_PACK_REQUIRE_GGUF_PY is set but BITNET_PACK_GGUF_PY is not"
        );
        eprintln!("skipped: set BITNET_PACK_GGUF_PY to a Python with the gguf package");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny-gguf-bitnet");
    let bpk = tmp.path().join("m.bpk");
    convert_ok(&src, &bpk, &[]);
    let want = bpk_trits(&bpk);
    for ty in ["tq2_0", "tq1_0"] {
        let out = tmp.path().join(format!("m-{ty}.gguf"));
        run(&["convert", s(&bpk), "-o", s(&out), "--gguf-type", ty]);
        let script: PathBuf = fixture("make_gguf_goldens.py");
        let o = std::process::Command::new(&py)
            .arg(&script)
            .arg("check")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "gguf-py: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let tensors = v["tensors"].as_array().unwrap();
        let mut checked = 0;
        for t in tensors {
            let name = t["name"].as_str().unwrap();
            let Some(req) = t.get("requantized_sha256") else {
                continue;
            };
            assert_eq!(
                req, &t["data_sha256"],
                "{ty} {name}: gguf-py requantizes differently"
            );
            // Our expectation of its dequantization.
            let (layer, short) = {
                let parts: Vec<&str> = name.split('.').collect();
                (parts[1].parse::<usize>().unwrap(), parts[2])
            };
            let i = [
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ]
            .iter()
            .position(|n| *n == short)
            .unwrap();
            let (_, trits, a) = &want[layer * 7 + i];
            let d = f16_round(*a);
            let bytes: Vec<u8> = trits
                .iter()
                .flat_map(|&x| (d * f32::from(x)).to_le_bytes())
                .collect();
            assert_eq!(
                t["dequantized_sha256"].as_str().unwrap(),
                sha256_bytes(&bytes),
                "{ty} {name}"
            );
            checked += 1;
        }
        assert_eq!(checked, 14, "{ty}");
    }
}

fn sha256_bytes(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Refusals: a row length no GGUF type fits (before anything is written), an I2_S-only fit
/// named, v2 schemes, an untied head for `bitnet`.
#[test]
fn what_gguf_cannot_carry_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.gguf");
    let o = bin(&["convert", s(&fixture("tiny-hf-saved")), "-o", s(&out)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not a multiple of 256"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("q_proj"), "{}", stderr(&o));
    assert!(!out.exists());
    let o = bin(&[
        "convert",
        s(&fixture("tiny-gguf-bitnet")),
        "-o",
        s(&out),
        "--activations",
        "a4",
    ]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--activations"), "{}", stderr(&o));
    assert!(!out.exists());
    let o = bin(&[
        "convert",
        s(&fixture("tiny-gguf-bitnet")),
        "-o",
        s(&tmp.path().join("x.bpk")),
        "--gguf-type",
        "tq2_0",
        "--to",
        "bpk",
    ]);
    assert_eq!(code(&o), 2);
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Hostile GGUF inputs to convert: per-block scales that disagree, a projection stored as
/// floats, a missing tensor, an unknown architecture, wrong dims: exit 2 naming the tensor or
/// key, nothing written.
#[test]
fn hostile_gguf_inputs_are_refused() {
    use bitnet_pack::gguf::{GgufFileWriter, GgufPlan, TensorSpec};
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.gguf");
    run(&["convert", s(&fixture("tiny-gguf-bitnet")), "-o", s(&good)]);
    let bytes = std::fs::read(&good).unwrap();
    let g = parse(&bytes).unwrap();
    // Rewrites the good file with `edit` applied to (kv, tensors as (spec, data)).
    type Tensors = Vec<(TensorSpec, Vec<u8>)>;
    type Edit<'e> = &'e dyn Fn(&mut Vec<(String, Value)>, &mut Tensors);
    let rewrite = |name: &str, edit: Edit<'_>| {
        let mut kv: Vec<(String, Value)> = g.kv().to_vec();
        let mut ts: Tensors = g
            .tensors()
            .iter()
            .map(|t| {
                (
                    TensorSpec {
                        name: t.name.clone(),
                        dims: t.dims.clone(),
                        ty: t.ty,
                    },
                    g.tensor_data(t).to_vec(),
                )
            })
            .collect();
        edit(&mut kv, &mut ts);
        let path = tmp.path().join(name);
        let plan = GgufPlan::new(&kv, ts.iter().map(|(s, _)| s.clone()).collect()).unwrap();
        let mut w = GgufFileWriter::create(&path, true, plan).unwrap();
        for (spec, data) in &ts {
            w.write_tensor(&spec.name, data).unwrap();
        }
        w.finish().unwrap().persist().unwrap();
        path
    };
    let q = "blk.0.attn_q.weight";
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "block scales differ",
            rewrite("scales.gguf", &|_, ts| {
                let (_, data) = ts.iter_mut().find(|(s, _)| s.name == q).unwrap();
                // The fp16 scale of the second 66-byte TQ2_0 block.
                data[66 + 64] ^= 0x01;
            }),
            "block scales",
        ),
        (
            "float projection",
            rewrite("float.gguf", &|_, ts| {
                let (spec, data) = ts.iter_mut().find(|(s, _)| s.name == q).unwrap();
                spec.ty = GgmlType::F16;
                *data = vec![0u8; 256 * 256 * 2];
            }),
            "not ternary",
        ),
        (
            "missing tensor",
            rewrite("missing.gguf", &|_, ts| ts.retain(|(s, _)| s.name != q)),
            "is missing",
        ),
        (
            "unknown architecture",
            rewrite("arch.gguf", &|kv, _| {
                kv.iter_mut()
                    .find(|(k, _)| k == "general.architecture")
                    .unwrap()
                    .1 = Value::String("gpt2".into());
            }),
            "general.architecture",
        ),
        (
            "extra tensor",
            rewrite("extra.gguf", &|_, ts| {
                ts.push((
                    TensorSpec {
                        name: "blk.0.attn_q.scale".into(),
                        dims: vec![1],
                        ty: GgmlType::F32,
                    },
                    1f32.to_le_bytes().to_vec(),
                ))
            }),
            "unexpected tensor",
        ),
    ];
    for (what, path, needle) in cases {
        let out = tmp.path().join("out.bpk");
        let o = bin(&["convert", s(&path), "-o", s(&out)]);
        assert_eq!(code(&o), 2, "{what}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{what}: {}", stderr(&o));
        assert!(!out.exists(), "{what}");
    }
    // An F32 embedding value beyond f16, asked to be kept as f16: refused, naming the tensor.
    let wide = rewrite("wide.gguf", &|_, ts| {
        let (spec, data) = ts
            .iter_mut()
            .find(|(s, _)| s.name == "token_embd.weight")
            .unwrap();
        spec.ty = GgmlType::F32;
        let mut v = vec![0.5f32; 256 * 400];
        v[7] = 1e5;
        *data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    });
    let out = tmp.path().join("wide.bpk");
    let o = bin(&["convert", s(&wide), "-o", s(&out), "--keep", "f16"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("token_embd.weight"), "{}", stderr(&o));
    assert!(!out.exists());
    // A file that is not GGUF at all.
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let o = bin(&["convert", s(&junk), "-o", s(&tmp.path().join("j.bpk"))]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("junk.gguf"), "{}", stderr(&o));
}

/// inspect and validate take GGUF files: bits per weight per layout, every tensor decoded, and
/// a damaged ternary byte or a truncated file reported with exit 1.
#[test]
fn inspect_and_validate_read_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    run(&[
        "convert",
        s(&fixture("tiny-gguf-bitnet")),
        "-o",
        s(&out),
        "--gguf-type",
        "tq1_0",
    ]);
    let o = run(&["inspect", s(&out), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "gguf");
    let bpw = v["ternary"]["bits_per_weight"].as_f64().unwrap();
    assert!((bpw - 1.6875).abs() < 1e-9, "{bpw}");
    assert_eq!(code(&bin(&["validate", s(&out)])), 0);
    // A TQ1_0 code byte that is no ceil(v*256/243) for v in 0..243 (1 is not: v = 1 gives 2).
    let mut bytes = std::fs::read(&out).unwrap();
    let g = parse(&bytes).unwrap();
    let info = g.tensor("blk.0.attn_q.weight").unwrap();
    let at = (g.data_offset() + info.offset) as usize;
    drop(g);
    bytes[at] = 1;
    let bad = tmp.path().join("bad.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let o = bin(&["validate", s(&bad)]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stdout(&o).contains("blk.0.attn_q.weight"), "{}", stdout(&o));
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&bad, &bytes).unwrap();
    let o = bin(&["validate", s(&bad), "--json"]);
    assert_eq!(code(&o), 1);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
}

/// A valid GGUF of an architecture bitnet-pack does not run (gguf-py's own small file) is
/// checked as a container with its tensors and passes; ours pass with the model check too.
#[test]
fn validate_checks_other_architectures_as_containers() {
    // gguf-py's small file claims `bitnet` without the model keys: the model check says so.
    let small = fixture("goldens/gguf/small.gguf");
    let o = bin(&["validate", s(&small)]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(
        stdout(&o).contains("bitnet.embedding_length"),
        "{}",
        stdout(&o)
    );
    // The same file as another architecture (same length, `falcon`) is a valid container.
    let mut bytes = std::fs::read(&small).unwrap();
    let at = bytes.windows(6).position(|w| w == b"bitnet").unwrap();
    bytes[at..at + 6].copy_from_slice(b"falcon");
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("falcon.gguf");
    std::fs::write(&other, &bytes).unwrap();
    let o = bin(&["validate", s(&other)]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
}

/// A model whose FFN activation is not the one its family's GGUF architecture runs (a 2B4T
/// config that says SiLU) gets no GGUF: no runtime would compute it.
#[test]
fn gguf_refuses_an_activation_no_architecture_runs() {
    let dir = copy_fixture("tiny-gguf-2b4t");
    let p = dir.path().join("config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace("\"relu2\"", "\"silu\"")).unwrap();
    let out = dir.path().join("x.gguf");
    let o = bin(&["convert", s(dir.path()), "-o", s(&out)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("activation is silu"), "{}", stderr(&o));
    assert!(!out.exists());
}

/// `--compress` and `--threads` apply to a GGUF import as to any conversion: the compressed
/// file validates and holds the same tensors.
#[test]
fn gguf_import_honours_compress_and_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let g = tmp.path().join("m.gguf");
    run(&["convert", s(&fixture("tiny-gguf-bitnet")), "-o", s(&g)]);
    let (a, b) = (tmp.path().join("a.bpk"), tmp.path().join("b.bpk"));
    convert_ok(&g, &a, &[]);
    convert_ok(&g, &b, &["--compress", "--threads", "1"]);
    assert_eq!(code(&bin(&["validate", s(&b)])), 0);
    let (fa, fb) = (BpkFile::open(&a).unwrap(), BpkFile::open(&b).unwrap());
    let mut compressed = 0;
    for (x, y) in fa.header.tensors.iter().zip(&fb.header.tensors) {
        assert_eq!(fa.raw(x).unwrap(), fb.raw(y).unwrap(), "{}", x.name);
        compressed += usize::from(y.compression != x.compression);
    }
    assert!(compressed > 0);
}
