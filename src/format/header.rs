//! The JSON header of a .bpk file (formats/bpk.md §3): model config, quantization scheme,
//! tensor table and provenance. Field order here is the order in the file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{ModelConfig, Role};
use crate::num::FloatDtype;
use crate::pack::TernaryLayout;

/// The whole header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub model: ModelConfig,
    pub quantization: QuantScheme,
    pub tensors: Vec<TensorEntry>,
    /// Length of the data section in bytes (a multiple of 64).
    pub data_len: u64,
    pub provenance: Provenance,
}

impl Header {
    /// Whether some tensor uses an encoding added in 1.2 (`t5`): then the preamble carries
    /// [`crate::format::FLAG_DENSE_TERNARY`], so that a 1.0 or 1.1 reader refuses the file at
    /// its flags instead of failing on an encoding it does not know (§2.1).
    pub fn uses_dense_ternary(&self) -> bool {
        self.tensors.iter().any(|t| t.encoding == Encoding::T5)
    }

    /// Whether some tensor uses the `q8_0` encoding (1.3): then the preamble carries
    /// [`crate::format::FLAG_BLOCK_Q8`].
    pub fn uses_block_q8(&self) -> bool {
        self.tensors.iter().any(|t| t.encoding == Encoding::Q8)
    }

    /// The preamble flags this header calls for (§2.1).
    pub fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.quantization.is_extended() {
            flags |= crate::format::FLAG_EXTENDED_QUANT;
        }
        if self.uses_dense_ternary() {
            flags |= crate::format::FLAG_DENSE_TERNARY;
        }
        if self.uses_block_q8() {
            flags |= crate::format::FLAG_BLOCK_Q8;
        }
        flags
    }
}

/// How the ternary weights were made and how activations must be quantized at run time (§3.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantScheme {
    pub weights: WeightScheme,
    /// The activation quantizer of every projection input without an entry in
    /// `activation_sites`.
    pub activations: ActivationScheme,
    /// Per-projection overrides (1.1): e.g. a4.8's int4 for q/k/v and gate/up, int8 for o/down.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub activation_sites: BTreeMap<Role, ActivationScheme>,
    /// Places where a runtime must apply an online transform (BitNet v2 H-BitLinear) before
    /// quantizing an activation.
    #[serde(default)]
    pub online_rotations: Vec<RotationSite>,
    /// Quantization of the attention states (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<AttentionScheme>,
    /// A rotation of the residual stream folded into the weights at conversion (1.1); for
    /// information and for parity, a runtime has nothing to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_rotation: Option<ResidualRotation>,
}

/// Quantization of the attention states (§3.2): queries after RoPE, and the keys (after RoPE)
/// and values kept in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttentionScheme {
    /// 8 or 4: each query head vector quantized symmetrically (absmax) before the scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q_bits: Option<u8>,
    /// 8, 4 or 3: each key and value head vector stored as unsigned codes with a per-vector
    /// minimum and step (asymmetric min-max).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_bits: Option<u8>,
}

/// A residual-stream rotation folded into the weights (§3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResidualRotation {
    /// `randomized-hadamard`: `Q = diag(s) H_n^T / sqrt(n)`, signs `s` from `seed` (§9.3).
    pub transform: String,
    pub seed: u64,
    /// The online transforms the conversion added (their transpose folded into these
    /// projections); each also has an entry in `online_rotations`.
    #[serde(default)]
    pub online: Vec<Role>,
}

/// The weight quantizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightScheme {
    pub rule: WeightRule,
    /// Lower bound on the mean absolute weight.
    pub eps: f64,
}

/// Weight quantization rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightRule {
    /// Per tensor: `a = max(mean|W|, eps)`, `T = clamp(round_half_even(W / a), -1, 1)`.
    AbsmeanPerTensor,
}

/// The activation quantizer a runtime must apply to the input of every ternary projection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivationScheme {
    pub rule: ActivationRule,
    pub bits: u8,
    pub eps: f64,
}

/// Activation quantization rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActivationRule {
    /// Per token: `s = (2^(bits-1) - 1) / max(max|x|, eps)`, `q = clamp(round(x * s), -2^(bits-1), 2^(bits-1) - 1)`.
    AbsmaxPerToken,
    /// Per token (1.1, bits 4): `s = sqrt(7) / max(mean|x|, eps)`, `q = clamp(round(x * s), -8, 7)`.
    AbsmeanPerToken,
    /// No activation quantization: projections take their f32 input as it is
    /// (`y = (sum_k T[n,k] * x[k]) * scale`). Not the training forward of a BitNet b1.58 model.
    None,
}

