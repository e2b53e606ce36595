//! Hostile use of the command line, one test per class of defect found by a hostile-input
//! campaign: huge counts, unbounded reads, special files where files are expected, --force onto
//! things that are not outputs, interruptions, ambiguous weights, values beyond a type's range,
//! files validate passed but run refused, NaN in the source path, lax configs, memory
//! amplification, messages, permissions. Each test failed before its fix.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs the binary with a deadline: a hang fails the test instead of blocking it.
fn bin_deadline(args: &[&str], secs: u64) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet-pack"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(secs) {
            child.kill().unwrap();
            panic!(
                "`bitnet-pack {}` did not finish in {secs} s",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Exit 2, no panic, every needle in stderr.
fn fails(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(code(o), 2, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

fn converted(tmp: &Path, fixture_name: &str) -> PathBuf {
    let out = tmp.join(format!("{fixture_name}.bpk"));
    convert_ok(&fixture(fixture_name), &out, &[]);
    out
}

#[test]
fn counts_are_bounded_before_anything_is_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = converted(tmp.path(), "tiny-2b4t-qat");
    let src = fixture("tiny-2b4t-qat");
    // Used to abort allocating 400 GB.
    let o = bin_deadline(
        &[
            "parity",
            s(&src),
            s(&bpk),
            "--random-tokens",
            "100000000000",
        ],
        20,
    );
    fails(&o, &["--random-tokens", "limit"]);
    let o = bin_deadline(
        &["parity", s(&src), s(&bpk), "--random-tokens", "100000"],
        20,
    );
    fails(&o, &["max_position_embeddings"]);
    // Used to spawn thousands of threads.
    let o = bin_deadline(&["validate", s(&bpk), "--threads", "100000"], 20);
    fails(&o, &["--threads 100000", "256"]);
    let o = bin_deadline(
        &[
            "run",
            s(&fixture("tiny-hf-saved")),
            "--prompt",
            "the",
            "--max-new-tokens",
            "99999999999",
        ],
        20,
    );
    fails(&o, &["--max-new-tokens", "limit"]);
}

#[test]
fn whole_file_reads_are_capped() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = converted(tmp.path(), "tiny-hf-saved");
    // A sparse 100 MB tokenizer.json: used to be read whole.
    let big = tmp.path().join("tokenizer.json");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let o = bin_deadline(
        &["run", s(&bpk), "--prompt", "hi", "--tokenizer", s(&big)],
        20,
    );
    fails(&o, &["tokenizer.json", "67108864"]);
    let o = bin_deadline(
        &["run", s(&bpk), "--prompt", "hi", "--tokenizer", "/dev/zero"],
        20,
    );
    fails(&o, &["/dev/zero", "character device"]);
    // A safetensors header declared far beyond what real checkpoints have.
    let d = copy_fixture("tiny-llama-fp");
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(40u64 << 20).to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    let o = bin_deadline(
        &["convert", s(d.path()), "-o", s(&tmp.path().join("x.bpk"))],
        20,
    );
    fails(&o, &["model.safetensors", "16777216"]);
}

#[test]
fn special_files_in_place_of_inputs_are_refused_without_hanging() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.bpk");
    // A FIFO as config.json, as the weights, as a .bpk, as a tokenizer.
    for victim in ["config.json", "model.safetensors"] {
        let d = copy_fixture("tiny-2b4t-qat");
        std::fs::remove_file(d.path().join(victim)).unwrap();
        mkfifo(&d.path().join(victim));
        let o = bin_deadline(&["convert", s(d.path()), "-o", s(&out)], 20);
        fails(&o, &[victim, "FIFO"]);
        let o = bin_deadline(&["run", s(d.path()), "--tokens", "1"], 20);
        fails(&o, &[victim, "FIFO"]);
    }
    let fifo = tmp.path().join("f.bpk");
    mkfifo(&fifo);
    for cmd in ["validate", "inspect"] {
        fails(&bin_deadline(&[cmd, s(&fifo)], 20), &["FIFO"]);
    }
    fails(
        &bin_deadline(&["run", s(&fifo), "--tokens", "1"], 20),
        &["FIFO"],
    );
    let bpk = converted(tmp.path(), "tiny-hf-saved");
    let o = bin_deadline(
        &["run", s(&bpk), "--prompt", "the", "--tokenizer", s(&fifo)],
        20,
    );
    fails(&o, &["FIFO"]);
    // A directory, /dev/zero, a symlink loop: said as such.
    fails(
        &bin_deadline(&["inspect", s(tmp.path())], 20),
        &["is a directory"],
    );
    fails(
        &bin_deadline(&["validate", "/dev/zero"], 20),
        &["character device"],
    );
    let lp = tmp.path().join("loop.bpk");
    std::os::unix::fs::symlink(&lp, &lp).unwrap();
    fails(&bin_deadline(&["inspect", s(&lp)], 20), &["symbolic links"]);
}

