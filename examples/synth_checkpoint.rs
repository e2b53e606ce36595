//! Writes a synthetic HF checkpoint shaped like microsoft/bitnet-b1.58-2B-4T (bf16 master
//! weights, tied embeddings): `config.json` plus one `model.safetensors` of about 4.8 GB.
//!
//! ```text
//! cargo run --release --example synth_checkpoint -- <OUT_DIR> [--layers N] [--order sorted|canonical]
//! ```
//!
//! The values are deterministic pseudo-random numbers: every element is a pure function of
//! (tensor index, element index) through a splitmix64 hash, so the file is byte-identical on
//! every run and whatever the thread count. Projections and the embedding are "normal-ish"
//! (the sum of four uniform variates, in [-2, 2], standard deviation ~0.58); norm weights are
//! uniform in [0.9, 1.1]. Every value is finite.
//!
//! The file is streamed: the safetensors header is computed from the shapes alone and written
//! first, then each tensor is generated in fixed-size chunks (filled in parallel with rayon) and
//! handed to a writer thread, so memory stays at a few chunk buffers whatever the model size.
//! The data is written to `model.safetensors.partial` and renamed at the end, so an interrupted
//! run never leaves a truncated `model.safetensors` behind.
//!
//! By default the tensors are laid out in the order the `safetensors` serializer (and therefore
//! `transformers`' `save_pretrained`) uses: sorted by name, so `model.layers.10.*` comes right
//! after `model.layers.1.*`. `--order canonical` lays them out in execution order instead.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use rayon::prelude::*;

// Shapes of BitNet b1.58 2B4T.
const HIDDEN: usize = 2560;
const INTERMEDIATE: usize = 6912;
const HEADS: usize = 20;
const KV_HEADS: usize = 5;
const HEAD_DIM: usize = HIDDEN / HEADS;
const VOCAB: usize = 128_256;
const DEFAULT_LAYERS: usize = 30;

/// Bytes per chunk handed to the writer thread.
const CHUNK_BYTES: usize = 16 << 20;
/// Bytes each rayon task fills.
const TASK_BYTES: usize = 256 << 10;
/// Chunk buffers in flight (being filled, queued, being written).
const BUFFERS: usize = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Projections and the embedding: normal-ish in [-2, 2].
    Weight,
    /// RMSNorm weights: uniform in [0.9, 1.1].
    Norm,
}

struct Tensor {
    name: String,
    shape: Vec<usize>,
    kind: Kind,
    /// Position in execution order; seeds the generator, so the values of a tensor do not depend
    /// on where it sits in the file.
    seed_index: u64,
}

impl Tensor {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn nbytes(&self) -> usize {
        self.numel() * 2
    }
}

/// The tensors of a 2B4T-shaped model with `layers` blocks, in execution order.
fn tensors(layers: usize) -> Vec<Tensor> {
    let q = HEADS * HEAD_DIM;
    let kv = KV_HEADS * HEAD_DIM;
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, kind: Kind| {
        let seed_index = out.len() as u64;
        out.push(Tensor {
            name,
            shape,
            kind,
            seed_index,
        });
    };
    push(
        "model.embed_tokens.weight".into(),
        vec![VOCAB, HIDDEN],
        Kind::Weight,
    );
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        push(
            format!("{p}.input_layernorm.weight"),
            vec![HIDDEN],
            Kind::Norm,
        );
        push(
            format!("{p}.self_attn.q_proj.weight"),
            vec![q, HIDDEN],
            Kind::Weight,
        );
        push(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, HIDDEN],
            Kind::Weight,
        );
        push(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, HIDDEN],
            Kind::Weight,
        );
        push(
            format!("{p}.self_attn.attn_sub_norm.weight"),
            vec![q],
            Kind::Norm,
        );
        push(
            format!("{p}.self_attn.o_proj.weight"),
            vec![HIDDEN, q],
            Kind::Weight,
        );
        push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![HIDDEN],
            Kind::Norm,
        );
        push(
            format!("{p}.mlp.gate_proj.weight"),
            vec![INTERMEDIATE, HIDDEN],
            Kind::Weight,
        );
        push(
            format!("{p}.mlp.up_proj.weight"),
            vec![INTERMEDIATE, HIDDEN],
            Kind::Weight,
        );
        push(
            format!("{p}.mlp.ffn_sub_norm.weight"),
            vec![INTERMEDIATE],
            Kind::Norm,
        );
        push(
            format!("{p}.mlp.down_proj.weight"),
            vec![HIDDEN, INTERMEDIATE],
            Kind::Weight,
        );
    }
    push("model.norm.weight".into(), vec![HIDDEN], Kind::Norm);
    out
}

