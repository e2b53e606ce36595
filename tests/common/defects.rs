//! Test-only defect injection: rewrites a correct .bpk file into one with a known defect, the
//! way a buggy converter would have written it (a consistent file: re-laid-out and
//! re-checksummed, so that `validate` passes and only parity can tell).
//!
//! Where a defect hits (which block, which projection, which rows) is drawn from a seed, so a
//! matrix over seeds moves it around the model.

use std::path::Path;

use bitnet_pack::format::header::{ActivationScheme, Header};
use bitnet_pack::format::{BpkFile, BpkWriter, TensorPlan};
use bitnet_pack::model::{Activation, Family, Role};
use bitnet_pack::num::dtype::decode_f32;
use bitnet_pack::quant::{AbsmeanScale, abs_sum_f64};
use bitnet_pack::source::Checkpoint;

/// The kinds of defect the parity verdict must catch (issue: "a parity verdict that can be
/// trusted").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    /// One projection of one block with its scale 20% too large.
    ScaleOff,
    /// Two rows of one projection swapped.
    SwapRows,
    /// The feed-forward activation swapped (ReLU^2 <-> SiLU).
    ActivationSwapped,
    /// The sub-norms left out (the model declared as a family without them).
    SubNormOmitted,
    /// Activations not quantized (the file declares unquantized inputs).
    ActivationsNotQuantized,
    /// Weights ternarized with round half away from zero instead of half to even.
    RoundHalfAway,
    /// The online Hadamard transforms of an H-BitLinear file left out.
    OnlineDropped,
    /// An int4 file declared as int8.
    Int4AsInt8,
}

pub const ALL_DEFECTS: [Defect; 8] = [
    Defect::ScaleOff,
    Defect::SwapRows,
    Defect::ActivationSwapped,
    Defect::SubNormOmitted,
    Defect::ActivationsNotQuantized,
    Defect::RoundHalfAway,
    Defect::OnlineDropped,
    Defect::Int4AsInt8,
];

impl Defect {
    pub fn name(self) -> &'static str {
        match self {
            Defect::ScaleOff => "one projection's scale off by 20%",
            Defect::SwapRows => "two rows of one projection swapped",
            Defect::ActivationSwapped => "activation function swapped",
            Defect::SubNormOmitted => "sub-norms left out",
            Defect::ActivationsNotQuantized => "activations not quantized",
            Defect::RoundHalfAway => "round half away from zero",
            Defect::OnlineDropped => "online Hadamard transforms left out",
            Defect::Int4AsInt8 => "int4 activations declared as int8",
        }
    }

    /// Whether the defect can exist in this file (a model without sub-norms cannot lose them,
    /// a file without online transforms cannot drop them, ...).
    pub fn applies_to(self, header: &Header) -> bool {
        match self {
            Defect::SubNormOmitted => header.model.family.has_sub_norms(),
            Defect::OnlineDropped => !header.quantization.online_rotations.is_empty(),
            Defect::Int4AsInt8 => header.quantization.activations == ActivationScheme::a4(),
            _ => true,
        }
    }
}

/// What an injection did.
#[derive(Debug, Clone)]
pub struct Injected {
    /// Where, in words.
    pub site: String,
    /// The block and projection hit, for the defects confined to one projection.
    pub projection: Option<(usize, Role)>,
    /// Whether the file differs from the correct one at all (a rounding-rule change alters
    /// nothing in a model without exact ties).
    pub changed: bool,
}

/// A small reproducible generator (SplitMix64).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n.max(1) as u64) as usize
    }
}

const PROJECTIONS: [Role; 7] = [
    Role::QProj,
    Role::KProj,
    Role::VProj,
    Role::OProj,
    Role::GateProj,
    Role::UpProj,
    Role::DownProj,
];