#[test]
fn force_replaces_only_regular_files_that_are_not_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = copy_fixture("tiny-2b4t-qat");
    let weights = d.path().join("model.safetensors");
    let before = sha256(&weights);
    // The input itself, directly and through a symlink.
    let o = bin_deadline(&["convert", s(d.path()), "-o", s(&weights), "--force"], 20);
    fails(&o, &["one of the inputs"]);
    let link = tmp.path().join("link.bpk");
    std::os::unix::fs::symlink(&weights, &link).unwrap();
    let o = bin_deadline(&["convert", s(d.path()), "-o", s(&link), "--force"], 20);
    fails(&o, &["one of the inputs"]);
    assert_eq!(sha256(&weights), before);
    let bpk = converted(tmp.path(), "tiny-2b4t-qat");
    let bpk_sha = sha256(&bpk);
    let o = bin_deadline(&["unpack", s(&bpk), "-o", s(&bpk), "--force"], 20);
    fails(&o, &["one of the inputs"]);
    assert_eq!(sha256(&bpk), bpk_sha);
    // A FIFO and a directory are not outputs.
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let o = bin_deadline(&["convert", s(d.path()), "-o", s(&fifo), "--force"], 20);
    fails(&o, &["FIFO", "an output replaces only a regular file"]);
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let o = bin_deadline(&["unpack", s(&bpk), "-o", s(&fifo), "--force"], 20);
    fails(&o, &["FIFO"]);
    let dir = tmp.path().join("adir");
    std::fs::create_dir(&dir).unwrap();
    let o = bin_deadline(&["convert", s(d.path()), "-o", s(&dir), "--force"], 20);
    fails(&o, &["directory"]);
    // Checked before the work: a missing directory fails at once.
    let o = bin_deadline(
        &[
            "convert",
            s(d.path()),
            "-o",
            s(&tmp.path().join("nowhere/x.bpk")),
        ],
        20,
    );
    fails(&o, &["nowhere", "does not exist"]);
    let o = bin_deadline(
        &["run", s(&bpk), "--tokens", "1", "--logits-json", s(&fifo)],
        20,
    );
    fails(&o, &["FIFO"]);
}

/// Writes a Llama-shaped f32 checkpoint of about 50 MB: big enough that a conversion takes a
/// visible moment, so a signal can arrive while its temporary file exists.
fn sizeable_checkpoint(dir: &Path) {
    let (h, f, layers, vocab) = (512usize, 1408usize, 4usize, 8192usize);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": vocab, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        let data: Vec<u8> = (0..n)
            .flat_map(|i| (((i * 2_654_435_761) % 1000) as f32 / 1000.0 - 0.5).to_le_bytes())
            .collect();
        tensors.push(Raw {
            name,
            dtype: safetensors::Dtype::F32,
            shape,
            data,
        });
    };
    add("model.embed_tokens.weight".into(), vec![vocab, h]);
    add("lm_head.weight".into(), vec![vocab, h]);
    add("model.norm.weight".into(), vec![h]);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
            ("self_attn.q_proj", vec![h, h]),
            ("self_attn.k_proj", vec![h, h]),
            ("self_attn.v_proj", vec![h, h]),
            ("self_attn.o_proj", vec![h, h]),
            ("mlp.gate_proj", vec![f, h]),
            ("mlp.up_proj", vec![f, h]),
            ("mlp.down_proj", vec![h, f]),
        ] {
            add(format!("{p}.{n}.weight"), shape);
        }
    }
    write_st(&dir.join("model.safetensors"), &tensors);
}

fn spawn_convert(src: &Path, out: &Path, extra: &[&str]) -> Child {
    let mut args = vec!["convert", s(src), "-o", s(out), "--quiet"];
    args.extend_from_slice(extra);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitnet-pack"));
    cmd.args(&args).stdout(Stdio::null()).stderr(Stdio::piped());
    // Its own process group, so a signal reaches it alone.
    cmd.process_group(0);
    cmd.spawn().unwrap()
}

/// Files in `dir` other than `keep`.
fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

