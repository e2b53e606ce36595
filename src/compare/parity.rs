//! Parity between a source checkpoint and a packed file: does the file compute what the source
//! computes?
//!
//! Comparing only the end-to-end output cannot answer that on a real model: an activation that
//! lands on an int8 rounding boundary rounds to neighbouring steps in the two paths (their
//! inputs differ by float rounding), and that one step then propagates through every later
//! block. So the verdict rests on local checks, each of which isolates one piece of the model
//! and feeds both paths the identical input (teacher forcing):
//!
//! 1. **Declarations**: the config, quantization scheme and tensor list of the file equal what
//!    the source implies.
//! 2. **Float tensors**: norms, embeddings and head equal the source's values rounded to the
//!    element type the file stores them in, bit for bit.
//! 3. **Projections**: each of the seven projections of every block, run on the exact input
//!    the source's projection received. Both paths quantize that input to the same int8
//!    values, so only float summation order separates them: a tight tolerance.
//! 4. **Block halves**: the attention half and the feed-forward half of every block, run from
//!    the source's residual stream. The inputs of their projections are compared (float
//!    arithmetic only, tight), and what each half adds to the residual stream (which includes a
//!    possible rounding-boundary flip at `o_proj`/`down_proj`: looser, and the flips are
//!    counted and shown).
//! 5. **Head**: the final norm and head on the source's last hidden state.
//!
//! End to end, the free-running packed model is compared with the source block by block and
//! at the logits, for information, with one rule in the verdict: a top-1 disagreement counts
//! only where the reference's margin is larger than the position's logit error can explain.

use serde::Serialize;

use super::{LogitsStats, PACKED_VS_QAT, Stats, Tolerances, compare, compare_logits};
use crate::convert::scheme::{self, SchemeOptions};
use crate::convert::{Job, jobs};
use crate::format::header::QuantScheme;
use crate::format::header::TensorEntry;
use crate::format::header::same_quantizer;
use crate::format::{BpkFile, Encoding};
use crate::model::{ModelConfig, Role};
use crate::num::FloatDtype;
use crate::num::digest::sha256_file;
use crate::num::dtype::{decode_f32, encode_f32};
use crate::pack::q8;
use crate::quant::ActQuant;
use crate::run::model::MatrixType;
use crate::run::packed::TernaryLinear;
use crate::run::{
    InputError, KvCache, Linear, Probe, RunError, Site, SourceMode, Transformer, packed, source,
};
use crate::source::{Checkpoint, SourceError, SourceTensor};
use crate::transform::Rotation;

/// Version of the JSON report (`parity --json`); docs/parity.md describes it.
pub const SCHEMA_VERSION: u32 = 2;

/// Parity could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    #[error("the packed file was not made from this checkpoint: {reason}")]
    Mismatch { reason: String },
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Format(#[from] crate::format::FormatError),
}

/// The outcome of a parity run.
#[derive(Debug, Clone, Serialize)]
pub struct ParityReport {
    pub schema_version: u32,
    /// What the packed model was compared against.
    pub against: SourceMode,
    pub tokens: Vec<u32>,
    /// Where the file declares something other than what the source implies.
    pub declarations: Vec<String>,
    pub floats: FloatCheck,
    /// The packed model's embedding of the tokens vs the source's.
    pub embedding: Stats,
    pub blocks: Vec<BlockReport>,
    /// Final norm and head on the source's last hidden state.
    pub head: Stats,
    /// The free-running packed model's logits vs the source's.
    pub logits: LogitsStats,
    /// What the file's narrower float tensors (`--keep f16`, `--keep q8`) cost the source
    /// model itself: its logits with the file's float tensors against its logits with its own
    /// (KL, top-1), apart from the ternary arithmetic. Absent when the file keeps the
    /// source's floats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub float_cost: Option<LogitsStats>,
    /// The tolerances of the verdict (`None` for the informational `fp` comparison).
    pub tolerances: Option<Tolerances>,
    pub verdict: Verdict,
}

/// The float tensors of the file against the source's.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FloatCheck {
    /// Float tensors compared.
    pub tensors: usize,
    /// Tensors whose values differ from the source's rounded to the stored element type.
    pub mismatches: Vec<FloatMismatch>,
    /// The largest unit roundoff of a float tensor stored in another type than its source's,
    /// unless that type is f32 (`--keep`), 0 if none: the rounding the file declares. The
    /// local checks run the reference with the file's (verified) float tensors, so only the
    /// end-to-end comparison shows its cost.
    pub narrowing: f64,
}

