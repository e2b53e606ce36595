//! `bitnet-pack rotate`.

use std::process::ExitCode;

use anyhow::{Context, bail};

use super::{KeepArg, RotateArgs, human_bytes, say, with_threads};
use crate::convert::rotate::{RotateOptions, rotate};
use crate::num::FloatDtype;

pub fn run(a: RotateArgs) -> anyhow::Result<ExitCode> {
    let dtype = match a.dtype {
        KeepArg::F32 => FloatDtype::F32,
        KeepArg::F16 => FloatDtype::F16,
        KeepArg::Bf16 => FloatDtype::Bf16,
        KeepArg::Source | KeepArg::Q8 => bail!("--dtype takes f32, f16 or bf16"),
    };
    let opts = RotateOptions {
        seed: a.seed,
        dtype,
    };
    let summary = with_threads(a.threads, || rotate(&a.src, &a.output, &opts))?
        .with_context(|| format!("could not rotate {}", a.src.display()))?;
    say(&format!(
        "wrote {}: {} tensors ({}, {}), residual stream rotated by a randomized Hadamard (seed {}), norm gains folded, head untied{}",
        a.output.display(),
        summary.tensors,
        human_bytes(summary.bytes),
        dtype.as_str(),
        a.seed,
        if summary.copied.is_empty() {
            String::new()
        } else {
            format!("; copied {}", summary.copied.join(", "))
        }
    ));
    if summary.quantized_source {
        say(
            "note: the source declares BitNet quantization: the rotated checkpoint computes the same function in full precision, not under that quantization (the quantizers see rotated activations, and the rotated weights are ternarized anew)",
        );
    }
    Ok(ExitCode::SUCCESS)
}