/// Waits until the temporary file of a conversion into `dir/out.bpk` exists (or the child ends).
fn wait_for_temp(child: &mut Child, dir: &Path) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if others(dir, &[]).iter().any(|n| n.starts_with(".out.bpk.")) {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn interrupted_conversions_clean_up_and_kill_9_leaves_only_recognisable_temp_files() {
    let src = tempfile::tempdir().unwrap();
    sizeable_checkpoint(src.path());
    // SIGINT and SIGTERM while the temporary file exists: removed, nothing at the target.
    for (sig, status) in [
        (libc::SIGINT, 130),
        (libc::SIGTERM, 143),
        (libc::SIGHUP, 129),
    ] {
        let out_dir = tempfile::tempdir().unwrap();
        let out = out_dir.path().join("out.bpk");
        let mut child = spawn_convert(src.path(), &out, &["--threads", "1"]);
        assert!(
            wait_for_temp(&mut child, out_dir.path()),
            "no temporary file appeared"
        );
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let st = child.wait().unwrap();
        assert_eq!(st.code(), Some(status), "signal {sig}: {st:?}");
        // A signal that arrives as the rename completes finds a complete target; otherwise
        // nothing is left.
        assert_eq!(
            others(out_dir.path(), &["out.bpk"]),
            Vec::<String>::new(),
            "signal {sig}"
        );
        if out.exists() {
            assert_eq!(code(&bin(&["validate", s(&out)])), 0, "a partial target");
        }
    }
    // kill -9 at several points: the target is absent or complete, and anything else is a
    // temporary file named after the target and the killed process.
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.bpk");
    let mut killed = Vec::new();
    for delay_ms in [0u64, 1, 5, 20, 60, 150] {
        let mut child = spawn_convert(src.path(), &out, &["--force", "--threads", "1"]);
        killed.push(child.id());
        if delay_ms > 0 {
            wait_for_temp(&mut child, out_dir.path());
            std::thread::sleep(Duration::from_millis(delay_ms));
        }
        child.kill().unwrap();
        let st = child.wait().unwrap();
        assert!(st.signal() == Some(9) || st.success(), "{st:?}");
        for name in others(out_dir.path(), &["out.bpk"]) {
            // A run killed before it could sweep leaves its predecessors' files too; each
            // is named after the target and one of the killed processes.
            assert!(
                killed
                    .iter()
                    .any(|pid| name.starts_with(&format!(".out.bpk.{pid}.")))
                    && name.ends_with(".tmp"),
                "unexpected file {name}"
            );
        }
        if out.exists() {
            assert_eq!(code(&bin(&["validate", s(&out)])), 0, "a partial target");
        }
    }
    // The next conversion removes what the killed ones left.
    let o = bin(&["convert", s(src.path()), "-o", s(&out), "--force"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(others(out_dir.path(), &["out.bpk"]), Vec::<String>::new());
}

#[test]
fn the_weights_named_are_the_weights_used() {
    let tmp = tempfile::tempdir().unwrap();
    // A directory holding both a sharded set and a single file (of another model, so that
    // the choice shows in the result).
    let d = copy_fixture("tiny-sharded");
    // The single file: tiny-sharded's shards merged, with one norm changed.
    let mut all = read_st(&d.path().join("model-00001-of-00002.safetensors"));
    all.extend(read_st(&d.path().join("model-00002-of-00002.safetensors")));
    let norm = all
        .iter_mut()
        .find(|t| t.name == "model.norm.weight")
        .unwrap();
    norm.data[0] ^= 0x40;
    write_st(&d.path().join("model.safetensors"), &all);
    let sources = |bpk: &Path| -> Vec<String> {
        let f = bitnet_pack::format::BpkFile::open(bpk).unwrap();
        f.header
            .provenance
            .source_files
            .iter()
            .map(|f| f.name.clone())
            .collect()
    };
    let out = tmp.path().join("a.bpk");
    let o = bin(&["convert", s(d.path()), "-o", s(&out)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("using model.safetensors, as transformers does"));
    assert_eq!(sources(&out), ["config.json", "model.safetensors"]);
    let out = tmp.path().join("b.bpk");
    convert_ok(&d.path().join("model.safetensors"), &out, &[]);
    assert_eq!(sources(&out), ["config.json", "model.safetensors"]);
    let out = tmp.path().join("c.bpk");
    convert_ok(&d.path().join("model.safetensors.index.json"), &out, &[]);
    assert_eq!(
        sources(&out),
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    let o = bin(&[
        "convert",
        s(&d.path().join("config.json")),
        "-o",
        s(&tmp.path().join("x.bpk")),
    ]);
    fails(&o, &["not a model directory"]);
}

#[test]
fn keep_f16_refuses_values_beyond_its_range() {
    let tmp = tempfile::tempdir().unwrap();
    let d = copy_fixture("tiny-llama-fp");
    edit_tensors(d.path(), |ts| {
        let e = ts
            .iter_mut()
            .find(|t| t.name == "model.embed_tokens.weight")
            .unwrap();
        // The fixture stores f16 (largest value 65504): store the embeddings as f32 instead,
        // with element 5 at 1e5.
        let vals: Vec<f32> = e
            .data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .enumerate()
            .map(|(i, v)| if i == 5 { 1e5 } else { v })
            .collect();
        e.dtype = safetensors::Dtype::F32;
        e.data = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    });
    let out = tmp.path().join("k.bpk");
    let o = bin(&["convert", s(d.path()), "-o", s(&out), "--keep", "f16"]);
    fails(
        &o,
        &["model.embed_tokens.weight", "[0, 5]", "100000", "f16"],
    );
    assert!(!out.exists());
    convert_ok(d.path(), &out, &["--keep", "bf16"]);
}

/// Rewrites a .bpk header (re-checksummed) through the test helper's writer.
fn rewrite_header(src: &Path, dst: &Path, edit: impl FnOnce(&mut bitnet_pack::format::Header)) {
    use bitnet_pack::format::{PREAMBLE_LEN, Preamble};
    let bytes = std::fs::read(src).unwrap();
    let pre = Preamble::parse(bytes[..PREAMBLE_LEN].try_into().unwrap()).unwrap();
    let end = PREAMBLE_LEN + pre.header_len as usize;
    let text = std::str::from_utf8(&bytes[PREAMBLE_LEN..end])
        .unwrap()
        .trim_end();
    let mut header: bitnet_pack::format::Header = serde_json::from_str(text).unwrap();
    edit(&mut header);
    let mut new = serde_json::to_vec(&header).unwrap();
    assert!(new.len() <= pre.header_len as usize);
    new.resize(pre.header_len as usize, b' ');
    let mut out = bytes.clone();
    out[PREAMBLE_LEN..end].copy_from_slice(&new);
    let sha = Preamble::compute_sha256(&pre.head_bytes(), &new);
    out[32..64].copy_from_slice(&sha);
    std::fs::write(dst, out).unwrap();
}

#[test]
fn validate_checks_what_run_relies_on_and_inspect_escapes_header_strings() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = converted(tmp.path(), "tiny-2b4t-qat");
    // Block indices that do not match the names: run looked tensors up by them.
    let bad = tmp.path().join("bad.bpk");
    rewrite_header(&bpk, &bad, |h| {
        for t in &mut h.tensors {
            if let Some(l) = t.layer.as_mut() {
                *l += 1;
            }
        }
    });
    let o = bin(&["validate", s(&bad)]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stdout(&o).contains("LayerVsConfig"), "{}", stdout(&o));
    let o = bin(&["run", s(&bad), "--tokens", "1"]);
    fails(&o, &["fails validation"]);
    assert!(!stderr(&o).contains("Some("), "{}", stderr(&o));
    // A header string with terminal escape codes reaches no terminal raw.
    let esc = tmp.path().join("esc.bpk");
    rewrite_header(&bpk, &esc, |h| {
        h.provenance.tool = "\u{1b}]0;owned\u{7}".into();
        h.provenance.source_files[0].name = "Bit\u{1b}[31mNet".into();
    });
    let o = bin(&["inspect", s(&esc)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!stdout(&o).contains('\u{1b}') && !stdout(&o).contains('\u{7}'));
    assert!(stdout(&o).contains("Bit\\u{1b}[31mNet"), "{}", stdout(&o));
    // An architecture string that is no supported architecture is refused, and escaped.
    rewrite_header(&bpk, &esc, |h| {
        h.model.architecture = "Bit\u{1b}[31mNet".into()
    });
    let o = bin(&["inspect", s(&esc)]);
    fails(&o, &["not one of the supported pairs"]);
    assert!(!stderr(&o).contains('\u{1b}'));
    // A zeroed header reports both the checksum and the JSON problem.
    let mut bytes = std::fs::read(&bpk).unwrap();
    for b in &mut bytes[64..200] {
        *b = 0;
    }
    let zeroed = tmp.path().join("zeroed.bpk");
    std::fs::write(&zeroed, bytes).unwrap();
    let o = bin(&["validate", s(&zeroed)]);
    assert_eq!(code(&o), 1);
    assert!(
        stdout(&o).contains("HeaderChecksum") && stdout(&o).contains("HeaderJson"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn the_source_path_refuses_non_finite_weights_as_convert_does() {
    let d = copy_fixture("tiny-awkward");
    edit_tensors(d.path(), |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "model.layers.1.mlp.up_proj.weight")
            .unwrap();
        t.data[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    for mode in ["fp", "qat"] {
        let o = bin(&["run", s(d.path()), "--tokens", "1,2", "--mode", mode]);
        fails(
            &o,
            &["model.layers.1.mlp.up_proj.weight", "non-finite", "10"],
        );
    }
    let o = bin(&["convert", s(d.path()), "-o", s(&d.path().join("x.bpk"))]);
    fails(&o, &["model.layers.1.mlp.up_proj.weight", "non-finite"]);
}

#[test]
fn configs_that_cannot_be_honoured_are_refused() {
    let edits: [(&str, serde_json::Value, &str); 6] = [
        ("rope_theta", serde_json::json!(1e-300), "rope_theta"),
        ("rms_norm_eps", serde_json::json!(5.0), "rms_norm_eps"),
        ("rope_scaling", serde_json::json!("yarn"), "rope_scaling"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "yarn",
        ),
        ("model_type", serde_json::json!("mistral"), "model_type"),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0}),
            "llama3",
        ),
    ];
    for (key, value, needle) in edits {
        let d = copy_fixture("tiny-2b4t-qat");
        let p = d.path().join("config.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        v[key] = value;
        std::fs::write(&p, v.to_string()).unwrap();
        let o = bin(&["convert", s(d.path()), "-o", s(&d.path().join("x.bpk"))]);
        fails(&o, &[needle, "config.json"]);
    }
}

#[test]
fn a_hostile_table_costs_memory_in_proportion_to_what_is_needed() {
    // A 40 MB header listing 160,000 entries over the same bytes. validate --json used to
    // build the whole report as a JSON value tree (1 GB for a 63 MB header); it now streams.
    let tmp = tempfile::tempdir().unwrap();
    let bpk = converted(tmp.path(), "tiny-2b4t-qat");
    let big = tmp.path().join("big.bpk");
    {
        use bitnet_pack::format::{PREAMBLE_LEN, Preamble, data_offset_for};
        let bytes = std::fs::read(&bpk).unwrap();
        let pre = Preamble::parse(bytes[..PREAMBLE_LEN].try_into().unwrap()).unwrap();
        let end = PREAMBLE_LEN + pre.header_len as usize;
        let text = std::str::from_utf8(&bytes[PREAMBLE_LEN..end])
            .unwrap()
            .trim_end();
        let mut h: bitnet_pack::format::Header = serde_json::from_str(text).unwrap();
        let proto = h.tensors[1].clone();
        for i in 0..160_000 {
            let mut t = proto.clone();
            t.name = format!("extra.{i:07}.{}", "x".repeat(100));
            h.tensors.push(t);
        }
        let new = serde_json::to_vec(&h).unwrap();
        let mut p2 = pre;
        p2.header_len = new.len() as u64;
        p2.data_offset = data_offset_for(p2.header_len).unwrap();
        p2.header_sha256 = Preamble::compute_sha256(&p2.head_bytes(), &new);
        let mut out = p2.to_bytes().to_vec();
        out.extend_from_slice(&new);
        out.resize(p2.data_offset as usize, 0);
        out.extend_from_slice(&bytes[pre.data_offset as usize..]);
        std::fs::write(&big, out).unwrap();
    }
    // Heap (RLIMIT_DATA) capped at 400 MB: the report of 320,000 findings must fit.
    for json in [true, false] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitnet-pack"));
        cmd.arg("validate")
            .arg(&big)
            .args(if json { &["--json"][..] } else { &[][..] });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: setrlimit in the child between fork and exec, with a valid struct.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 400 << 20,
                    rlim_max: 400 << 20,
                };
                if libc::setrlimit(libc::RLIMIT_DATA, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let o = cmd.output().unwrap();
        assert_eq!(code(&o), 1, "json {json}: {}", stderr(&o));
        if json {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(v["problems"], v["findings"].as_array().unwrap().len());
            assert!(v["problems"].as_u64().unwrap() >= 320_000);
        }
    }
}

#[test]
fn messages_name_the_fault_once() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = converted(tmp.path(), "tiny-2b4t-qat");
    // An existing target without --force: the clause used to appear twice.
    let o = bin(&["convert", s(&fixture("tiny-2b4t-qat")), "-o", s(&bpk)]);
    let err = stderr(&o);
    assert_eq!(code(&o), 2);
    assert_eq!(err.matches("already exists").count(), 1, "{err}");
    // A bad k_proj in the safetensors header is named as k_proj.
    let d = copy_fixture("tiny-2b4t-qat");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let k = "model.layers.1.self_attn.k_proj.weight";
    let offs = header[k]["data_offsets"].clone();
    header.get_mut(k).unwrap()["data_offsets"] =
        serde_json::json!([offs[0].as_u64().unwrap() + 2, offs[1].as_u64().unwrap() + 2]);
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
    let o = bin(&["convert", s(d.path()), "-o", s(&tmp.path().join("k.bpk"))]);
    fails(&o, &[k]);
    // No message repeats a clause.
    for o in [
        bin(&["convert", s(&fixture("tiny-2b4t-qat")), "-o", s(&bpk)]),
        bin(&["inspect", s(tmp.path())]),
        bin(&["validate", s(&tmp.path().join("missing.bpk"))]),
        bin(&[
            "convert",
            s(&tmp.path().join("missing")),
            "-o",
            s(&tmp.path().join("x.bpk")),
        ]),
    ] {
        let err = stderr(&o);
        let clauses: Vec<&str> = err.trim().split(": ").filter(|c| c.len() > 12).collect();
        for (i, c) in clauses.iter().enumerate() {
            assert!(!clauses[i + 1..].contains(c), "`{c}` repeated in: {err}");
        }
    }
}

#[test]
fn outputs_get_the_usual_permissions_and_logits_are_written_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = converted(tmp.path(), "tiny-2b4t-qat");
    // SAFETY: reading the umask requires setting it; it is put back at once.
    let umask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    } as u32;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&bpk), 0o666 & !umask);
    let st = tmp.path().join("u.safetensors");
    let o = bin(&["unpack", s(&bpk), "-o", s(&st)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(mode(&st), 0o666 & !umask);
    // Logits replace an existing file by rename (a new inode), never in place.
    let logits = tmp.path().join("l.json");
    std::fs::write(&logits, b"old").unwrap();
    let ino = std::fs::metadata(&logits).unwrap().ino();
    let o = bin(&[
        "run",
        s(&bpk),
        "--tokens",
        "1,2",
        "--logits-json",
        s(&logits),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_ne!(std::fs::metadata(&logits).unwrap().ino(), ino);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&logits).unwrap()).unwrap();
    assert_eq!(v["tokens"], serde_json::json!([1, 2]));
}

/// What a second campaign found after the first round of fixes.
#[test]
fn outputs_never_overwrite_any_file_of_the_model_they_read() {
    let d = copy_fixture("tiny-sharded");
    for victim in [
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
    ] {
        let p = d.path().join(victim);
        let before = sha256(&p);
        let o = bin(&[
            "run",
            s(d.path()),
            "--tokens",
            "1,2",
            "--logits-json",
            s(&p),
        ]);
        fails(&o, &["one of the inputs"]);
        assert_eq!(sha256(&p), before, "{victim} was changed");
    }
}

#[test]
fn generated_text_keeps_split_characters_and_escapes_controls() {
    // This prompt makes the tiny model end on a two-byte character split over two tokens.
    let o = bin(&[
        "run",
        s(&fixture("tiny-hf-saved")),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "54",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.trim_end().ends_with("o\u{612}"), "{out:?}");
    assert!(
        !out.chars().any(|c| c.is_control() && c != '\n'),
        "raw control characters in {out:?}"
    );
}

#[test]
fn failures_to_write_diagnostics_are_not_crashes() {
    let tmp = tempfile::tempdir().unwrap();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = tmp.path().join("x.bpk");
    let st = Command::new(env!("CARGO_BIN_EXE_bitnet-pack"))
        .args(["convert", s(&fixture("tiny-hf-saved")), "-o", s(&out)])
        .stdout(Stdio::null())
        .stderr(full.try_clone().unwrap())
        .status()
        .unwrap();
    assert_eq!(
        st.code(),
        Some(0),
        "a full stderr made a successful conversion fail"
    );
    let st = Command::new(env!("CARGO_BIN_EXE_bitnet-pack"))
        .args(["inspect", s(&tmp.path().join("missing.bpk"))])
        .stdout(Stdio::null())
        .stderr(full)
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(2));
    // validate --json prints nothing at all when the file cannot be read.
    let o = bin(&["validate", s(&tmp.path().join("missing.bpk")), "--json"]);
    assert_eq!(code(&o), 2);
    assert_eq!(stdout(&o), "");
}

#[test]
fn an_input_truncated_while_mapped_is_an_error_not_a_crash() {
    let src = tempfile::tempdir().unwrap();
    sizeable_checkpoint(src.path());
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.bpk");
    convert_ok(src.path(), &good, &[]);
    let mut saw_message = false;
    for delay_ms in [1u64, 5, 15, 40, 80] {
        let victim = tmp.path().join("victim.bpk");
        std::fs::copy(&good, &victim).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_bitnet-pack"))
            .args(["validate", s(&victim), "--threads", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&victim)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let o = child.wait_with_output().unwrap();
        // Exit 0 (read before the cut), 1 (cut before it was opened) or 2 (cut while mapped):
        // never killed by SIGBUS.
        assert!(
            o.status.code().is_some(),
            "killed by a signal: {:?}",
            o.status
        );
        saw_message |= stderr(&o).contains("changed size while it was being read");
    }
    eprintln!("truncation while mapped caught in flight: {saw_message}");
}

#[test]
fn targets_are_checked_as_names_and_symlinks_are_written_through() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny-2b4t-qat");
    // A trailing slash is not a file name: refused before any work.
    let o = bin(&[
        "convert",
        s(&src),
        "-o",
        &format!("{}/newdir/", tmp.path().display()),
    ]);
    fails(&o, &["does not name a file"]);
    // --force through a symlink replaces the file it points to; the link stays.
    let real = tmp.path().join("real.bpk");
    std::fs::write(&real, b"old").unwrap();
    let link = tmp.path().join("link.bpk");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let o = bin(&["convert", s(&src), "-o", s(&link), "--force", "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(code(&bin(&["validate", s(&real)])), 0);
    // A dangling link is named as such.
    let dangling = tmp.path().join("dangling.bpk");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
    fails(
        &bin(&["convert", s(&src), "-o", s(&dangling), "--force"]),
        &["symbolic link to a file that does not exist"],
    );
    // A stale temporary file of --logits-json is removed by the next run.
    let stale = tmp.path().join(".l.json.99999999.abc.tmp");
    std::fs::write(&stale, b"x").unwrap();
    let o = bin(&[
        "run",
        s(&real),
        "--tokens",
        "1",
        "--logits-json",
        s(&tmp.path().join("l.json")),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!stale.exists());
}

#[test]
fn options_that_would_be_ignored_are_refused() {
    let src = fixture("tiny-hf-saved");
    for args in [
        vec!["run", s(&src), "--prompt", "the", "--logits-json", "x.json"],
        vec!["run", s(&src), "--tokens", "1", "--max-new-tokens", "4"],
        vec!["run", s(&src), "--tokens", "1", "--tokenizer", "t.json"],
    ] {
        assert_eq!(code(&bin(&args)), 2, "{args:?}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let bpk = converted(tmp.path(), "tiny-hf-saved");
    let o = bin(&["parity", s(&src), s(&bpk), "--tokens", "1,2", "--seed", "3"]);
    assert_eq!(code(&o), 2);
}

#[test]
fn validate_holds_the_header_to_the_spec() {
    let tmp = tempfile::tempdir().unwrap();
    let bpk = converted(tmp.path(), "tiny-2b4t-qat");
    use bitnet_pack::format::{PREAMBLE_LEN, Preamble};
    let bytes = std::fs::read(&bpk).unwrap();
    let pre = Preamble::parse(bytes[..PREAMBLE_LEN].try_into().unwrap()).unwrap();
    let end = PREAMBLE_LEN + pre.header_len as usize;
    // A newline after the JSON object (only spaces may follow it), re-checksummed.
    let mut b = bytes.clone();
    let text_end = PREAMBLE_LEN
        + std::str::from_utf8(&b[PREAMBLE_LEN..end])
            .unwrap()
            .trim_end()
            .len();
    b[text_end] = b'\n';
    let sha = Preamble::compute_sha256(&pre.head_bytes(), &b[PREAMBLE_LEN..end]);
    b[32..64].copy_from_slice(&sha);
    let p = tmp.path().join("nl.bpk");
    std::fs::write(&p, b).unwrap();
    let o = bin(&["validate", s(&p)]);
    assert_eq!(code(&o), 1);
    assert!(stdout(&o).contains("HeaderJson"), "{}", stdout(&o));
    // Activation bits that no rule defines.
    let bad = tmp.path().join("bits.bpk");
    rewrite_header(&bpk, &bad, |h| h.quantization.activations.bits = 64);
    let o = bin(&["validate", s(&bad)]);
    assert_eq!(code(&o), 1);
    assert!(stdout(&o).contains("BadScheme"), "{}", stdout(&o));
    fails(
        &bin(&["run", s(&bad), "--tokens", "1"]),
        &["scheme in the header is unusable"],
    );
}

/// The scheme rules of formats/bpk.md §3.2.6 that writers follow and validate enforces: a
/// hand-edited header that breaks one is a BadScheme finding, and run refuses it.
#[test]
fn validate_holds_the_v2_scheme_to_the_spec() {
    use bitnet_pack::format::header::{ActivationScheme, AttentionScheme};
    use bitnet_pack::model::Role;
    let tmp = tempfile::tempdir().unwrap();
    let rotated = tmp.path().join("rot.bpk");
    let o = bin(&[
        "convert",
        s(&fixture("tiny-hf-awkward")),
        "-o",
        s(&rotated),
        "--rotate",
        "hadamard",
        "--force-requantize",
        "--quiet",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&bin(&["validate", s(&rotated)])), 0);
    type Edit = Box<dyn Fn(&mut bitnet_pack::format::Header)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "rotation adds transforms at o_proj and down_proj only",
            Box::new(|h| {
                let r = h.quantization.residual_rotation.as_mut().unwrap();
                r.online = vec![Role::QProj];
            }),
        ),
        (
            "has no entry for every block",
            Box::new(|h| {
                h.quantization
                    .online_rotations
                    .retain(|s| s.role != Role::OProj)
            }),
        ),
        (
            "a rotated head is not the embedding",
            Box::new(|h| h.model.tie_word_embeddings = true),
        ),
        (
            "repeats `activations`",
            Box::new(|h| {
                h.quantization
                    .activation_sites
                    .insert(Role::KProj, ActivationScheme::a8());
            }),
        ),
        (
            "neither q_bits nor kv_bits",
            Box::new(|h| {
                h.quantization.attention = Some(AttentionScheme {
                    q_bits: None,
                    kv_bits: None,
                })
            }),
        ),
        (
            "weights.eps",
            Box::new(|h| h.quantization.weights.eps = -1.0),
        ),
    ];
    for (needle, edit) in cases {
        let bad = tmp.path().join("bad.bpk");
        rewrite_header(&rotated, &bad, edit);
        let o = bin(&["validate", s(&bad)]);
        assert_eq!(code(&o), 1, "{needle}: {}", stdout(&o));
        assert!(
            stdout(&o).contains("BadScheme") && stdout(&o).contains(needle),
            "{needle}: {}",
            stdout(&o)
        );
        fails(
            &bin(&["run", s(&bad), "--tokens", "1"]),
            &["scheme in the header is unusable"],
        );
    }
}

/// Scheme options that cannot be honoured: exit 2, naming the value and the accepted ones.
#[test]
fn scheme_options_that_cannot_be_honoured_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.bpk");
    let cases: [(&str, &[&str], &[&str]); 7] = [
        // FFN 352 = 11 * 32 has no Hadamard matrix.
        (
            "tiny-2b4t-qat",
            &["--online-hadamard", "down_proj"],
            &["352", "down_proj", "supported sizes", "108"],
        ),
        (
            "tiny-2b4t-qat",
            &["--online-hadamard", "o_proj,attn_norm"],
            &["attn_norm", "not a projection", "o_proj, down_proj"],
        ),
        (
            "tiny-2b4t-qat",
            &["--kv-bits", "2"],
            &["--kv-bits 2", "8, 4 or 3"],
        ),
        (
            "tiny-2b4t-qat",
            &["--q-bits", "3"],
            &["--q-bits 3", "8 or 4"],
        ),
        (
            "tiny-2b4t-qat",
            &["--activations", "a5"],
            &["a5", "a8, a4 or none"],
        ),
        (
            "tiny-hf-saved",
            &["--rotate", "hadamard"],
            &["trained ternarization", "--force-requantize"],
        ),
        (
            "tiny-2b4t-qat",
            &["--rotate", "hadamard", "--force-requantize"],
            &["down_proj", "352"],
        ),
    ];
    for (name, flags, needles) in cases {
        let src = fixture(name);
        let mut args = vec!["convert", s(&src), "-o", s(&out)];
        args.extend_from_slice(flags);
        fails(&bin(&args), needles);
        assert!(!out.exists());
    }
}

#[test]
fn rotate_writes_a_new_directory_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny-hf-llama");
    // Not into the source, not into a non-empty directory.
    fails(
        &bin(&["rotate", s(&src), "-o", s(&src)]),
        &["one of the inputs"],
    );
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), b"x").unwrap();
    fails(
        &bin(&["rotate", s(&src), "-o", s(&full)]),
        &["not an empty directory"],
    );
    assert_eq!(std::fs::read(full.join("keep.txt")).unwrap(), b"x");
    // A new directory, then an empty one: both work and leave no temporary directory.
    let out = tmp.path().join("rot");
    let o = bin(&["rotate", s(&src), "-o", s(&out), "--seed", "3"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = bin(&["rotate", s(&src), "-o", s(&empty)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}
