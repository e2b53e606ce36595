//! Round trips through the writer and reader, and one hostile file per reader error.

use super::*;
use crate::pack::{tq, tq2_0};
use proptest::prelude::*;
use std::path::Path;

/// Writes `kv` and `tensors` (with their bytes) to memory.
fn write_vec(kv: &[(String, Value)], tensors: &[(TensorSpec, Vec<u8>)]) -> Vec<u8> {
    let plan = GgufPlan::new(kv, tensors.iter().map(|t| t.0.clone()).collect()).unwrap();
    let mut w = GgufWriter::new(Vec::new(), plan, Path::new("mem.gguf")).unwrap();
    for (spec, bytes) in tensors {
        w.write_tensor(&spec.name, bytes).unwrap();
    }
    w.finish().unwrap()
}

fn spec(name: &str, dims: &[u64], ty: GgmlType) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dims: dims.to_vec(),
        ty,
    }
}

fn kv(key: &str, v: Value) -> (String, Value) {
    (key.to_string(), v)
}

/// A small file: two pairs and an F32 [4] tensor followed by an F16 [2, 3] one.
fn small() -> Vec<u8> {
    write_vec(
        &[
            kv("general.architecture", Value::String("bitnet".into())),
            kv("a.n", Value::U32(7)),
        ],
        &[
            (spec("w", &[4], GgmlType::F32), vec![1; 16]),
            (spec("v", &[2, 3], GgmlType::F16), vec![2; 12]),
        ],
    )
}

/// Hand-built file bytes, for inputs the writer refuses to produce.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        let mut r = Raw::default();
        r.0.extend_from_slice(b"GGUF");
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &[u8]) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s);
        self
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name.as_bytes()).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pads to `align` and appends `n` data bytes.
    fn data(&mut self, align: usize, n: usize) -> Vec<u8> {
        let mut v = self.0.clone();
        v.resize(v.len().next_multiple_of(align) + n, 0);
        v
    }
}

#[test]
fn small_file_round_trips_with_the_layout_llama_cpp_expects() {
    let bytes = small();
    let f = parse(&bytes).unwrap();
    assert_eq!(f.version(), GgufVersion::V3);
    assert_eq!(f.get_str("general.architecture"), Some("bitnet"));
    assert_eq!(f.get_u32("a.n"), Some(7));
    assert_eq!(f.get_uint("a.n"), Some(7));
    assert_eq!(f.get_f32("a.n"), None);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset() % 32, 0);
    let t = f.tensors();
    assert_eq!((t[0].offset, t[0].size), (0, 16));
    assert_eq!((t[1].offset, t[1].size), (32, 12));
    assert_eq!(f.tensor_data(&t[1]), &[2; 12]);
    assert_eq!(bytes.len() as u64, f.data_offset() + 64);
}

fn arb_value() -> impl Strategy<Value = Value> {
    let finite32 = (-1e30f32..1e30).prop_map(Value::F32);
    let finite64 = (-1e300f64..1e300).prop_map(Value::F64);
    prop_oneof![
        any::<u8>().prop_map(Value::U8),
        any::<i8>().prop_map(Value::I8),
        any::<u16>().prop_map(Value::U16),
        any::<i16>().prop_map(Value::I16),
        any::<u32>().prop_map(Value::U32),
        any::<i32>().prop_map(Value::I32),
        finite32,
        any::<bool>().prop_map(Value::Bool),
        ".{0,12}".prop_map(Value::String),
        any::<u64>().prop_map(Value::U64),
        any::<i64>().prop_map(Value::I64),
        finite64,
        proptest::collection::vec(any::<u8>(), 0..9).prop_map(|v| Value::Array(Array::U8(v))),
        proptest::collection::vec(any::<i32>(), 0..9).prop_map(|v| Value::Array(Array::I32(v))),
        proptest::collection::vec(any::<bool>(), 0..9).prop_map(|v| Value::Array(Array::Bool(v))),
        proptest::collection::vec(".{0,6}", 0..5).prop_map(|v| Value::Array(Array::String(v))),
        proptest::collection::vec(-1e6f32..1e6, 0..9).prop_map(|v| Value::Array(Array::F32(v))),
    ]
}