fn config_json(layers: usize) -> String {
    format!(
        r#"{{"architectures":["BitNetForCausalLM"],"model_type":"bitnet","hidden_act":"relu2","hidden_size":{HIDDEN},"intermediate_size":{INTERMEDIATE},"num_hidden_layers":{layers},"num_attention_heads":{HEADS},"num_key_value_heads":{KV_HEADS},"max_position_embeddings":4096,"rms_norm_eps":1e-05,"rope_theta":500000.0,"tie_word_embeddings":true,"torch_dtype":"bfloat16","vocab_size":{VOCAB},"bos_token_id":128000,"eos_token_id":128001,"quantization_config":{{"quant_method":"bitnet","linear_class":"autobitlinear","quantization_mode":"online"}}}}"#
    ) + "\n"
}

/// The safetensors header (JSON padded with spaces to a multiple of 8) for `order`, which lists
/// the tensors in file order.
fn header(order: &[&Tensor]) -> Vec<u8> {
    let mut json = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0usize;
    for t in order {
        let shape: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        let end = offset + t.nbytes();
        // Names are plain ASCII without quotes or backslashes: no escaping needed.
        json.push_str(&format!(
            r#","{}":{{"dtype":"BF16","shape":[{}],"data_offsets":[{offset},{end}]}}"#,
            t.name,
            shape.join(",")
        ));
        offset = end;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    json.into_bytes()
}

/// splitmix64's output function.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// f32 -> bf16 bits, round to nearest even (the inputs are finite and small).
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// Fills `out` with the bf16 bytes of elements `first..first + out.len() / 2` of a tensor.
fn fill(kind: Kind, seed_index: u64, first: usize, out: &mut [u8]) {
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    let seed = mix(seed_index
        .wrapping_add(1)
        .wrapping_mul(0xD1B5_4A32_D192_ED03));
    for (j, o) in out.chunks_exact_mut(2).enumerate() {
        let h = mix(seed.wrapping_add(((first + j) as u64).wrapping_mul(GOLDEN)));
        let v = match kind {
            Kind::Weight => {
                // Irwin-Hall with n = 4 on 16-bit lanes: mean 0, range [-2, 2].
                let s = (h & 0xFFFF) + ((h >> 16) & 0xFFFF) + ((h >> 32) & 0xFFFF) + (h >> 48);
                s as f32 * (1.0 / 65535.0) - 2.0
            }
            Kind::Norm => 0.9 + 0.2 * ((h >> 40) as f32 * (1.0 / (1u64 << 24) as f32)),
        };
        o.copy_from_slice(&bf16_bits(v).to_le_bytes());
    }
}

struct Args {
    out_dir: PathBuf,
    layers: usize,
    sorted: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let usage = "usage: synth_checkpoint <OUT_DIR> [--layers N] [--order sorted|canonical]";
    let mut out_dir = None;
    let mut layers = DEFAULT_LAYERS;
    let mut sorted = true;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            "--layers" => {
                let v = it.next().context("--layers needs a value")?;
                layers = v.parse().with_context(|| format!("bad --layers `{v}`"))?;
                ensure!(layers >= 1, "--layers must be at least 1");
            }
            "--order" => match it.next().as_deref() {
                Some("sorted") => sorted = true,
                Some("canonical") => sorted = false,
                other => bail!("--order must be `sorted` or `canonical`, not {other:?}"),
            },
            s if s.starts_with('-') => bail!("unknown option `{s}`\n{usage}"),
            s => {
                ensure!(out_dir.is_none(), "more than one OUT_DIR\n{usage}");
                out_dir = Some(PathBuf::from(s));
            }
        }
    }
    Ok(Args {
        out_dir: out_dir.context(usage)?,
        layers,
        sorted,
    })
}

