//! End-to-end tests of the `t5` layout on the real binary: conversion, validation, inspection,
//! running (logits equal to the `i2` file's, bit for bit: the trits and scales are the same,
//! only their packing differs), parity, unpacking, and damaged t5 bytes.

mod common;

use std::path::{Path, PathBuf};

use bitnet_pack::format::{Encoding, FLAG_DENSE_TERNARY, PREAMBLE_LEN, Preamble};
use bitnet_pack::pack::t5;
use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Converts `fixture_name` with `--layout layout` (and `extra`) into `tmp`.
fn converted(tmp: &Path, fixture_name: &str, layout: &str, extra: &[&str]) -> PathBuf {
    let out = tmp.join(format!("{fixture_name}-{layout}.bpk"));
    let mut args = vec!["--layout", layout];
    args.extend_from_slice(extra);
    convert_ok(&fixture(fixture_name), &out, &args);
    out
}

/// The header of a .bpk file, parsed by the library.
fn header(path: &Path) -> (Preamble, bitnet_pack::format::Header) {
    let bytes = std::fs::read(path).unwrap();
    let pre = Preamble::parse(bytes[..PREAMBLE_LEN].try_into().unwrap()).unwrap();
    let end = PREAMBLE_LEN + pre.header_len as usize;
    let text = std::str::from_utf8(&bytes[PREAMBLE_LEN..end])
        .unwrap()
        .trim_end();
    (pre, serde_json::from_str(text).unwrap())
}

/// The logits of `tokens` as `run --logits-json` writes them.
fn logits(bpk: &Path, tokens: &str) -> String {
    let out = bpk.with_extension("logits.json");
    let o = bin(&["run", s(bpk), "--tokens", tokens, "--logits-json", s(&out)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    std::fs::read_to_string(out).unwrap()
}

/// Decoding a token at a time (where the runner takes `t5` rows through its table-lookup
/// kernel in the `avx512` build, and prompts through its multi-token path) gives the same
/// logits from both files, bit for bit, at every step.
fn decoding_steps_agree(i2: &Path, t5: &Path, what: &str) {
    use bitnet_pack::format::BpkFile;
    use bitnet_pack::run::{KvCache, packed};
    let files = [i2, t5].map(|p| BpkFile::open(p).unwrap());
    let models = files.each_ref().map(|f| packed::load(f).unwrap());
    let mut caches = models.each_ref().map(|m| KvCache::for_model(m));
    let mut token = 1u32;
    for step in 0..6 {
        let [a, b] = [0, 1].map(|i| models[i].forward_last(&[token], &mut caches[i]).unwrap());
        let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{what}: step {step}");
        token = (token * 7 + 3) % models[0].config.vocab_size as u32;
    }
}

/// `parity --json`, without the members that name the files.
fn parity(src: &Path, bpk: &Path) -> serde_json::Value {
    let o = bin(&["parity", s(src), s(bpk), "--random-tokens", "24", "--json"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let mut v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.retain(|key, _| !matches!(key.as_str(), "packed" | "source" | "file" | "files"));
    v
}

/// Fixtures with rows shorter than a block (k = 60, 64, 80, 104, 128, 135) and rows of whole
/// blocks and a short last block (176 = 160 + 16, 216 = 160 + 56, 224 = 160 + 64,
/// 352 = 2 * 160 + 32), two of them made by transformers' own classes; and the int4
/// activation path. Prompts and decoding steps alike.
#[test]
fn t5_files_run_exactly_like_i2_files() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("tiny-2b4t-qat", &[][..]),
        ("tiny-awkward", &[][..]),
        ("tiny-llama-fp", &[][..]),
        ("tiny-hf-llama", &[][..]),
        ("tiny-hf-awkward", &[][..]),
        ("tiny-2b4t-qat", &["--activations", "a4"][..]),
    ] {
        let sub = tmp.path().join(format!("{name}{}", extra.len()));
        std::fs::create_dir(&sub).unwrap();
        let i2 = converted(&sub, name, "i2", extra);
        let t5 = converted(&sub, name, "t5", extra);
        let what = format!("{name} {extra:?}");

        let o = bin(&["validate", s(&t5)]);
        assert_eq!(code(&o), 0, "{what}: {}{}", stdout(&o), stderr(&o));

        // Same tensors, scales and digests of the float tensors; t5 ternary tensors are smaller.
        let ((pre2, h2), (pre5, h5)) = (header(&i2), header(&t5));
        assert_eq!(pre2.flags & FLAG_DENSE_TERNARY, 0);
        assert_eq!(pre5.flags & FLAG_DENSE_TERNARY, FLAG_DENSE_TERNARY);
        assert_eq!(h2.tensors.len(), h5.tensors.len());
        for (a, b) in h2.tensors.iter().zip(&h5.tensors) {
            assert_eq!((&a.name, &a.shape, a.scale), (&b.name, &b.shape, b.scale));
            if a.encoding == Encoding::I2 {
                assert_eq!(b.encoding, Encoding::T5, "{what} {}", a.name);
                assert!(b.length < a.length, "{what} {}", a.name);
            } else {
                assert_eq!((a.encoding, &a.sha256), (b.encoding, &b.sha256));
            }
        }

        let tokens = "1,7,3,30,2,11,5";
        assert_eq!(logits(&i2, tokens), logits(&t5, tokens), "{what}");
        decoding_steps_agree(&i2, &t5, &what);
        let src = fixture(name);
        assert_eq!(parity(&src, &i2), parity(&src, &t5), "{what}");
    }
}

#[test]
fn inspect_shows_the_t5_encoding_and_its_bits_per_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let t5 = converted(tmp.path(), "tiny-2b4t-qat", "t5", &[]);
    let o = bin(&["inspect", s(&t5), "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["format_version"], "1.3");
    let q = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q["encoding"], "t5");
    // k = 128: one short block of 26 bytes per row.
    assert_eq!(q["bits_per_weight"], 8.0 * 26.0 / 128.0);
    let o = bin(&["inspect", s(&t5)]);
    assert!(stdout(&o).contains(" t5 "), "{}", stdout(&o));
}

#[test]
fn unpacking_a_t5_file_gives_the_i2_file_s_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny-awkward", "tiny-llama-fp"] {
        let i2 = converted(tmp.path(), name, "i2", &[]);
        let t5 = converted(tmp.path(), name, "t5", &[]);
        let (u2, u5) = (i2.with_extension("st"), t5.with_extension("st"));
        for (bpk, out) in [(&i2, &u2), (&t5, &u5)] {
            let o = bin(&["unpack", s(bpk), "-o", s(out)]);
            assert_eq!(code(&o), 0, "{}", stderr(&o));
        }
        let (a, b) = (read_st(&u2), read_st(&u5));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((&x.name, &x.shape, &x.data), (&y.name, &y.shape, &y.data));
        }
    }
}

