//! Property test: whatever tensors the writer is given, the reader gets back the same table,
//! the same bytes and the same dequantized values, and the file passes its structural checks.

use std::collections::BTreeMap;
use std::io::Write;

use bitnet_pack::format::{
    BpkFile, BpkWriter, Compression, Encoding, Provenance, QuantScheme, TensorPlan,
};
use bitnet_pack::model::{ModelConfig, Role};
use bitnet_pack::num::FloatDtype;
use bitnet_pack::num::dtype::encode_f32;
use bitnet_pack::pack::TernaryLayout;
use proptest::prelude::*;

fn config() -> ModelConfig {
    ModelConfig::from_json(
        br#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,"intermediate_size":8,
        "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":8}"#,
    )
    .unwrap()
}

#[derive(Debug, Clone)]
enum Content {
    Ternary {
        layout: TernaryLayout,
        rows: usize,
        trits: Vec<i8>,
        scale: f32,
    },
    Float {
        dtype: FloatDtype,
        values: Vec<f32>,
        compress: bool,
    },
}

fn content() -> impl Strategy<Value = Content> {
    let ternary = (
        prop_oneof![
            Just(TernaryLayout::I2),
            Just(TernaryLayout::I8),
            Just(TernaryLayout::T5)
        ],
        1usize..5,
        1usize..300,
        1e-6f32..10.0,
    )
        .prop_flat_map(|(layout, rows, k, scale)| {
            prop::collection::vec(-1i8..=1, rows * k).prop_map(move |trits| Content::Ternary {
                layout,
                rows,
                trits,
                scale,
            })
        });
    let float = (
        prop_oneof![
            Just(FloatDtype::F32),
            Just(FloatDtype::F16),
            Just(FloatDtype::Bf16)
        ],
        prop::collection::vec(-1000f32..1000.0, 1..500),
        any::<bool>(),
    )
        .prop_map(|(dtype, values, compress)| Content::Float {
            dtype,
            values,
            compress,
        });
    prop_oneof![ternary, float]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn write_then_read(contents in prop::collection::vec(content(), 1..6)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bpk");
        let plans: Vec<TensorPlan> = contents.iter().enumerate().map(|(i, c)| match c {
            Content::Ternary { layout, rows, trits, .. } => TensorPlan {
                name: format!("t{i}"), role: Role::QProj, layer: Some(0),
                encoding: Encoding::from_layout(*layout),
                shape: vec![*rows as u64, (trits.len() / rows) as u64], compression: Compression::None,
            },
            Content::Float { dtype, values, compress } => TensorPlan {
                name: format!("t{i}"), role: Role::AttnNorm, layer: None,
                encoding: Encoding::from_float(*dtype), shape: vec![values.len() as u64],
                compression: if *compress { Compression::Zstd } else { Compression::None },
            },
        }).collect();
        let provenance = Provenance { tool: "test".into(), tool_version: "0".into(), source_files: vec![], options: BTreeMap::new() };
        let mut w = BpkWriter::create(&path, false, config(), QuantScheme::bitnet_b158(), provenance.clone(), plans).unwrap();
        let mut expected_raw = Vec::new();
        for c in &contents {
            match c {
                Content::Ternary { layout, rows, trits, scale } => {
                    let k = trits.len() / rows;
                    let mut packed = vec![0u8; rows * layout.row_bytes(k)];
                    for (src, dst) in trits.chunks(k).zip(packed.chunks_mut(layout.row_bytes(k))) {
                        layout.pack_row(src, dst);
                    }
                    w.write_tensor(Some(*scale), |s| s.write_all(&packed)).unwrap();
                    expected_raw.push(packed);
                }
                Content::Float { dtype, values, compress } => {
                    let mut raw = Vec::new();
                    encode_f32(*dtype, values, &mut raw);
                    let stored = if *compress { zstd::encode_all(&raw[..], 3).unwrap() } else { raw.clone() };
                    w.write_tensor(None, |s| s.write_all(&stored)).unwrap();
                    expected_raw.push(raw);
                }
            }
        }
        let (header, len) = w.finish(provenance).unwrap().persist().unwrap();
        prop_assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        let file = BpkFile::open(&path).unwrap();
        prop_assert_eq!(&file.header, &header);
        for ((c, e), raw) in contents.iter().zip(&file.header.tensors).zip(&expected_raw) {
            prop_assert_eq!(e.offset % 64, 0);
            prop_assert_eq!(&file.raw(e).unwrap()[..], &raw[..]);
            let values = file.dequantize_f32(e).unwrap();
            match c {
                Content::Ternary { trits, scale, .. } => {
                    prop_assert_eq!(e.scale_f32(), Some(*scale));
                    let want: Vec<f32> = trits.iter().map(|&t| scale * f32::from(t)).collect();
                    prop_assert_eq!(values, want);
                }
                Content::Float { dtype, values: v, .. } => {
                    let mut enc = Vec::new();
                    encode_f32(*dtype, &values, &mut enc);
                    let mut orig = Vec::new();
                    encode_f32(*dtype, v, &mut orig);
                    prop_assert_eq!(enc, orig);
                }
            }
        }
    }
}

/// A tensor written without its digest: the file is refused until the digest is given, a
/// digest for a tensor that does not wait for one is refused, and with it the file validates.
#[test]
fn digests_given_later_must_all_come() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<f32> = (0..300).map(|i| i as f32 * 0.25 - 7.0).collect();
    let mut raw = Vec::new();
    encode_f32(FloatDtype::Bf16, &values, &mut raw);
    let plans: Vec<TensorPlan> = (0..2)
        .map(|i| TensorPlan {
            name: format!("t{i}"),
            role: Role::AttnNorm,
            layer: None,
            encoding: Encoding::from_float(FloatDtype::Bf16),
            shape: vec![values.len() as u64],
            compression: Compression::None,
        })
        .collect();
    let provenance = Provenance {
        tool: "test".into(),
        tool_version: "0".into(),
        source_files: vec![],
        options: BTreeMap::new(),
    };
    let write = |path: &std::path::Path| {
        let mut w = BpkWriter::create(
            path,
            false,
            config(),
            QuantScheme::bitnet_b158(),
            provenance.clone(),
            plans.clone(),
        )
        .unwrap();
        w.write_tensor_bytes(None, &raw).unwrap();
        w.write_tensor_bytes_digest_later(None, &raw).unwrap();
        w
    };
    let digest = bitnet_pack::num::digest::hex(&Sha256::digest(&raw));

    let never_given = dir.path().join("a.bpk");
    let w = write(&never_given);
    assert!(w.finish(provenance.clone()).is_err());
    assert!(!never_given.exists());

    let path = dir.path().join("b.bpk");
    let mut w = write(&path);
    assert!(
        w.set_digest("t0", digest.clone()).is_err(),
        "t0 has its digest"
    );
    assert!(w.set_digest("t1", "00".into()).is_err(), "not a SHA-256");
    w.set_digest("t1", digest.clone()).unwrap();
    w.finish(provenance.clone()).unwrap().persist().unwrap();
    // The test model is not a whole model, but no digest may disagree with its tensor.
    let report = bitnet_pack::format::validate::validate_file(&path).unwrap();
    let kinds: Vec<&str> = report.findings.iter().map(|f| f.kind.as_str()).collect();
    assert!(kinds.contains(&"MissingTensor"), "the check ran: {kinds:?}");
    assert!(!kinds.contains(&"DataChecksum"), "{kinds:?}");
    let file = BpkFile::open(&path).unwrap();
    assert_eq!(file.header.tensors[1].sha256, digest);
}
