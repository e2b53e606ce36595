//! Validation of .bpk files: every flipped byte is reported, and each kind of damage is reported
//! as its own finding, even when the attacker recomputed the checksums.

mod common;

use bitnet_pack::format::{Header, PREAMBLE_LEN, Preamble, validate_bytes};
use common::*;
use sha2::{Digest, Sha256};

fn converted(name: &str, extra: &[&str]) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.bpk");
    convert_ok(&fixture(name), &out, extra);
    std::fs::read(out).unwrap()
}

fn kinds(bytes: &[u8]) -> Vec<String> {
    validate_bytes(bytes)
        .findings
        .into_iter()
        .map(|f| f.kind)
        .collect()
}

/// Flipping any single bit anywhere in the file makes validation fail. Every byte of the
/// preamble and of the padding regions is tried; header and tensor data are sampled densely.
#[test]
fn every_flip_is_reported() {
    for (name, extra) in [
        ("tiny-awkward", &[][..]),
        ("tiny-llama-fp", &["--compress", "--layout", "i8"][..]),
    ] {
        let clean = converted(name, extra);
        assert!(validate_bytes(&clean).ok(), "{:?}", kinds(&clean));
        let pre = Preamble::parse(clean[..PREAMBLE_LEN].try_into().unwrap()).unwrap();
        let header_end = PREAMBLE_LEN + pre.header_len as usize;
        let mut positions: Vec<usize> = (0..PREAMBLE_LEN).collect();
        positions.extend((PREAMBLE_LEN..header_end).step_by(13));
        positions.extend(header_end..pre.data_offset as usize);
        positions.extend((pre.data_offset as usize..clean.len()).step_by(29));
        positions.push(clean.len() - 1);
        let mut tried = 0;
        for &pos in &positions {
            for bit in [0x01u8, 0x80] {
                let mut bad = clean.clone();
                bad[pos] ^= bit;
                let report = validate_bytes(&bad);
                assert!(
                    !report.ok(),
                    "{name}: flip of bit {bit:#x} at byte {pos} went unnoticed"
                );
                tried += 1;
            }
        }
        assert!(tried > 2000, "{tried}");
    }
}

#[test]
fn truncation_and_trailing_bytes_are_reported() {
    let clean = converted("tiny-2b4t-qat", &[]);
    assert_eq!(kinds(&clean[..10]), ["TooShort"]);
    assert!(kinds(&clean[..clean.len() - 64]).contains(&"FileLength".to_string()));
    assert_eq!(kinds(&clean[..200]), ["HeaderOutOfBounds"]);
    let mut longer = clean.clone();
    longer.extend_from_slice(&[0; 64]);
    assert!(kinds(&longer).contains(&"FileLength".to_string()));
}

/// A file whose header was edited and re-checksummed, as a careless (or hostile) tool would.
fn rewrite(
    bytes: &[u8],
    edit_header: impl FnOnce(&mut Header),
    edit_data: impl FnOnce(&mut [u8], &Header),
) -> Vec<u8> {
    let pre = Preamble::parse(bytes[..PREAMBLE_LEN].try_into().unwrap()).unwrap();
    let header_end = PREAMBLE_LEN + pre.header_len as usize;
    let mut header: Header = serde_json::from_str(
        std::str::from_utf8(&bytes[PREAMBLE_LEN..header_end])
            .unwrap()
            .trim_end(),
    )
    .unwrap();
    let mut out = bytes.to_vec();
    edit_data(&mut out[pre.data_offset as usize..], &header);
    edit_header(&mut header);
    let mut text = serde_json::to_vec(&header).unwrap();
    assert!(
        text.len() <= pre.header_len as usize,
        "edited header must fit the reserved space"
    );
    text.resize(pre.header_len as usize, b' ');
    out[PREAMBLE_LEN..header_end].copy_from_slice(&text);
    let sha = Preamble::compute_sha256(&pre.head_bytes(), &text);
    out[32..64].copy_from_slice(&sha);
    out
}

fn rehash(data: &[u8], header: &mut Header, index: usize) {
    let t = &header.tensors[index];
    let stored = &data[t.offset as usize..(t.offset + t.length) as usize];
    header.tensors[index].sha256 = bitnet_pack::num::digest::hex(&Sha256::digest(stored));
}

fn index_of(h: &Header, name: &str) -> usize {
    h.tensors.iter().position(|t| t.name == name).unwrap()
}

const Q0: &str = "model.layers.0.self_attn.q_proj.weight";
const NORM: &str = "model.norm.weight";

