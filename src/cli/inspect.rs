//! `bitnet-pack inspect`.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;

use super::{InspectArgs, human_bytes, print};
use crate::format::{BpkFile, FormatVersion, TensorEntry};

/// Stored bits per element of a tensor.
/// The name serde writes for an enum value (the same spelling as in the header).
fn name_of<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn bits_per_weight(t: &TensorEntry) -> f64 {
    t.length as f64 * 8.0 / t.numel().unwrap_or(1).max(1) as f64
}

pub fn run(a: InspectArgs) -> anyhow::Result<ExitCode> {
    if super::gguf_file::is_gguf(&a.file) {
        return super::gguf_file::inspect(&a.file, a.json);
    }
    let file =
        BpkFile::open(&a.file).with_context(|| format!("could not read {}", a.file.display()))?;
    let h = &file.header;
    let FormatVersion::V1 { minor } = file.version;
    let file_len = file.bytes().len() as u64;
    let (ternary, other): (Vec<&TensorEntry>, Vec<&TensorEntry>) = h
        .tensors
        .iter()
        .partition(|t| t.encoding.ternary().is_some());
    let t_params: u64 = ternary.iter().filter_map(|t| t.numel()).sum();
    let t_bytes: u64 = ternary.iter().map(|t| t.length).sum();
    let o_params: u64 = other.iter().filter_map(|t| t.numel()).sum();
    let o_bytes: u64 = other.iter().map(|t| t.length).sum();
    let t_bpw = t_bytes as f64 * 8.0 / t_params.max(1) as f64;

    if a.json {
        let tensors: Vec<_> = h
            .tensors
            .iter()
            .map(|t| {
                let mut v = serde_json::to_value(t).expect("tensor entries serialize");
                v["bits_per_weight"] = json!(bits_per_weight(t));
                v
            })
            .collect();
        let doc = json!({
            "schema_version": 1,
            "file": a.file.display().to_string(),
            "format_version": format!("1.{minor}"),
            "file_len": file_len,
            "model": h.model,
            "quantization": h.quantization,
            "totals": {
                "ternary_tensors": ternary.len(), "ternary_weights": t_params, "ternary_bytes": t_bytes,
                "ternary_bits_per_weight": t_bpw,
                "other_tensors": other.len(), "other_elements": o_params, "other_bytes": o_bytes,
            },
            "provenance": h.provenance,
            "tensors": tensors,
        });
        print(&format!("{}\n", serde_json::to_string_pretty(&doc)?))?;
        return Ok(ExitCode::SUCCESS);
    }

    let m = &h.model;
    let mut s = String::new();
    writeln!(
        s,
        "file         {} ({}, format 1.{minor})",
        a.file.display(),
        human_bytes(file_len)
    )?;
    writeln!(
        s,
        "model        {} ({}): {} layers, hidden {}, ffn {}, heads {}/{} kv (head_dim {}), vocab {}, max positions {}",
        m.architecture,
        name_of(&m.family),
        m.num_layers,
        m.hidden_size,
        m.intermediate_size,
        m.num_heads,
        m.num_kv_heads,
        m.head_dim,
        m.vocab_size,
        m.max_position_embeddings
    )?;
    writeln!(
        s,
        "             activation {}, rope theta {}, rms eps {:e}, embeddings {}",
        name_of(&m.hidden_act),
        m.rope_theta,
        m.rms_norm_eps,
        if m.tie_word_embeddings {
            "tied to lm_head"
        } else {
            "untied"
        }
    )?;
    let q = &h.quantization;
    let act = |a: &crate::format::header::ActivationScheme| {
        let name = a.quantizer().map(|q| q.name()).unwrap_or("?");
        format!("{name} ({}, {} bits)", name_of(&a.rule), a.bits)
    };
    writeln!(
        s,
        "quantization weights {} (eps {:e}); activations {}",
        name_of(&q.weights.rule),
        q.weights.eps,
        act(&q.activations)
    )?;
    for (role, a) in &q.activation_sites {
        writeln!(s, "             input of {}: {}", role.as_str(), act(a))?;
    }
    let online: Vec<String> = q
        .online_rotations
        .iter()
        .map(|site| {
            let where_ = site
                .layer
                .map(|l| format!(" of block {l}"))
                .unwrap_or_default();
            format!(
                "{} {} at the input of {}{where_}",
                site.transform,
                site.dim,
                site.role.as_str()
            )
        })
        .collect();
    writeln!(
        s,
        "             online transforms: {}",
        if online.is_empty() {
            "none".to_string()
        } else {
            online.join(", ")
        }
    )?;
    if let Some(a) = &q.attention {
        let bits = |b: Option<u8>| b.map_or("f32".to_string(), |b| format!("{b}-bit"));
        writeln!(
            s,
            "             attention states: queries {}, keys and values {} in the cache",
            bits(a.q_bits),
            bits(a.kv_bits)
        )?;
    }
    if let Some(r) = &q.residual_rotation {
        let added = if r.online.is_empty() {
            "none: the source declared its own".to_string()
        } else {
            r.online
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            s,
            "             residual stream rotated at conversion: {} seed {} (online transforms it added: {added})",
            r.transform, r.seed
        )?;
    }
    writeln!(
        s,
        "ternary      {} tensors, {} weights in {} ({t_bpw:.3} bits/weight)",
        ternary.len(),
        t_params,
        human_bytes(t_bytes)
    )?;
    writeln!(
        s,
        "other        {} tensors, {} elements in {}",
        other.len(),
        o_params,
        human_bytes(o_bytes)
    )?;
    let p = &h.provenance;
    writeln!(
        s,
        "written by   {} {}, options {:?}",
        p.tool, p.tool_version, p.options
    )?;
    for f in &p.source_files {
        writeln!(
            s,
            "source       {} ({} bytes, sha256 {})",
            f.name, f.bytes, f.sha256
        )?;
    }
    writeln!(s)?;
    writeln!(
        s,
        "{:<48} {:<13} {:>5} {:<4} {:<14} {:>13} {:>12} {:>6}",
        "tensor", "role", "layer", "enc", "shape", "scale", "bytes", "bits/w"
    )?;
    for t in &h.tensors {
        let shape = t
            .shape
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("x");
        let scale = t
            .scale_f32()
            .map(|v| format!("{v:.6e}"))
            .unwrap_or_else(|| "-".into());
        let enc = match t.compression {
            crate::format::Compression::Zstd => format!("{}+z", t.encoding.as_str()),
            crate::format::Compression::None => t.encoding.as_str().to_string(),
        };
        let layer = t.layer.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
        writeln!(
            s,
            "{:<48} {:<13} {:>5} {:<4} {:<14} {:>13} {:>12} {:>6.3}",
            t.name,
            t.role.as_str(),
            layer,
            enc,
            shape,
            scale,
            t.length,
            bits_per_weight(t)
        )?;
    }
    print(&s)?;
    Ok(ExitCode::SUCCESS)
}
