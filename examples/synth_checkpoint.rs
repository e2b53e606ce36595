//! Writes a synthetic HF checkpoint shaped like microsoft/bitnet-b1.58-2B-4T (bf16 master
//! weights, tied embeddings): `config.json` plus one `model.safetensors` of about 4.8 GB, or
//! with `--shards N` (N > 1) the same tensors split over `model-0000i-of-0000N.safetensors`
//! with a `model.safetensors.index.json`, as transformers' `save_pretrained` writes them.
//!
//! ```text
//! cargo run --release --example synth_checkpoint -- <OUT_DIR> [--layers N] [--order sorted|canonical] [--shards N]
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
//!
//! Shards split that order on tensor boundaries into runs of roughly equal size: a tensor goes
//! to the shard its middle byte falls in when the data is cut into N equal parts. A tensor's
//! values depend only on the tensor, so every shard layout holds the same tensors.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use rayon::prelude::*;

/// The model's dimensions.
#[derive(Clone, Copy)]
struct Dims {
    hidden: usize,
    intermediate: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    layers: usize,
}

/// BitNet b1.58 2B4T's.
const B2B4T: Dims = Dims {
    hidden: 2560,
    intermediate: 6912,
    heads: 20,
    kv_heads: 5,
    vocab: 128_256,
    layers: 30,
};

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

/// The tensors of a model of dimensions `d`, in execution order.
fn tensors(d: Dims) -> Vec<Tensor> {
    let (hidden, inter) = (d.hidden, d.intermediate);
    let head_dim = d.hidden / d.heads;
    let q = d.heads * head_dim;
    let kv = d.kv_heads * head_dim;
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
        vec![d.vocab, hidden],
        Kind::Weight,
    );
    for i in 0..d.layers {
        let p = format!("model.layers.{i}");
        push(
            format!("{p}.input_layernorm.weight"),
            vec![hidden],
            Kind::Norm,
        );
        push(
            format!("{p}.self_attn.q_proj.weight"),
            vec![q, hidden],
            Kind::Weight,
        );
        push(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, hidden],
            Kind::Weight,
        );
        push(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, hidden],
            Kind::Weight,
        );
        push(
            format!("{p}.self_attn.attn_sub_norm.weight"),
            vec![q],
            Kind::Norm,
        );
        push(
            format!("{p}.self_attn.o_proj.weight"),
            vec![hidden, q],
            Kind::Weight,
        );
        push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![hidden],
            Kind::Norm,
        );
        push(
            format!("{p}.mlp.gate_proj.weight"),
            vec![inter, hidden],
            Kind::Weight,
        );
        push(
            format!("{p}.mlp.up_proj.weight"),
            vec![inter, hidden],
            Kind::Weight,
        );
        push(
            format!("{p}.mlp.ffn_sub_norm.weight"),
            vec![inter],
            Kind::Norm,
        );
        push(
            format!("{p}.mlp.down_proj.weight"),
            vec![hidden, inter],
            Kind::Weight,
        );
    }
    push("model.norm.weight".into(), vec![hidden], Kind::Norm);
    out
}

fn config_json(d: Dims) -> String {
    let Dims {
        hidden,
        intermediate,
        heads,
        kv_heads,
        vocab,
        layers,
    } = d;
    format!(
        r#"{{"architectures":["BitNetForCausalLM"],"model_type":"bitnet","hidden_act":"relu2","hidden_size":{hidden},"intermediate_size":{intermediate},"num_hidden_layers":{layers},"num_attention_heads":{heads},"num_key_value_heads":{kv_heads},"max_position_embeddings":4096,"rms_norm_eps":1e-05,"rope_theta":500000.0,"tie_word_embeddings":true,"torch_dtype":"bfloat16","vocab_size":{vocab},"bos_token_id":128000,"eos_token_id":128001,"quantization_config":{{"quant_method":"bitnet","linear_class":"autobitlinear","quantization_mode":"online"}}}}"#
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
    shards: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let usage =
        "usage: synth_checkpoint <OUT_DIR> [--layers N] [--order sorted|canonical] [--shards N]";
    let mut out_dir = None;
    let mut layers = B2B4T.layers;
    let mut sorted = true;
    let mut shards = 1;
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
            "--shards" => {
                let v = it.next().context("--shards needs a value")?;
                shards = v.parse().with_context(|| format!("bad --shards `{v}`"))?;
                ensure!(shards >= 1, "--shards must be at least 1");
                ensure!(shards <= 99_999, "--shards must be at most 99999");
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
        shards,
    })
}

