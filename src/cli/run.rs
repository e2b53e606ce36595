//! `bitnet-pack run`: execute a packed file or a source checkpoint on token ids or a prompt.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

use super::{
    MAX_TOKENS, ModeArg, RunArgs, escape_controls, load_tokenizer, print, say, with_threads,
};

/// Tokens `--prompt` generates without `--max-new-tokens`.
const DEFAULT_NEW_TOKENS: usize = 32;
use crate::format::{BpkFile, Storage};
use crate::run::{KvCache, Linear, Transformer, packed, source};
use crate::source::Checkpoint;

/// The logits file written by `--logits-json`.
#[derive(serde::Serialize)]
struct LogitsJson<'a> {
    tokens: &'a [u32],
    logits: Vec<&'a [f32]>,
}

pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    with_threads(a.threads, || dispatch(&a))?
}

fn dispatch(a: &RunArgs) -> anyhow::Result<ExitCode> {
    if !is_bpk(&a.model)? {
        if a.mmap {
            bail!(
                "--mmap applies to .bpk files; a source checkpoint is always read through its mapping"
            );
        }
        let ckpt = Checkpoint::open(&a.model)
            .with_context(|| format!("could not open {}", a.model.display()))?;
        for note in &ckpt.notes {
            say(&format!("note: {note}"));
        }
        let mode = match a.mode.unwrap_or(ModeArg::Qat) {
            ModeArg::Qat => source::SourceMode::Qat,
            ModeArg::Fp => source::SourceMode::Fp,
        };
        // The training forward the checkpoint declares (config.json's BitNet v2 keys, if any).
        let scheme = crate::convert::scheme::scheme(&ckpt.config, &Default::default())
            .with_context(|| format!("could not read the scheme of {}", a.model.display()))?;
        let model = source::load(&ckpt, mode, &scheme)
            .with_context(|| format!("could not load {}", a.model.display()))?;
        execute(a, &model, &ckpt.dir, &ckpt.input_files())
    } else {
        if a.mode.is_some() {
            bail!(
                "--mode applies to source checkpoints; a .bpk file always runs its packed integer path"
            );
        }
        let storage = if a.mmap {
            Storage::map(&a.model)
        } else {
            Storage::read_into_memory(&a.model)
        };
        let file = storage
            .and_then(|s| BpkFile::from_storage(&a.model, s))
            .with_context(|| format!("could not read {}", a.model.display()))?;
        let model =
            packed::load(&file).with_context(|| format!("could not load {}", a.model.display()))?;
        let dir = a.model.parent().unwrap_or(Path::new(".")).to_path_buf();
        execute(a, &model, &dir, std::slice::from_ref(&a.model))
    }
}

/// Whether `path` names a .bpk file (by its magic or its extension), rather than a source
/// checkpoint (a directory, a .safetensors file or a shard index).
fn is_bpk(path: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    if std::fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false) {
        return Ok(false);
    }
    let mut magic = [0u8; 8];
    let mut f = crate::fsio::open_regular(path)?;
    let n = f.read(&mut magic).unwrap_or(0);
    let named_bpk = path.extension().is_some_and(|e| e == "bpk");
    Ok(named_bpk || (n == magic.len() && magic == crate::format::MAGIC))
}

/// `inputs`: every file the model is read from (an output must be none of them).
fn execute<L: Linear>(
    a: &RunArgs,
    model: &Transformer<'_, L>,
    dir: &Path,
    inputs: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    match (&a.tokens, &a.prompt) {
        (None, Some(_)) if a.logits_json.is_some() => {
            bail!(
                "--logits-json goes with --tokens (with --prompt only the generated text is printed)"
            )
        }
        (Some(_), None) if a.max_new_tokens.is_some() || a.tokenizer.is_some() => {
            bail!("--max-new-tokens and --tokenizer go with --prompt, not --tokens")
        }
        (Some(tokens), None) => run_tokens(a, model, tokens, inputs),
        (None, Some(prompt)) => generate(a, model, dir, prompt),
        _ => bail!("give either --tokens or --prompt"),
    }
}

/// The first position whose logits are not all finite.
fn check_finite(logits: &[f32], vocab: usize) -> anyhow::Result<()> {
    if let Some(p) = logits
        .chunks_exact(vocab)
        .position(|row| row.iter().any(|v| !v.is_finite()))
    {
        bail!(
            "the forward pass produced non-finite logits (NaN or infinity) at position {p}: the model's numbers overflow f32 (a hyperparameter or a weight out of range?)"
        );
    }
    Ok(())
}