fn arb_tensor() -> impl Strategy<Value = (GgmlType, Vec<u64>)> {
    prop_oneof![
        (1u64..5, 1u64..4).prop_map(|(a, b)| (GgmlType::F32, vec![a, b])),
        (1u64..9).prop_map(|a| (GgmlType::F16, vec![a])),
        (1u64..3, 1u64..3, 1u64..3).prop_map(|(a, b, c)| (GgmlType::BF16, vec![a, b, c, 2])),
        (1u64..3).prop_map(|r| (GgmlType::Q8_0, vec![32, r])),
        (1u64..3).prop_map(|r| (GgmlType::TQ1_0, vec![256, r])),
        (1u64..3).prop_map(|r| (GgmlType::TQ2_0, vec![256, r])),
        (1u64..3).prop_map(|r| (GgmlType::I2_S, vec![128, r])),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn write_then_parse_gives_everything_back(
        values in proptest::collection::vec(arb_value(), 0..8),
        shapes in proptest::collection::vec(arb_tensor(), 0..5),
        align_pow in proptest::option::of(0u32..8),
        seed in any::<u64>(),
    ) {
        let mut pairs: Vec<(String, Value)> =
            values.into_iter().enumerate().map(|(i, v)| (format!("k.{i}"), v)).collect();
        if let Some(p) = align_pow {
            pairs.push(kv(ALIGNMENT_KEY, Value::U32(1 << p)));
        }
        let mut rng = crate::num::SplitMix64(seed);
        let tensors: Vec<(TensorSpec, Vec<u8>)> = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (ty, dims))| {
                let n = tensor_bytes(ty, &dims).unwrap() as usize;
                let data = (0..n).map(|_| rng.next_u64() as u8).collect();
                (spec(&format!("t{i}"), &dims, ty), data)
            })
            .collect();
        let bytes = write_vec(&pairs, &tensors);
        let f = parse(&bytes).unwrap();
        prop_assert_eq!(f.kv(), &pairs[..]);
        prop_assert_eq!(f.alignment(), align_pow.map_or(32, |p| 1 << p));
        prop_assert_eq!(f.tensors().len(), tensors.len());
        for (info, (spec, data)) in f.tensors().iter().zip(&tensors) {
            prop_assert_eq!(&info.name, &spec.name);
            prop_assert_eq!(&info.dims, &spec.dims);
            prop_assert_eq!(info.ty, spec.ty);
            prop_assert_eq!(f.tensor_data(info), &data[..]);
        }
    }
}

#[test]
fn ternary_tensors_decode() {
    let trits: Vec<i8> = (0..512).map(|i| (i % 3) as i8 - 1).collect();
    let mut tq2 = vec![0u8; 2 * tq2_0::BLOCK_BYTES];
    tq2_0::encode_row(&trits, 0.25, &mut tq2).unwrap();
    let mut i2 = vec![0u8; i2_s::tensor_bytes(2, 256).unwrap()];
    i2_s::encode_tensor(&trits, 256, 0.5, &mut i2).unwrap();
    let bytes = write_vec(
        &[],
        &[
            (spec("a", &[256, 2], GgmlType::TQ2_0), tq2),
            (spec("b", &[256, 2], GgmlType::I2_S), i2),
        ],
    );
    let f = parse(&bytes).unwrap();
    let a = f.ternary(&f.tensors()[0]).unwrap().unwrap();
    assert_eq!(
        (a.trits.as_slice(), a.scales.as_slice()),
        (&trits[..], &[0.25, 0.25][..])
    );
    let b = f.ternary(&f.tensors()[1]).unwrap().unwrap();
    assert_eq!(
        (b.trits.as_slice(), b.scales.as_slice()),
        (&trits[..], &[0.5][..])
    );
}