/// Writes `dst`: the file at `src` with `defect` injected (its source checkpoint `ckpt` is
/// needed for re-ternarization), the location drawn from `seed`.
pub fn inject(src: &Path, dst: &Path, ckpt: &Checkpoint, defect: Defect, seed: u64) -> Injected {
    let file = BpkFile::open(src).expect("a valid .bpk to inject into");
    let mut header = file.header.clone();
    let mut data: Vec<Vec<u8>> = header
        .tensors
        .iter()
        .map(|e| file.stored(e).to_vec())
        .collect();
    let mut rng = Rng(seed ^ 0xD1FF_EC75);
    let layer = rng.below(header.model.num_layers);
    let role = PROJECTIONS[rng.below(PROJECTIONS.len())];
    let index = header
        .tensors
        .iter()
        .position(|e| e.role == role && e.layer == Some(layer as u32))
        .expect("every projection is in the file");
    let mut changed = true;
    let projection = matches!(defect, Defect::ScaleOff | Defect::SwapRows).then_some((layer, role));
    let site = match defect {
        Defect::ScaleOff => {
            let e = &mut header.tensors[index];
            let scale = e.scale_f32().expect("ternary scale") * 1.2;
            e.scale = Some(f64::from(scale));
            format!("{} x1.2", e.name)
        }
        Defect::SwapRows => {
            let e = &header.tensors[index];
            let layout = e.encoding.ternary().expect("a ternary projection");
            let (rows, k) = (e.shape[0] as usize, e.shape[1] as usize);
            let rb = layout.row_bytes(k);
            let d = &mut data[index];
            // Two rows with different contents (random weights: the first try).
            let a = rng.below(rows);
            let b = (1..rows)
                .map(|off| (a + off + rng.below(rows)) % rows)
                .find(|&b| b != a && d[a * rb..(a + 1) * rb] != d[b * rb..(b + 1) * rb])
                .expect("a projection with two different rows");
            let row_a = d[a * rb..(a + 1) * rb].to_vec();
            d.copy_within(b * rb..(b + 1) * rb, a * rb);
            d[b * rb..(b + 1) * rb].copy_from_slice(&row_a);
            format!("{} rows {a} and {b}", e.name)
        }
        Defect::ActivationSwapped => {
            let m = &mut header.model;
            m.hidden_act = match m.hidden_act {
                Activation::Relu2 => Activation::Silu,
                Activation::Silu => Activation::Relu2,
            };
            format!("hidden_act {:?}", m.hidden_act)
        }
        Defect::SubNormOmitted => {
            assert!(header.model.family.has_sub_norms());
            header.model.family = Family::Llama;
            header.model.architecture = "LlamaForCausalLM".into();
            let keep: Vec<bool> = header
                .tensors
                .iter()
                .map(|e| !matches!(e.role, Role::AttnSubNorm | Role::FfnSubNorm))
                .collect();
            let mut it = keep.iter();
            header
                .tensors
                .retain(|_| *it.next().expect("one flag per tensor"));
            let mut it = keep.iter();
            data.retain(|_| *it.next().expect("one flag per tensor"));
            "every attn_sub_norm and ffn_sub_norm".to_string()
        }
        Defect::ActivationsNotQuantized => {
            header.quantization.activations = ActivationScheme::none();
            header.quantization.activation_sites.clear();
            "activation rule none".to_string()
        }
        Defect::OnlineDropped => {
            header.quantization.online_rotations.clear();
            header.quantization.residual_rotation = None;
            "every online transform".to_string()
        }
        Defect::Int4AsInt8 => {
            header.quantization.activations = ActivationScheme::a8();
            "activations a8".to_string()
        }
        Defect::RoundHalfAway => {
            let mut flipped = 0usize;
            for (e, d) in header.tensors.iter().zip(data.iter_mut()) {
                if !e.role.is_ternary() {
                    continue;
                }
                let t = ckpt
                    .tensors
                    .iter()
                    .find(|t| t.spec.name == e.name)
                    .expect("the source has every projection");
                let mut w = vec![0f32; t.numel()];
                decode_f32(t.dtype, ckpt.bytes(t), &mut w);
                let k = e.shape[1] as usize;
                let sum: f64 = w.chunks(k).map(abs_sum_f64).sum();
                let scale = AbsmeanScale::from_abs_sum(sum, w.len());
                let layout = e.encoding.ternary().expect("a ternary projection");
                let rb = layout.row_bytes(k);
                let mut trits = vec![0i8; k];
                for (row, out) in w.chunks(k).zip(d.chunks_mut(rb)) {
                    for (t, &v) in trits.iter_mut().zip(row) {
                        // f32::round rounds half away from zero.
                        *t = (v * scale.inv_scale).round().clamp(-1.0, 1.0) as i8;
                        flipped += usize::from(*t != scale.trit(v));
                    }
                    layout.pack_row(&trits, out);
                }
            }
            changed = flipped > 0;
            format!("{flipped} weights on a .5 tie")
        }
    };
    write(dst, &file, header, data);
    Injected {
        site,
        projection,
        changed,
    }
}

/// Writes a consistent .bpk from a header and the stored bytes of each of its tensors.
pub fn write(dst: &Path, original: &BpkFile, header: Header, data: Vec<Vec<u8>>) {
    let plans: Vec<TensorPlan> = header
        .tensors
        .iter()
        .map(|e| TensorPlan {
            name: e.name.clone(),
            role: e.role,
            layer: e.layer,
            encoding: e.encoding,
            shape: e.shape.clone(),
            compression: e.compression,
        })
        .collect();
    let provenance = original.header.provenance.clone();
    let mut w = BpkWriter::create(
        dst,
        true,
        header.model.clone(),
        header.quantization.clone(),
        provenance.clone(),
        plans,
    )
    .expect("create");
    for (e, d) in header.tensors.iter().zip(&data) {
        let scale = e
            .encoding
            .ternary()
            .map(|_| e.scale_f32().expect("ternary scale"));
        w.write_tensor(scale, |sink| std::io::Write::write_all(sink, d))
            .expect("write");
    }
    w.finish(provenance)
        .expect("finish")
        .persist()
        .expect("persist");
}