fn run_tokens<L: Linear>(
    a: &RunArgs,
    model: &Transformer<'_, L>,
    tokens: &[u32],
    inputs: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let out = model.forward(tokens, &mut KvCache::for_model(model), false)?;
    let vocab = model.config.vocab_size;
    check_finite(&out.logits, vocab)?;
    if let Some(path) = &a.logits_json {
        let doc = LogitsJson {
            tokens,
            logits: out.logits.chunks_exact(vocab).collect(),
        };
        let bytes = serde_json::to_vec(&doc)?;
        if path.as_os_str() == "-" {
            print(&String::from_utf8_lossy(&bytes))?;
            return Ok(ExitCode::SUCCESS);
        }
        // Replaced if it exists (it is an output), but never a non-file or a file of the model.
        crate::fsio::check_output(path, true, inputs)
            .and_then(|()| crate::fsio::write_atomic(path, true, &bytes))
            .context("could not write the logits")?;
    }
    let mut text = String::from("position  token  next (argmax)  logit\n");
    for (p, (t, row)) in tokens
        .iter()
        .zip(out.logits.chunks_exact(vocab))
        .enumerate()
    {
        let (best, logit) =
            row.iter().enumerate().fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            );
        text.push_str(&format!("{p:>8}  {t:>5}  {best:>13}  {logit:.4}\n"));
    }
    print(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn tokenizer_path(a: &RunArgs, dir: &Path) -> PathBuf {
    a.tokenizer
        .clone()
        .unwrap_or_else(|| dir.join("tokenizer.json"))
}

fn generate<L: Linear>(
    a: &RunArgs,
    model: &Transformer<'_, L>,
    dir: &Path,
    prompt: &str,
) -> anyhow::Result<ExitCode> {
    let path = tokenizer_path(a, dir);
    let max_new_tokens = a.max_new_tokens.unwrap_or(DEFAULT_NEW_TOKENS);
    if max_new_tokens > MAX_TOKENS {
        bail!("--max-new-tokens {max_new_tokens} is above the limit of {MAX_TOKENS}");
    }
    let tok =
        load_tokenizer(&path).context("could not load the tokenizer (pass --tokenizer PATH)")?;
    let enc = tok
        .encode(prompt, true)
        .map_err(|e| anyhow::anyhow!("could not tokenize the prompt: {e}"))?;
    let prompt_ids: Vec<u32> = enc.get_ids().to_vec();
    if prompt_ids.is_empty() {
        bail!("the prompt is empty once tokenized; give some text");
    }
    let vocab = model.config.vocab_size;
    // The attention state grows to the prompt plus what is generated (at most the positions
    // the model has): check that it fits before starting.
    let positions = (prompt_ids.len() + max_new_tokens).min(model.config.max_position_embeddings);
    crate::run::budget::check(&model.config, 1, positions, false)?;
    let mut cache = KvCache::for_model(model);
    let mut logits = model.forward_last(&prompt_ids, &mut cache)?;
    check_finite(&logits, vocab)?;
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let mut last_text = String::new();
    let mut stdout = std::io::stdout().lock();
    for _ in 0..max_new_tokens {
        let last = &logits[logits.len() - vocab..];
        let next = last
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                if v > b.1 { (i, v) } else { b }
            })
            .0 as u32;
        generated.push(next);
        // Print what the new token adds to the decoded text. A byte-level token can end inside
        // a UTF-8 character (decoded as U+FFFD until the next token completes it): hold such a
        // tail back until it is complete. Control characters are printed escaped.
        let text = tok
            .decode(&generated, true)
            .map_err(|e| anyhow::anyhow!("could not decode: {e}"))?;
        let settled = text.trim_end_matches('\u{FFFD}');
        if let Some(new) = settled.strip_prefix(printed.as_str())
            && !new.is_empty()
        {
            match write!(stdout, "{}", escape_controls(new)).and_then(|_| stdout.flush()) {
                // The reader went away (`| head`): stop generating, quietly.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    return Ok(ExitCode::SUCCESS);
                }
                other => other?,
            }
            printed = settled.to_string();
        }
        last_text = text;
        if model.config.eos_token_ids.contains(&u64::from(next))
            || cache.len >= model.config.max_position_embeddings
        {
            break;
        }
        logits = model.forward_last(&[next], &mut cache)?;
        check_finite(&logits, vocab)?;
    }
    // Whatever is left (a character the generation never completed).
    let rest = last_text.strip_prefix(printed.as_str()).unwrap_or("");
    match writeln!(stdout, "{}", escape_controls(rest)) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
        other => other?,
    }
    say(&format!(
        "prompt tokens {prompt_ids:?}; generated tokens {generated:?}"
    ));
    Ok(ExitCode::SUCCESS)
}