/// A float tensor whose stored values are not the source's.
#[derive(Debug, Clone, Serialize)]
pub struct FloatMismatch {
    pub name: String,
    /// Elements that differ.
    pub count: u64,
    pub first_index: u64,
    pub source_value: f32,
    pub packed_value: f32,
}

/// Local and end-to-end comparisons of one block.
#[derive(Debug, Clone, Serialize)]
pub struct BlockReport {
    pub layer: usize,
    /// The seven projections, in execution order.
    pub projections: Vec<ProjectionReport>,
    /// What the attention half adds to the residual stream, from the source's residual stream.
    pub attention: Stats,
    /// What the feed-forward half adds, from the source's residual stream after attention.
    pub ffn: Stats,
    /// Hidden state after the block, free-running packed model vs source (informational).
    pub end_to_end: Stats,
    /// Local checks of this block out of tolerance, in words.
    pub failures: Vec<String>,
}

/// One projection of one block.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionReport {
    pub role: Role,
    /// Output of the packed projection on the source projection's exact input.
    pub output: Stats,
    /// The input the packed block half computed for this projection vs the source's.
    pub input: Stats,
    /// How the two inputs quantize (absent when comparing against full precision).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flips: Option<FlipStats>,
}

/// Rounding-boundary effects at a projection's input quantizer: the packed block half's input
/// and the source's are quantized with the scheme's int8 rule and compared.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlipStats {
    /// Activations quantized (tokens x input width).
    pub activations: u64,
    /// The largest difference between the two paths' scaled values `x * s_x`, in quantization
    /// steps: how far float rounding moved an activation.
    pub max_shift: f64,
    /// Source activations whose scaled value lies within `max_shift` of a rounding boundary
    /// (`n + 0.5`): those that float rounding could tip to the neighbouring step.
    pub near_boundary: u64,
    /// Activations that did quantize to different steps in the two paths.
    pub flipped: u64,
}

/// The verdict and, on failure, where to look.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub pass: bool,
    /// Every check out of tolerance, in model order.
    pub failures: Vec<String>,
    /// The first block whose local checks fail, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failing_block: Option<usize>,
    /// Within that block, the projection whose output error is largest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub culprit_projection: Option<Role>,
    /// One line naming the culprit.
    pub diagnosis: String,
}

/// Checks that `file` was converted from `ckpt`: the source files have the recorded checksums
/// (unless `check_provenance` is false) and the models have the same shapes. Differences that
/// leave the models comparable (a hyperparameter, the scheme) are not errors here: parity
/// reports them as findings.
pub fn check_pair(
    ckpt: &Checkpoint,
    file: &BpkFile,
    check_provenance: bool,
) -> Result<(), ParityError> {
    let (a, b) = (&ckpt.config, &file.header.model);
    let dims = |c: &ModelConfig| {
        [
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_layers", c.num_layers),
            ("num_heads", c.num_heads),
            ("num_kv_heads", c.num_kv_heads),
            ("head_dim", c.head_dim),
            ("vocab_size", c.vocab_size),
        ]
    };
    for ((key, x), (_, y)) in dims(a).into_iter().zip(dims(b)) {
        if x != y {
            return Err(ParityError::Mismatch {
                reason: format!("{key} is {x} in the source, {y} in the packed file"),
            });
        }
    }
    for t in &ckpt.tensors {
        let shape: Vec<u64> = t.spec.shape.iter().map(|&d| d as u64).collect();
        if let Some(e) = file.tensor(&t.spec.name)
            && e.shape != shape
        {
            return Err(ParityError::Mismatch {
                reason: format!(
                    "`{}` is {:?} in the source, {:?} packed",
                    t.spec.name, shape, e.shape
                ),
            });
        }
    }
    if check_provenance {
        for f in &file.header.provenance.source_files {
            let path = ckpt.dir.join(&f.name);
            let actual = if path.exists() {
                Some(sha256_file(&path).map_err(SourceError::from)?)
            } else {
                None
            };
            if actual.as_deref() != Some(f.sha256.as_str()) {
                return Err(ParityError::Mismatch {
                    reason: format!(
                        "{} {} (recorded sha256 {}); if the weights are the same but the files were rewritten, pass --no-provenance-check",
                        path.display(),
                        if actual.is_some() {
                            "has a different checksum"
                        } else {
                            "is missing"
                        },
                        f.sha256
                    ),
                });
            }
        }
    }
    Ok(())
}

