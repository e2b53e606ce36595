#!/usr/bin/env python3
"""Small models made by transformers' own classes, for testing bitnet-pack on models it did
not make (the parity matrix in tests/parity_matrix.rs, and anything else).

Each model is a BitNetForCausalLM or LlamaForCausalLM built from a config under a seed, with
transformers' own initialisation, and written by save_pretrained (safetensors). Nothing is
committed: the models go to OUT_DIR, one directory each, and the script prints their paths
joined with ':' for BITNET_PACK_MATRIX_MODELS.

    python3 -m venv $VENV
    $VENV/bin/pip install torch transformers safetensors numpy
    $VENV/bin/python scripts/make_hf_models.py OUT_DIR [--seeds 11,12,13]

The sizes vary on purpose: head dims of 16, 24 and 32, GQA groups of 1 to 4, widths that are
not multiples of 128, tied and untied heads, bf16, f16 and f32 files. The projections of the
BitNet models are scaled by a per-tensor factor (master weights are larger than the 0.02
initialisation), which the absmean ternarization does not care about but the fp path does.
"""

import argparse
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch
import transformers
from transformers import BitNetConfig, BitNetForCausalLM, LlamaConfig, LlamaForCausalLM

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name: (class, config kwargs, dtype)
SPECS = {
    "bitnet-h96": (BitNetForCausalLM, dict(
        vocab_size=512, hidden_size=96, intermediate_size=272, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="relu2",
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), torch.bfloat16),
    "bitnet-h192": (BitNetForCausalLM, dict(
        vocab_size=1000, hidden_size=192, intermediate_size=520, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, hidden_act="relu2",
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), torch.float32),
    "bitnet-h256": (BitNetForCausalLM, dict(
        vocab_size=768, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=8, hidden_act="relu2",
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), torch.bfloat16),
    "llama-h120": (LlamaForCausalLM, dict(
        vocab_size=640, hidden_size=120, intermediate_size=328, num_hidden_layers=3,
        num_attention_heads=5, num_key_value_heads=5, hidden_act="silu",
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), torch.float16),
    "llama-h256": (LlamaForCausalLM, dict(
        vocab_size=900, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, hidden_act="silu",
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), torch.bfloat16),
    # Widths with Hadamard matrices (n = m * 2^k, m in the stored orders), so that the BitNet v2
    # schemes and rotations run on models made by transformers too: the o_proj input is the
    # hidden size, the down_proj input the FFN width.
    "bitnet-h160": (BitNetForCausalLM, dict(
        vocab_size=700, hidden_size=160, intermediate_size=432, num_hidden_layers=4,
        num_attention_heads=5, num_key_value_heads=1, hidden_act="relu2",
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), torch.bfloat16),
    "bitnet-h224": (BitNetForCausalLM, dict(
        vocab_size=600, hidden_size=224, intermediate_size=640, num_hidden_layers=5,
        num_attention_heads=7, num_key_value_heads=7, hidden_act="relu2",
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), torch.float32),
    "llama-h144": (LlamaForCausalLM, dict(
        vocab_size=500, hidden_size=144, intermediate_size=416, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, hidden_act="silu",
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), torch.float16),
    "llama-h240": (LlamaForCausalLM, dict(
        vocab_size=800, hidden_size=240, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=10, num_key_value_heads=5, hidden_act="silu",
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), torch.bfloat16),
}


def build(name, seed, out_dir):
    cls, kwargs, dtype = SPECS[name]
    config_cls = BitNetConfig if cls is BitNetForCausalLM else LlamaConfig
    config = config_cls(max_position_embeddings=512, bos_token_id=1, eos_token_id=2, **kwargs)
    torch.manual_seed(seed)
    model = cls(config)
    if cls is BitNetForCausalLM:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith(".weight") and pname.split(".")[-2] in PROJ:
                    p.mul_(5.0 + 15.0 * torch.rand((), generator=gen).item())
    path = os.path.join(out_dir, f"{name}-s{seed}")
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seeds", default="11,12", help="comma-separated seeds (default 11,12)")
    ap.add_argument("--models", default=",".join(SPECS), help="comma-separated names: " + ", ".join(SPECS))
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    paths = [build(name, int(seed), a.out_dir)
             for name in a.models.split(",") for seed in a.seeds.split(",")]
    print(f"# transformers {transformers.__version__}, torch {torch.__version__}")
    print(":".join(paths))


if __name__ == "__main__":
    main()
