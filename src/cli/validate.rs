//! `bitnet-pack validate`. Findings are written as they are found, text or JSON, so that a
//! hostile file with a million bad table entries needs no memory for its report.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;

use super::{EXIT_CHECK_FAILED, ValidateArgs, escape_controls, with_threads};
use crate::format::{Finding, validate_file_into};

/// Version of the JSON report (`validate --json`).
const SCHEMA_VERSION: u32 = 1;

pub fn run(a: ValidateArgs) -> anyhow::Result<ExitCode> {
    if super::gguf_file::is_gguf(&a.file) {
        return super::gguf_file::validate(&a.file, a.json);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout());
    // A closed pipe (`| head`) ends the output, not the validation's exit status.
    let mut broken = false;
    let mut emit = |text: &[u8]| {
        if !broken && let Err(e) = out.write_all(text) {
            broken = e.kind() == std::io::ErrorKind::BrokenPipe;
            if !broken {
                return Err(e);
            }
        }
        Ok(())
    };
    let file = a.file.display().to_string();
    let mut write_error: Option<std::io::Error> = None;
    // Nothing is printed until the file could be read: the JSON head goes out with the first
    // finding, or with the summary.
    let head = format!(
        "{{\"schema_version\":{SCHEMA_VERSION},\"file\":{},\"findings\":[",
        serde_json::to_string(&file)?
    );
    let mut first = true;
    let mut sink = |f: Finding| {
        if write_error.is_some() {
            return;
        }
        let text = if a.json {
            let sep = if first {
                format!("{head}\n")
            } else {
                ",\n".to_string()
            };
            format!("{sep}{}", serde_json::to_string(&f).unwrap_or_default())
        } else {
            format!("  [{}] {}\n", f.kind, escape_controls(&f.message))
        };
        first = false;
        if let Err(e) = emit(text.as_bytes()) {
            write_error = Some(e);
        }
    };
    let summary = with_threads(a.threads, || validate_file_into(&a.file, &mut sink))?
        .with_context(|| format!("could not validate {}", a.file.display()))?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    let ok = summary.problems == 0;
    let tail = if a.json {
        let mut v = serde_json::to_value(&summary)?;
        v["ok"] = ok.into();
        let fields = serde_json::to_string(&v)?;
        // `fields` is an object: splice its members after the findings array.
        let opening = if first { head.as_str() } else { "" };
        format!("{opening}\n],{}\n", &fields[1..])
    } else if ok {
        format!(
            "{}: ok (format {}, {} tensors, {} bytes of tensor data checked)\n",
            escape_controls(&file),
            summary.version.as_deref().unwrap_or("?"),
            summary.tensors,
            summary.data_bytes_checked
        )
    } else {
        format!(
            "{}: INVALID, {} problem(s), listed above\n",
            escape_controls(&file),
            summary.problems
        )
    };
    emit(tail.as_bytes())?;
    if !broken {
        out.flush().or_else(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                Ok(())
            } else {
                Err(e)
            }
        })?;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CHECK_FAILED)
    })
}