impl QuantScheme {
    /// The BitNet b1.58 scheme: absmean ternary weights, per-token absmax int8 activations.
    pub fn bitnet_b158() -> Self {
        QuantScheme {
            weights: WeightScheme {
                rule: WeightRule::AbsmeanPerTensor,
                eps: f64::from(crate::quant::ABSMEAN_EPS),
            },
            activations: ActivationScheme::a8(),
            activation_sites: BTreeMap::new(),
            online_rotations: Vec::new(),
            attention: None,
            residual_rotation: None,
        }
    }

    /// Whether a runtime must implement more than BitNet b1.58 (int8 activations with the
    /// standard eps everywhere, no online transform, float attention, no rotation) to run the
    /// file: then the preamble carries
    /// [`crate::format::FLAG_EXTENDED_QUANT`] so that a reader that cannot is sure to refuse it.
    pub fn is_extended(&self) -> bool {
        let a8 = ActivationScheme::a8();
        !same_quantizer(&self.activations, &a8)
            || !self.activation_sites.is_empty()
            || !self.online_rotations.is_empty()
            || self.attention.is_some()
            || self.residual_rotation.is_some()
    }

    /// Checks the scheme against the model: every activation scheme defined, overrides and
    /// online transforms only on projections, transform sizes equal to the projection's input
    /// width and supported (§9), attention bits among those defined. The first problem, in words.
    pub fn check(&self, cfg: &ModelConfig) -> Result<(), String> {
        if !(self.weights.eps.is_finite() && self.weights.eps > 0.0) {
            return Err(format!(
                "weights.eps {} is not a positive finite number",
                self.weights.eps
            ));
        }
        self.activations
            .quantizer()
            .map_err(|e| format!("activations: {e}"))?;
        for (role, a) in &self.activation_sites {
            if !role.is_ternary() {
                return Err(format!(
                    "activation_sites: {} is not a projection",
                    role.as_str()
                ));
            }
            a.quantizer()
                .map_err(|e| format!("activation_sites.{}: {e}", role.as_str()))?;
            // One way to write each scheme: an override equal to the default is left out.
            if same_quantizer(a, &self.activations) {
                return Err(format!(
                    "activation_sites.{} repeats `activations`; an override must differ",
                    role.as_str()
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for site in &self.online_rotations {
            let name = site.role.as_str();
            let Some(dim) = cfg.projection_in_dim(site.role) else {
                return Err(format!("online_rotations: {name} is not a projection"));
            };
            if site.transform != "hadamard" {
                return Err(format!(
                    "online_rotations: transform `{}` at {name} is unknown (only `hadamard`)",
                    site.transform
                ));
            }
            if site.dim != dim as u64 {
                return Err(format!(
                    "online_rotations: {name} has dim {} but its input is {dim} wide",
                    site.dim
                ));
            }
            crate::transform::Hadamard::new(dim)
                .map_err(|e| format!("online_rotations: {name}: {e}"))?;
            if let Some(l) = site.layer
                && l as usize >= cfg.num_layers
            {
                return Err(format!(
                    "online_rotations: {name} names block {l}, the model has {}",
                    cfg.num_layers
                ));
            }
            if !seen.insert((site.role, site.layer)) {
                return Err(format!("online_rotations: {name} is listed twice"));
            }
        }
        let all_layers: std::collections::HashSet<Role> = self
            .online_rotations
            .iter()
            .filter(|s| s.layer.is_none())
            .map(|s| s.role)
            .collect();
        if let Some(s) = self
            .online_rotations
            .iter()
            .find(|s| s.layer.is_some() && all_layers.contains(&s.role))
        {
            return Err(format!(
                "online_rotations: {} is listed for every block and for block {} too",
                s.role.as_str(),
                s.layer.unwrap_or(0)
            ));
        }
        if let Some(a) = &self.attention {
            if a.q_bits.is_none() && a.kv_bits.is_none() {
                return Err(
                    "attention sets neither q_bits nor kv_bits; the member must then be absent"
                        .to_string(),
                );
            }
            if let Some(b) = a.q_bits
                && !matches!(b, 8 | 4)
            {
                return Err(format!("attention.q_bits {b} is not 8 or 4"));
            }
            if let Some(b) = a.kv_bits
                && !matches!(b, 8 | 4 | 3)
            {
                return Err(format!("attention.kv_bits {b} is not 8, 4 or 3"));
            }
        }
        if let Some(r) = &self.residual_rotation {
            if r.transform != "randomized-hadamard" {
                return Err(format!(
                    "residual_rotation: transform `{}` is unknown (only `randomized-hadamard`)",
                    r.transform
                ));
            }
            crate::transform::Hadamard::new(cfg.hidden_size)
                .map_err(|e| format!("residual_rotation: hidden size: {e}"))?;
            if cfg.tie_word_embeddings {
                return Err(
                    "residual_rotation with tie_word_embeddings: a rotated head is not the embedding"
                        .to_string(),
                );
            }
            let mut added = std::collections::HashSet::new();
            for &role in &r.online {
                if !matches!(role, Role::OProj | Role::DownProj) {
                    return Err(format!(
                        "residual_rotation.online: {} (a rotation adds transforms at o_proj and down_proj only)",
                        role.as_str()
                    ));
                }
                if !added.insert(role) {
                    return Err(format!(
                        "residual_rotation.online: {} is listed twice",
                        role.as_str()
                    ));
                }
                if !all_layers.contains(&role) {
                    return Err(format!(
                        "residual_rotation.online: {} has no entry for every block in online_rotations",
                        role.as_str()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The scheme of the input of `role`.
    pub fn activation_of(&self, role: Role) -> &ActivationScheme {
        self.activation_sites
            .get(&role)
            .unwrap_or(&self.activations)
    }
}

/// Whether two activation schemes quantize identically (eps compared as the f32 it stands
/// for: files of format 1.0 wrote `1e-5`, which means the f32 nearest it).
pub fn same_quantizer(a: &ActivationScheme, b: &ActivationScheme) -> bool {
    a.rule == b.rule && a.bits == b.bits && (a.eps as f32) == (b.eps as f32)
}

impl ActivationScheme {
    /// int8 per-token absmax, eps the f32 nearest 1e-5 (written exactly).
    pub fn a8() -> Self {
        ActivationScheme {
            rule: ActivationRule::AbsmaxPerToken,
            bits: 8,
            eps: f64::from(crate::quant::ACTIVATION_EPS),
        }
    }

    /// int4 per-token absmean (BitNet v2, a4.8).
    pub fn a4() -> Self {
        ActivationScheme {
            rule: ActivationRule::AbsmeanPerToken,
            bits: 4,
            eps: f64::from(crate::quant::ACTIVATION_EPS),
        }
    }

    /// No activation quantization.
    pub fn none() -> Self {
        ActivationScheme {
            rule: ActivationRule::None,
            bits: 0,
            eps: f64::from(crate::quant::ACTIVATION_EPS),
        }
    }

    /// The quantizer this scheme describes, or why it cannot be one.
    pub fn quantizer(&self) -> Result<crate::quant::ActQuant, String> {
        use crate::quant::ActQuant;
        let eps = self.eps as f32;
        if !(eps.is_finite() && eps > 0.0) {
            return Err(format!("activation eps {} is not a positive f32", self.eps));
        }
        match (self.rule, self.bits) {
            (ActivationRule::AbsmaxPerToken, 8) => Ok(ActQuant::Absmax8 { eps }),
            (ActivationRule::AbsmeanPerToken, 4) => Ok(ActQuant::Absmean4 { eps }),
            (ActivationRule::None, 0) => Ok(ActQuant::None),
            (rule, bits) => Err(format!(
                "activation rule {} with {bits} bits is not defined (absmax-per-token takes 8, absmean-per-token 4, none 0)",
                serde_json::to_value(rule)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            )),
        }
    }
}

/// One online transform site (§3.2.3): the input of a projection is transformed right before
/// it is quantized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationSite {
    /// The projection whose input is transformed.
    pub role: Role,
    /// Block index, or absent for every block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<u32>,
    /// The transform, e.g. `hadamard`.
    pub transform: String,
    /// Length of the transformed vector.
    pub dim: u64,
}

/// How a tensor's elements are stored (§5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    I2,
    I8,
    /// Five trits per byte (1.2; only in files with [`crate::format::FLAG_DENSE_TERNARY`]).
    T5,
    F32,
    F16,
    Bf16,
    /// Blocks of 32 int8 values with an f16 scale each, GGML's `Q8_0` (1.3; embedding and
    /// head only, in files with [`crate::format::FLAG_BLOCK_Q8`]). See [`crate::pack::q8`].
    #[serde(rename = "q8_0")]
    Q8,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::I2 => "i2",
            Encoding::I8 => "i8",
            Encoding::T5 => "t5",
            Encoding::F32 => "f32",
            Encoding::F16 => "f16",
            Encoding::Bf16 => "bf16",
            Encoding::Q8 => "q8_0",
        }
    }

    /// The ternary layout, for `i2`, `i8` and `t5`.
    pub fn ternary(self) -> Option<TernaryLayout> {
        match self {
            Encoding::I2 => Some(TernaryLayout::I2),
            Encoding::I8 => Some(TernaryLayout::I8),
            Encoding::T5 => Some(TernaryLayout::T5),
            _ => None,
        }
    }

    /// The float element type, for `f32`, `f16` and `bf16`.
    pub fn float(self) -> Option<FloatDtype> {
        match self {
            Encoding::F32 => Some(FloatDtype::F32),
            Encoding::F16 => Some(FloatDtype::F16),
            Encoding::Bf16 => Some(FloatDtype::Bf16),
            _ => None,
        }
    }

    pub fn from_layout(l: TernaryLayout) -> Self {
        match l {
            TernaryLayout::I2 => Encoding::I2,
            TernaryLayout::I8 => Encoding::I8,
            TernaryLayout::T5 => Encoding::T5,
        }
    }

    pub fn from_float(d: FloatDtype) -> Self {
        match d {
            FloatDtype::F32 => Encoding::F32,
            FloatDtype::F16 => Encoding::F16,
            FloatDtype::Bf16 => Encoding::Bf16,
        }
    }

    /// Bytes of the uncompressed encoding of a tensor of this shape, or `None` if the shape
    /// does not suit the encoding (ternary tensors are 2-D) or the size overflows.
    pub fn raw_len(self, shape: &[u64]) -> Option<u64> {
        let numel = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        match (self.ternary(), self.float()) {
            (Some(layout), _) => {
                let [rows, k] = shape else { return None };
                let k = usize::try_from(*k).ok()?;
                rows.checked_mul(layout.row_bytes(k) as u64)
            }
            (None, Some(d)) => numel.checked_mul(d.size() as u64),
            (None, None) => {
                // q8_0: 2-D, whole blocks of 32 per row.
                let [rows, k] = shape else { return None };
                if k % crate::pack::q8::BLOCK as u64 != 0 {
                    return None;
                }
                rows.checked_mul(k / crate::pack::q8::BLOCK as u64)?
                    .checked_mul(crate::pack::q8::BLOCK_BYTES as u64)
            }
        }
    }
}

/// How a tensor's bytes are compressed on disk (§4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    /// One zstd frame; allowed for float tensors only.
    Zstd,
}

/// One row of the tensor table (§3.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<u32>,
    pub encoding: Encoding,
    /// Row-major shape, `[out, in]` for projections.
    pub shape: Vec<u64>,
    /// Per-tensor dequantization scale of a ternary tensor: the exact value of an f32, written
    /// as a decimal that parses back to that value (`weight = scale * trit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Offset of the stored bytes from the start of the data section (a multiple of 64).
    pub offset: u64,
    /// Number of stored bytes (after compression, if any).
    pub length: u64,
    #[serde(default)]
    pub compression: Compression,
    /// SHA-256 of the stored bytes, lower-case hex.
    pub sha256: String,
}

impl TensorEntry {
    /// The scale as the f32 it encodes, if it is one exactly.
    pub fn scale_f32(&self) -> Option<f32> {
        let s = self.scale?;
        let f = s as f32;
        (f64::from(f) == s).then_some(f)
    }

    /// Number of elements.
    pub fn numel(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

/// Where the file came from (§3.4). No timestamps: converting the same input with the same
/// options gives the same bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub tool: String,
    pub tool_version: String,
    /// Source files (config and weights) with their SHA-256.
    pub source_files: Vec<SourceFile>,
    /// Conversion options that affect the output.
    pub options: BTreeMap<String, String>,
}

/// A source file, by name relative to the model directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_lengths() {
        assert_eq!(Encoding::I2.raw_len(&[3, 130]), Some(3 * 64));
        assert_eq!(Encoding::I8.raw_len(&[3, 130]), Some(390));
        assert_eq!(Encoding::T5.raw_len(&[3, 130]), Some(3 * 26));
        assert_eq!(Encoding::T5.raw_len(&[2, 6912]), Some(2 * 1383));
        assert_eq!(Encoding::Bf16.raw_len(&[7]), Some(14));
        assert_eq!(Encoding::I2.raw_len(&[7]), None);
        assert_eq!(Encoding::F32.raw_len(&[u64::MAX, 2]), None);
    }

    #[test]
    fn scale_must_be_an_exact_f32() {
        let mut e = TensorEntry {
            name: "x".into(),
            role: Role::QProj,
            layer: Some(0),
            encoding: Encoding::I2,
            shape: vec![1, 1],
            scale: Some(f64::from(0.1f32)),
            offset: 0,
            length: 32,
            compression: Compression::None,
            sha256: String::new(),
        };
        assert_eq!(e.scale_f32(), Some(0.1f32));
        let text = serde_json::to_string(&e).unwrap();
        let back: TensorEntry = serde_json::from_str(&text).unwrap();
        assert_eq!(back.scale_f32(), Some(0.1f32));
        e.scale = Some(0.1f64);
        assert_eq!(e.scale_f32(), None);
    }
}
