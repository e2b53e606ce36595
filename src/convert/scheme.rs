//! The quantization scheme of a conversion: what the source declares (config.json's BitNet v2
//! keys), overridden by the conversion's options (`--activations`, `--online-hadamard`,
//! `--kv-bits`, `--q-bits`, `--rotate`). The options are recorded in the file's provenance, so
//! that parity can derive the same scheme from the source again and compare it with what the
//! file declares.

use std::collections::BTreeMap;

use crate::format::header::{
    ActivationScheme, AttentionScheme, QuantScheme, ResidualRotation, RotationSite,
};
use crate::model::{ModelConfig, Role};
use crate::transform::Hadamard;

/// A scheme option that cannot be honoured. Each names the value and the accepted ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemeError {
    #[error(
        "activation scheme `{value}` is not understood: use a8, a4 or none, or per site like qkv=a4,o=a8,gate_up=a4,down=a8 (sites: qkv, o, gate_up, down, or a projection name)"
    )]
    Activations { value: String },
    #[error(
        "`{value}` is not a projection; online Hadamard sites are projection names: o_proj, down_proj (also q_proj, k_proj, v_proj, gate_proj, up_proj), or none"
    )]
    Site { value: String },
    #[error("--kv-bits {value} is not supported: use 8, 4 or 3")]
    KvBits { value: u8 },
    #[error("--q-bits {value} is not supported: use 8 or 4")]
    QBits { value: u8 },
    #[error("online Hadamard at the input of {role}: {reason}")]
    OnlineSize { role: &'static str, reason: String },
    #[error("{0}")]
    Rotation(String),
    #[error(
        "--rotate on a checkpoint trained with BitNet quantization (quantization_config quant_method `{method}`) would lose its trained ternarization: the rotated weights are ternarized again, as a post-training quantization; pass --force-requantize to do it anyway"
    )]
    QatRotation { method: String },
    #[error("provenance option `{key}` = `{value}` cannot be read back: {reason}")]
    Record {
        key: String,
        value: String,
        reason: String,
    },
}

/// The conversion's choices; `None` (or empty) keeps what the source declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemeOptions {
    /// `a8`, `a4`, `none` or a per-site list.
    pub activations: Option<String>,
    /// Sites of online Hadamard transforms (`Some(vec![])` clears the source's).
    pub online_hadamard: Option<Vec<Role>>,
    pub kv_bits: Option<u8>,
    pub q_bits: Option<u8>,
    /// Rotate the residual stream with the randomized Hadamard of this seed.
    pub rotate_seed: Option<u64>,
    /// Allow rotating a QAT checkpoint.
    pub force_requantize: bool,
}

impl SchemeOptions {
    /// The options as provenance strings (only those set).
    pub fn record(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Some(a) = &self.activations {
            out.insert("activations".into(), a.clone());
        }
        if let Some(sites) = &self.online_hadamard {
            let names: Vec<&str> = sites.iter().map(|r| r.as_str()).collect();
            out.insert(
                "online_hadamard".into(),
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(",")
                },
            );
        }
        if let Some(b) = self.kv_bits {
            out.insert("kv_bits".into(), b.to_string());
        }
        if let Some(b) = self.q_bits {
            out.insert("q_bits".into(), b.to_string());
        }
        if let Some(seed) = self.rotate_seed {
            out.insert("rotate".into(), "hadamard".into());
            out.insert("rotate_seed".into(), seed.to_string());
        }
        if self.force_requantize {
            out.insert("force_requantize".into(), "true".into());
        }
        out
    }

    /// Reads the options back from a file's provenance (unknown keys belong to other options).
    pub fn from_record(map: &BTreeMap<String, String>) -> Result<Self, SchemeError> {
        let bad = |key: &str, value: &str, reason: String| SchemeError::Record {
            key: key.into(),
            value: value.into(),
            reason,
        };
        let number = |key: &str| -> Result<Option<u64>, SchemeError> {
            map.get(key)
                .map(|v| v.parse::<u64>().map_err(|e| bad(key, v, e.to_string())))
                .transpose()
        };
        let small = |key: &str| -> Result<Option<u8>, SchemeError> {
            number(key)?
                .map(|v| u8::try_from(v).map_err(|e| bad(key, &v.to_string(), e.to_string())))
                .transpose()
        };
        Ok(SchemeOptions {
            activations: map.get("activations").cloned(),
            online_hadamard: map
                .get("online_hadamard")
                .map(|v| parse_sites(v))
                .transpose()?,
            kv_bits: small("kv_bits")?,
            q_bits: small("q_bits")?,
            rotate_seed: match map.get("rotate").map(String::as_str) {
                None => None,
                Some("hadamard") => Some(number("rotate_seed")?.unwrap_or(0)),
                Some(other) => return Err(bad("rotate", other, "unknown rotation".into())),
            },
            force_requantize: map.get("force_requantize").is_some_and(|v| v == "true"),
        })
    }
}