#[test]
fn type_table() {
    for (ty, id) in [
        (GgmlType::F32, 0),
        (GgmlType::F16, 1),
        (GgmlType::Q8_0, 8),
        (GgmlType::BF16, 30),
        (GgmlType::TQ1_0, 34),
        (GgmlType::TQ2_0, 35),
        (GgmlType::I2_S, 36),
    ] {
        assert_eq!(ty.id(), id);
        assert_eq!(GgmlType::from_id(id), Some(ty));
    }
    assert_eq!(GgmlType::from_id(37), None);
    assert_eq!(tensor_bytes(GgmlType::TQ1_0, &[512, 3]), Ok(6 * 54));
    assert_eq!(
        tensor_bytes(GgmlType::I2_S, &[2560, 640]),
        Ok(2560 * 640 / 4 + 32)
    );
    assert_eq!(
        tensor_bytes(GgmlType::TQ2_0, &[100]),
        Err(ShapeError::NotBlockMultiple {
            ty: GgmlType::TQ2_0,
            ne0: 100,
            block: 256
        })
    );
    assert_eq!(
        tensor_bytes(GgmlType::F32, &[1 << 40, 1 << 30]),
        Err(ShapeError::Overflow)
    );
    assert_eq!(
        tensor_bytes(GgmlType::F32, &[]),
        Err(ShapeError::DimCount { n: 0 })
    );
    assert_eq!(
        tensor_bytes(GgmlType::F32, &[3, 0]),
        Err(ShapeError::ZeroDim { axis: 1 })
    );
    for id in 0..64 {
        if let Some(ty) = GgmlType::from_id(id) {
            assert_eq!(ty.id(), id);
            assert!(ty.block_size() > 0 && ty.block_bytes() > 0);
        }
    }
}

// ---- One hostile file per reader error. ----

macro_rules! refuses {
    ($bytes:expr, $pat:pat $(if $guard:expr)?) => {
        match parse(&$bytes) {
            Err(e @ $pat) $(if $guard)? => {
                let _ = e.to_string();
            }
            other => panic!("expected {}, got {:?}", stringify!($pat), other.map(|_| ())),
        }
    };
}

#[test]
fn truncated_anywhere_is_refused() {
    let bytes = small();
    // The last tensor ends 20 bytes before the file does; what follows it is optional padding.
    for len in 0..bytes.len() - 20 {
        assert!(
            parse(&bytes[..len]).is_err(),
            "prefix of {len} bytes parsed"
        );
    }
    refuses!(bytes[..3], GgufError::Truncated { what: "magic", .. });
    refuses!(bytes[..30], GgufError::CountExceedsFile { .. });
}