/// What the file declares that the source does not imply: config fields, the quantization
/// scheme, missing or extra tensors and roles.
pub fn declarations(file: &BpkFile, expected: &Expected) -> Vec<String> {
    let mut out = Vec::new();
    let (a, b) = (
        serde_json::to_value(&expected.model).unwrap_or_default(),
        serde_json::to_value(&file.header.model).unwrap_or_default(),
    );
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            let (x, y) = (a.get(k.as_str()), b.get(k.as_str()));
            if x != y {
                let show = |v: Option<&serde_json::Value>| {
                    v.map_or_else(|| "absent".to_string(), |v| v.to_string())
                };
                out.push(format!(
                    "model config `{k}`: the source implies {}, packed {}",
                    show(x),
                    show(y)
                ));
            }
        }
    }
    let (want, q) = (&expected.scheme, &file.header.quantization);
    if q.weights != want.weights {
        out.push(format!(
            "weight quantization: the source implies {} (eps {:e}), the file declares {} (eps {:e})",
            name_of(&want.weights.rule),
            want.weights.eps,
            name_of(&q.weights.rule),
            q.weights.eps
        ));
    }
    for role in Role::PROJECTIONS {
        let (w, g) = (want.activation_of(role), q.activation_of(role));
        if !same_quantizer(w, g) {
            out.push(format!(
                "activation quantization of {}: the source implies {}, the file declares {}",
                role.as_str(),
                describe(w),
                describe(g)
            ));
        }
    }
    let sites = |q: &QuantScheme| {
        let mut v: Vec<String> = q
            .online_rotations
            .iter()
            .map(|s| {
                format!(
                    "{} {}{}",
                    s.transform,
                    s.role.as_str(),
                    s.layer
                        .map(|l| format!(" of block {l}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        v.sort();
        v
    };
    if sites(want) != sites(q) {
        out.push(format!(
            "online transforms: the source implies {:?}, the file declares {:?}",
            sites(want),
            sites(q)
        ));
    }
    if want.attention != q.attention {
        let show = |a: &Option<crate::format::header::AttentionScheme>| match a {
            None => "unquantized".to_string(),
            Some(a) => format!(
                "queries {}, keys and values {}",
                a.q_bits
                    .map_or("unquantized".into(), |b| format!("{b}-bit")),
                a.kv_bits
                    .map_or("unquantized".into(), |b| format!("{b}-bit"))
            ),
        };
        out.push(format!(
            "attention states: the source implies {}, the file declares {}",
            show(&want.attention),
            show(&q.attention)
        ));
    }
    if want.residual_rotation != q.residual_rotation {
        let show = |r: &Option<crate::format::header::ResidualRotation>| match r {
            None => "none".to_string(),
            Some(r) => format!("{} seed {}", r.transform, r.seed),
        };
        out.push(format!(
            "residual rotation: the source implies {}, the file declares {}",
            show(&want.residual_rotation),
            show(&q.residual_rotation)
        ));
    }
    for job in &expected.tensors {
        let name = &job.spec.name;
        match file.tensor(name) {
            None => out.push(format!("tensor `{name}` is not in the packed file")),
            Some(e) if e.role != job.spec.role => out.push(format!(
                "tensor `{name}` has role {} in the packed file, {} in the source",
                e.role.as_str(),
                job.spec.role.as_str()
            )),
            Some(e) if e.encoding.ternary().is_some() != job.spec.role.is_ternary() => {
                out.push(format!(
                    "tensor `{name}` is stored as {}, but its role is {}",
                    e.encoding.as_str(),
                    job.spec.role.as_str()
                ))
            }
            Some(_) => {}
        }
    }
    for e in &file.header.tensors {
        if !expected.tensors.iter().any(|j| j.spec.name == e.name) {
            out.push(format!("tensor `{}` is not in the source", e.name));
        }
    }
    out
}

/// The name serde writes for an enum value.
fn name_of<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// An activation scheme in words.
fn describe(a: &crate::format::header::ActivationScheme) -> String {
    a.quantizer()
        .map(|q| q.name().to_string())
        .unwrap_or_else(|e| e)
}

/// What the file should be, derived from the source and the conversion options it records.
pub struct Expected<'a> {
    pub options: SchemeOptions,
    pub scheme: QuantScheme,
    pub model: ModelConfig,
    pub tensors: Vec<Job<'a>>,
    pub rotation: Option<Rotation>,
}

impl<'a> Expected<'a> {
    /// Derives it; an option the file records that cannot be honoured is a mismatch.
    pub fn derive(ckpt: &'a Checkpoint, file: &BpkFile) -> Result<Self, ParityError> {
        let mismatch = |reason: String| ParityError::Mismatch { reason };
        let options = SchemeOptions::from_record(&file.header.provenance.options)
            .map_err(|e| mismatch(e.to_string()))?;
        let scheme = scheme::scheme(&ckpt.config, &options).map_err(|e| mismatch(e.to_string()))?;
        let model = scheme::converted_model(&ckpt.config, &options);
        let tensors = jobs(ckpt, &model).map_err(|e| mismatch(e.to_string()))?;
        let rotation = match &scheme.residual_rotation {
            Some(r) => Some(
                Rotation::new(&ckpt.config, r.seed, &r.online)
                    .map_err(|e| mismatch(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Expected {
            options,
            scheme,
            model,
            tensors,
            rotation,
        })
    }
}

/// Bits of precision of a float element type.
fn precision_bits(d: FloatDtype) -> i32 {
    match d {
        FloatDtype::F32 => 24,
        FloatDtype::F16 => 11,
        FloatDtype::Bf16 => 8,
    }
}

/// Compares every float tensor of the file with the source's values (rotated, if the
/// conversion rotated) rounded to the stored type.
pub fn check_floats(
    ckpt: &Checkpoint,
    file: &BpkFile,
    expected: &Expected<'_>,
) -> Result<FloatCheck, ParityError> {
    let mut check = FloatCheck::default();
    for job in expected
        .tensors
        .iter()
        .filter(|j| !j.spec.role.is_ternary())
    {
        let Some(e) = file.tensor(&job.spec.name) else {
            continue;
        };
        let Some(stored) = Stored::of(e) else {
            continue;
        };
        check.tensors += 1;
        let t = job.source;
        // Only a widening (or no conversion) of source values is exact; f16's narrower exponent
        // range rounds small bf16 values too; rotated values are f32 whatever the source.
        let from = if expected.rotation.is_some() {
            FloatDtype::F32
        } else {
            t.dtype
        };
        match stored {
            Stored::Float(d) if d != from && d != FloatDtype::F32 => {
                check.narrowing = check.narrowing.max(2f64.powi(-precision_bits(d)));
            }
            // Half a step of 1/127 of the block's largest magnitude.
            Stored::Q8 => check.narrowing = check.narrowing.max(1.0 / 254.0),
            Stored::Float(_) => {}
        }
        let raw = file.raw(e)?;
        let mismatch = match &expected.rotation {
            None => first_float_mismatch(ckpt, t, &job.spec.name, stored, &raw),
            Some(rot) => {
                let gain =
                    crate::convert::gain_of(ckpt, job.spec.role, job.spec.layer).map_err(|e| {
                        ParityError::Mismatch {
                            reason: e.to_string(),
                        }
                    })?;
                let mut tally = Tally::new(&job.spec.name, stored);
                crate::convert::rotated_floats(ckpt, job, rot, gain.as_deref(), &mut |start, v| {
                    let range = stored.bytes_of(start)..stored.bytes_of(start + v.len());
                    let p = raw.get(range).unwrap_or(&[]);
                    tally.add(start, v, p);
                    Ok(())
                })
                .map_err(|e| ParityError::Mismatch {
                    reason: e.to_string(),
                })?;
                tally.found
            }
        };
        check.mismatches.extend(mismatch);
    }
    Ok(check)
}

/// How the file stores a float tensor, as parity checks it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stored {
    Float(FloatDtype),
    /// `q8_0` blocks: the source's values quantized the way [`crate::pack::q8`] does.
    Q8,
}

impl Stored {
    fn of(e: &TensorEntry) -> Option<Stored> {
        match (e.encoding.float(), e.encoding) {
            (Some(d), _) => Some(Stored::Float(d)),
            (None, Encoding::Q8) => Some(Stored::Q8),
            _ => None,
        }
    }

    /// Stored bytes of the first `n` elements (for `q8_0`, `n` is a multiple of 32).
    fn bytes_of(self, n: usize) -> usize {
        match self {
            Stored::Float(d) => n * d.size(),
            Stored::Q8 => n / q8::BLOCK * q8::BLOCK_BYTES,
        }
    }

    /// `values` (a multiple of 32 for `q8_0`) in this encoding.
    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            Stored::Float(d) => encode_f32(d, values, out),
            Stored::Q8 => {
                out.resize(self.bytes_of(values.len()), 0);
                q8::quantize_row(values, out);
            }
        }
    }

    /// The values of encoded bytes (NaN for a missing tail).
    fn decode(self, bytes: &[u8], n: usize) -> Vec<f32> {
        let mut v = vec![f32::NAN; n];
        let whole = match self {
            Stored::Float(d) => bytes.len() / d.size(),
            Stored::Q8 => bytes.len() / q8::BLOCK_BYTES * q8::BLOCK,
        }
        .min(n);
        match self {
            Stored::Float(d) => decode_f32(d, &bytes[..whole * d.size()], &mut v[..whole]),
            Stored::Q8 => q8::dequantize_row(&bytes[..self.bytes_of(whole)], &mut v[..whole]),
        }
        v
    }
}

/// Counts stored values that differ from the expected ones rounded to the stored type.
struct Tally<'n> {
    name: &'n str,
    stored: Stored,
    found: Option<FloatMismatch>,
    enc: Vec<u8>,
}

impl<'n> Tally<'n> {
    fn new(name: &'n str, stored: Stored) -> Self {
        Tally {
            name,
            stored,
            found: None,
            enc: Vec::new(),
        }
    }

    /// `values` (expected, f32) against `packed` (stored bytes), starting at element `start`.
    fn add(&mut self, start: usize, values: &[f32], packed: &[u8]) {
        self.enc.clear();
        self.stored.encode(values, &mut self.enc);
        if self.enc == packed {
            return;
        }
        let want = self.stored.decode(&self.enc, values.len());
        let got = self.stored.decode(packed, values.len());
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            if a.to_bits() != b.to_bits() {
                let m = self.found.get_or_insert(FloatMismatch {
                    name: self.name.to_string(),
                    count: 0,
                    first_index: (start + i) as u64,
                    source_value: values[i],
                    packed_value: *b,
                });
                m.count += 1;
            }
        }
    }
}

fn first_float_mismatch(
    ckpt: &Checkpoint,
    t: &SourceTensor,
    name: &str,
    stored: Stored,
    raw: &[u8],
) -> Option<FloatMismatch> {
    const CHUNK: usize = 1 << 16;
    let src = ckpt.bytes(t);
    let ss = t.dtype.size();
    let mut vals = vec![0f32; CHUNK];
    let mut tally = Tally::new(name, stored);
    for (c, (s, p)) in src
        .chunks(CHUNK * ss)
        .zip(raw.chunks(stored.bytes_of(CHUNK)))
        .enumerate()
    {
        if stored == Stored::Float(t.dtype) && s == p {
            continue;
        }
        let n = s.len() / ss;
        decode_f32(t.dtype, s, &mut vals[..n]);
        tally.add(c * CHUNK, &vals[..n], p);
    }
    tally.found
}

/// Records the input and output of every projection a forward shows it.
#[derive(Default)]
struct Recorder {
    calls: Vec<(Site, Vec<f32>, Vec<f32>)>,
}

impl Probe for Recorder {
    fn projection(&mut self, site: Site, input: &[f32], output: &[f32]) {
        self.calls.push((site, input.to_vec(), output.to_vec()));
    }
}

impl Recorder {
    fn input(&self, role: Role) -> Option<&[f32]> {
        self.calls
            .iter()
            .find(|(s, _, _)| s.role == role)
            .map(|(_, i, _)| i.as_slice())
    }

    fn output(&self, role: Role) -> Option<&[f32]> {
        self.calls
            .iter()
            .find(|(s, _, _)| s.role == role)
            .map(|(_, _, o)| o.as_slice())
    }
}

/// Quantizes both inputs (`[n, k]`) per token with the site's quantizer and counts the
/// differences.
fn flip_stats(act: ActQuant, reference: &[f32], candidate: &[f32], k: usize) -> FlipStats {
    let mut st = FlipStats::default();
    let (mut qr, mut qc) = (vec![0i8; k], vec![0i8; k]);
    let mut scaled = Vec::with_capacity(reference.len());
    for (r, c) in reference.chunks_exact(k).zip(candidate.chunks_exact(k)) {
        let sr = act.quantize(r, &mut qr);
        let sc = act.quantize(c, &mut qc);
        for e in 0..k {
            let (vr, vc) = (r[e] * sr, c[e] * sc);
            st.max_shift = st.max_shift.max(f64::from((vc - vr).abs()));
            st.flipped += u64::from(qr[e] != qc[e]);
            scaled.push(vr);
        }
    }
    st.activations = scaled.len() as u64;
    st.near_boundary = scaled
        .iter()
        .filter(|v| {
            let a = f64::from(v.abs());
            (a - a.floor() - 0.5).abs() <= st.max_shift
        })
        .count() as u64;
    st
}

/// Runs the packed model and the source model (in `against` mode) on `tokens` and compares them.
pub fn parity(
    ckpt: &Checkpoint,
    file: &BpkFile,
    tokens: &[u32],
    against: SourceMode,
    check_provenance: bool,
) -> Result<ParityReport, ParityError> {
    check_pair(ckpt, file, check_provenance)?;
    crate::run::budget::check(&ckpt.config, tokens.len(), 0, true).map_err(InputError::from)?;
    let expected = Expected::derive(ckpt, file)?;
    let declarations = declarations(file, &expected);
    let floats = check_floats(ckpt, file, &expected)?;
    let packed_model = packed::load(file)?;
    // The reference of the local checks: the source model, with the file's float tensors where
    // they are exactly the source's rounded to the type the file declares (so that a `--keep`
    // conversion does not blur the checks of the ternary arithmetic; its cost shows end to end).
    let mut reference = source::load(ckpt, against, &expected.scheme)?;
    let adopted = adopt_floats(&mut reference, &packed_model, file, &floats);
    let tolerances = (against == SourceMode::Qat).then_some(PACKED_VS_QAT);
    let margin = PACKED_VS_QAT.top1_margin_rms;

    let h = ckpt.config.hidden_size;
    let n = tokens.len();
    let mut x = reference.embed(tokens, 0)?;
    let embedding = compare(&x, &packed_model.embed(tokens, 0)?, h);
    let free = packed_model.forward(tokens, &mut KvCache::for_model(&packed_model), true)?;
    let (inv_r, inv_p) = (reference.rope_inv_freq(), packed_model.rope_inv_freq());
    let mut blocks = Vec::with_capacity(ckpt.config.num_layers);
    for layer in 0..free.hidden.len() {
        let (mut rs, mut rp) = (Recorder::default(), Recorder::default());
        let att_r = reference.attention_update(
            layer,
            &x,
            n,
            &mut reference.new_attention_state(),
            &inv_r,
            &mut rs,
        );
        // The packed attention core runs on the reference's q/k/v outputs (each projection is
        // checked on its own below), so that a key or value code that rounds differently in the
        // two paths does not blur the check of the core and of o_proj.
        let recorded = |role| {
            rs.output(role)
                .expect("the reference ran q, k and v")
                .to_vec()
        };
        let att_p = packed_model.attention_output(
            layer,
            recorded(Role::QProj),
            recorded(Role::KProj),
            recorded(Role::VProj),
            n,
            &mut packed_model.new_attention_state(),
            &inv_p,
            &mut rp,
        );
        x.iter_mut().zip(&att_r).for_each(|(a, d)| *a += d);
        let ffn_r = reference.ffn_update(layer, &x, n, &mut rs);
        let ffn_p = packed_model.ffn_update(layer, &x, n, &mut rp);
        x.iter_mut().zip(&ffn_r).for_each(|(a, d)| *a += d);

        let projections = rs
            .calls
            .iter()
            .map(|(site, input, output)| {
                let lin = packed_model.blocks[layer]
                    .projection(site.role)
                    .expect("the recorder only sees projections");
                let mut y = vec![0f32; output.len()];
                lin.forward(input, n, &mut y);
                let k = lin.in_dim();
                let packed_input = rp.input(site.role).unwrap_or(input);
                ProjectionReport {
                    role: site.role,
                    output: compare(output, &y, lin.out_dim()),
                    input: compare(input, packed_input, k),
                    flips: Some(reference.plan.act_of(site.role))
                        .filter(|a| a.is_quantized())
                        .map(|a| flip_stats(a, input, packed_input, k)),
                }
            })
            .collect();
        let mut block = BlockReport {
            layer,
            projections,
            attention: compare(&att_r, &att_p, h),
            ffn: compare(&ffn_r, &ffn_p, h),
            end_to_end: compare(&x, &free.hidden[layer], h),
            failures: Vec::new(),
        };
        if let Some(t) = &tolerances {
            block.failures = block_failures(&block, t);
        }
        blocks.push(block);
    }
    let reference_logits = reference.head(&x, n);
    let head = compare(
        &reference_logits,
        &packed_model.head(&x, n),
        ckpt.config.vocab_size,
    );
    // End to end against the source itself (its own floats).
    let vocab = ckpt.config.vocab_size;
    let (source_logits, float_cost) = if adopted {
        let pure_model = source::load(ckpt, against, &expected.scheme)?;
        let pure = pure_model.forward(tokens, &mut KvCache::for_model(&pure_model), true)?;
        for (b, hs) in blocks.iter_mut().zip(&pure.hidden) {
            b.end_to_end = compare(hs, &free.hidden[b.layer], h);
        }
        let narrowed = reference.forward(tokens, &mut KvCache::for_model(&reference), true)?;
        let cost = compare_logits(&pure.logits, &narrowed.logits, vocab, margin);
        (pure.logits, Some(cost))
    } else {
        (reference_logits, None)
    };
    let logits = compare_logits(&source_logits, &free.logits, ckpt.config.vocab_size, margin);
    let mut report = ParityReport {
        schema_version: SCHEMA_VERSION,
        against,
        tokens: tokens.to_vec(),
        declarations,
        floats,
        embedding,
        blocks,
        head,
        logits,
        float_cost,
        tolerances,
        verdict: Verdict {
            pass: true,
            failures: Vec::new(),
            first_failing_block: None,
            culprit_projection: None,
            diagnosis: String::new(),
        },
    };
    report.verdict = verdict(&report);
    Ok(report)
}

/// Puts the packed model's float tensors into `reference` where the file stores them in
/// another type than the source and [`check_floats`] found them to be exactly the source's
/// values in that type. Returns whether anything was adopted.
fn adopt_floats<'a, L>(
    reference: &mut Transformer<'a, L>,
    packed: &'a Transformer<'a, TernaryLinear<'a>>,
    file: &BpkFile,
    floats: &FloatCheck,
) -> bool {
    let mut adopted = false;
    for e in &file.header.tensors {
        let Some(stored) = Stored::of(e) else {
            continue;
        };
        let stored = match stored {
            Stored::Float(d) => MatrixType::Float(d),
            Stored::Q8 => MatrixType::Q8,
        };
        if floats.mismatches.iter().any(|m| m.name == e.name) {
            continue;
        }
        let layer = e.layer.map(|l| l as usize);
        let changed = match (e.role, layer) {
            (Role::Embedding, _) if reference.embed.ty != stored => {
                reference.embed = packed.embed.borrowed();
                true
            }
            (Role::LmHead, _) => match (&mut reference.lm_head, &packed.lm_head) {
                (Some(r), Some(p)) if r.ty != stored => {
                    *r = p.borrowed();
                    true
                }
                _ => false,
            },
            (Role::FinalNorm, _) => adopt(&mut reference.final_norm, &packed.final_norm),
            (role, Some(l)) if l < reference.blocks.len() && l < packed.blocks.len() => {
                let (r, p) = (&mut reference.blocks[l], &packed.blocks[l]);
                match role {
                    Role::AttnNorm => adopt(&mut r.attn_norm, &p.attn_norm),
                    Role::FfnNorm => adopt(&mut r.ffn_norm, &p.ffn_norm),
                    Role::AttnSubNorm => match (&mut r.attn_sub_norm, &p.attn_sub_norm) {
                        (Some(r), Some(p)) => adopt(r, p),
                        _ => false,
                    },
                    Role::FfnSubNorm => match (&mut r.ffn_sub_norm, &p.ffn_sub_norm) {
                        (Some(r), Some(p)) => adopt(r, p),
                        _ => false,
                    },
                    _ => false,
                }
            }
            _ => false,
        };
        adopted |= changed;
    }
    adopted
}

