//! `bitnet-pack convert`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use std::path::Path;

use super::parity::DEFAULT_RANDOM_TOKENS;
use super::{
    ConvertArgs, EXIT_CHECK_FAILED, GgufTypeArg, KeepArg, LayoutArg, LinearClassArg, ToArg,
    human_bytes, say, with_threads,
};
use crate::compare::parity::{parity, random_tokens};
use crate::convert::from_gguf::{GgufImportOptions, gguf_to_bpk};
use crate::convert::scheme::{SchemeOptions, parse_sites};
use crate::convert::{ConvertError, ConvertOptions, Exporter, convert_export, convert_verified};
use crate::export::gguf::{GgufSummary, GgufTernary, Vocab, check_rows, export_gguf};
use crate::export::hf::export_hf;
use crate::format::{BpkFile, Storage};
use crate::num::FloatDtype;
use crate::pack::TernaryLayout;
use crate::run::SourceMode;
use crate::source::Checkpoint;
use crate::source::LinearClass;

pub fn run(a: ConvertArgs) -> anyhow::Result<ExitCode> {
    let opts = ConvertOptions {
        layout: match a.layout {
            LayoutArg::I2 => TernaryLayout::I2,
            LayoutArg::I8 => TernaryLayout::I8,
            LayoutArg::T5 => TernaryLayout::T5,
        },
        keep: match a.keep {
            KeepArg::Source => None,
            KeepArg::F32 => Some(FloatDtype::F32),
            KeepArg::F16 => Some(FloatDtype::F16),
            KeepArg::Bf16 => Some(FloatDtype::Bf16),
            KeepArg::Q8 => None,
        },
        q8_outputs: matches!(a.keep, KeepArg::Q8),
        compress: a.compress,
        force: a.force,
        scheme: SchemeOptions {
            activations: a.activations.clone(),
            online_hadamard: a.online_hadamard.as_deref().map(parse_sites).transpose()?,
            kv_bits: a.kv_bits,
            q_bits: a.q_bits,
            rotate_seed: a.rotate.map(|_| a.seed),
            force_requantize: a.force_requantize,
        },
    };
    // The bar's length is set once the checkpoint is open; until then it shows a spinner.
    let bar = ProgressBar::with_draw_target(
        None,
        if a.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("{spinner} converting [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    let total = dir_tensor_bytes_hint(&a.src);
    if let Some(t) = total {
        bar.set_length(t);
    }
    for p in crate::fsio::remove_stale_temps(&a.output) {
        say(&format!(
            "removed {}, left by an interrupted conversion",
            p.display()
        ));
    }
    let start = Instant::now();
    // Filled by a passing verification, for the summary line.
    let verified = std::sync::Mutex::new(None);
    let verify = |ckpt: &Checkpoint, tmp: &Path| -> Result<(), String> {
        if !a.verify {
            return Ok(());
        }
        // Named by its target in messages: the temporary path is gone once this fails.
        let file = Storage::map(tmp)
            .and_then(|storage| BpkFile::from_storage(&a.output, storage))
            .map_err(|e| e.to_string())?;
        let tokens = random_tokens(DEFAULT_RANDOM_TOKENS, ckpt.config.vocab_size, 0);
        let report =
            parity(ckpt, &file, &tokens, SourceMode::Qat, true).map_err(|e| e.to_string())?;
        if report.verdict.pass {
            *verified.lock().unwrap_or_else(|e| e.into_inner()) = Some((
                tokens.len(),
                report.logits.stats.rel_l2,
                report.logits.top1_agreement,
            ));
            Ok(())
        } else {
            Err(format!(
                "packed vs source parity failed: {}; the file was not written: convert without --verify and run `bitnet-pack parity` on it for the full report",
                report.verdict.diagnosis
            ))
        }
    };
    let to = a.to.unwrap_or(
        if a.gguf_type.is_some() || a.output.extension().is_some_and(|x| x == "gguf") {
            ToArg::Gguf
        } else {
            ToArg::Bpk
        },
    );
    if a.gguf_type.is_some() && to != ToArg::Gguf {
        anyhow::bail!(
            "--gguf-type applies to GGUF output only (--to gguf, or an output named *.gguf)"
        );
    }
    let gguf_type = match a.gguf_type {
        None | Some(GgufTypeArg::Tq2_0) => GgufTernary::Tq2_0,
        Some(GgufTypeArg::Tq1_0) => GgufTernary::Tq1_0,
        Some(GgufTypeArg::I2S) => GgufTernary::I2S,
    };
    let gguf_embed = opts.keep.unwrap_or(FloatDtype::F16);
    let gguf_notes = std::sync::Mutex::new(Vec::<String>::new());
    let class = match a.linear_class {
        LinearClassArg::Autobitlinear => LinearClass::AutoBitLinear,
        LinearClassArg::Bitlinear => LinearClass::BitLinear,
    };
    // Chosen by name: a FIFO or a device named so gets the reader's clear refusal.
    let src_is_bpk = a.src.extension().is_some_and(|x| x == "bpk");
    let src_is_gguf = a.src.extension().is_some_and(|x| x == "gguf");
    if a.timings && (src_is_bpk || src_is_gguf) {
        anyhow::bail!(
            "--timings measures conversions from an HF checkpoint; {} is not one",
            a.src.display()
        );
    }
    if opts.q8_outputs && (src_is_bpk || src_is_gguf) {
        anyhow::bail!(
            "--keep q8 quantizes the embedding and head of an HF checkpoint; {} is not one (its tensors are written as they are stored; convert the HF checkpoint with --keep q8 instead)",
            a.src.display()
        );
    }
    if src_is_bpk {
        bar.finish_and_clear();
        return export_bpk(&a, to, class, gguf_type, gguf_embed);
    }
    if src_is_gguf {
        bar.finish_and_clear();
        return with_threads(a.threads, || {
            import_gguf(&a, &opts, to, class, gguf_type, gguf_embed)
        })?;
    }
    let export_gguf_from = |ckpt: &Checkpoint, tmp: &Path| -> Result<(), ConvertError> {
        let file = hub_file(tmp, &a.src)?;
        let s = export_gguf(
            &file,
            &a.output,
            a.force,
            gguf_type,
            gguf_embed,
            Vocab::Dir(&ckpt.dir),
        )
        .map_err(|e| ConvertError::Output {
            error: e.to_string(),
        })?;
        gguf_notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(gguf_summary_lines(&a.output, &s, gguf_type));
        Ok(())
    };
    let export_hf_from = |ckpt: &Checkpoint, tmp: &Path| -> Result<(), ConvertError> {
        let file = hub_file(tmp, &a.src)?;
        export_hf(&file, &a.output, class, Some(&ckpt.dir)).map_err(|e| ConvertError::Output {
            error: e.to_string(),
        })?;
        Ok(())
    };
    let result = with_threads(a.threads, || {
        let (runtime, exporter): (&str, &Exporter<'_>) = match to {
            ToArg::Bpk => {
                return convert_verified(&a.src, &a.output, &opts, &|n| bar.inc(n), &verify);
            }
            ToArg::Gguf => {
                crate::fsio::check_output(&a.output, a.force, &[])?;
                // Row lengths from the checkpoint's shapes, before the work.
                let ckpt = Checkpoint::open(&a.src)?;
                check_rows(
                    &a.src,
                    ckpt.tensors
                        .iter()
                        .filter(|t| t.spec.role.is_ternary())
                        .map(|t| (t.spec.name.as_str(), t.spec.shape[1] as u64)),
                    gguf_type,
                )
                .map_err(|e| ConvertError::Refused {
                    reason: e.to_string(),
                })?;
                ("GGUF output: llama.cpp and bitnet.cpp", &export_gguf_from)
            }
            ToArg::Hf => {
                crate::fsio::check_new_dir(&a.output)?;
                // transformers' packed layout needs output rows in fours: checked before the
                // work, from the checkpoint's shapes (and again on the file).
                let ckpt = Checkpoint::open(&a.src)?;
                if let Some(t) = ckpt
                    .tensors
                    .iter()
                    .find(|t| t.spec.role.is_ternary() && t.spec.shape[0] % 4 != 0)
                {
                    return Err(ConvertError::Refused {
                        reason: format!(
                            "{}: tensor `{}` has {} output rows, not a multiple of 4, which transformers' packed layout needs",
                            a.src.display(),
                            t.spec.name,
                            t.spec.shape[0]
                        ),
                    });
                }
                ("--to hf: transformers' BitNet layers", &export_hf_from)
            }
        };
        // Fail before the work if options ask for what the target runtime cannot compute
        // (checked again on the file, which also catches a scheme config.json declares).
        if let Some(flag) = extended_flag(&a) {
            return Err(ConvertError::Refused {
                reason: format!(
                    "{flag} cannot be combined with {runtime} run BitNet b1.58 only (int8 per-token activations, no online transforms, float attention); write a .bpk instead"
                ),
            });
        }
        convert_export(
            &a.src,
            &hub_target(&a.output),
            &opts,
            &|n| bar.inc(n),
            &verify,
            exporter,
        )
    })?;
    bar.finish_and_clear();
    if let Err(e @ ConvertError::VerifyFailed { .. }) = &result {
        say(&format!("error: {e}"));
        return Ok(ExitCode::from(EXIT_CHECK_FAILED));
    }
    let summary = result.with_context(|| format!("could not convert {}", a.src.display()))?;
    for note in &summary.notes {
        say(&format!("note: {note}"));
    }
    if !a.quiet {
        let h = &summary.header;
        let ternary: Vec<_> = h
            .tensors
            .iter()
            .filter(|t| t.encoding.ternary().is_some())
            .collect();
        let params: u64 = ternary.iter().filter_map(|t| t.numel()).sum();
        let bytes: u64 = ternary.iter().map(|t| t.length).sum();
        let secs = start.elapsed().as_secs_f64();
        if to == ToArg::Gguf {
            for line in gguf_notes.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                say(line);
            }
        } else if to == ToArg::Hf {
            say(&format!(
                "wrote {}: HF packed checkpoint ({}, linear_class {}, weight_scale = {}) with {} ternary weights, from the .bpk made on the way, in {:.2} s",
                a.output.display(),
                h.model.architecture,
                class.as_str(),
                if class == LinearClass::AutoBitLinear {
                    "a"
                } else {
                    "1/a"
                },
                params,
                secs
            ));
        } else {
            say(&format!(
                "wrote {}: {} ({}), {} tensors, {} ternary weights in {} ({:.3} bits/weight, layout {}) in {:.2} s ({}/s of source)",
                a.output.display(),
                h.model.architecture,
                human_bytes(summary.file_len),
                h.tensors.len(),
                params,
                human_bytes(bytes),
                bytes as f64 * 8.0 / params.max(1) as f64,
                opts.layout.as_str(),
                secs,
                human_bytes((summary.source_tensor_bytes as f64 / secs.max(1e-9)) as u64),
            ));
        }
        if let Some(r) = &h.quantization.residual_rotation {
            say(&format!(
                "rotated: randomized Hadamard (seed {}) folded into the weights before ternarization, with online Hadamard transforms at {}. In full precision this computes the same function; under BitNet's quantizers it does not: the folded norm gains and the rotation change what each activation quantizer sees, the rotated weights are ternarized anew, and the sub-norm gains in front of o_proj and down_proj stay in place (they cannot be folded across an activation quantizer).",
                r.seed,
                r.online
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(" and ")
            ));
        }
        if let Some((n, rel_l2, top1)) = *verified.lock().unwrap_or_else(|e| e.into_inner()) {
            say(&format!(
                "verified: packed vs source (qat) on {n} random tokens, every block and projection locally: PASS (end to end: logits rel L2 {rel_l2:.2e}, top-1 agreement {:.1}%)",
                100.0 * top1
            ));
        }
    }
    if a.timings {
        say(summary.timings.to_string().trim_end());
    }
    Ok(ExitCode::SUCCESS)
}

/// Total size of the safetensors files in the source directory, for the progress bar (a hint:
/// the exact work is known only once the checkpoint is opened).
fn dir_tensor_bytes_hint(src: &std::path::Path) -> Option<u64> {
    let dir = if src.is_file() { src.parent()? } else { src };
    let total = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .sum();
    Some(total)
}

/// The intermediate .bpk at `tmp`, named in messages by the source it was made from.
fn hub_file(tmp: &Path, src: &Path) -> Result<BpkFile, ConvertError> {
    Storage::map(tmp)
        .and_then(|storage| BpkFile::from_storage(src, storage))
        .map_err(|e| ConvertError::Output {
            error: e.to_string(),
        })
}

/// Where the intermediate .bpk of an HF or GGUF output is written (as a temporary file beside
/// this name, never persisted): a hidden name beside the target.
fn hub_target(out: &Path) -> std::path::PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    crate::fsio::parent_dir(out).join(format!(".{name}.bitnet-pack-hub.bpk"))
}