#[test]
fn magic_and_version() {
    let mut b = small();
    b[0] = b'X';
    refuses!(b, GgufError::BadMagic { .. });
    for v in [1u32, 4] {
        let mut b = small();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        refuses!(b, GgufError::UnsupportedVersion { found } if found == v);
    }
    let mut b = small();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    refuses!(b, GgufError::BigEndian { .. });
    let mut b = small();
    b[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(parse(&b).unwrap().version(), GgufVersion::V2);
}

#[test]
fn counts_are_capped_and_bounded_by_the_file() {
    refuses!(
        Raw::header(3, MAX_TENSORS + 1, 0).0,
        GgufError::CountTooLarge {
            what: "tensors",
            ..
        }
    );
    refuses!(
        Raw::header(3, 0, u64::MAX).0,
        GgufError::CountTooLarge {
            what: "key-value pairs",
            ..
        }
    );
    refuses!(
        Raw::header(3, 1000, 0).0,
        GgufError::CountExceedsFile { .. }
    );
    let mut r = Raw::header(3, 0, 1);
    r.str(b"arr").u32(9).u32(0).u64(MAX_ARRAY_LEN + 1);
    refuses!(
        r.0,
        GgufError::CountTooLarge {
            what: "array elements",
            ..
        }
    );
    let mut r = Raw::header(3, 0, 1);
    r.str(b"arr").u32(9).u32(4).u64(1000).u32(1);
    refuses!(
        r.0,
        GgufError::CountExceedsFile {
            what: "array elements",
            ..
        }
    );
}

#[test]
fn strings_and_keys() {
    let mut r = Raw::header(3, 0, 1);
    r.u64(MAX_KEY_LEN + 1).u32(0).u32(0);
    refuses!(r.0, GgufError::StringTooLong { what: "key", .. });
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k").u32(8).u64(u64::MAX);
    refuses!(
        r.0,
        GgufError::StringTooLong {
            what: "string value",
            ..
        }
    );
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k").u32(8).u64(1000).u32(0);
    refuses!(
        r.0,
        GgufError::Truncated {
            what: "string value",
            ..
        }
    );
    let mut r = Raw::header(3, 0, 1);
    r.str(b"\xff\xfe").u32(0);
    r.0.push(0);
    refuses!(r.0, GgufError::NotUtf8 { what: "key", .. });
    let mut r = Raw::header(3, 0, 1);
    r.str(b"").u32(0);
    r.0.push(0);
    refuses!(r.0, GgufError::EmptyKey { .. });
    let mut r = Raw::header(3, 0, 2);
    r.str(b"k").u32(0);
    r.0.push(0);
    r.str(b"k").u32(0);
    r.0.push(0);
    refuses!(r.0, GgufError::DuplicateKey { .. });
}

#[test]
fn value_types() {
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k").u32(13).u32(0);
    refuses!(r.0, GgufError::UnknownValueType { id: 13, .. });
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k").u32(9).u32(77).u64(0);
    refuses!(r.0, GgufError::UnknownValueType { id: 77, .. });
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k").u32(9).u32(9).u64(1).u32(0).u64(0);
    refuses!(r.0, GgufError::NestedArray { .. });
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k").u32(7);
    r.0.push(2);
    refuses!(r.0, GgufError::BadBool { value: 2, .. });
}

#[test]
fn alignment_must_be_a_u32_power_of_two() {
    for a in [0u32, 3, 1 << 30] {
        let mut r = Raw::header(3, 0, 1);
        r.str(ALIGNMENT_KEY.as_bytes()).u32(4).u32(a);
        refuses!(r.0, GgufError::BadAlignment { value } if value == a);
    }
    let mut r = Raw::header(3, 0, 1);
    r.str(ALIGNMENT_KEY.as_bytes()).u32(10).u64(32);
    refuses!(
        r.0,
        GgufError::AlignmentType {
            found: ValueType::U64
        }
    );
}

#[test]
fn tensor_infos() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor(&"x".repeat(64), &[4], 0, 0);
    refuses!(r.data(32, 16), GgufError::BadName { len: 64, .. });
    let mut r = Raw::header(3, 1, 0);
    r.tensor("", &[4], 0, 0);
    refuses!(r.data(32, 16), GgufError::BadName { len: 0, .. });
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[4], 0, 0).tensor("a", &[4], 0, 32);
    refuses!(r.data(32, 48), GgufError::DuplicateTensor { .. });
    for n in [0u32, 5] {
        let mut r = Raw::header(3, 1, 0);
        r.str(b"a")
            .u32(n)
            .u64(1)
            .u64(1)
            .u64(1)
            .u64(1)
            .u64(1)
            .u32(0)
            .u64(0);
        refuses!(r.data(32, 16), GgufError::BadDimCount { n_dims, .. } if n_dims == n);
    }
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[4], 37, 0);
    refuses!(r.data(32, 16), GgufError::UnknownTensorType { id: 37, .. });
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[1 << 32, 1 << 32], 0, 0);
    refuses!(
        r.data(32, 16),
        GgufError::BadShape {
            source: ShapeError::Overflow,
            ..
        }
    );
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[4, 0], 0, 0);
    refuses!(
        r.data(32, 16),
        GgufError::BadShape {
            source: ShapeError::ZeroDim { axis: 1 },
            ..
        }
    );
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[100], 35, 0);
    refuses!(
        r.data(32, 66),
        GgufError::BadShape {
            source: ShapeError::NotBlockMultiple { .. },
            ..
        }
    );
}

#[test]
fn tensor_placement() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[4], 0, 8);
    refuses!(r.data(32, 64), GgufError::Misaligned { offset: 8, .. });
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[4], 0, 32);
    refuses!(r.data(32, 40), GgufError::TensorOutOfBounds { .. });
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[4], 0, u64::MAX - 31);
    refuses!(r.data(32, 16), GgufError::TensorOutOfBounds { .. });
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[16], 0, 0).tensor("b", &[4], 0, 32);
    refuses!(r.data(32, 64), GgufError::Overlap { .. });
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[4], 0, 0);
    assert!(parse(&r.data(32, 16)).is_ok());
    assert!(parse(&r.data(32, 32)).is_ok());
    refuses!(r.data(32, 33), GgufError::TrailingBytes { .. });
}