/// Parses `o_proj,down_proj` (or `none`) into projection roles.
pub fn parse_sites(text: &str) -> Result<Vec<Role>, SchemeError> {
    if text.trim() == "none" || text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim) {
        let role = Role::from_name(item)
            .filter(|r| r.is_ternary())
            .ok_or_else(|| SchemeError::Site {
                value: item.to_string(),
            })?;
        if !out.contains(&role) {
            out.push(role);
        }
    }
    Ok(out)
}

/// One activation scheme by its short name.
fn named(name: &str) -> Option<ActivationScheme> {
    match name {
        "a8" => Some(ActivationScheme::a8()),
        "a4" => Some(ActivationScheme::a4()),
        "none" => Some(ActivationScheme::none()),
        _ => None,
    }
}

/// The roles of a site group of the per-site syntax.
fn group(name: &str) -> Option<Vec<Role>> {
    Some(match name {
        "qkv" => vec![Role::QProj, Role::KProj, Role::VProj],
        "o" => vec![Role::OProj],
        "gate_up" => vec![Role::GateProj, Role::UpProj],
        "down" => vec![Role::DownProj],
        other => vec![Role::from_name(other).filter(|r| r.is_ternary())?],
    })
}

/// Parses an activation spec: `a4`, or `a8,qkv=a4,gate_up=a4` (a bare name sets the default,
/// `site=name` overrides a site). Returns the default and the overrides that differ from it.
pub fn parse_activations(
    spec: &str,
) -> Result<(ActivationScheme, BTreeMap<Role, ActivationScheme>), SchemeError> {
    let bad = || SchemeError::Activations {
        value: spec.to_string(),
    };
    let mut default = ActivationScheme::a8();
    let mut sites = BTreeMap::new();
    for item in spec.split(',').map(str::trim) {
        match item.split_once('=') {
            None => default = named(item).ok_or_else(bad)?,
            Some((site, name)) => {
                let a = named(name.trim()).ok_or_else(bad)?;
                for role in group(site.trim()).ok_or_else(bad)? {
                    sites.insert(role, a.clone());
                }
            }
        }
    }
    sites.retain(|_, a| *a != default);
    Ok((default, sites))
}

/// The model config of the converted file: the source's, untied if the residual is rotated
/// (the rotated head is no longer the embedding).
pub fn converted_model(cfg: &ModelConfig, opts: &SchemeOptions) -> ModelConfig {
    let mut out = cfg.clone();
    if opts.rotate_seed.is_some() {
        out.tie_word_embeddings = false;
    }
    out
}