/// Replaces `r` by `p` if they differ (and have the same length); returns whether it did.
fn adopt(r: &mut Vec<f32>, p: &[f32]) -> bool {
    if r.len() == p.len() && r.as_slice() != p {
        r.copy_from_slice(p);
        true
    } else {
        false
    }
}

/// `value <= tolerance`, false for NaN (a NaN error is out of every tolerance).
fn within(value: f64, tolerance: f64) -> bool {
    value <= tolerance
}

fn block_failures(b: &BlockReport, t: &Tolerances) -> Vec<String> {
    let mut out = Vec::new();
    for p in &b.projections {
        let name = p.role.as_str();
        if !within(p.output.rel_l2, t.projection_rel_l2) {
            out.push(format!(
                "{name} output on the source's input: rel L2 {:.3e} > {:.0e}",
                p.output.rel_l2, t.projection_rel_l2
            ));
        } else if !within(p.output.max_over_rms, t.projection_max_over_rms) {
            out.push(format!(
                "{name} output on the source's input: max |diff| {:.3e} = {:.3e} x RMS > {:.0e} at token {} row {}",
                p.output.max_abs_diff,
                p.output.max_over_rms,
                t.projection_max_over_rms,
                p.output.worst_position,
                p.output.worst_index
            ));
        }
        if !within(p.input.rel_l2, t.input_rel_l2) {
            out.push(format!(
                "{name} input computed by the packed block: rel L2 {:.3e} > {:.1e}",
                p.input.rel_l2, t.input_rel_l2
            ));
        }
    }
    for (half, s) in [("attention", &b.attention), ("feed-forward", &b.ffn)] {
        if !within(s.rel_l2, t.half_rel_l2) {
            out.push(format!(
                "{half} half's update of the residual stream: rel L2 {:.3e} > {:.1e}",
                s.rel_l2, t.half_rel_l2
            ));
        }
    }
    out
}