#[test]
fn bad_ternary_data_is_reported_with_the_tensor() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("q", &[256], 35, 0);
    let mut b = r.data(32, 66);
    let start = b.len() - 66;
    b[start..start + 64].fill(0xff); // code 3 everywhere
    let f = parse(&b).unwrap();
    match f.ternary(&f.tensors()[0]) {
        Err(GgufError::BadTensorData { name, .. }) => assert_eq!(name, "q"),
        other => panic!("{other:?}"),
    }
}

// ---- Writer errors. ----

#[test]
fn plan_refuses_what_readers_refuse() {
    let t = |name: &str| spec(name, &[4], GgmlType::F32);
    let e = |kv: &[(String, Value)], ts: Vec<TensorSpec>| GgufPlan::new(kv, ts).unwrap_err();
    assert!(matches!(
        e(&[kv("", Value::U8(0))], vec![]),
        GgufWriteError::BadKey { .. }
    ));
    assert!(matches!(
        e(&[kv("k", Value::U8(0)), kv("k", Value::U8(1))], vec![]),
        GgufWriteError::DuplicateKey { .. }
    ));
    for bad in [Value::U32(0), Value::U32(3), Value::U64(32)] {
        assert!(matches!(
            e(&[kv(ALIGNMENT_KEY, bad)], vec![]),
            GgufWriteError::BadAlignment { .. }
        ));
    }
    assert!(matches!(
        e(&[], vec![t(&"n".repeat(64))]),
        GgufWriteError::BadName { len: 64, .. }
    ));
    assert!(matches!(
        e(&[], vec![t("a"), t("a")]),
        GgufWriteError::DuplicateTensor { .. }
    ));
    assert!(matches!(
        e(&[], vec![spec("a", &[100], GgmlType::TQ1_0)]),
        GgufWriteError::BadShape { .. }
    ));
    let huge = |n: &str| spec(n, &[1 << 31, 1 << 31], GgmlType::I8);
    assert!(matches!(
        e(&[], vec![huge("a"), huge("b"), huge("c"), huge("d")]),
        GgufWriteError::TooLarge
    ));
}

#[test]
fn writer_follows_the_plan() {
    let plan = || {
        GgufPlan::new(
            &[],
            vec![
                spec("a", &[4], GgmlType::F32),
                spec("b", &[2], GgmlType::F32),
            ],
        )
        .unwrap()
    };
    let new = || GgufWriter::new(Vec::new(), plan(), Path::new("m")).unwrap();
    let mut w = new();
    assert!(matches!(
        w.write_tensor("b", &[0; 8]),
        Err(GgufWriteError::OutOfOrder { .. })
    ));
    assert!(matches!(
        w.write_chunk(&[0]),
        Err(GgufWriteError::NoTensorOpen)
    ));
    assert!(matches!(w.end_tensor(), Err(GgufWriteError::NoTensorOpen)));
    w.begin_tensor("a").unwrap();
    assert!(matches!(
        w.begin_tensor("a"),
        Err(GgufWriteError::TensorOpen { .. })
    ));
    w.write_chunk(&[1; 10]).unwrap();
    assert!(matches!(
        w.write_chunk(&[1; 7]),
        Err(GgufWriteError::Length {
            planned: 16,
            written: 17,
            ..
        })
    ));
    assert!(matches!(
        w.end_tensor(),
        Err(GgufWriteError::Length { written: 10, .. })
    ));
    w.write_chunk(&[1; 6]).unwrap();
    w.end_tensor().unwrap();
    assert!(matches!(
        new().finish(),
        Err(GgufWriteError::Missing { .. })
    ));
    w.write_tensor("b", &[2; 8]).unwrap();
    assert!(matches!(
        w.write_tensor("c", &[]),
        Err(GgufWriteError::NoneLeft { .. })
    ));
    let bytes = w.finish().unwrap();
    let f = parse(&bytes).unwrap();
    assert_eq!(f.tensor_data(&f.tensors()[0]), &[1; 16]);
}

