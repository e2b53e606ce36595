//! The command-line front end: argument parsing and one `run()` per subcommand. All real work
//! is in the library; this layer adds file names to errors and formats output.
//!
//! Exit codes: 0 success, 1 a check failed (`validate`), 2 an error (usage, unreadable or
//! malformed input, I/O).

mod bench;
mod convert;
mod gguf_file;
mod inspect;
mod parity;
mod rotate;
mod run;
mod unpack;
mod validate;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit code when a check (validation, parity) fails.
pub const EXIT_CHECK_FAILED: u8 = 1;
/// Exit code for errors: usage, bad input, I/O.
pub const EXIT_ERROR: u8 = 2;

/// Most worker threads `--threads` may ask for: far beyond any useful count, low enough that
/// spawning them is instant and cannot exhaust the system's thread limit.
pub const MAX_THREADS: usize = 256;
/// Most tokens any count argument may ask for (`--random-tokens`, `--max-new-tokens`), before
/// the model's own `max_position_embeddings` limits it further.
pub const MAX_TOKENS: usize = 1 << 20;
/// Largest tokenizer.json read (real ones are 2 to 35 MB).
pub const MAX_TOKENIZER_FILE: u64 = 64 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "bitnet-pack",
    version,
    about = "Pack LLM checkpoints into ternary (BitNet b1.58) models and check them"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Convert an HF checkpoint (master weights or packed), a .bpk or a GGUF file into a .bpk,
    /// an HF packed checkpoint (--to hf) or a GGUF file (-o NAME.gguf).
    Convert(ConvertArgs),
    /// Describe a .bpk or GGUF file: model, quantization, tensor table, sizes.
    Inspect(InspectArgs),
    /// Measure the packed runner on a .bpk file: load, prefill, decode (tokens/s), bytes read
    /// per token, memory-copy rate.
    Bench(BenchArgs),
    /// Check every byte of a .bpk or GGUF file; exit 1 if anything is wrong.
    Validate(ValidateArgs),
    /// Dequantize a .bpk file into a safetensors file.
    Unpack(UnpackArgs),
    /// Run a .bpk file (integer path) or a source checkpoint on tokens or a prompt.
    Run(RunArgs),
    /// Compare a packed file with its source checkpoint, block by block and at the logits.
    Parity(ParityArgs),
    /// Write an HF checkpoint with its residual stream rotated (same function in full precision).
    Rotate(RotateArgs),
}

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// The source HF model directory.
    pub src: PathBuf,
    /// A new (or empty) output directory.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Seed of the rotation's random signs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Element type of the tensors written.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: KeepArg,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// How a source checkpoint is executed.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// The training forward: absmean fake-quant weights, fake-quant activations (a8 per token
    /// unless config.json declares another scheme; with parity, the scheme the file recorded).
    Qat,
    /// Full precision, no quantization.
    Fp,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A .bpk file, or an HF model directory (run in f32).
    pub model: PathBuf,
    /// Comma-separated token ids to run (prints the arg max at every position).
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "prompt",
        required_unless_present = "prompt"
    )]
    pub tokens: Option<Vec<u32>>,
    /// Text to continue greedily (needs tokenizer.json beside the model, or --tokenizer).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Tokens to generate after --prompt (default 32).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// With --tokens: write the logits of every position to this JSON file
    /// ({"tokens", "logits"}), or `-` for standard output.
    #[arg(long)]
    pub logits_json: Option<PathBuf>,
    /// For a source directory: qat (default) or fp.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// tokenizer.json to use with --prompt.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run a .bpk file from its memory mapping instead of reading it into memory first
    /// (less memory, slower decoding).
    #[arg(long)]
    pub mmap: bool,
}

#[derive(Debug, clap::Args)]
pub struct ParityArgs {
    /// The source HF model directory.
    pub source: PathBuf,
    /// The .bpk file converted from it.
    pub packed: PathBuf,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub tokens: Option<Vec<u32>>,
    /// Text, tokenized with the source's tokenizer.json.
    #[arg(long)]
    pub text: Option<String>,
    /// Number of random token ids (the default input, 16 tokens).
    #[arg(long)]
    pub random_tokens: Option<usize>,
    /// Seed of the random tokens (the default input, or --random-tokens).
    #[arg(long, conflicts_with_all = ["tokens", "text"])]
    pub seed: Option<u64>,
    /// qat: must match (exit 1 if not); fp: report the quantization loss (exit 0).
    #[arg(long, value_enum, default_value = "qat")]
    pub against: ModeArg,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Do not require the source files to have the checksums recorded in the packed file.
    #[arg(long)]
    pub no_provenance_check: bool,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Storage for the ternary projections.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LayoutArg {
    /// 2 bits per weight in blocks of 128.
    I2,
    /// One int8 per weight.
    I8,
    /// Five trits per byte (1.6 bits per weight) in blocks of 160; needs a reader of format 1.2.
    T5,
}

/// Element type for non-ternary tensors.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KeepArg {
    /// Each tensor's own source type.
    Source,
    F32,
    F16,
    Bf16,
    /// `convert` only: the embedding and the head as q8_0 (blocks of 32 int8 values with an
    /// f16 scale, GGML's Q8_0); norms keep their source type.
    Q8,
}

