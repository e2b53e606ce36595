//! `bitnet-pack unpack`.

use std::process::ExitCode;

use anyhow::Context;

use super::{UnpackArgs, UnpackDtype, say};
use crate::export::unpack;
use crate::format::BpkFile;
use crate::num::FloatDtype;

pub fn run(a: UnpackArgs) -> anyhow::Result<ExitCode> {
    let file =
        BpkFile::open(&a.file).with_context(|| format!("could not read {}", a.file.display()))?;
    crate::fsio::check_output(&a.output, a.force, std::slice::from_ref(&a.file))
        .with_context(|| format!("could not unpack {}", a.file.display()))?;
    for p in crate::fsio::remove_stale_temps(&a.output) {
        say(&format!(
            "removed {}, left by an interrupted run",
            p.display()
        ));
    }
    let dtype = match a.dtype {
        UnpackDtype::F32 => FloatDtype::F32,
        UnpackDtype::Bf16 => FloatDtype::Bf16,
    };
    let n = unpack(&file, &a.output, dtype, a.force)
        .with_context(|| format!("could not unpack {}", a.file.display()))?;
    say(&format!(
        "wrote {}: {n} tensors as {}",
        a.output.display(),
        dtype.as_str()
    ));
    Ok(ExitCode::SUCCESS)
}