/// Splits `order` (file order) into `shards` runs on tensor boundaries, of roughly equal bytes:
/// each shard in turn aims at an equal part of the bytes still to place, and takes tensors
/// while the next one's middle byte falls within its part (always at least one, and never so
/// many that a later shard would get none). A tensor larger than a part gets a shard of its
/// own, and the shards after it share the rest.
fn split<'a>(order: &[&'a Tensor], shards: usize) -> anyhow::Result<Vec<Vec<&'a Tensor>>> {
    ensure!(shards >= 1, "--shards must be at least 1");
    ensure!(
        shards <= order.len(),
        "--shards {shards} is more than the model's {} tensors",
        order.len()
    );
    let mut left: u128 = order.iter().map(|t| t.nbytes() as u128).sum();
    let mut out = Vec::with_capacity(shards);
    let mut rest = order;
    for g in 0..shards {
        let shards_left = (shards - g) as u128;
        // Twice the bytes this shard aims at, to compare with twice a middle byte's offset.
        let aim2 = 2 * left / shards_left;
        let most = rest.len() - (shards - g - 1);
        let mut taken = 0u128;
        let mut n = 0;
        while n < most
            && (n == 0 || g + 1 == shards || 2 * taken + rest[n].nbytes() as u128 <= aim2)
        {
            taken += rest[n].nbytes() as u128;
            n += 1;
        }
        out.push(rest[..n].to_vec());
        rest = &rest[n..];
        left -= taken;
    }
    Ok(out)
}

/// The shard file names transformers uses.
fn shard_name(i: usize, shards: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, shards)
}

/// `model.safetensors.index.json` for `shards` (each shard's tensors in file order).
fn index_json(shards: &[Vec<&Tensor>]) -> String {
    let mut weight_map = std::collections::BTreeMap::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        for t in shard {
            weight_map.insert(t.name.clone(), shard_name(i, shards.len()));
            total += t.nbytes();
        }
    }
    let index = serde_json::json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    serde_json::to_string_pretty(&index).expect("an index serializes") + "\n"
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
    let dims = Dims {
        layers: args.layers,
        ..B2B4T
    };
    generate(&args.out_dir, dims, args.sorted, args.shards, true)
}

