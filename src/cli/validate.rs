//! `bitnet-pack validate`.

use std::process::ExitCode;

use anyhow::Context;

use super::{EXIT_CHECK_FAILED, ValidateArgs, print, with_threads};
use crate::format::validate_file;

pub fn run(a: ValidateArgs) -> anyhow::Result<ExitCode> {
    let report = with_threads(a.threads, || validate_file(&a.file))?
        .with_context(|| format!("could not validate {}", a.file.display()))?;
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["schema_version"] = 1.into();
        v["file"] = a.file.display().to_string().into();
        v["ok"] = report.ok().into();
        print(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
    } else if report.ok() {
        print(&format!(
            "{}: ok (format {}, {} tensors, {} bytes of tensor data checked)\n",
            a.file.display(),
            report.version.as_deref().unwrap_or("?"),
            report.tensors,
            report.data_bytes_checked
        ))?;
    } else {
        let mut text = format!(
            "{}: INVALID, {} problem(s):\n",
            a.file.display(),
            report.findings.len()
        );
        for f in &report.findings {
            text.push_str(&format!("  [{}] {}\n", f.kind, f.message));
        }
        print(&text)?;
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CHECK_FAILED)
    })
}