/// Element type of unpacked tensors.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum UnpackDtype {
    F32,
    Bf16,
}

/// Output format of `convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ToArg {
    /// A .bpk file.
    Bpk,
    /// An HF packed BitNet checkpoint directory (transformers, offline quantization).
    Hf,
    /// A GGUF file for llama.cpp (TQ1_0, TQ2_0) or bitnet.cpp (I2_S); see --gguf-type.
    Gguf,
}

/// Ternary type of a GGUF output.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GgufTypeArg {
    /// llama.cpp's TQ2_0: 2.06 bits per weight, rows a multiple of 256.
    #[value(name = "tq2_0")]
    Tq2_0,
    /// llama.cpp's TQ1_0: 1.69 bits per weight, rows a multiple of 256.
    #[value(name = "tq1_0")]
    Tq1_0,
    /// bitnet.cpp's x86 I2_S: 2 bits per weight, rows a multiple of 128 (not loaded by upstream llama.cpp).
    #[value(name = "i2_s")]
    I2S,
}

/// transformers' BitNet linear class of an HF export (its `weight_scale` convention).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LinearClassArg {
    /// `output * weight_scale`, weight_scale = a (as microsoft/bitnet-b1.58-2B-4T).
    Autobitlinear,
    /// `output / weight_scale`, weight_scale = 1/a (transformers' default class).
    Bitlinear,
}

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// HF model directory (config.json + model.safetensors or model.safetensors.index.json;
    /// master weights, or an HF packed checkpoint), or a .bpk file to export with --to.
    pub src: PathBuf,
    /// Output: a .bpk file, a NAME.gguf file, or a new directory with --to hf.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Output format (default: gguf for an output named *.gguf or with --gguf-type, else bpk).
    #[arg(long, value_enum)]
    pub to: Option<ToArg>,
    /// Ternary type of a GGUF output (default tq2_0). Embeddings are written f16 unless --keep
    /// says otherwise, norms f32.
    #[arg(long, value_enum)]
    pub gguf_type: Option<GgufTypeArg>,
    /// The weight_scale convention of --to hf.
    #[arg(long, value_enum, default_value = "autobitlinear")]
    pub linear_class: LinearClassArg,
    /// Layout of the ternary weights.
    #[arg(long, value_enum, default_value = "i2")]
    pub layout: LayoutArg,
    /// Element type of embeddings, norms and an untied lm_head (for GGUF output: of the
    /// embedding and head, f16 unless given; norms are always f32 there).
    #[arg(long, value_enum, default_value = "source")]
    pub keep: KeepArg,
    /// zstd-compress the non-ternary tensors.
    #[arg(long)]
    pub compress: bool,
    /// Worker threads (default: one per core), the source's SHA-256 included: --threads 1
    /// uses one core. The output does not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Overwrite the output if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print nothing but errors.
    #[arg(short, long)]
    pub quiet: bool,
    /// After the summary, print where the time went to stderr (even with --quiet): per stage
    /// (source hash, ternarize, float tensors, output hash, write, finalize) the time threads
    /// spent in it added over threads, the total wall time and the CPUs kept busy. HF sources only.
    #[arg(long)]
    pub timings: bool,
    /// After writing, run parity (packed vs source in qat mode) and fail if it does not pass.
    #[arg(long)]
    pub verify: bool,
    /// Activation quantizer: a8, a4, none, or per site, e.g. qkv=a4,o=a8,gate_up=a4,down=a8
    /// (default: config.json's `activation_scheme`, else a8).
    #[arg(long, value_name = "SPEC")]
    pub activations: Option<String>,
    /// Projections whose input gets an online Hadamard transform before it is quantized
    /// (BitNet v2 H-BitLinear), e.g. o_proj,down_proj, or none (default: config.json's
    /// `online_hadamard`).
    #[arg(long, value_name = "SITES")]
    pub online_hadamard: Option<String>,
    /// Quantize the attention keys and values kept in the cache to 8, 4 or 3 bits.
    #[arg(long, value_name = "BITS")]
    pub kv_bits: Option<u8>,
    /// Quantize the attention queries to 8 or 4 bits.
    #[arg(long, value_name = "BITS")]
    pub q_bits: Option<u8>,
    /// Rotate the residual stream before ternarization (QuaRot-style: norm gains folded, a
    /// seeded randomized Hadamard, online Hadamards at o_proj and down_proj inputs).
    #[arg(long, value_enum)]
    pub rotate: Option<RotateArg>,
    /// Seed of --rotate's random signs.
    #[arg(long, default_value_t = 0, requires = "rotate")]
    pub seed: u64,
    /// Allow --rotate on a checkpoint trained with BitNet quantization (its trained
    /// ternarization is lost: the rotated weights are ternarized again).
    #[arg(long, requires = "rotate")]
    pub force_requantize: bool,
}