fn verdict(r: &ParityReport) -> Verdict {
    let Some(t) = &r.tolerances else {
        return Verdict {
            pass: true,
            failures: Vec::new(),
            first_failing_block: None,
            culprit_projection: None,
            diagnosis: "informational: the cost of quantization, not a defect".into(),
        };
    };
    let mut failures: Vec<String> = r
        .declarations
        .iter()
        .map(|d| format!("declaration: {d}"))
        .collect();
    for m in &r.floats.mismatches {
        failures.push(format!(
            "float tensor `{}`: {} element(s) differ from the source, first at {} ({} in the source, {} packed)",
            m.name, m.count, m.first_index, m.source_value, m.packed_value
        ));
    }
    if r.embedding.rel_l2 != 0.0 {
        failures.push(format!(
            "embedding of the tokens: rel L2 {:.3e}, not identical",
            r.embedding.rel_l2
        ));
    }
    for b in &r.blocks {
        failures.extend(b.failures.iter().map(|f| format!("block {}: {f}", b.layer)));
    }
    if !within(r.head.rel_l2, t.head_rel_l2) {
        failures.push(format!(
            "head on the source's last hidden state: rel L2 {:.3e} > {:.1e}",
            r.head.rel_l2, t.head_rel_l2
        ));
    }
    if !r.logits.top1_unexplained.is_empty() {
        failures.push(format!(
            "logits: the top-1 token differs at {} position(s) (first {}) where the reference's margin exceeds {} x the RMS logit error",
            r.logits.top1_unexplained.len(),
            r.logits.top1_unexplained[0],
            t.top1_margin_rms
        ));
    }
    let first = r.blocks.iter().find(|b| !b.failures.is_empty());
    // A NaN error is the largest there is.
    let key = |x: f64| if x.is_nan() { f64::INFINITY } else { x };
    let culprit = first.and_then(|b| {
        b.projections
            .iter()
            .max_by(|x, y| key(x.output.rel_l2).total_cmp(&key(y.output.rel_l2)))
    });
    let declared = match r.declarations.first() {
        Some(d) if r.declarations.len() > 1 => {
            format!(
                "the file declares what the source does not imply: {d} (and {} more); ",
                r.declarations.len() - 1
            )
        }
        Some(d) => format!("the file declares what the source does not imply: {d}; "),
        None => String::new(),
    };
    let diagnosis = match (first, culprit) {
        _ if failures.is_empty() => "every local check within tolerance".to_string(),
        (Some(b), Some(p)) => {
            let projection = if within(p.output.rel_l2, t.projection_rel_l2)
                && within(p.output.max_over_rms, t.projection_max_over_rms)
            {
                "every projection's output within tolerance".to_string()
            } else {
                format!(
                    "largest projection output error there: {} (rel L2 {:.3e})",
                    p.role.as_str(),
                    p.output.rel_l2
                )
            };
            format!(
                "{declared}first failing block: {}: {}; {projection}",
                b.layer, b.failures[0]
            )
        }
        _ if !declared.is_empty() => declared.trim_end_matches("; ").to_string(),
        _ => failures[0].clone(),
    };
    Verdict {
        pass: failures.is_empty(),
        first_failing_block: first.map(|b| b.layer),
        culprit_projection: culprit.map(|p| p.role),
        failures,
        diagnosis,
    }
}

/// `n` pseudo-random token ids below `vocab`, reproducible from `seed` (SplitMix64).
pub fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = crate::num::SplitMix64(seed);
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_are_counted_only_where_the_inputs_quantize_differently() {
        // absmax 127 gives s = 1, so the scaled values are the values: 10.5 is a boundary.
        let k = 4;
        let r = [127.0f32, 10.5, 0.25, -0.5];
        let mut c = r;
        c[1] = f32::from_bits(r[1].to_bits() + 1); // one ulp up: rounds to 11 instead of 10
        let a8 = ActQuant::Absmax8 {
            eps: crate::quant::ACTIVATION_EPS,
        };
        let st = flip_stats(a8, &r, &c, k);
        assert_eq!(st.activations, 4);
        assert_eq!(st.flipped, 1);
        assert!(st.near_boundary >= 1);
        assert!(st.max_shift < 1e-5);
        let same = flip_stats(a8, &r, &r, k);
        assert_eq!((same.flipped, same.max_shift), (0, 0.0));
    }
}