/// Streams the safetensors file to `path`; returns its length.
fn write_safetensors(path: &Path, order: &[&Tensor]) -> anyhow::Result<u64> {
    let file =
        File::create(path).with_context(|| format!("could not create {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let head = header(order);
    w.write_all(&(head.len() as u64).to_le_bytes())?;
    w.write_all(&head)?;

    // Buffers circulate: main thread fills one (in parallel), the writer thread writes another.
    let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(BUFFERS);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        free_tx.send(vec![0u8; CHUNK_BYTES])?;
    }
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let writer = scope.spawn(move || -> std::io::Result<BufWriter<File>> {
            for (buf, len) in full_rx {
                w.write_all(&buf[..len])?;
                // The main thread may have stopped on an error; then nobody needs the buffer.
                let _ = free_tx.send(buf);
            }
            Ok(w)
        });
        for t in order {
            let total = t.nbytes();
            let mut done = 0;
            while done < total {
                let Ok(mut buf) = free_rx.recv() else {
                    break; // the writer failed; its error is reported below
                };
                let len = (total - done).min(CHUNK_BYTES);
                let first = done / 2;
                buf[..len]
                    .par_chunks_mut(TASK_BYTES)
                    .enumerate()
                    .for_each(|(c, out)| {
                        fill(t.kind, t.seed_index, first + c * TASK_BYTES / 2, out)
                    });
                if full_tx.send((buf, len)).is_err() {
                    break;
                }
                done += len;
            }
        }
        drop(full_tx);
        let mut w = writer.join().expect("the writer thread does not panic")?;
        w.flush()?;
        Ok(())
    })?;
    Ok(std::fs::metadata(path)?.len())
}

/// Re-reads the file with the `safetensors` crate and checks every tensor's dtype, shape and
/// offsets, plus that the first and last elements of each tensor are finite.
fn verify(path: &Path, order: &[&Tensor]) -> anyhow::Result<()> {
    let file = File::open(path)?;
    // SAFETY: we just wrote the file and nothing else modifies it.
    let mmap = unsafe { memmap2::Mmap::map(&file)? };
    let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap[..])
        .map_err(|e| anyhow::anyhow!("safetensors rejects {}: {e:?}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&mmap[..])
        .map_err(|e| anyhow::anyhow!("safetensors rejects {}: {e:?}", path.display()))?;
    ensure!(
        st.len() == order.len(),
        "{} tensors, expected {}",
        st.len(),
        order.len()
    );
    let data_start = 8 + n;
    let mut offset = 0;
    for t in order {
        let info = meta
            .info(&t.name)
            .with_context(|| format!("tensor {} missing", t.name))?;
        ensure!(
            info.dtype == safetensors::Dtype::BF16,
            "{}: dtype {:?}",
            t.name,
            info.dtype
        );
        ensure!(info.shape == t.shape, "{}: shape {:?}", t.name, info.shape);
        ensure!(
            info.data_offsets == (offset, offset + t.nbytes()),
            "{}: offsets {:?}",
            t.name,
            info.data_offsets
        );
        let bytes = st.tensor(&t.name)?.data();
        let k = bytes.len().min(2048);
        for c in bytes[..k]
            .chunks_exact(2)
            .chain(bytes[bytes.len() - k..].chunks_exact(2))
        {
            let v = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            ensure!(v.is_finite() && v.abs() <= 2.0, "{}: bad value {v}", t.name);
        }
        offset += t.nbytes();
    }
    ensure!(
        (data_start + offset) as u64 == mmap.len() as u64,
        "file length {} != {}",
        mmap.len(),
        data_start + offset
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let all = tensors(args.layers);
    let mut order: Vec<&Tensor> = all.iter().collect();
    if args.sorted {
        // What safetensors' serializer does for tensors of one dtype: sort by name.
        order.sort_by(|a, b| a.name.cmp(&b.name));
    }
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("could not create {}", args.out_dir.display()))?;
    std::fs::write(args.out_dir.join("config.json"), config_json(args.layers))?;

    let final_path = args.out_dir.join("model.safetensors");
    let partial = args.out_dir.join("model.safetensors.partial");
    let params: usize = all.iter().map(Tensor::numel).sum();
    eprintln!(
        "generating {} tensors, {} parameters, {} layers, order {}, {} threads",
        all.len(),
        params,
        args.layers,
        if args.sorted { "sorted" } else { "canonical" },
        rayon::current_num_threads()
    );
    let start = Instant::now();
    let len = write_safetensors(&partial, &order)?;
    let gen_secs = start.elapsed().as_secs_f64();
    std::fs::rename(&partial, &final_path)?;
    let vstart = Instant::now();
    verify(&final_path, &order)?;
    println!(
        "wrote {}: {} bytes ({:.3} GB) in {:.2} s ({:.2} GB/s); verified with safetensors in {:.2} s",
        final_path.display(),
        len,
        len as f64 / 1e9,
        gen_secs,
        len as f64 / 1e9 / gen_secs.max(1e-9),
        vstart.elapsed().as_secs_f64()
    );
    Ok(())
}