/// The scheme a conversion of a source with config `cfg` and options `opts` records.
pub fn scheme(cfg: &ModelConfig, opts: &SchemeOptions) -> Result<QuantScheme, SchemeError> {
    let mut q = QuantScheme::bitnet_b158();
    if let Some(spec) = opts
        .activations
        .as_deref()
        .or(cfg.declared.activation_scheme.as_deref())
    {
        let (default, sites) = parse_activations(spec)?;
        q.activations = default;
        q.activation_sites = sites;
    }
    let mut online: Vec<Role> = opts
        .online_hadamard
        .clone()
        .unwrap_or_else(|| cfg.declared.online_hadamard.clone());
    let mut added = Vec::new();
    if let Some(seed) = opts.rotate_seed {
        if let Some(sq) = &cfg.source_quantization
            && sq.quant_method == "bitnet"
            && !opts.force_requantize
        {
            return Err(SchemeError::QatRotation {
                method: sq.quant_method.clone(),
            });
        }
        for role in [Role::OProj, Role::DownProj] {
            if !online.contains(&role) {
                online.push(role);
                added.push(role);
            }
        }
        crate::transform::Rotation::new(cfg, seed, &added)
            .map_err(|e| SchemeError::Rotation(e.to_string()))?;
        q.residual_rotation = Some(ResidualRotation {
            transform: "randomized-hadamard".into(),
            seed,
            online: added,
        });
    }
    online.sort();
    for role in online {
        let dim = cfg.projection_in_dim(role).expect("sites are projections");
        Hadamard::new(dim).map_err(|e| SchemeError::OnlineSize {
            role: role.as_str(),
            reason: e.to_string(),
        })?;
        q.online_rotations.push(RotationSite {
            role,
            layer: None,
            transform: "hadamard".into(),
            dim: dim as u64,
        });
    }
    if let Some(b) = opts.kv_bits
        && !matches!(b, 8 | 4 | 3)
    {
        return Err(SchemeError::KvBits { value: b });
    }
    if let Some(b) = opts.q_bits
        && !matches!(b, 8 | 4)
    {
        return Err(SchemeError::QBits { value: b });
    }
    if opts.kv_bits.is_some() || opts.q_bits.is_some() {
        q.attention = Some(AttentionScheme {
            q_bits: opts.q_bits,
            kv_bits: opts.kv_bits,
        });
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> ModelConfig {
        ModelConfig::from_json(
            format!(
                r#"{{"architectures":["BitNetForCausalLM"],"model_type":"bitnet","hidden_size":128,
                "intermediate_size":256,"num_hidden_layers":2,"num_attention_heads":4,
                "num_key_value_heads":2,"vocab_size":100{extra}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn per_site_activation_specs_parse() {
        let (d, sites) = parse_activations("qkv=a4,o=a8,gate_up=a4,down=a8").unwrap();
        assert_eq!(d, ActivationScheme::a8());
        assert_eq!(sites.len(), 5);
        assert_eq!(sites[&Role::UpProj], ActivationScheme::a4());
        let (d, sites) = parse_activations("a4").unwrap();
        assert_eq!((d, sites.len()), (ActivationScheme::a4(), 0));
        let (d, sites) = parse_activations("a4, down_proj=a8").unwrap();
        assert_eq!(d, ActivationScheme::a4());
        assert_eq!(sites.keys().collect::<Vec<_>>(), [&Role::DownProj]);
        for bad in ["a5", "qkv=a3", "attn=a4", "q_norm=a8", ""] {
            assert!(matches!(
                parse_activations(bad),
                Err(SchemeError::Activations { .. })
            ));
        }
    }

    #[test]
    fn options_survive_the_provenance_record() {
        let o = SchemeOptions {
            activations: Some("qkv=a4,o=a8".into()),
            online_hadamard: Some(vec![Role::OProj, Role::DownProj]),
            kv_bits: Some(3),
            q_bits: Some(4),
            rotate_seed: Some(99),
            force_requantize: true,
        };
        assert_eq!(SchemeOptions::from_record(&o.record()).unwrap(), o);
        assert_eq!(
            SchemeOptions::from_record(&BTreeMap::new()).unwrap(),
            SchemeOptions::default()
        );
    }

    #[test]
    fn the_source_declares_and_the_options_override() {
        let c = cfg(r#","online_hadamard":["o_proj","down_proj"],"activation_scheme":"a4""#);
        let q = scheme(&c, &SchemeOptions::default()).unwrap();
        assert_eq!(q.activations, ActivationScheme::a4());
        assert_eq!(q.online_rotations.len(), 2);
        assert!(q.is_extended());
        let q = scheme(
            &c,
            &SchemeOptions {
                activations: Some("a8".into()),
                online_hadamard: Some(vec![]),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(q, QuantScheme::bitnet_b158());
    }

    #[test]
    fn bad_options_name_the_value() {
        let c = cfg("");
        let o = |f: fn(&mut SchemeOptions)| {
            let mut o = SchemeOptions::default();
            f(&mut o);
            scheme(&c, &o)
        };
        assert_eq!(
            o(|o| o.kv_bits = Some(2)).unwrap_err(),
            SchemeError::KvBits { value: 2 }
        );
        assert_eq!(
            o(|o| o.q_bits = Some(3)).unwrap_err(),
            SchemeError::QBits { value: 3 }
        );
        assert!(
            matches!(parse_sites("o_proj,attn_norm"), Err(SchemeError::Site { value }) if value == "attn_norm")
        );
        let qat = cfg(r#","quantization_config":{"quant_method":"bitnet"}"#);
        let mut opts = SchemeOptions {
            rotate_seed: Some(1),
            ..Default::default()
        };
        assert!(matches!(
            scheme(&qat, &opts),
            Err(SchemeError::QatRotation { .. })
        ));
        opts.force_requantize = true;
        let q = scheme(&qat, &opts).unwrap();
        assert_eq!(
            q.residual_rotation.unwrap().online,
            [Role::OProj, Role::DownProj]
        );
        // 352 = 11 * 32 has no Hadamard matrix.
        let odd = ModelConfig::from_json(
            br#"{"architectures":["BitNetForCausalLM"],"model_type":"bitnet","hidden_size":128,
            "intermediate_size":352,"num_hidden_layers":1,"num_attention_heads":4,
            "num_key_value_heads":2,"vocab_size":10}"#,
        )
        .unwrap();
        let e = scheme(
            &odd,
            &SchemeOptions {
                online_hadamard: Some(vec![Role::DownProj]),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("352") && e.to_string().contains("down_proj"),
            "{e}"
        );
    }
}
