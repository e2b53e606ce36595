#!/usr/bin/env python3
"""Opt-in interop check (not in CI): do other tools load what bitnet-pack writes, and compute
what bitnet-pack's runner computes?

  hf   DIR    : transformers loads the HF packed export DIR (from_pretrained, its bitnet
                quantizer, every float tensor then cast to f32) and its logits are compared with
                `bitnet-pack run` on the same DIR (source path) and on the .bpk the export came
                from, if given with --bpk.
  gguf FILE   : llama-cpp-python loads FILE (a GGUF bitnet-pack wrote) and its logits are
                compared with `bitnet-pack run` on the .bpk given with --bpk (top-1 agreement and
                rel L2; llama.cpp quantizes activations per 256-block, not per token, so small
                differences are expected).

Needs: torch + transformers + accelerate (hf), llama-cpp-python (gguf), numpy. Run from the
repository root after `cargo build --release`, e.g.
    python scripts/check_interop.py hf OUT_DIR --bpk model.bpk
    python scripts/check_interop.py gguf model.gguf --bpk model.bpk
Prints one JSON line per comparison; exits 1 if top-1 agreement is below --min-top1.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

BIN = os.path.join("target", "release", "bitnet-pack")
TOKENS = [0, 5, 17, 42, 99, 3, 250, 7, 128, 64, 11, 200]


def ours(path, tokens):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "logits.json")
        subprocess.run(
            [BIN, "run", path, "--tokens", ",".join(map(str, tokens)), "--logits-json", out],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with open(out) as fh:
            return np.array(json.load(fh)["logits"], dtype=np.float64)


def compare(label, ref, got):
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    top1 = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    print(json.dumps({"compare": label, "rel_l2": rel, "top1": top1, "positions": len(ref)}))
    return top1


def transformers_logits(directory, tokens):
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.data = t.data.float()
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens]), use_cache=False).logits[0].double().numpy()


def llama_cpp_logits(path, tokens):
    from llama_cpp import Llama

    llm = Llama(model_path=path, logits_all=True, n_ctx=max(64, len(tokens)), verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["hf", "gguf"])
    ap.add_argument("path")
    ap.add_argument("--bpk")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--min-top1", type=float, default=1.0)
    a = ap.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    worst = 1.0
    if a.kind == "hf":
        ref = transformers_logits(a.path, tokens)
        worst = min(worst, compare("transformers vs bitnet-pack source path", ref, ours(a.path, tokens)))
        if a.bpk:
            worst = min(worst, compare("transformers vs bitnet-pack .bpk", ref, ours(a.bpk, tokens)))
    else:
        if not a.bpk:
            ap.error("gguf needs --bpk (the .bpk the GGUF was written from)")
        ref = ours(a.bpk, tokens)
        worst = min(worst, compare("bitnet-pack .bpk vs llama.cpp", ref, llama_cpp_logits(a.path, tokens)))
    return 0 if worst >= a.min_top1 else 1


if __name__ == "__main__":
    sys.exit(main())
