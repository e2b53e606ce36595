//! `inspect` and `validate` of a GGUF file (chosen when the file starts with the GGUF magic).

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;

use super::{EXIT_CHECK_FAILED, human_bytes, print};
use crate::gguf::{Array, GgmlType, GgufFile, Value, parse};

/// Whether `path` starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    crate::fsio::open_regular(path)
        .ok()
        .and_then(|mut f| f.read_exact(&mut magic).ok())
        .is_some()
        && magic == crate::gguf::MAGIC
}

fn map(path: &Path) -> anyhow::Result<memmap2::Mmap> {
    let f = crate::fsio::open_regular(path)?;
    // SAFETY: a read-only map; the file is assumed not to change while we read it.
    unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("could not map {}", path.display()))
}

/// A value in a line: arrays as their length and first elements.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => {
            let head: Vec<String> = match a {
                Array::String(x) => x.iter().take(4).map(|s| format!("{s:?}")).collect(),
                Array::I32(x) => x.iter().take(4).map(|n| n.to_string()).collect(),
                Array::U32(x) => x.iter().take(4).map(|n| n.to_string()).collect(),
                Array::F32(x) => x.iter().take(4).map(|n| n.to_string()).collect(),
                _ => Vec::new(),
            };
            format!(
                "[{} items: {}{}]",
                a.len(),
                head.join(", "),
                if a.len() > 4 { ", ..." } else { "" }
            )
        }
        other => format!("{other:?}")
            .split_once('(')
            .map(|(_, r)| r.trim_end_matches(')').to_string())
            .unwrap_or_default(),
    }
}

fn bits(t: &crate::gguf::TensorInfo) -> f64 {
    t.size as f64 * 8.0 / t.numel().max(1) as f64
}

pub fn inspect(path: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let bytes = map(path)?;
    let g = parse(&bytes).with_context(|| format!("could not read {}", path.display()))?;
    let (tern, other): (Vec<_>, Vec<_>) = g.tensors().iter().partition(|t| t.ty.is_ternary());
    let t_params: u64 = tern.iter().map(|t| t.numel()).sum();
    let t_bytes: u64 = tern.iter().map(|t| t.size).sum();
    if as_json {
        let doc = json!({
            "format": "gguf",
            "version": g.version().as_u32(),
            "file_bytes": bytes.len(),
            "alignment": g.alignment(),
            "metadata": g.kv().iter().map(|(k, v)| json!({"key": k, "value": show(v)})).collect::<Vec<_>>(),
            "ternary": {"params": t_params, "bytes": t_bytes, "bits_per_weight": t_bytes as f64 * 8.0 / t_params.max(1) as f64},
            "tensors": g.tensors().iter().map(|t| json!({
                "name": t.name, "type": t.ty.name(), "dims": t.dims, "offset": t.offset,
                "bytes": t.size, "bits_per_weight": bits(t),
            })).collect::<Vec<_>>(),
        });
        print(&(serde_json::to_string_pretty(&doc)? + "\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut s = String::new();
    writeln!(
        s,
        "{}: GGUF v{}, {}, alignment {}",
        path.display(),
        g.version().as_u32(),
        human_bytes(bytes.len() as u64),
        g.alignment()
    )?;
    writeln!(
        s,
        "architecture: {}",
        g.get_str("general.architecture").unwrap_or("(none)")
    )?;
    writeln!(
        s,
        "ternary: {} weights in {} tensors, {} ({:.3} bits/weight); other: {} tensors, {}",
        t_params,
        tern.len(),
        human_bytes(t_bytes),
        t_bytes as f64 * 8.0 / t_params.max(1) as f64,
        other.len(),
        human_bytes(other.iter().map(|t| t.size).sum()),
    )?;
    writeln!(s, "\nmetadata ({} keys):", g.kv().len())?;
    for (k, v) in g.kv() {
        writeln!(s, "  {k} = {}", show(v))?;
    }
    writeln!(s, "\ntensors ({}):", g.tensors().len())?;
    for t in g.tensors() {
        writeln!(
            s,
            "  {:<32} {:<6} {:>18} {:>12}  {:.3} bits/weight",
            t.name,
            t.ty.name(),
            format!("{:?}", t.dims),
            human_bytes(t.size),
            bits(t)
        )?;
    }
    print(&s)?;
    Ok(ExitCode::SUCCESS)
}

/// Checks the container (our reader's every rule), the data of every tensor of a type
/// bitnet-pack decodes (ternary codes valid, floats and Q8_0 scales finite) and, for the
/// architectures bitnet-pack reads, the model the metadata imply.
pub fn validate(path: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let bytes = map(path)?;
    let mut findings: Vec<(String, String)> = Vec::new();
    match parse(&bytes) {
        Err(e) => findings.push(("container".into(), e.to_string())),
        Ok(g) => {
            check_data(&g, &mut findings);
            // The model check only where bitnet-pack knows the architecture; another GGUF is
            // checked as a container with its tensors.
            let arch = g.get_str("general.architecture").unwrap_or_default();
            if crate::convert::from_gguf::ARCHITECTURES.contains(&arch)
                && let Err(e) = crate::convert::from_gguf::check_model(&g, path)
            {
                findings.push(("model".into(), e.to_string()));
            }
        }
    }
    let name = path.display().to_string();
    if as_json {
        let doc = json!({
            "schema_version": 1,
            "file": name,
            "format": "gguf",
            "findings": findings.iter().map(|(k, m)| json!({"kind": k, "message": m})).collect::<Vec<_>>(),
            "ok": findings.is_empty(),
        });
        print(&(serde_json::to_string(&doc)? + "\n"))?;
    } else if findings.is_empty() {
        print(&format!("{name}: ok (GGUF, every tensor checked)\n"))?;
    } else {
        let mut s = format!("{name}: {} problem(s)\n", findings.len());
        for (k, m) in &findings {
            writeln!(s, "  [{k}] {m}")?;
        }
        print(&s)?;
    }
    Ok(if findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CHECK_FAILED)
    })
}

fn check_data(g: &GgufFile<'_>, findings: &mut Vec<(String, String)>) {
    use crate::num::FloatDtype;
    use crate::num::dtype::first_non_finite;
    for t in g.tensors() {
        if t.ty.is_ternary() {
            if let Err(e) = g.ternary(t) {
                findings.push(("tensor".into(), e.to_string()));
            }
            continue;
        }
        let d = match t.ty {
            GgmlType::F32 => FloatDtype::F32,
            GgmlType::F16 => FloatDtype::F16,
            GgmlType::BF16 => FloatDtype::Bf16,
            GgmlType::Q8_0 => {
                // Each 34-byte block starts with its f16 scale.
                let data = g.tensor_data(t);
                if let Some(b) = data
                    .chunks_exact(34)
                    .position(|b| first_non_finite(FloatDtype::F16, &b[..2]).is_some())
                {
                    findings.push((
                        "tensor".into(),
                        format!("tensor `{}`: block {b} has a non-finite scale", t.name),
                    ));
                }
                continue;
            }
            // Types bitnet-pack does not decode: their sizes were checked by the reader.
            _ => continue,
        };
        if let Some((i, v)) = first_non_finite(d, g.tensor_data(t)) {
            findings.push((
                "tensor".into(),
                format!("tensor `{}`: element {i} is {v}, not finite", t.name),
            ));
        }
    }
}