#[test]
fn each_kind_of_damage_is_named() {
    let clean = converted("tiny-2b4t-qat", &[]);
    let pre = Preamble::parse(clean[..PREAMBLE_LEN].try_into().unwrap()).unwrap();
    let data_offset = pre.data_offset as usize;
    let expect = |bytes: Vec<u8>, kind: &str| {
        let k = kinds(&bytes);
        assert!(k.contains(&kind.to_string()), "expected {kind}, got {k:?}");
    };

    // Preamble fields.
    let mut b = clean.clone();
    b[8] = 2;
    expect(b, "UnsupportedVersion");
    let mut b = clean.clone();
    b[12] = 8;
    expect(b, "UnknownFlags");
    // Bit 2 (q8_0) is known since 1.3: set on a file without q8_0 tensors, it disagrees.
    let mut b = clean.clone();
    b[12] = 4;
    expect(b, "BlockQ8FlagMismatch");
    // Bit 1 is known (some tensor uses t5), but this file's tensors are i2.
    let mut b = clean.clone();
    b[12] = 2;
    expect(b, "DenseFlagMismatch");
    // Bit 0 is known (an extended scheme), but this file's scheme is plain b1.58.
    let mut b = clean.clone();
    b[12] = 1;
    expect(b, "FlagMismatch");
    let mut b = clean.clone();
    b[0] = b'G';
    expect(b, "BadMagic");
    let mut b = clean.clone();
    b[40] ^= 0xff;
    expect(b, "HeaderChecksum");

    // Tensor table.
    expect(
        rewrite(&clean, |h| h.tensors[3].offset += 64, |_, _| {}),
        "Overlap",
    );
    expect(
        rewrite(&clean, |h| h.tensors[3].offset += 1, |_, _| {}),
        "Misaligned",
    );
    expect(
        rewrite(
            &clean,
            |h| {
                let n = h.tensors.len() - 1;
                h.tensors[n].offset += 1 << 20
            },
            |_, _| {},
        ),
        "OutOfBounds",
    );
    expect(
        rewrite(
            &clean,
            |h| {
                let i = index_of(h, Q0);
                h.tensors[i].scale = Some(-1.0)
            },
            |_, _| {},
        ),
        "BadScale",
    );
    expect(
        rewrite(
            &clean,
            |h| {
                let i = index_of(h, Q0);
                h.tensors[i].scale = Some(0.1)
            },
            |_, _| {},
        ),
        "BadScale",
    );
    expect(
        rewrite(
            &clean,
            |h| {
                let i = index_of(h, Q0);
                h.tensors[i].scale = None
            },
            |_, _| {},
        ),
        "ScaleMissing",
    );
    expect(
        rewrite(
            &clean,
            |h| {
                let i = index_of(h, NORM);
                h.tensors[i].scale = Some(1.0)
            },
            |_, _| {},
        ),
        "ScaleUnexpected",
    );
    expect(
        rewrite(
            &clean,
            |h| {
                let i = index_of(h, Q0);
                h.tensors[i].length -= 32
            },
            |_, _| {},
        ),
        "StoredLength",
    );
    expect(
        rewrite(
            &clean,
            |h| {
                let i = index_of(h, Q0);
                h.tensors[i].name = NORM.into()
            },
            |_, _| {},
        ),
        "DuplicateName",
    );
    expect(
        rewrite(
            &clean,
            |h| {
                let i = index_of(h, Q0);
                h.tensors[i].sha256 = "XYZ".into()
            },
            |_, _| {},
        ),
        "BadDigest",
    );
    expect(
        rewrite(
            &clean,
            |h| {
                let i = index_of(h, Q0);
                h.tensors[i].encoding = bitnet_pack::format::Encoding::F16;
                h.tensors[i].scale = None
            },
            |_, _| {},
        ),
        "RoleEncoding",
    );

    // Consistency with the model config.
    expect(
        rewrite(&clean, |h| h.model.num_layers = 3, |_, _| {}),
        "MissingTensor",
    );
    expect(
        rewrite(&clean, |h| h.model.num_layers = 1, |_, _| {}),
        "UnexpectedTensor",
    );
    expect(
        rewrite(&clean, |h| h.model.intermediate_size = 353, |_, _| {}),
        "ShapeVsConfig",
    );
    expect(
        rewrite(&clean, |h| h.model.num_kv_heads = 3, |_, _| {}),
        "BadConfig",
    );

    // Data with recomputed checksums: invalid codes and non-finite floats are still caught.
    let bad_codes = rewrite(
        &clean,
        |_| {},
        |data, h| {
            // Weight 0 of the first row becomes code 3.
            data[h.tensors[index_of(h, Q0)].offset as usize] |= 0b11;
        },
    );
    // Recompute the digest of the damaged tensor so only the code check can see it.
    let fixed = rewrite(
        &bad_codes,
        |h| rehash(&bad_codes[data_offset..], h, index_of(h, Q0)),
        |_, _| {},
    );
    assert_eq!(kinds(&fixed), ["BadCode"]);

    let inf = rewrite(
        &clean,
        |_| {},
        |data, h| {
            let t = &h.tensors[index_of(h, NORM)];
            let at = t.offset as usize + 2; // bf16 element 1
            data[at..at + 2].copy_from_slice(&0x7F80u16.to_le_bytes());
        },
    );
    let fixed = rewrite(
        &inf,
        |h| rehash(&inf[data_offset..], h, index_of(h, NORM)),
        |_, _| {},
    );
    assert_eq!(kinds(&fixed), ["NonFinite"]);

    // Non-zero padding between the header and the data.
    let mut b = clean.clone();
    let header_end = PREAMBLE_LEN + pre.header_len as usize;
    if header_end < data_offset {
        b[data_offset - 1] = 7;
        expect(b, "NonZeroPadding");
    }
}

