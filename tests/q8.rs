//! `convert --keep q8`: the embedding and the head stored as q8_0 blocks. The bytes are checked
//! against gguf-py's Q8_0 quantizer (an independent implementation; opt-in as in tests/gguf.rs,
//! required in CI), the file against `validate`, `run`, `parity` and the GGUF and HF exports.

mod common;

use std::path::{Path, PathBuf};

use bitnet_pack::format::{BpkFile, Encoding};
use bitnet_pack::model::Role;
use bitnet_pack::pack::q8;
use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run_ok(args: &[&str]) -> String {
    let o = bin(args);
    assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
    stdout(&o)
}

/// The source embedding of a fixture as f32 rows (bf16 or f32 in the safetensors file).
fn source_embedding(name: &str) -> (Vec<f32>, usize) {
    let t = read_st(&fixture(name).join("model.safetensors"))
        .into_iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .unwrap();
    let values = match t.dtype {
        safetensors::Dtype::BF16 => t
            .data
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect(),
        safetensors::Dtype::F32 => f32s(&t.data),
        other => panic!("fixture embedding in {other:?}"),
    };
    (values, t.shape[1])
}

fn q8_tensor(path: &Path, role: Role) -> Vec<u8> {
    let f = BpkFile::open(path).unwrap();
    let e = f.header.tensors.iter().find(|e| e.role == role).unwrap();
    assert_eq!(e.encoding, Encoding::Q8, "{}", e.name);
    f.raw(e).unwrap().into_owned()
}

/// The file, the stored bytes of each of its tensors, and the index of the embedding.
fn stored_tensors(path: &Path) -> (BpkFile, Vec<Vec<u8>>, usize) {
    let f = BpkFile::open(path).unwrap();
    let data = f
        .header
        .tensors
        .iter()
        .map(|e| f.raw(e).unwrap().into_owned())
        .collect();
    let i = f
        .header
        .tensors
        .iter()
        .position(|e| e.role == Role::Embedding)
        .unwrap();
    (f, data, i)
}

fn converted(dir: &Path) -> PathBuf {
    let out = dir.join("q8.bpk");
    convert_ok(&fixture("tiny-2b4t-qat"), &out, &["--keep", "q8"]);
    out
}