#[test]
fn file_writer_leaves_nothing_until_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("m.gguf");
    let plan = GgufPlan::new(
        &[kv("x", Value::Bool(true))],
        vec![spec("a", &[4], GgmlType::F32)],
    )
    .unwrap();
    {
        let mut w = GgufFileWriter::create(&target, false, plan.clone()).unwrap();
        w.begin_tensor("a").unwrap();
        // Dropped mid-tensor (an error elsewhere): no target, no temporary file.
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let mut w = GgufFileWriter::create(&target, false, plan.clone()).unwrap();
    w.write_tensor("a", &[3; 16]).unwrap();
    let done = w.finish().unwrap();
    assert!(!target.exists());
    done.persist().unwrap();
    let bytes = std::fs::read(&target).unwrap();
    assert_eq!(bytes.len() as u64, plan.file_len());
    let f = parse(&bytes).unwrap();
    assert_eq!(f.get_bool("x"), Some(true));
    assert!(matches!(
        GgufFileWriter::create(&target, false, plan),
        Err(GgufWriteError::File(crate::fsio::FileError::Exists { .. }))
    ));
}

// ---- Against gguf-py (fixtures/make_gguf_goldens.py, gguf 0.19.0). ----

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    crate::num::digest::hex(&sha2::Sha256::digest(bytes))
}

/// Our Value as the sidecar writes it ({type, value} or {type, elem_type, values}).
fn to_json(v: &Value) -> serde_json::Value {
    use serde_json::json;
    let ty = v.value_type().id();
    let scalar = |x: serde_json::Value| json!({"type": ty, "value": x});
    match v {
        Value::U8(x) => scalar(json!(x)),
        Value::I8(x) => scalar(json!(x)),
        Value::U16(x) => scalar(json!(x)),
        Value::I16(x) => scalar(json!(x)),
        Value::U32(x) => scalar(json!(x)),
        Value::I32(x) => scalar(json!(x)),
        Value::F32(x) => scalar(json!(f64::from(*x))),
        Value::Bool(x) => scalar(json!(x)),
        Value::String(x) => scalar(json!(x)),
        Value::U64(x) => scalar(json!(x)),
        Value::I64(x) => scalar(json!(x)),
        Value::F64(x) => scalar(json!(x)),
        Value::Array(a) => {
            let values = match a {
                Array::I32(v) => json!(v),
                Array::String(v) => json!(v),
                Array::F32(v) => json!(v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>()),
                other => panic!("the golden has no {:?} array", other.elem_type()),
            };
            json!({"type": ty, "elem_type": a.elem_type().id(), "values": values})
        }
    }
}

/// The dequantized f32 values of a tensor, little-endian, as gguf-py computes them.
fn dequantized_le(f: &GgufFile, t: &TensorInfo) -> Vec<u8> {
    let data = f.tensor_data(t);
    let values: Vec<f32> = match t.ty {
        GgmlType::F32 => return data.to_vec(),
        GgmlType::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => {
            let tern = f.ternary(t).unwrap().unwrap();
            tern.trits
                .iter()
                .enumerate()
                .map(|(i, &x)| tern.scales[i / tq::BLOCK] * f32::from(x))
                .collect()
        }
    };
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn reads_what_gguf_py_writes_and_writes_it_back_byte_for_byte() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/goldens/gguf/");
    let bytes = std::fs::read(format!("{dir}small.gguf")).unwrap();
    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{dir}small.json")).unwrap()).unwrap();
    let f = parse(&bytes).unwrap();
    assert_eq!(
        u64::from(f.alignment()),
        side["alignment"].as_u64().unwrap()
    );
    let want_kv = side["kv"].as_array().unwrap();
    assert_eq!(f.kv().len(), want_kv.len());
    for ((key, value), want) in f.kv().iter().zip(want_kv) {
        assert_eq!(key, want["key"].as_str().unwrap());
        let mut want = want.clone();
        want.as_object_mut().unwrap().remove("key");
        assert_eq!(to_json(value), want, "key {key}");
    }
    let want_t = side["tensors"].as_array().unwrap();
    assert_eq!(f.tensors().len(), want_t.len());
    for (t, want) in f.tensors().iter().zip(want_t) {
        assert_eq!(t.name, want["name"].as_str().unwrap());
        assert_eq!(serde_json::json!(t.dims), want["dims"]);
        assert_eq!(u64::from(t.ty.id()), want["type"].as_u64().unwrap());
        assert_eq!(t.ty.name(), want["type_name"].as_str().unwrap());
        assert_eq!(t.offset, want["offset"].as_u64().unwrap());
        assert_eq!(
            f.data_offset() + t.offset,
            want["data_offset"].as_u64().unwrap()
        );
        assert_eq!(t.size, want["n_bytes"].as_u64().unwrap());
        assert_eq!(
            sha256(f.tensor_data(t)),
            want["data_sha256"].as_str().unwrap()
        );
        assert_eq!(
            sha256(&dequantized_le(&f, t)),
            want["dequantized_sha256"].as_str().unwrap(),
            "{}",
            t.name
        );
    }
    // Our writer, given what we read, reproduces gguf-py's file exactly.
    let tensors: Vec<(TensorSpec, Vec<u8>)> = f
        .tensors()
        .iter()
        .map(|t| (spec(&t.name, &t.dims, t.ty), f.tensor_data(t).to_vec()))
        .collect();
    assert_eq!(write_vec(f.kv(), &tensors), bytes);
}