/// The first option that asks for more than BitNet b1.58, which HF and GGUF runtimes lack.
fn extended_flag(a: &ConvertArgs) -> Option<&'static str> {
    [
        (
            a.activations.as_deref().is_some_and(|s| s != "a8"),
            "--activations",
        ),
        (
            a.online_hadamard.as_deref().is_some_and(|s| s != "none"),
            "--online-hadamard",
        ),
        (a.kv_bits.is_some(), "--kv-bits"),
        (a.q_bits.is_some(), "--q-bits"),
        (a.rotate.is_some(), "--rotate"),
    ]
    .into_iter()
    .find(|(set, _)| *set)
    .map(|(_, f)| f)
}

/// What to tell the user about a GGUF written.
fn gguf_summary_lines(out: &Path, s: &GgufSummary, ty: GgufTernary) -> Vec<String> {
    let mut lines = vec![format!(
        "wrote {}: GGUF v3, architecture {}, {} tensors, projections {} ({})",
        out.display(),
        s.architecture,
        s.tensors,
        ty.as_str().to_uppercase(),
        human_bytes(s.file_len),
    )];
    lines.extend(s.notes.iter().map(|n| format!("note: {n}")));
    if ty == GgufTernary::I2S {
        lines.push("note: I2_S (type 36) is bitnet.cpp's x86 layout; upstream llama.cpp does not load it, and bitnet.cpp's ARM build expects another layout".into());
    }
    lines
}

