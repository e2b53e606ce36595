#!/usr/bin/env python3
"""Checks `bitnet-pack rotate` with transformers itself: the rotated checkpoint must load with
transformers' own classes and give the original's full-precision logits.

For each model directory: runs `bitnet-pack rotate MODEL -o TMP --seed S`, loads the original
and the rotated checkpoint with `AutoModelForCausalLM.from_pretrained` in f32 (a BitNet
`quantization_config` is removed from the loaded config, so that both run in full precision,
the function rotate promises to keep), runs both on the same random tokens and prints the
relative L2 of the logits and the top-1 agreement. Exit 1 if any relative L2 exceeds 1e-4.

Opt-in (transformers and torch are a large install, not part of CI):

    python3 -m venv /opt/tfvenv
    /opt/tfvenv/bin/pip install torch transformers safetensors numpy
    cargo build --release
    /opt/tfvenv/bin/python scripts/check_rotate.py fixtures/tiny-hf-llama fixtures/tiny-hf-awkward \
        fixtures/tiny-outliers [--seeds 0,1,7] [--tokens 64]
"""

import argparse
import os
import subprocess
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TOLERANCE = 1e-4


def load_fp(path):
    cfg = AutoConfig.from_pretrained(path)
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch.float32)
    model.eval()
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--seeds", default="0,1,7")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--bin", default="target/release/bitnet-pack")
    a = ap.parse_args()
    worst = 0.0
    for path in a.models:
        original = load_fp(path)
        vocab = original.config.vocab_size
        g = torch.Generator().manual_seed(1234)
        tokens = torch.randint(0, vocab, (a.tokens,), generator=g).tolist()
        want = logits(original, tokens)
        for seed in a.seeds.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "rotated")
                subprocess.run(
                    [a.bin, "rotate", path, "-o", out, "--seed", seed],
                    check=True,
                    capture_output=True,
                )
                got = logits(load_fp(out), tokens)
            rel = float(torch.linalg.norm(got - want) / torch.linalg.norm(want))
            top1 = float((got.argmax(-1) == want.argmax(-1)).double().mean())
            worst = max(worst, rel)
            print(f"{path} seed {seed}: logits rel L2 {rel:.3e}, top-1 agreement {100 * top1:.1f}%")
    print(f"worst rel L2 {worst:.3e} (tolerance {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