/// A rotation to fold into the weights.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RotateArg {
    /// Randomized Hadamard `Q = diag(s) H^T / sqrt(n)` (formats/bpk.md §9).
    Hadamard,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// A .bpk or GGUF file.
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A .bpk file.
    pub file: PathBuf,
    /// Prompt length of the prefill.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens generated greedily after the prompt (decode speed is their median).
    #[arg(long, default_value_t = 32)]
    pub gen_tokens: usize,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Skip measuring the memory-copy rate (and the decode floor it gives).
    #[arg(long)]
    pub no_memcpy: bool,
    /// Run from the file's memory mapping instead of reading it into memory first.
    #[arg(long)]
    pub mmap: bool,
}

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// A .bpk or GGUF file.
    pub file: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Worker threads for checksum verification (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct UnpackArgs {
    /// A .bpk file.
    pub file: PathBuf,
    /// Output .safetensors file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Element type of the output tensors.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: UnpackDtype,
    /// Overwrite the output if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Convert(a) => convert::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => {
            crate::run::keep_working_memory();
            bench::run(a)
        }
        Command::Validate(a) => validate::run(a),
        Command::Unpack(a) => unpack::run(a),
        Command::Run(a) => {
            crate::run::keep_working_memory();
            run::run(a)
        }
        Command::Parity(a) => {
            crate::run::keep_working_memory();
            parity::run(a)
        }
        Command::Rotate(a) => rotate::run(a),
    }
}

/// Runs `f` on a rayon pool of `threads` workers (default: the global pool, one per core),
/// on one of the pool's threads: a parallel section started from outside a pool waits for it
/// through a lock, about 15 us more per section on the machine measured, which a decoded token
/// of a 30-block model pays about 250 times.
fn with_threads<T: Send>(
    threads: Option<usize>,
    f: impl FnOnce() -> T + Send,
) -> anyhow::Result<T> {
    match threads {
        None => Ok(rayon::scope(|_| f())),
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) if n > MAX_THREADS => {
            anyhow::bail!("--threads {n} is above the limit of {MAX_THREADS}")
        }
        Some(n) => Ok(rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()?
            .install(f)),
    }
}

/// Checks a token count argument against [`MAX_TOKENS`] and the model's position limit, before
/// anything of that size is allocated.
fn check_token_count(flag: &str, n: usize, max_positions: usize) -> anyhow::Result<()> {
    if n > MAX_TOKENS {
        anyhow::bail!("{flag} {n} is above the limit of {MAX_TOKENS}");
    }
    if n > max_positions {
        anyhow::bail!(
            "{flag} {n} is more than the model's max_position_embeddings ({max_positions})"
        );
    }
    Ok(())
}

/// Loads a tokenizer.json (a regular file of at most [`MAX_TOKENIZER_FILE`] bytes).
fn load_tokenizer(path: &std::path::Path) -> anyhow::Result<tokenizers::Tokenizer> {
    let bytes = crate::fsio::read_capped(path, MAX_TOKENIZER_FILE, "tokenizer.json")?;
    tokenizers::Tokenizer::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a usable tokenizer.json: {e}", path.display()))
}

/// `text` with every control character other than newline and tab written as a `\u{..}`
/// escape: header strings of a hostile file (tensor names, the architecture) must not reach a
/// terminal as escape sequences.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Writes one line to stderr, control characters escaped; a stderr that cannot be written
/// (closed, full) is not an error and never a panic.
pub fn say(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{}", escape_controls(line));
}

/// Writes to stdout, control characters escaped; a closed pipe (`| head`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let text = escape_controls(text);
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context("could not write to standard output")),
        Ok(()) => Ok(()),
    }
}

/// Human-readable byte count.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