/// `convert FILE.bpk --to ...`: an export of an existing .bpk (no conversion).
fn export_bpk(
    a: &ConvertArgs,
    to: ToArg,
    class: LinearClass,
    gguf_type: GgufTernary,
    gguf_embed: FloatDtype,
) -> anyhow::Result<ExitCode> {
    let file =
        BpkFile::open(&a.src).with_context(|| format!("could not read {}", a.src.display()))?;
    match to {
        ToArg::Bpk => anyhow::bail!(
            "{} is already a .bpk file; name an output format with --to hf or --to gguf",
            a.src.display()
        ),
        ToArg::Gguf => {
            // A tokenizer.json beside the .bpk is carried over, if there is one.
            let dir = crate::fsio::parent_dir(&a.src);
            let s = export_gguf(
                &file,
                &a.output,
                a.force,
                gguf_type,
                gguf_embed,
                Vocab::Dir(&dir),
            )
            .with_context(|| format!("could not export {}", a.src.display()))?;
            if !a.quiet {
                for line in gguf_summary_lines(&a.output, &s, gguf_type) {
                    say(&line);
                }
            }
        }
        ToArg::Hf => {
            let s = export_hf(&file, &a.output, class, None)
                .with_context(|| format!("could not export {}", a.src.display()))?;
            if !a.quiet {
                say(&format!(
                    "wrote {}: HF packed checkpoint, {} tensors, linear_class {} (no tokenizer: the .bpk holds none; copy tokenizer files beside it)",
                    a.output.display(),
                    s.tensors,
                    class.as_str()
                ));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `convert FILE.gguf ...`: a GGUF read into a .bpk, kept or exported.
fn import_gguf(
    a: &ConvertArgs,
    opts: &ConvertOptions,
    to: ToArg,
    class: LinearClass,
    gguf_type: GgufTernary,
    gguf_embed: FloatDtype,
) -> anyhow::Result<ExitCode> {
    if a.verify {
        anyhow::bail!(
            "--verify compares with the float source model, which a GGUF file does not hold; convert without it and check the output with `bitnet-pack validate`"
        );
    }
    if let Some(flag) = extended_flag(a) {
        anyhow::bail!(
            "{flag} needs float weights; a GGUF holds trits already (convert the HF checkpoint instead)"
        );
    }
    let start = Instant::now();
    let io = GgufImportOptions {
        layout: opts.layout,
        keep: opts.keep,
        compress: opts.compress,
        force: a.force,
    };
    let context = || format!("could not convert {}", a.src.display());
    match to {
        ToArg::Bpk => {
            let finished = gguf_to_bpk(&a.src, &a.output, &io).with_context(context)?;
            let (h, len) = finished
                .persist()
                .map_err(|e| anyhow::anyhow!("{}: {e}", a.output.display()))?;
            if !a.quiet {
                say(&format!(
                    "wrote {}: {} ({}) from GGUF, {} tensors, layout {}, in {:.2} s",
                    a.output.display(),
                    h.model.architecture,
                    human_bytes(len),
                    h.tensors.len(),
                    opts.layout.as_str(),
                    start.elapsed().as_secs_f64()
                ));
            }
        }
        ToArg::Hf | ToArg::Gguf => {
            if to == ToArg::Hf {
                crate::fsio::check_new_dir(&a.output)?;
            } else {
                crate::fsio::check_output(&a.output, a.force, std::slice::from_ref(&a.src))?;
            }
            // The .bpk is made beside the target and never persisted.
            let finished =
                gguf_to_bpk(&a.src, &hub_target(&a.output), &io).with_context(context)?;
            let file = Storage::map(finished.temp_path())
                .and_then(|storage| BpkFile::from_storage(&a.src, storage))?;
            if to == ToArg::Hf {
                let s = export_hf(&file, &a.output, class, None).with_context(context)?;
                if !a.quiet {
                    say(&format!(
                        "wrote {}: HF packed checkpoint from GGUF, {} tensors, linear_class {} (the GGUF vocabulary is not converted to tokenizer.json: copy the model's tokenizer files beside it)",
                        a.output.display(),
                        s.tensors,
                        class.as_str()
                    ));
                }
            } else {
                let src_map = crate::fsio::open_regular(&a.src)?;
                // SAFETY: read-only map, as every reader of ours.
                let bytes = unsafe { memmap2::Mmap::map(&src_map) }?;
                let src_g = crate::gguf::parse(&bytes)?;
                let vocab: Vec<_> = src_g
                    .kv()
                    .iter()
                    .filter(|(k, _)| k.starts_with("tokenizer."))
                    .cloned()
                    .collect();
                let s = export_gguf(
                    &file,
                    &a.output,
                    a.force,
                    gguf_type,
                    gguf_embed,
                    Vocab::Carried(&vocab),
                )
                .with_context(context)?;
                if !a.quiet {
                    for line in gguf_summary_lines(&a.output, &s, gguf_type) {
                        say(&line);
                    }
                }
            }
            drop(finished);
        }
    }
    Ok(ExitCode::SUCCESS)
}