#[test]
fn keep_q8_bytes_equal_gguf_pys_quantizer() {
    let Some(py) = std::env::var_os("BITNET_PACK_GGUF_PY") else {
        assert!(
            std::env::var_os("BITNET_PACK_REQUIRE_GGUF_PY").is_none(),
            "BITNET_PACK_REQUIRE_GGUF_PY is set but BITNET_PACK_GGUF_PY is not"
        );
        eprintln!("skipped: set BITNET_PACK_GGUF_PY to a Python with the gguf package");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = converted(tmp.path());
    let (values, cols) = source_embedding("tiny-2b4t-qat");
    let raw = tmp.path().join("embed.f32");
    std::fs::write(
        &raw,
        values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let o = std::process::Command::new(&py)
        .arg(fixture("make_gguf_goldens.py"))
        .args(["q8", s(&raw), &cols.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = String::from_utf8(o.stdout).unwrap();
    let got: String = q8_tensor(&out, Role::Embedding)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(got, want.trim(), "q8_0 bytes differ from gguf-py's Q8_0");
}

#[test]
fn a_q8_file_validates_runs_and_passes_parity_with_its_cost_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let out = converted(tmp.path());
    let v = run_ok(&["validate", s(&out)]);
    assert!(v.contains("format 1.3"), "{v}");
    let i = run_ok(&["inspect", s(&out)]);
    assert!(i.contains("q8_0"), "{i}");
    let src = fixture("tiny-2b4t-qat");
    let json = run_ok(&["parity", s(&src), s(&out), "--json"]);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(r["verdict"]["pass"], true, "{json}");
    assert_eq!(r["floats"]["mismatches"].as_array().unwrap().len(), 0);
    let cost = &r["float_cost"];
    assert!(cost["kl"].as_f64().unwrap() > 0.0, "{cost}");
    assert!(cost["top1_agreement"].as_f64().unwrap() > 0.5, "{cost}");
    // The same model without --keep q8 reports no such cost.
    let plain = tmp.path().join("plain.bpk");
    convert_ok(&src, &plain, &[]);
    let json = run_ok(&["parity", s(&src), s(&plain), "--json"]);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(r.get("float_cost").is_none(), "{json}");
}

/// One q8_0 code changed by one step: a consistent file (checksums rewritten) whose embedding
/// is not the source's quantization; parity must name it.
#[test]
fn parity_catches_an_embedding_that_is_not_the_sources_quantization() {
    let tmp = tempfile::tempdir().unwrap();
    let out = converted(tmp.path());
    let (f, mut data, i) = stored_tensors(&out);
    // Token 3, element 5 of its first block: a code away from +-127 moved by one.
    let at = 3 * q8::row_bytes(f.header.model.hidden_size) + 2 + 5;
    let q = data[i][at] as i8;
    data[i][at] = (if q < 100 { q + 1 } else { q - 1 }) as u8;
    let bad = tmp.path().join("bad.bpk");
    common::defects::write(&bad, &f, f.header.clone(), data);
    run_ok(&["validate", s(&bad)]);
    let o = bin(&["parity", s(&fixture("tiny-2b4t-qat")), s(&bad), "--json"]);
    assert_ne!(code(&o), 0);
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["verdict"]["pass"], false);
    let m = &r["floats"]["mismatches"][0];
    assert_eq!(m["name"], "model.embed_tokens.weight", "{m}");
    assert_eq!(m["count"], 1, "{m}");
    assert_eq!(
        m["first_index"].as_u64().unwrap(),
        3 * f.header.model.hidden_size as u64 + 5
    );
}

#[test]
fn a_bad_block_scale_is_refused_by_validate_and_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = converted(tmp.path());
    let (f, mut data, i) = stored_tensors(&out);
    let at = 7 * q8::row_bytes(f.header.model.hidden_size) + 2 * q8::BLOCK_BYTES;
    data[i][at..at + 2].copy_from_slice(&0x7e00u16.to_le_bytes()); // f16 NaN
    let bad = tmp.path().join("bad.bpk");
    common::defects::write(&bad, &f, f.header.clone(), data);
    let o = bin(&["validate", s(&bad)]);
    assert_ne!(code(&o), 0);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        text.contains("row 7, block 2") && text.contains("q8_0 scale"),
        "{text}"
    );
    let o = bin(&["run", s(&bad), "--tokens", "1,2,3"]);
    assert_ne!(code(&o), 0);
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

#[test]
fn keep_q8_is_refused_before_any_work_where_rows_are_not_in_blocks_of_32() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.bpk");
    let o = bin(&[
        "convert",
        s(&fixture("tiny-awkward")),
        "-o",
        s(&out),
        "--keep",
        "q8",
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not a multiple of 32"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

/// q8_0 goes to GGUF as GGML Q8_0 byte for byte, and comes back as q8_0; HF gets the exact
/// f32 values.
#[test]
fn q8_survives_gguf_and_reaches_hf_as_its_values() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny-gguf-2b4t");
    let out = tmp.path().join("q8.bpk");
    convert_ok(&src, &out, &["--keep", "q8"]);
    let embed = q8_tensor(&out, Role::Embedding);
    let gguf = tmp.path().join("q8.gguf");
    run_ok(&["convert", s(&out), "-o", s(&gguf)]);
    let back = tmp.path().join("back.bpk");
    run_ok(&["convert", s(&gguf), "-o", s(&back)]);
    assert_eq!(q8_tensor(&back, Role::Embedding), embed);
    // (The ternary scales come back as fp16(a) through TQ2_0, so logits are not compared.)
    run_ok(&["validate", s(&back)]);
    let hf = tmp.path().join("hf");
    run_ok(&["convert", s(&out), "--to", "hf", "-o", s(&hf)]);
    let t = read_st(&hf.join("model.safetensors"))
        .into_iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .unwrap();
    assert_eq!(t.dtype, safetensors::Dtype::F32);
    let cols = t.shape[1];
    let mut want = vec![0f32; embed.len() / q8::BLOCK_BYTES * q8::BLOCK];
    for (r, w) in embed
        .chunks_exact(q8::row_bytes(cols))
        .zip(want.chunks_exact_mut(cols))
    {
        q8::dequantize_row(r, w);
    }
    assert_eq!(f32s(&t.data), want);
}

/// `--keep q8` applies to HF checkpoints; a .bpk or GGUF source is refused, not silently
/// converted without it.
#[test]
fn keep_q8_is_refused_for_sources_that_are_not_hf_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = tmp.path().join("m.bpk");
    convert_ok(&fixture("tiny-gguf-2b4t"), &bpk, &[]);
    let gguf = tmp.path().join("m.gguf");
    run_ok(&["convert", s(&bpk), "-o", s(&gguf)]);
    for src in [bpk, gguf] {
        let out = tmp.path().join("out.gguf");
        let o = bin(&["convert", s(&src), "-o", s(&out), "--keep", "q8"]);
        assert_ne!(code(&o), 0, "{}", stderr(&o));
        assert!(stderr(&o).contains("--keep q8"), "{}", stderr(&o));
        assert!(!out.exists());
    }
}

/// A value whose block scale would overflow f16 is refused with its tensor and index, and
/// nothing is left at the target.
#[test]
fn keep_q8_refuses_a_block_scale_beyond_f16() {
    let dir = copy_fixture("tiny-2b4t-qat");
    edit_tensors(dir.path(), |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "model.embed_tokens.weight")
            .unwrap();
        assert_eq!(t.dtype, safetensors::Dtype::BF16);
        // 1e7 in bf16 at [2, 3]: finite in bf16 and f32, but 1e7 / 127 is beyond f16.
        let cols = t.shape[1];
        let at = 2 * (2 * cols + 3);
        let bits = (1.0e7f32.to_bits() >> 16) as u16;
        t.data[at..at + 2].copy_from_slice(&bits.to_le_bytes());
    });
    let out = dir.path().join("x.bpk");
    let o = bin(&["convert", s(dir.path()), "-o", s(&out), "--keep", "q8"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("[2, 3]") && e.contains("q8_0"),
        "{e}"
    );
    assert!(!out.exists());
}

/// With a folded rotation the embedding and the untied head are rotated, then quantized:
/// parity finds both equal to the rotated source quantized the same way and passes.
#[test]
fn keep_q8_with_a_rotation_passes_parity() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rq8.bpk");
    let src = fixture("tiny-outliers");
    let extra = ["--rotate", "hadamard", "--keep", "q8", "--force-requantize"];
    convert_ok(&src, &out, &extra);
    let f = BpkFile::open(&out).unwrap();
    let q8_roles: Vec<Role> = f
        .header
        .tensors
        .iter()
        .filter(|e| e.encoding == Encoding::Q8)
        .map(|e| e.role)
        .collect();
    assert_eq!(q8_roles, [Role::Embedding, Role::LmHead]);
    let json = run_ok(&["parity", s(&src), s(&out), "--json"]);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(r["verdict"]["pass"], true, "{json}");
    assert_eq!(r["floats"]["mismatches"].as_array().unwrap().len(), 0);
    assert!(r["float_cost"]["kl"].as_f64().unwrap() > 0.0);
}
