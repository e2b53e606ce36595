//! End-to-end: the real binary on the committed fixtures.

mod common;

use common::*;

/// convert -> validate exits 0 on every fixture, in every layout and storage option.
#[test]
fn every_fixture_converts_and_validates() {
    let tmp = tempfile::tempdir().unwrap();
    let variants: [&[&str]; 4] = [
        &[],
        &["--layout", "i8"],
        &["--compress"],
        &["--keep", "bf16", "--compress", "--layout", "i8"],
    ];
    for name in FIXTURES {
        for (i, extra) in variants.iter().enumerate() {
            let out = tmp.path().join(format!("{name}-{i}.bpk"));
            convert_ok(&fixture(name), &out, extra);
            let o = bin(&["validate", out.to_str().unwrap()]);
            assert_eq!(code(&o), 0, "{name} {extra:?}: {}", stdout(&o));
            assert!(stdout(&o).contains(": ok"), "{}", stdout(&o));
        }
    }
}

/// Unpacking a converted model gives, bit for bit in f32, the absmean fake-quant that the
/// independent numpy implementation (fixtures/make_fixtures.py) computed from the same source.
#[test]
fn unpack_equals_the_independent_numpy_fake_quant() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let golden = read_st(&fixture(name).join("golden_fakequant.safetensors"));
        for layout in ["i2", "i8"] {
            let bpk = tmp.path().join(format!("{name}-{layout}.bpk"));
            let st = tmp.path().join(format!("{name}-{layout}.safetensors"));
            convert_ok(&fixture(name), &bpk, &["--layout", layout]);
            let o = bin(&["unpack", bpk.to_str().unwrap(), "-o", st.to_str().unwrap()]);
            assert_eq!(code(&o), 0, "{}", stderr(&o));
            let unpacked = read_st(&st);
            let mut compared = 0;
            for g in golden.iter().filter(|g| !g.name.ends_with(".scale")) {
                let u = unpacked
                    .iter()
                    .find(|u| u.name == g.name)
                    .unwrap_or_else(|| panic!("{} missing", g.name));
                assert_eq!(u.shape, g.shape, "{}", g.name);
                assert_eq!(u.dtype, safetensors::Dtype::F32);
                let (uv, gv) = (f32s(&u.data), f32s(&g.data));
                let first_diff = uv
                    .iter()
                    .zip(&gv)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(
                    first_diff, None,
                    "{name} {layout} {}: first differing element",
                    g.name
                );
                compared += 1;
            }
            assert_eq!(
                compared,
                golden.len() / 2,
                "{name}: every projection compared"
            );
            assert!(compared >= 14);
        }
    }
}

/// The header scales are the golden's `scale = 1/s` exactly.
#[test]
fn header_scales_equal_the_golden_scales() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = tmp.path().join("m.bpk");
    convert_ok(&fixture("tiny-2b4t-qat"), &bpk, &[]);
    let file = bitnet_pack::format::BpkFile::open(&bpk).unwrap();
    let golden = read_st(&fixture("tiny-2b4t-qat").join("golden_fakequant.safetensors"));
    for g in golden.iter().filter(|g| g.name.ends_with(".scale")) {
        let name = g.name.trim_end_matches(".scale");
        let entry = file.tensor(name).unwrap();
        assert_eq!(
            entry.scale_f32().unwrap().to_bits(),
            f32s(&g.data)[0].to_bits(),
            "{name}"
        );
    }
}

/// Non-ternary tensors come back exactly as the source had them (widened to f32).
#[test]
fn unpack_keeps_norms_and_embeddings_exact() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny-llama-fp", "tiny-awkward"] {
        let bpk = tmp.path().join(format!("{name}.bpk"));
        let st = tmp.path().join(format!("{name}.safetensors"));
        convert_ok(&fixture(name), &bpk, &["--compress"]);
        assert_eq!(
            code(&bin(&[
                "unpack",
                bpk.to_str().unwrap(),
                "-o",
                st.to_str().unwrap()
            ])),
            0
        );
        let src = read_st(&fixture(name).join("model.safetensors"));
        let unpacked = read_st(&st);
        for s in src.iter().filter(|s| !s.name.contains("_proj")) {
            let u = unpacked.iter().find(|u| u.name == s.name).unwrap();
            let widened: Vec<f32> = match s.dtype {
                safetensors::Dtype::F16 => s
                    .data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                safetensors::Dtype::F32 => f32s(&s.data),
                other => panic!("fixture dtype {other:?}"),
            };
            assert_eq!(f32s(&u.data), widened, "{}", s.name);
        }
    }
}

/// Output bytes do not depend on the thread count, nor on the run: with tensors written
/// from memory (plain) and streamed through the compressor (--compress).
#[test]
fn output_is_identical_for_1_and_2_threads() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        for (i, extra) in [&[][..], &["--compress"][..]].iter().enumerate() {
            let out = |t: &str| tmp.path().join(format!("{name}-{i}-{t}.bpk"));
            for t in ["1", "2", "3"] {
                let mut args = vec!["--threads", t];
                args.extend_from_slice(extra);
                convert_ok(&fixture(name), &out(t), &args);
            }
            convert_ok(
                &fixture(name),
                &out("2b"),
                &[&["--threads", "2"][..], extra].concat(),
            );
            let one = sha256(&out("1"));
            for t in ["2", "3", "2b"] {
                assert_eq!(one, sha256(&out(t)), "{name} {extra:?} threads {t}");
            }
        }
    }
}