/// Writes a GGUF for cross-checking with gguf-py (`fixtures/make_gguf_goldens.py check FILE`)
/// to the path in `BITNET_PACK_GGUF_OUT`, if set; otherwise to a temporary directory. The
/// file holds one key of each scalar type, arrays, and F32, F16, TQ1_0 and TQ2_0 tensors.
#[test]
fn writes_a_file_for_gguf_py_to_check() {
    use crate::pack::tq1_0;
    let trits: Vec<i8> = (0..768).map(|i| ((i * 7 + i / 5) % 3) as i8 - 1).collect();
    let mut tq1 = vec![0u8; 3 * tq1_0::BLOCK_BYTES];
    tq1_0::encode_row(&trits, 0.0371, &mut tq1).unwrap();
    let mut tq2 = vec![0u8; 3 * tq2_0::BLOCK_BYTES];
    tq2_0::encode_row(&trits, 1.75, &mut tq2).unwrap();
    let f32s: Vec<u8> = (0..15)
        .flat_map(|i| (i as f32 * 0.5 - 3.0).to_le_bytes())
        .collect();
    let f16s: Vec<u8> = (0..8)
        .flat_map(|i| half::f16::from_f32(i as f32 / 8.0).to_le_bytes())
        .collect();
    let pairs = vec![
        kv("general.architecture", Value::String("bitnet".into())),
        kv("general.quantization_version", Value::U32(2)),
        kv("general.file_type", Value::U32(37)),
        kv("test.u8", Value::U8(200)),
        kv("test.i16", Value::I16(-30000)),
        kv("test.f32", Value::F32(0.1)),
        kv("test.bool", Value::Bool(true)),
        kv("test.u64", Value::U64((1 << 40) + 3)),
        kv("test.f64", Value::F64(1.0 / 3.0)),
        kv("test.string", Value::String("h\u{e9}llo \u{2713}".into())),
        kv(
            "test.arr.str",
            Value::Array(Array::String(vec!["a".into(), "".into()])),
        ),
        kv("test.arr.i32", Value::Array(Array::I32(vec![1, -2, 3]))),
    ];
    let tensors = vec![
        (spec("f32.weight", &[5, 3], GgmlType::F32), f32s),
        (spec("f16.weight", &[8], GgmlType::F16), f16s),
        (spec("tq1.weight", &[256, 3], GgmlType::TQ1_0), tq1),
        (spec("tq2.weight", &[256, 3], GgmlType::TQ2_0), tq2),
    ];
    let dir = tempfile::tempdir().unwrap();
    let target = std::env::var_os("BITNET_PACK_GGUF_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().join("rust.gguf"));
    let plan = GgufPlan::new(&pairs, tensors.iter().map(|t| t.0.clone()).collect()).unwrap();
    let mut w = GgufFileWriter::create(&target, true, plan).unwrap();
    for (s, data) in &tensors {
        w.write_tensor(&s.name, data).unwrap();
    }
    w.finish().unwrap().persist().unwrap();
    let bytes = std::fs::read(&target).unwrap();
    let f = parse(&bytes).unwrap();
    assert_eq!(f.kv(), &pairs[..]);
    assert_eq!(f.ternary(&f.tensors()[2]).unwrap().unwrap().trits, trits);
}