/// Rewrites byte `at` of tensor `name`'s data to `value` and fixes its digest in the header, so
/// that the code check is what finds the damage.
fn damage(src: &Path, dst: &Path, name: &str, at: usize, value: u8) {
    use sha2::{Digest, Sha256};
    let (pre, mut h) = header(src);
    let mut bytes = std::fs::read(src).unwrap();
    let e = h.tensors.iter_mut().find(|t| t.name == name).unwrap();
    let start = pre.data_offset as usize + e.offset as usize;
    let data = &mut bytes[start..start + e.length as usize];
    data[at] = value;
    e.sha256 = Sha256::digest(&*data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let end = PREAMBLE_LEN + pre.header_len as usize;
    let mut text = serde_json::to_vec(&h).unwrap();
    assert!(text.len() <= pre.header_len as usize);
    text.resize(pre.header_len as usize, b' ');
    bytes[PREAMBLE_LEN..end].copy_from_slice(&text);
    let sha = Preamble::compute_sha256(&pre.head_bytes(), &text);
    bytes[32..64].copy_from_slice(&sha);
    std::fs::write(dst, bytes).unwrap();
}

/// The one finding of `validate --json` on `bpk`, which must fail.
fn only_finding(bpk: &Path) -> serde_json::Value {
    let o = bin(&["validate", s(bpk), "--json"]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let text = stdout(&o);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let findings = v["findings"].as_array().unwrap().clone();
    assert_eq!(findings.len(), 1, "{text}");
    findings[0].clone()
}

#[test]
fn validate_names_the_tensor_row_and_weight_of_a_damaged_t5_byte() {
    let tmp = tempfile::tempdir().unwrap();
    // gate_proj of tiny-2b4t-qat: k = 128, one short block of 26 bytes per row.
    let t5 = converted(tmp.path(), "tiny-2b4t-qat", "t5", &[]);
    let name = "model.layers.1.mlp.gate_proj.weight";
    let row_bytes = t5::row_bytes(128);

    // A byte value that encodes nothing (20 lies between ceil(18*256/243) = 19 and
    // ceil(19*256/243) = 21), in row 3, byte 4: it holds weight 4.
    let bad = tmp.path().join("bad-byte.bpk");
    damage(&t5, &bad, name, 3 * row_bytes + 4, 20);
    let f = only_finding(&bad);
    assert_eq!(f["kind"], "BadCode");
    assert_eq!(f["tensor"], name);
    let message = f["message"].as_str().unwrap();
    assert!(
        message.contains("row 3") && message.contains("weight 4 ") && message.contains("0x14"),
        "{message}"
    );

    // Padding: 128 weights in 26 bytes leave slots 128 and 129 (the last digits of bytes 24
    // and 25) to padding. Byte 25 of row 0 holds weights 25, 51, 77, 103 and slot 129; give
    // that slot code 0 (all five codes 1,1,1,1,0 -> v = 120).
    let bad = tmp.path().join("bad-padding.bpk");
    let (pre, h) = header(&t5);
    let e = h.tensors.iter().find(|t| t.name == name).unwrap();
    let start = pre.data_offset as usize + e.offset as usize;
    let original = std::fs::read(&t5).unwrap()[start + 25];
    assert_eq!(t5::digit(original, 4), t5::PAD_CODE);
    let codes = t5::codes(original);
    let v = codes[..4].iter().fold(0u8, |v, &c| v * 3 + c) * 3;
    damage(&t5, &bad, name, 25, t5::encode(v));
    let f = only_finding(&bad);
    assert_eq!(f["kind"], "BadCode");
    let message = f["message"].as_str().unwrap();
    assert!(
        message.contains("row 0") && message.contains("padding slot 129"),
        "{message}"
    );
}

/// A t5 file without its flag, or an i2 file with it: the flag must say whether t5 is used.
#[test]
fn the_t5_flag_must_match_the_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let t5 = converted(tmp.path(), "tiny-awkward", "t5", &[]);
    let mut bytes = std::fs::read(&t5).unwrap();
    bytes[12] &= !(FLAG_DENSE_TERNARY as u8);
    let pre = Preamble::parse(bytes[..PREAMBLE_LEN].try_into().unwrap()).unwrap();
    let end = PREAMBLE_LEN + pre.header_len as usize;
    let sha = Preamble::compute_sha256(&pre.head_bytes(), &bytes[PREAMBLE_LEN..end]);
    bytes[32..64].copy_from_slice(&sha);
    let bad = tmp.path().join("unflagged.bpk");
    std::fs::write(&bad, bytes).unwrap();
    let f = only_finding(&bad);
    assert_eq!(f["kind"], "DenseFlagMismatch");
}
