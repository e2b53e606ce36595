//! `bitnet-pack run`: execute a packed file or a source checkpoint on token ids or a prompt.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

use super::{MAX_TOKENS, ModeArg, RunArgs, load_tokenizer, print, with_threads};
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
    if !is_bpk(&a.model)? {
        let ckpt = Checkpoint::open(&a.model)
            .with_context(|| format!("could not open {}", a.model.display()))?;
        for note in &ckpt.notes {
            eprintln!("note: {note}");
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
    let out = model.forward(tokens, &mut KvCache::for_model(model), false)?;
    let vocab = model.config.vocab_size;
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
        // Replaced if it exists (it is an output), but never a non-file or the model itself.
        crate::fsio::check_output(path, true, std::slice::from_ref(&a.model))
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
    if a.max_new_tokens > MAX_TOKENS {
        bail!(
            "--max-new-tokens {} is above the limit of {MAX_TOKENS}",
            a.max_new_tokens
        );
    }
    let tok =
        load_tokenizer(&path).context("could not load the tokenizer (pass --tokenizer PATH)")?;
    let enc = tok
        .encode(prompt, true)
        .map_err(|e| anyhow::anyhow!("could not tokenize the prompt: {e}"))?;
    let prompt_ids: Vec<u32> = enc.get_ids().to_vec();
    let vocab = model.config.vocab_size;
    // The attention state grows to the prompt plus what is generated (at most the positions
    // the model has): check that it fits before starting.
    let positions = (prompt_ids.len() + a.max_new_tokens).min(model.config.max_position_embeddings);
    crate::run::budget::check(&model.config, 1, positions, false)?;
    let mut cache = KvCache::for_model(model);
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
            match write!(stdout, "{new}").and_then(|_| stdout.flush()) {
                // The reader went away (`| head`): stop generating, quietly.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    return Ok(ExitCode::SUCCESS);
                }
                other => other?,
            }
        }
        printed = text;
        if model.config.eos_token_ids.contains(&u64::from(next))
            || cache.len >= model.config.max_position_embeddings
        {
            break;
        }
        logits = model.forward(&[next], &mut cache, false)?.logits;
    }
    match writeln!(stdout) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
        other => other?,
    }
    eprintln!("prompt tokens {prompt_ids:?}; generated tokens {generated:?}");
    Ok(ExitCode::SUCCESS)
}