/// Writes the checkpoint of dimensions `d` into `out_dir` (`shards` files when above 1),
/// printing what it wrote when `report` is set.
fn generate(
    out_dir: &Path,
    d: Dims,
    sorted: bool,
    shards: usize,
    report: bool,
) -> anyhow::Result<()> {
    let all = tensors(d);
    let mut order: Vec<&Tensor> = all.iter().collect();
    if sorted {
        // What safetensors' serializer does for tensors of one dtype: sort by name.
        order.sort_by(|a, b| a.name.cmp(&b.name));
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("could not create {}", out_dir.display()))?;
    let params: usize = all.iter().map(Tensor::numel).sum();
    if report {
        eprintln!(
            "generating {} tensors, {} parameters, {} layers, order {}, {} shard{}, {} threads",
            all.len(),
            params,
            d.layers,
            if sorted { "sorted" } else { "canonical" },
            shards,
            if shards == 1 { "" } else { "s" },
            rayon::current_num_threads()
        );
    }
    let (files, index): (Vec<(String, Vec<&Tensor>)>, _) = if shards == 1 {
        (vec![("model.safetensors".to_string(), order)], None)
    } else {
        // transformers loads model.safetensors before an index: a leftover one would hide the
        // shards.
        let single = out_dir.join("model.safetensors");
        ensure!(
            !single.exists(),
            "{} exists and would be read instead of the shards; remove it or use another directory",
            single.display()
        );
        let split = split(&order, shards)?;
        let index = index_json(&split);
        let named = split
            .into_iter()
            .enumerate()
            .map(|(i, s)| (shard_name(i, shards), s))
            .collect();
        (named, Some(index))
    };
    std::fs::write(out_dir.join("config.json"), config_json(d))?;
    for (name, order) in &files {
        let final_path = out_dir.join(name);
        let partial = out_dir.join(format!("{name}.partial"));
        let start = Instant::now();
        let len = write_safetensors(&partial, order)?;
        let gen_secs = start.elapsed().as_secs_f64();
        std::fs::rename(&partial, &final_path)?;
        let vstart = Instant::now();
        verify(&final_path, order)?;
        if report {
            println!(
                "wrote {}: {} bytes ({:.3} GB) in {:.2} s ({:.2} GB/s); verified with safetensors in {:.2} s",
                final_path.display(),
                len,
                len as f64 / 1e9,
                gen_secs,
                len as f64 / 1e9 / gen_secs.max(1e-9),
                vstart.elapsed().as_secs_f64()
            );
        }
    }
    // Last, so that an interrupted run leaves no index naming missing shards.
    if let Some(index) = index {
        std::fs::write(out_dir.join("model.safetensors.index.json"), index)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// A small model of the same family, quick to write and convert.
    const TINY: Dims = Dims {
        hidden: 256,
        intermediate: 512,
        heads: 4,
        kv_heads: 2,
        vocab: 512,
        layers: 3,
    };

    fn sorted(all: &[Tensor]) -> Vec<&Tensor> {
        let mut order: Vec<&Tensor> = all.iter().collect();
        order.sort_by(|a, b| a.name.cmp(&b.name));
        order
    }

    fn names<'a>(ts: impl IntoIterator<Item = &'a &'a Tensor>) -> Vec<&'a str> {
        ts.into_iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn equal_tensors_split_evenly() {
        let all: Vec<Tensor> = (0..10)
            .map(|i| Tensor {
                name: format!("t{i:02}"),
                shape: vec![8, 8],
                kind: Kind::Weight,
                seed_index: i,
            })
            .collect();
        let order: Vec<&Tensor> = all.iter().collect();
        let lens: Vec<usize> = split(&order, 5).unwrap().iter().map(Vec::len).collect();
        assert_eq!(lens, [2; 5]);
        let lens: Vec<usize> = split(&order, 10).unwrap().iter().map(Vec::len).collect();
        assert_eq!(lens, [1; 10]);
        assert!(split(&order, 11).is_err());
    }

    /// Shards of the 2B4T layout keep the file order, are never empty, and each is within the
    /// largest tensor of an equal share; in seven shards, the six after the embedding's differ by
    /// at most two of the largest projections.
    #[test]
    fn shards_of_the_full_model_are_in_order_and_near_equal() {
        let all = tensors(B2B4T);
        let order = sorted(&all);
        let total: usize = order.iter().map(|t| t.nbytes()).sum();
        let largest = order.iter().map(|t| t.nbytes()).max().unwrap();
        for shards in [1, 2, 7, 30, order.len()] {
            let split = split(&order, shards).unwrap();
            assert_eq!(split.len(), shards);
            assert!(split.iter().all(|s| !s.is_empty()), "{shards}");
            assert_eq!(names(split.iter().flatten()), names(&order), "{shards}");
            for s in &split {
                let bytes: usize = s.iter().map(|t| t.nbytes()).sum();
                assert!(
                    bytes.abs_diff(total / shards) <= largest,
                    "{shards}: {bytes}"
                );
            }
        }
        let seven = split(&order, 7).unwrap();
        assert_eq!(seven[0][0].name, "model.embed_tokens.weight");
        let rest: Vec<usize> = seven[1..]
            .iter()
            .map(|s| s.iter().map(|t| t.nbytes()).sum())
            .collect();
        let (lo, hi) = (rest.iter().min().unwrap(), rest.iter().max().unwrap());
        // The layers' largest tensor is a 6912 x 2560 projection.
        assert!(hi - lo <= 6912 * 2560 * 2 * 2, "{rest:?}");
    }

    /// The sharded checkpoint is read by bitnet-pack like the single file: the same tensors,
    /// byte for byte, and the provenance names each shard with its SHA-256.
    #[test]
    fn sharded_and_single_file_convert_to_the_same_tensors() {
        let tmp = tempfile::tempdir().unwrap();
        let (one, three) = (tmp.path().join("one"), tmp.path().join("three"));
        generate(&one, TINY, true, 1, false).unwrap();
        generate(&three, TINY, true, 3, false).unwrap();
        assert!(!three.join("model.safetensors").exists());

        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(three.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let map = index["weight_map"].as_object().unwrap();
        let all = tensors(TINY);
        assert_eq!(map.len(), all.len());
        let total: usize = all.iter().map(Tensor::nbytes).sum();
        assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total as u64));
        let mut files: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
        files.sort();
        files.dedup();
        assert_eq!(
            files,
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors"
            ]
        );

        let opts = bitnet_pack::convert::ConvertOptions {
            layout: bitnet_pack::pack::TernaryLayout::I2,
            keep: None,
            q8_outputs: false,
            compress: false,
            force: false,
            scheme: Default::default(),
        };
        let convert = |dir: &Path| {
            let out = dir.with_extension("bpk");
            bitnet_pack::convert::convert(dir, &out, &opts, &|_| {}).unwrap();
            bitnet_pack::format::BpkFile::open(&out).unwrap()
        };
        let (a, b) = (convert(&one), convert(&three));
        assert_eq!(a.header.tensors, b.header.tensors);
        assert_eq!(a.header.data_len, b.header.data_len);
        for e in &a.header.tensors {
            assert_eq!(a.stored(e), b.stored(e), "{}", e.name);
        }
        let sources = |f: &bitnet_pack::format::BpkFile| -> Vec<(String, String)> {
            f.header
                .provenance
                .source_files
                .iter()
                .map(|s| (s.name.clone(), s.sha256.clone()))
                .collect()
        };
        let sha = |p: PathBuf| {
            let d = Sha256::digest(std::fs::read(p).unwrap());
            d.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        let expect = |dir: &Path, names: &[&str]| -> Vec<(String, String)> {
            std::iter::once("config.json")
                .chain(names.iter().copied())
                .map(|n| (n.to_string(), sha(dir.join(n))))
                .collect()
        };
        assert_eq!(sources(&a), expect(&one, &["model.safetensors"]));
        assert_eq!(sources(&b), expect(&three, &files));
    }

    #[test]
    fn shards_are_refused_beside_a_single_file() {
        let tmp = tempfile::tempdir().unwrap();
        generate(tmp.path(), TINY, true, 1, false).unwrap();
        let err = generate(tmp.path(), TINY, true, 2, false).unwrap_err();
        assert!(err.to_string().contains("would be read instead"), "{err}");
        assert!(!tmp.path().join("model.safetensors.index.json").exists());
    }
}