#[test]
fn cli_validate_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.bpk");
    convert_ok(&fixture("tiny-awkward"), &path, &[]);
    let p = path.to_str().unwrap();
    assert_eq!(code(&bin(&["validate", p])), 0);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let o = bin(&["validate", p]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stdout(&o).contains("INVALID"));
    let o = bin(&["validate", p, "--json"]);
    assert_eq!(code(&o), 1);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["ok"], false);
    assert!(
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "DataChecksum" || f["kind"] == "NonZeroPadding")
    );
    // inspect and unpack refuse damaged files with exit 2.
    let out = tmp.path().join("u.safetensors");
    assert_eq!(code(&bin(&["unpack", p, "-o", out.to_str().unwrap()])), 2);
    assert!(!out.exists());
    assert_eq!(
        code(&bin(&[
            "validate",
            tmp.path().join("nope.bpk").to_str().unwrap()
        ])),
        2
    );
}

/// Found by fuzzing: ternary entries with a zero dimension made validation panic (rows of zero
/// bytes) or abort (a row buffer sized by a dimension the data cannot hold). Both must be
/// reported as a bad shape, and opening the file must fail with an error.
#[test]
fn zero_dimensions_are_reported_not_crashed_on() {
    use bitnet_pack::format::{BpkFile, Storage};
    let clean = converted("tiny-2b4t-qat", &[]);
    for shape in [vec![1u64, 0], vec![0, 1_898_210_101_902]] {
        let bad = rewrite(
            &clean,
            |h| {
                let i = index_of(h, Q0);
                h.tensors[i].shape = shape.clone();
                h.tensors[i].length = 0;
                h.tensors[i].sha256 = bitnet_pack::num::digest::hex(&Sha256::digest(b""));
            },
            |_, _| {},
        );
        let k = kinds(&bad);
        assert!(k.contains(&"BadShape".to_string()), "{shape:?}: {k:?}");
        let opened = BpkFile::from_storage(std::path::Path::new("fuzzed.bpk"), Storage::Owned(bad));
        assert!(opened.is_err(), "{shape:?} opened");
    }
}

/// An entry already reported by the structural checks (here: overlapping the previous tensor)
/// is not read again: a hostile table could otherwise list a million entries over the same
/// bytes and make validation hash them a million times.
#[test]
fn entries_with_structural_problems_are_not_read() {
    let clean = converted("tiny-2b4t-qat", &[]);
    let bad = rewrite(
        &clean,
        |h| {
            let i = index_of(h, Q0);
            let previous = h.tensors[i - 1].clone();
            // Point q_proj into the previous tensor's bytes, with a digest that cannot match.
            h.tensors[i].offset = previous.offset;
            h.tensors[i].sha256 = "0".repeat(64);
        },
        |_, _| {},
    );
    let report = validate_bytes(&bad);
    let about_q0: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.tensor.as_deref() == Some(Q0))
        .map(|f| f.kind.as_str())
        .collect();
    assert!(about_q0.contains(&"Overlap"), "{about_q0:?}");
    assert!(!about_q0.contains(&"DataChecksum"), "{about_q0:?}");
}