/// `--timings` reports every stage after the summary, even with --quiet, and changes nothing
/// in the output; it is refused for a source it does not measure.
#[test]
fn timings_are_reported_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, timed) = (tmp.path().join("a.bpk"), tmp.path().join("b.bpk"));
    let src = fixture("tiny-sharded");
    convert_ok(&src, &plain, &[]);
    let o = bin(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        timed.to_str().unwrap(),
        "--quiet",
        "--timings",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(sha256(&plain), sha256(&timed));
    let err = stderr(&o);
    // The shards, counted from the index.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let mut shards: Vec<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    shards.sort();
    shards.dedup();
    assert!(shards.len() > 1);
    for stage in [
        "open and check the checkpoint",
        &format!("wall, {} files", shards.len()),
        "read, decode, ternarize, pack",
        "float tensors (check, copy)",
        "output hash (SHA-256)",
        "write",
        "finalize (header, fsync, rename)",
        "CPUs busy on average",
    ] {
        assert!(err.contains(stage), "`{stage}` missing from:\n{err}");
    }
    assert!(
        !err.contains("wrote "),
        "--quiet keeps the summary out: {err}"
    );

    let o = bin(&[
        "convert",
        plain.to_str().unwrap(),
        "-o",
        tmp.path().join("c.gguf").to_str().unwrap(),
        "--timings",
    ]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("--timings measures conversions from an HF checkpoint"));
    assert!(!tmp.path().join("c.gguf").exists());
}

#[test]
fn inspect_reports_the_model_and_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = tmp.path().join("m.bpk");
    convert_ok(&fixture("tiny-sharded"), &bpk, &[]);
    let o = bin(&["inspect", bpk.to_str().unwrap(), "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["model"]["architecture"], "BitNetForCausalLM");
    assert_eq!(v["model"]["num_layers"], 3);
    assert_eq!(v["model"]["rope_theta"], 10000.0);
    assert_eq!(v["totals"]["ternary_tensors"], 21);
    // hidden 128 and ffn 256 are multiples of 128: exactly 2 bits per weight.
    assert_eq!(v["totals"]["ternary_bits_per_weight"], 2.0);
    let files: Vec<&str> = v["provenance"]["source_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    // Shards are hashed in parallel; each digest must land beside its own file name.
    for (i, name) in files.iter().enumerate() {
        assert_eq!(
            v["provenance"]["source_files"][i]["sha256"]
                .as_str()
                .unwrap(),
            sha256(&fixture("tiny-sharded").join(name)),
            "{name}"
        );
    }

    let o = bin(&["inspect", bpk.to_str().unwrap()]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("model.layers.2.mlp.down_proj.weight"));
}

#[test]
fn existing_output_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = tmp.path().join("m.bpk");
    std::fs::write(&bpk, b"precious").unwrap();
    let src = fixture("tiny-llama-fp");
    let args = [
        "convert",
        src.to_str().unwrap(),
        "-o",
        bpk.to_str().unwrap(),
    ];
    let o = bin(&args);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&bpk).unwrap(), b"precious");
    let mut forced = args.to_vec();
    forced.push("--force");
    assert_eq!(code(&bin(&forced)), 0);
    assert_eq!(code(&bin(&["validate", bpk.to_str().unwrap()])), 0);
}

/// Three shards and one worker: the shards are hashed in the lanes of a multi-message SHA-256
/// (where the CPU has the SHA extensions or AVX-512), and the 16 MiB embedding, stored as it
/// is, in a lane they leave free, its digest given to the writer afterwards. With two workers
/// neither happens. Both
/// files must be byte-identical and pass `validate`.
#[test]
fn an_embedding_hashed_in_a_free_lane_gives_the_same_file() {
    let src = copy_fixture("tiny-sharded");
    let dir = src.path();
    let mut tensors = Vec::new();
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        tensors.extend(read_st(&dir.join(shard)));
        std::fs::remove_file(dir.join(shard)).unwrap();
    }
    // A vocabulary of 65536: 65536 x 128 bf16 is 16 MiB, the size from which it gets a lane.
    let vocab = 65536usize;
    let emb = tensors
        .iter_mut()
        .find(|t| t.name == "model.embed_tokens.weight")
        .unwrap();
    let row = emb.data.len() / emb.shape[0];
    let mut data = Vec::with_capacity(vocab * row);
    while data.len() < vocab * row {
        data.extend_from_slice(&emb.data);
    }
    data.truncate(vocab * row);
    emb.data = data;
    emb.shape[0] = vocab;
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["vocab_size"] = vocab.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in tensors.chunks(tensors.len().div_ceil(3)).enumerate() {
        let name = format!("model-0000{}-of-00003.safetensors", i + 1);
        write_st(&dir.join(&name), part);
        for t in part {
            weight_map.insert(t.name.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let out = tempfile::tempdir().unwrap();
    let one = out.path().join("one.bpk");
    let two = out.path().join("two.bpk");
    convert_ok(dir, &one, &["--threads", "1"]);
    convert_ok(dir, &two, &["--threads", "2"]);
    assert_eq!(sha256(&one), sha256(&two));
    let o = bin(&["validate", one.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
}
