//! `bitnet-pack run`: execute a packed file or a source checkpoint on token ids or a prompt.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

use super::{ModeArg, RunArgs, print, with_threads};
use crate::format::BpkFile;
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
    if a.model.is_dir() {
        let ckpt = Checkpoint::open(&a.model)
            .with_context(|| format!("could not open {}", a.model.display()))?;
        let mode = match a.mode.unwrap_or(ModeArg::Qat) {
            ModeArg::Qat => source::SourceMode::Qat,
            ModeArg::Fp => source::SourceMode::Fp,
        };
        let model = source::load(&ckpt, mode)
            .with_context(|| format!("could not load {}", a.model.display()))?;
        execute(a, &model, &ckpt.dir)
    } else {
        if a.mode.is_some() {
            bail!(
                "--mode applies to source checkpoints; a .bpk file always runs its packed integer path"
            );
        }
        let file = BpkFile::open(&a.model)
            .with_context(|| format!("could not read {}", a.model.display()))?;
        let model =
            packed::load(&file).with_context(|| format!("could not load {}", a.model.display()))?;
        let dir = a.model.parent().unwrap_or(Path::new(".")).to_path_buf();
        execute(a, &model, &dir)
    }
}

fn execute<L: Linear>(
    a: &RunArgs,
    model: &Transformer<'_, L>,
    dir: &Path,
) -> anyhow::Result<ExitCode> {
    match (&a.tokens, &a.prompt) {
        (Some(tokens), None) => run_tokens(a, model, tokens),
        (None, Some(prompt)) => generate(a, model, dir, prompt),
        _ => bail!("give either --tokens or --prompt"),
    }
}

fn run_tokens<L: Linear>(
    a: &RunArgs,
    model: &Transformer<'_, L>,
    tokens: &[u32],
) -> anyhow::Result<ExitCode> {
    let out = model.forward(tokens, &mut KvCache::new(&model.config), false)?;
    let vocab = model.config.vocab_size;
    if let Some(path) = &a.logits_json {
        let doc = LogitsJson {
            tokens,
            logits: out.logits.chunks_exact(vocab).collect(),
        };
        std::fs::write(path, serde_json::to_vec(&doc)?)
            .with_context(|| format!("could not write {}", path.display()))?;
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
    let tok = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| {
            format!(
                "could not load the tokenizer {} (pass --tokenizer PATH)",
                path.display()
            )
        })?;
    let enc = tok
        .encode(prompt, true)
        .map_err(|e| anyhow::anyhow!("could not tokenize the prompt: {e}"))?;
    let prompt_ids: Vec<u32> = enc.get_ids().to_vec();
    let vocab = model.config.vocab_size;
    let mut cache = KvCache::new(&model.config);
    let mut logits = model.forward(&prompt_ids, &mut cache, false)?.logits;
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let mut stdout = std::io::stdout().lock();
    for _ in 0..a.max_new_tokens {
        let last = &logits[logits.len() - vocab..];
        let next = last
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                if v > b.1 { (i, v) } else { b }
            })
            .0 as u32;
        generated.push(next);
        // Print what the new token adds to the decoded text (tokens may merge into characters).
        let text = tok
            .decode(&generated, true)
            .map_err(|e| anyhow::anyhow!("could not decode: {e}"))?;
        if let Some(new) = text.strip_prefix(printed.as_str()) {
            let _ = write!(stdout, "{new}").and_then(|_| stdout.flush());
        }
        printed = text;
        if model.config.eos_token_ids.contains(&u64::from(next))
            || cache.len >= model.config.max_position_embeddings
        {
            break;
        }
        logits = model.forward(&[next], &mut cache, false)?.logits;
    }
    let _ = writeln!(stdout);
    eprintln!("prompt tokens {prompt_ids:?}; generated tokens {generated:?}");
    Ok(ExitCode::SUCCESS)
}
