#!/usr/bin/env python3
"""Side-by-side benchmark of bitnet-pack against llama.cpp on one synthetic checkpoint.

Opt-in (not run in CI). In one run it converts the same synthetic BitNet b1.58 2B4T-shaped
bf16 checkpoint with llama.cpp's `convert_hf_to_gguf.py --outtype tq2_0` and with
`bitnet-pack convert`, runs both results (llama.cpp through llama-cpp-python, bitnet-pack
through `bitnet-pack bench`), and prints a markdown table with ratios. The raw numbers are
saved as JSON (and the table as markdown) in the work directory.

    python3 scripts/side_by_side.py --llama-cpp LLAMA_CPP_DIR --python PYTHON
        [--work DIR] [--layers 30] [--runs 3] [--threads 2,1]
        [--prompt-tokens 128] [--gen-tokens 32] [--bitnet-pack PATH]
        [--extra-convert-args "--layout t5"] [--skip-convert]

Needs:
  * this repository (the checkpoint generator is `cargo run --release --example
    synth_checkpoint`; bitnet-pack is built with `cargo build --release` if --bitnet-pack
    does not exist);
  * a llama.cpp source tree (--llama-cpp) with convert_hf_to_gguf.py and gguf-py/, best the
    one the installed llama-cpp-python wheel vendors, e.g. for llama-cpp-python 0.3.36:

        pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps -d /tmp/llama-sdist
        tar xzf /tmp/llama-sdist/llama_cpp_python-0.3.36.tar.gz -C /tmp/llama-sdist
        # llama.cpp is then /tmp/llama-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp
        # (0.3.36 vendors llama.cpp 0c1e57098; the script reports the commit from the sdist's
        # git metadata, else from its CHANGELOG.md)

  * a Python (--python) with llama_cpp (llama-cpp-python) and numpy for the runtime, and what
    llama.cpp's converter imports: torch, numpy, transformers, pyyaml (gguf-py is taken from
    the llama.cpp tree);
  * disk in the work directory: the checkpoint (4.8 GB at 30 layers) + two outputs (~1.2 GB
    each); GNU time (/usr/bin/time) for peak RSS, else os.wait4's rusage is used.

What is measured:
  * convert: wall (perf_counter around the process) and peak RSS, R runs, llama.cpp and
    bitnet-pack alternating (which one goes first alternates too), warm page cache (the
    safetensors file is read once first), `sync` before every timed run, output removed first;
  * runtime, for each thread count T, R runs alternating, each in a fresh process:
    - llama.cpp: the low-level llama-cpp-python API (not `Llama.eval`): model mmapped,
      n_threads = n_threads_batch = T, n_ctx >= prompt + gen, n_batch = n_ubatch >= prompt; one
      untimed warm-up (prompt + 2 tokens, then the KV cache is cleared), then the prefill is
      one llama_decode of the N prompt ids (llama_batch_get_one: logits for the last position
      only) and decode is M greedy tokens one at a time (median per-token time; the argmax is
      outside the timer, as in `bitnet-pack bench`). Prompt ids: random < vocab, fixed seed.
    - bitnet-pack: `bitnet-pack bench X.bpk --prompt-tokens N --gen-tokens M --threads T
      --json --no-memcpy` (loads and validates everything before timing; no warm-up needed);
  * the machine's state: page cache in huge folios (`FileHugePages`) at the start and the end,
    and the memory-copy rate (`bitnet-pack bench`, one thread) before and after the runtime
    runs.

The synthetic checkpoint has no tokenizer and uses 2B4T's tensor names, neither of which
upstream's converter handles for BitNetForCausalLM. The llama.cpp converter is therefore run
through this script's `_llama-convert` entry, which imports convert_hf_to_gguf.py unchanged
and patches two things in memory only: (1) the sentencepiece vocab step returns a synthetic
vocab of `vocab_size` tokens (<unk>, <s>, </s>, the 256 byte tokens, then placeholder pieces)
instead of reading tokenizer.model; (2) `self_attn.attn_sub_norm` / `mlp.ffn_sub_norm` are
renamed to the names upstream maps (`inner_attn_ln` / `ffn_layernorm`, the 1bitLLM naming)
before mapping. Everything else (ternarization, TQ2_0 packing, the embedding type) is
upstream's. The speed compared is a matter of shapes: llama.cpp runs its `bitnet` graph,
whose FFN activation is SiLU-gated where 2B4T's is ReLU^2 (a negligible cost difference).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = 1234


class Fail(Exception):
    """An error reported as one line, with an exit code (2: a missing prerequisite)."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


def log(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# Entries run by --python (the llama.cpp side). They import only what they need.
# ------------------------------------------------------------------------------------------


def _add_llama_paths(llama_dir: Path) -> None:
    # convert_hf_to_gguf.py puts gguf-py at sys.path[1] itself and looks for models/ under
    # sys.path[0]; take gguf-py from the llama.cpp tree, not a pip-installed gguf.
    sys.path[0:0] = [str(llama_dir), str(llama_dir / "gguf-py")]


def entry_llama_convert(argv: list[str]) -> None:
    """_llama-convert LLAMA_DIR CKPT OUTFILE OUTTYPE: upstream's converter, two patches."""
    llama_dir, ckpt, outfile, outtype = Path(argv[0]).resolve(), argv[1], argv[2], argv[3]
    _add_llama_paths(llama_dir)
    import convert_hf_to_gguf as conv  # noqa: E402  (imports torch, gguf, conversion)
    from conversion.base import SentencePieceTokenTypes
    from conversion.bitnet import BitnetModel

    notes = []
    if not (Path(ckpt) / "tokenizer.model").is_file():

        def _create_vocab_sentencepiece(self):
            n = int(self.find_hparam(["vocab_size"]))
            tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
            types = [SentencePieceTokenTypes.UNKNOWN, SentencePieceTokenTypes.CONTROL,
                     SentencePieceTokenTypes.CONTROL] + [SentencePieceTokenTypes.BYTE] * 256
            tokens += [f"\u2581t{i}".encode() for i in range(len(tokens), n)]
            types += [SentencePieceTokenTypes.NORMAL] * (n - len(types))
            return tokens[:n], [0.0] * n, types[:n]

        BitnetModel._create_vocab_sentencepiece = _create_vocab_sentencepiece
        notes.append("no tokenizer.model: synthetic sentencepiece vocab of vocab_size tokens")

    orig_modify = BitnetModel.modify_tensors

    def modify_tensors(self, data_torch, name, bid):
        name = (name.replace(".self_attn.attn_sub_norm.", ".self_attn.inner_attn_ln.")
                    .replace(".mlp.ffn_sub_norm.", ".mlp.ffn_layernorm."))
        return orig_modify(self, data_torch, name, bid)

    BitnetModel.modify_tensors = modify_tensors
    notes.append("attn_sub_norm/ffn_sub_norm renamed to inner_attn_ln/ffn_layernorm")
    for n in notes:
        print(f"side_by_side patch: {n}", file=sys.stderr, flush=True)
    sys.argv = [str(llama_dir / "convert_hf_to_gguf.py"), ckpt, "--outtype", outtype,
                "--outfile", outfile]
    conv.main()


def entry_gguf_types(argv: list[str]) -> None:
    """_gguf-types LLAMA_DIR GGUF: JSON of the tensor types in a GGUF file."""
    _add_llama_paths(Path(argv[0]).resolve())
    import gguf

    r = gguf.GGUFReader(argv[1], "r")
    counts: dict[str, int] = {}
    by_name = {}
    total = 0
    for t in r.tensors:
        ty = t.tensor_type.name
        counts[ty] = counts.get(ty, 0) + 1
        by_name[t.name] = ty
        total += int(t.n_bytes)
    proj = {ty for name, ty in by_name.items()
            if re.search(r"\.(attn_[qkv]|attn_output|ffn_(gate|up|down))\.weight$", name)}
    print(json.dumps({
        "counts": counts,
        "n_tensors": len(by_name),
        "projection_types": sorted(proj),
        "token_embd": by_name.get("token_embd.weight"),
        "output": by_name.get("output.weight"),
        "tensor_bytes": total,
    }))


def entry_llama_bench(argv: list[str]) -> None:
    """_llama-bench GGUF THREADS PROMPT GEN SEED [mmap|read]: JSON of one llama.cpp measurement
    (weights from the file's mapping, the default, or read into llama.cpp's own buffers)."""
    path, threads, n_prompt, n_gen, seed = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    use_mmap = (argv[5] if len(argv) > 5 else "mmap") == "mmap"
    import ctypes

    import numpy as np
    import llama_cpp as L

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    if hasattr(mp, "load_mode"):
        mp.load_mode = L.LLAMA_LOAD_MODE_MMAP if use_mmap else L.LLAMA_LOAD_MODE_NONE
    else:
        mp.use_mmap = use_mmap
    t = time.perf_counter()
    model = L.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"llama_model_load_from_file failed on {path}")
    cp = L.llama_context_default_params()
    cp.n_ctx = n_prompt + n_gen + 16
    cp.n_batch = cp.n_ubatch = max(n_prompt, 512)
    cp.n_threads = cp.n_threads_batch = threads
    cp.embeddings = False
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama_init_from_model failed")
    load_ms = (time.perf_counter() - t) * 1e3
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    rng = random.Random(seed)
    prompt = [rng.randrange(n_vocab) for _ in range(n_prompt)]

    def step(tokens):
        arr = (L.llama_token * len(tokens))(*tokens)
        # llama_batch_get_one: no logits array -> only the last position is an output.
        rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")
        return L.llama_get_logits_ith(ctx, -1)  # synchronizes

    def argmax(ptr):
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                         shape=(n_vocab,)).argmax())

    # Warm-up: pages of the mmapped file, thread pool, buffers. Then an empty cache.
    nxt = argmax(step(prompt))
    for _ in range(2):
        nxt = argmax(step([nxt]))
    L.llama_memory_clear(L.llama_get_memory(ctx), True)

    t = time.perf_counter()
    logits = step(prompt)
    prefill_ms = (time.perf_counter() - t) * 1e3
    nxt = argmax(logits)
    decode_ms = []
    for _ in range(n_gen):
        t = time.perf_counter()
        logits = step([nxt])
        decode_ms.append((time.perf_counter() - t) * 1e3)
        nxt = argmax(logits)
    decode_ms.sort()
    med = decode_ms[len(decode_ms) // 2] if decode_ms else 0.0
    info = L.llama_print_system_info()
    print(json.dumps({
        "threads": threads,
        "prompt_tokens": n_prompt,
        "gen_tokens": n_gen,
        "load_ms": load_ms,
        "prefill_ms": prefill_ms,
        "prefill_tokens_per_s": n_prompt / (prefill_ms / 1e3),
        "decode_ms": decode_ms,
        "decode_ms_median": med,
        "decode_tokens_per_s": 1e3 / med if med > 0 else 0.0,
        "n_vocab": n_vocab,
        "llama_cpp_python": getattr(L, "__version__", "unknown"),
        "system_info": info.decode() if isinstance(info, bytes) else str(info),
    }))
    L.llama_free(ctx)
    L.llama_model_free(model)


ENTRIES = {
    "_llama-convert": entry_llama_convert,
    "_gguf-types": entry_gguf_types,
    "_llama-bench": entry_llama_bench,
}

# ------------------------------------------------------------------------------------------
# Driver (stdlib only)
# ------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Convert and run one synthetic 2B4T-shaped checkpoint with llama.cpp and "
                    "bitnet-pack; print a markdown table with ratios.")
    p.add_argument("--work", type=Path, default=Path("/tmp/bitnet-pack-sbs"),
                   help="work directory: checkpoint, outputs, logs, results (default: %(default)s)")
    p.add_argument("--layers", type=int, default=30, help="layers of the synthetic model (default 30)")
    p.add_argument("--load", choices=["memory", "mmap"], default="memory",
                   help="how both runners hold the weights: read into memory (default; "
                        "bitnet-pack's default, llama.cpp's no-mmap) or the file's mapping "
                        "(bitnet-pack --mmap, llama.cpp's default)")
    p.add_argument("--shards", type=int, default=1,
                   help="safetensors files of the synthetic checkpoint (default 1; 2B4T-like: 7)")
    p.add_argument("--runs", type=int, default=3, help="runs of every measurement (default 3)")
    p.add_argument("--threads", default="2,1", help="comma-separated thread counts (default 2,1)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--llama-cpp", type=Path, required=True,
                   help="llama.cpp source tree holding convert_hf_to_gguf.py and gguf-py/")
    p.add_argument("--python", default=sys.executable,
                   help="Python with llama_cpp, numpy, torch, transformers, yaml (default: this one)")
    p.add_argument("--bitnet-pack", type=Path, default=REPO / "target/release/bitnet-pack",
                   help="bitnet-pack binary (default: the repo's release build, built if missing)")
    p.add_argument("--extra-convert-args", default="",
                   help="extra arguments for `bitnet-pack convert`, one string, e.g. \"--layout t5\"")
    p.add_argument("--skip-convert", action="store_true",
                   help="do not time the conversions; reuse the outputs already in --work")
    a = p.parse_args()
    try:
        a.thread_list = [int(x) for x in a.threads.split(",") if x.strip()]
    except ValueError:
        p.error(f"--threads: not a comma-separated list of integers: {a.threads!r}")
    if not a.thread_list or min(a.thread_list) < 1:
        p.error("--threads needs at least one thread count >= 1")
    if a.runs < 1 or a.layers < 1 or a.shards < 1 or a.prompt_tokens < 1 or a.gen_tokens < 1:
        p.error("--runs, --layers, --prompt-tokens and --gen-tokens must be >= 1")
    return a


def run_checked(cmd: list[str], what: str, log_path: Path | None = None, **kw) -> str:
    """Runs cmd; returns stdout; on failure raises Fail with the tail of its stderr."""
    err = open(log_path, "w") if log_path else subprocess.PIPE
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, **kw)
    finally:
        if log_path:
            err.close()
    if r.returncode != 0:
        tail = (log_path.read_text(errors="replace") if log_path else r.stderr or "")
        tail = "\n".join(tail.strip().splitlines()[-25:])
        where = f" (log: {log_path})" if log_path else ""
        raise Fail(f"{what} failed with exit code {r.returncode}{where}:\n  $ {shlex.join(cmd)}\n{tail}")
    return r.stdout


def self_cmd(python: str, entry: str, *args) -> list[str]:
    return [python, str(Path(__file__).resolve()), entry, *map(str, args)]


def check_llama(a: argparse.Namespace) -> dict:
    """Missing llama.cpp tools: a clear message and exit code 2."""
    d = a.llama_cpp
    missing = [str(d / f) for f in ("convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py")
               if not (d / f).is_file()]
    if missing:
        raise Fail("llama.cpp tools not found: " + ", ".join(missing) + "\n  --llama-cpp must be a "
                   "llama.cpp source tree (see this script's docstring for how to get the one "
                   "llama-cpp-python vendors)", 2)
    if shutil.which(a.python) is None and not Path(a.python).is_file():
        raise Fail(f"--python {a.python}: no such interpreter", 2)
    mods = ["llama_cpp", "numpy"] + ([] if a.skip_convert else ["torch", "transformers", "yaml"])
    probe = (f"import importlib.util, json; print(json.dumps([m for m in {mods!r} "
             "if importlib.util.find_spec(m) is None]))")
    try:
        r = subprocess.run([a.python, "-c", probe], capture_output=True, text=True, timeout=120)
        gone = json.loads(r.stdout) if r.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        gone = None
    if gone is None:
        raise Fail(f"--python {a.python} could not be run", 2)
    if gone:
        raise Fail(f"--python {a.python} lacks module(s) {', '.join(gone)} (llama-cpp-python for the "
                   "runtime; torch, numpy, transformers, pyyaml for llama.cpp's converter)", 2)
    r = subprocess.run([a.python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise Fail(f"--python {a.python}: `import llama_cpp` fails:\n{r.stderr.strip()[-2000:]}", 2)
    return {"llama_cpp_python": r.stdout.strip(), "llama_cpp_commit": llama_commit(d)}


def llama_commit(d: Path) -> str:
    """The llama.cpp commit of the tree: git, or the CHANGELOG of a llama-cpp-python sdist."""
    try:
        r = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=30)
        if r.returncode == 0 and r.stdout.strip():
            top = subprocess.run(["git", "-C", str(d), "rev-parse", "--show-toplevel"],
                                 capture_output=True, text=True).stdout.strip()
            if top and Path(top).resolve() == d.resolve():
                return r.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    for up in list(d.resolve().parents)[:3]:
        pkg, changelog = up / "PKG-INFO", up / "CHANGELOG.md"
        if pkg.is_file() and changelog.is_file():
            m = re.search(r"^Version:\s*(\S+)", pkg.read_text(errors="replace"), re.M)
            if not m:
                continue
            ver = m.group(1)
            text = changelog.read_text(errors="replace")
            sec = re.search(rf"^## \[{re.escape(ver)}\](.*?)(?=^## \[|\Z)", text, re.M | re.S)
            if sec:
                c = re.search(r"llama\.cpp@([0-9a-f]{7,40})", sec.group(1))
                if c:
                    return f"{c.group(1)} (llama-cpp-python {ver} sdist, from its CHANGELOG)"
    return "unknown"


def file_huge_pages_gb() -> float | None:
    """Page-cache bytes held in huge (2 MiB) folios (`FileHugePages`), in GB. How the source
    shards are cached changes what mapping them costs: from 4 KiB pages, a conversion of the
    7-shard checkpoint spent about 1 s of system time mapping them, from huge folios about 0.2 s.
    """
    try:
        m = re.search(r"^FileHugePages:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
        return int(m.group(1)) * 1024 / 1e9 if m else None
    except OSError:
        return None


def memcpy_gb_s(bp: Path, bpk: Path) -> float | None:
    """The machine's memory-copy rate in GB/s, as `bitnet-pack bench` measures it (best of five
    copies of 1 GiB, one thread). It tells the machine's states apart: on the benchmark VM it
    moved by a factor of two between days, and the runtime figures with it.
    """
    cmd = [str(bp), "bench", str(bpk), "--prompt-tokens", "1", "--gen-tokens", "1",
           "--threads", "1", "--json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        value = json.loads(out.stdout).get("memcpy_gb_per_s")
        return float(value) if value is not None else None
    except (OSError, ValueError, TypeError, subprocess.TimeoutExpired):
        return None


def machine_info() -> dict:
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_kb = 0
    try:
        m = re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
        mem_kb = int(m.group(1)) if m else 0
    except OSError:
        pass
    want = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16"]
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "flags": {f: f in flags for f in want},
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),
        "file_huge_pages_gb_start": file_huge_pages_gb(),
    }


def huge_text(machine: dict) -> str:
    a, b = machine.get("file_huge_pages_gb_start"), machine.get("file_huge_pages_gb_end")
    if a is None or b is None:
        return "not reported by this OS"
    return f"{a:.2f} GB at the start, {b:.2f} GB at the end"


def memcpy_text(machine: dict) -> str:
    a, b = machine.get("memcpy_gb_s_start"), machine.get("memcpy_gb_s_end")
    show = lambda v: "not measured" if v is None else f"{v:.1f} GB/s"
    return f"{show(a)} before the runtime runs, {show(b)} after them"


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src",
                                "Cargo.toml", "Cargo.lock"], capture_output=True, text=True).stdout
        return rev + (" + uncommitted changes" if dirty.strip() else "")
    except OSError:
        return "unknown"


def ensure_bitnet_pack(a: argparse.Namespace) -> Path:
    b = a.bitnet_pack
    if not b.is_file():
        if b.resolve() != (REPO / "target/release/bitnet-pack").resolve():
            raise Fail(f"--bitnet-pack {b}: no such file", 2)
        log("building bitnet-pack (cargo build --release --bin bitnet-pack)")
        run_checked(["cargo", "build", "--release", "--quiet", "--bin", "bitnet-pack"], "cargo build",
                    cwd=REPO)
    return b.resolve()


def checkpoint_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one, or the shards)."""
    return sorted(ckpt.glob("*.safetensors"))


def ensure_checkpoint(a: argparse.Namespace) -> Path:
    ckpt = a.work / (f"ckpt-L{a.layers}" + (f"-s{a.shards}" if a.shards > 1 else ""))
    marker = "model.safetensors.index.json" if a.shards > 1 else "model.safetensors"
    if (ckpt / "config.json").is_file() and (ckpt / marker).is_file():
        log(f"reusing {ckpt}")
        return ckpt
    need = 0.16e9 * a.layers + 0.7e9
    free = shutil.disk_usage(a.work).free
    if free < need + 2.5e9:
        log(f"warning: {free / 1e9:.1f} GB free in {a.work}; about {(need + 2.5e9) / 1e9:.1f} GB needed")
    log(f"generating the synthetic checkpoint ({a.layers} layers, {a.shards} file(s)) into {ckpt}")
    cmd = ["cargo", "run", "--release", "--quiet", "--example", "synth_checkpoint", "--",
           str(ckpt), "--layers", str(a.layers), "--shards", str(a.shards)]
    run_checked(cmd, "synth_checkpoint", cwd=REPO)
    return ckpt


def warm(path: Path) -> float:
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


GNU_TIME = "/usr/bin/time"


def has_gnu_time() -> bool:
    try:
        return subprocess.run([GNU_TIME, "-v", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


def busy_s() -> float | None:
    """Busy (non-idle, non-iowait) CPU seconds of the whole machine, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def timed(cmd: list[str], log_path: Path, what: str, use_time: bool = False,
          stdout_path: Path | None = None) -> dict:
    """Wall (perf_counter), peak RSS and CPU of one process, and the CPU other processes used
    meanwhile (in CPUs: 0 on an otherwise idle machine). Its stderr (and its stdout, unless
    stdout_path is given) go to log_path."""
    tf = log_path.with_suffix(".time")
    full = [GNU_TIME, "-v", "-o", str(tf)] + cmd if use_time else cmd
    with open(log_path, "w") as err, open(stdout_path or os.devnull, "w") as out:
        b0 = busy_s()
        t = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out if stdout_path else err, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        b1 = busy_s()
        proc.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") \
            else (status >> 8)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-25:])
        raise Fail(f"{what} failed with exit code {proc.returncode} (log: {log_path}):\n"
                   f"  $ {shlex.join(cmd)}\n{tail}")
    res = {"wall_s": wall}
    if b0 is not None and b1 is not None and wall > 0:
        res["other_load_cpus"] = max(0.0, (b1 - b0 - ru.ru_utime - ru.ru_stime) / wall)
    if use_time:
        txt = tf.read_text()

        def field(name):
            m = re.search(rf"^\s*{re.escape(name)}: (.*)$", txt, re.M)
            return m.group(1).strip() if m else None

        res["max_rss_kb"] = int(field("Maximum resident set size (kbytes)"))
        res["user_s"] = float(field("User time (seconds)"))
        res["sys_s"] = float(field("System time (seconds)"))
    else:
        # wait4's rusage covers the child and the descendants it waited for.
        res["max_rss_kb"] = ru.ru_maxrss
        res["user_s"], res["sys_s"] = ru.ru_utime, ru.ru_stime
    return res


def spread(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def fmt(xs: list[float], unit: str = "", digits: int = 1) -> str:
    med, lo, hi = spread(xs)
    s = f"{med:.{digits}f}{unit}"
    if len(xs) > 1:
        s += f" ({lo:.{digits}f}-{hi:.{digits}f})"
    return s


def ratio_text(r: float, better: str, worse: str) -> str:
    """r > 1: bitnet-pack is better by r."""
    if r >= 1:
        return f"{r:.2f}x {better}"
    return f"{r:.2f}x ({1 / r:.2f}x {worse})"


def main() -> int:
    a = parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.work = a.work.resolve()
    logs = a.work / "logs"
    logs.mkdir(exist_ok=True)
    versions = check_llama(a)
    bp = ensure_bitnet_pack(a)
    versions["bitnet_pack"] = subprocess.run([str(bp), "--version"], capture_output=True,
                                             text=True).stdout.strip()
    # The repository's state describes the binary only when it is the repository's build.
    own_build = bp == (REPO / "target/release/bitnet-pack").resolve()
    versions["bitnet_pack_git"] = git_rev() if own_build else "a binary given with --bitnet-pack"
    machine = machine_info()
    ckpt = ensure_checkpoint(a)
    sources = checkpoint_files(ckpt)
    source_bytes = sum(f.stat().st_size for f in sources)
    gguf_path = a.work / f"llama-tq2_0-L{a.layers}.gguf"
    bpk_path = a.work / f"bitnet-pack-L{a.layers}.bpk"
    extra = shlex.split(a.extra_convert_args)
    llama_convert_cmd = self_cmd(a.python, "_llama-convert", a.llama_cpp.resolve(), ckpt, gguf_path,
                                 "tq2_0")
    ours_convert_cmd = [str(bp), "convert", str(ckpt), "-o", str(bpk_path), "--force", "--quiet",
                        *extra]
    use_time = has_gnu_time()
    convert = {"llama.cpp": [], "bitnet-pack": []}
    commands = {"llama.cpp convert": shlex.join(llama_convert_cmd),
                "bitnet-pack convert": shlex.join(ours_convert_cmd)}

    if a.skip_convert:
        for p in (gguf_path, bpk_path):
            if not p.is_file():
                raise Fail(f"--skip-convert: {p} is missing (run once without --skip-convert)", 2)
        log("skipping the conversions (--skip-convert)")
    else:
        log(f"warming the page cache ({source_bytes / 1e9:.2f} GB in {len(sources)} file(s))")
        warm_s = sum(warm(f) for f in sources)
        log(f"read in {warm_s:.2f} s; warming the converter's imports (untimed)")
        run_checked([a.python, "-c", f"import sys; sys.path[0:0] = {[str(a.llama_cpp.resolve()), str(a.llama_cpp.resolve() / 'gguf-py')]!r}; "
                     "import convert_hf_to_gguf"], "importing convert_hf_to_gguf",
                    log_path=logs / "llama-import.log")
        sides = [("llama.cpp", llama_convert_cmd, gguf_path), ("bitnet-pack", ours_convert_cmd, bpk_path)]
        for r in range(a.runs):
            for name, cmd, out in (sides if r % 2 == 0 else sides[::-1]):
                if out.exists():
                    out.unlink()
                os.sync()
                log(f"convert, {name}, run {r + 1} of {a.runs}")
                res = timed(cmd, logs / f"convert-{name}-{r + 1}.log", f"{name} convert", use_time)
                res["output_bytes"] = out.stat().st_size
                log(f"  {res['wall_s']:.2f} s, peak RSS {res['max_rss_kb'] / 1024:.0f} MiB; other "
                    f"processes {res.get('other_load_cpus', float('nan')):.2f} CPUs")
                convert[name].append(res)

    log("tensor types of both outputs")
    gtypes = json.loads(run_checked(self_cmd(a.python, "_gguf-types", a.llama_cpp.resolve(), gguf_path),
                                    "reading the GGUF"))
    insp = json.loads(run_checked([str(bp), "inspect", str(bpk_path), "--json"], "bitnet-pack inspect"))
    btypes: dict[str, int] = {}
    bemb = None
    for t in insp["tensors"]:
        btypes[t["encoding"]] = btypes.get(t["encoding"], 0) + 1
        if t["role"] == "embedding":
            bemb = t["encoding"]

    machine["memcpy_gb_s_start"] = memcpy_gb_s(bp, bpk_path)
    bench: dict[str, dict[str, list]] = {}
    for th in a.thread_list:
        llama_cmd = self_cmd(a.python, "_llama-bench", gguf_path, th, a.prompt_tokens, a.gen_tokens, SEED,
                             "mmap" if a.load == "mmap" else "read")
        ours_cmd = [str(bp), "bench", str(bpk_path), "--prompt-tokens", str(a.prompt_tokens),
                    "--gen-tokens", str(a.gen_tokens), "--threads", str(th), "--json", "--no-memcpy",
                    *(["--mmap"] if a.load == "mmap" else [])]
        commands[f"llama.cpp run, {th} threads"] = shlex.join(llama_cmd)
        commands[f"bitnet-pack run, {th} threads"] = shlex.join(ours_cmd)
        sides = [("llama.cpp", llama_cmd), ("bitnet-pack", ours_cmd)]
        bench[str(th)] = {"llama.cpp": [], "bitnet-pack": []}
        for r in range(a.runs):
            for name, cmd in (sides if r % 2 == 0 else sides[::-1]):
                log(f"run, {name}, {th} threads, run {r + 1} of {a.runs}")
                stem = logs / f"run-{name}-t{th}-{r + 1}"
                proc = timed(cmd, stem.with_suffix(".log"), f"{name} run",
                             stdout_path=stem.with_suffix(".json"))
                res = json.loads(stem.with_suffix(".json").read_text())
                res["process"] = proc
                log(f"  prefill {res['prefill_tokens_per_s']:.1f} tok/s, decode "
                    f"{res['decode_tokens_per_s']:.1f} tok/s; other processes "
                    f"{proc.get('other_load_cpus', float('nan')):.2f} CPUs")
                bench[str(th)][name].append(res)

    machine["loadavg_end"] = os.getloadavg()
    machine["file_huge_pages_gb_end"] = file_huge_pages_gb()
    machine["memcpy_gb_s_end"] = memcpy_gb_s(bp, bpk_path)
    # --- report ------------------------------------------------------------------------------
    rows = []
    if not a.skip_convert:
        lw = [x["wall_s"] for x in convert["llama.cpp"]]
        ow = [x["wall_s"] for x in convert["bitnet-pack"]]
        lr = [x["max_rss_kb"] / 1024 / 1024 for x in convert["llama.cpp"]]
        orr = [x["max_rss_kb"] / 1024 / 1024 for x in convert["bitnet-pack"]]
        rows.append((f"convert wall (median of {a.runs}, alternating)", fmt(lw, " s", 2), fmt(ow, " s", 2),
                     ratio_text(spread(lw)[0] / spread(ow)[0], "faster", "slower")))
        rows.append(("convert peak RSS", fmt(lr, " GiB", 2), fmt(orr, " GiB", 2),
                     ratio_text(spread(lr)[0] / spread(orr)[0], "less", "more")))
    for th in a.thread_list:
        b = bench[str(th)]
        for key, label in (("decode_tokens_per_s", f"decode, {th} thread{'s' if th > 1 else ''} (tok/s)"),
                           ("prefill_tokens_per_s", f"prefill, {th} thread{'s' if th > 1 else ''}, "
                                                    f"{a.prompt_tokens}-token prompt (tok/s)")):
            lx = [x[key] for x in b["llama.cpp"]]
            ox = [x[key] for x in b["bitnet-pack"]]
            rows.append((label, fmt(lx), fmt(ox), ratio_text(spread(ox)[0] / spread(lx)[0], "faster", "slower")))

    ours_bytes = bench[str(a.thread_list[0])]["bitnet-pack"][0].get("bytes_per_decoded_token")
    others = [x.get("other_load_cpus") for v in convert.values() for x in v]
    others += [x["process"].get("other_load_cpus") for b in bench.values() for v in b.values() for x in v]
    others = [x for x in others if x is not None]
    load_note = (f"CPU used by other processes during the measurements: {min(others):.2f}-"
                 f"{max(others):.2f} CPUs (0 on an idle machine; anything well above 0 makes the "
                 "numbers pessimistic, llama.cpp's spinning thread pool most of all)"
                 if others else "other processes' CPU use not measured")
    gsize, bsize = gguf_path.stat().st_size, bpk_path.stat().st_size
    fl = machine["flags"]
    lines = [
        f"### side by side with llama.cpp: synthetic 2B4T-shaped checkpoint, {a.layers} layers, "
        f"{len(sources)} safetensors file(s)",
        "",
        "| figure | llama.cpp | bitnet-pack | ratio |",
        "|---|---|---|---|",
        *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows],
        "",
        f"Each cell: median of {a.runs} run(s)" + (" (min-max)" if a.runs > 1 else "") +
        "; every measurement in a fresh process, llama.cpp and bitnet-pack alternating. "
        "Ratio > 1 means bitnet-pack is better.",
        "",
        f"- llama.cpp file: `{gguf_path.name}`, {gsize / 1e9:.3f} GB; tensor types "
        + ", ".join(f"{k} x{v}" for k, v in sorted(gtypes["counts"].items()))
        + f"; projections {'/'.join(gtypes['projection_types']) or 'none'}; token_embd "
        f"{gtypes['token_embd']}; output {gtypes['output'] or 'none (tied to token_embd)'}. "
        f"A decoded token reads about {gtypes['tensor_bytes'] / 1e6:.1f} MB of weights "
        "(every tensor, the embedding as the head).",
        f"- bitnet-pack file: `{bpk_path.name}`, {bsize / 1e9:.3f} GB; tensor encodings "
        + ", ".join(f"{k} x{v}" for k, v in sorted(btypes.items()))
        + f"; embedding (tied head) {bemb}"
        + (f"; {ours_bytes / 1e6:.1f} MB of weights per decoded token" if ours_bytes else "")
        + (f"; convert arguments `{shlex.join(extra)}`" if extra else "") + ".",
        "- llama.cpp's converter ran unchanged but for two in-memory patches (this script's "
        "`_llama-convert`): a synthetic sentencepiece vocab of vocab_size placeholder tokens "
        "(the checkpoint has no tokenizer), and 2B4T's `attn_sub_norm`/`ffn_sub_norm` renamed to "
        "the names upstream maps (`inner_attn_ln`/`ffn_layernorm`).",
        "- llama.cpp runs its `bitnet` graph: its FFN activation is SiLU-gated where 2B4T's is "
        "ReLU^2 (negligible cost); the weights are random, so only speed and memory mean anything.",
        f"- Weights: {'read into memory by both (llama.cpp without mmap, bitnet-pack by default)' if a.load == 'memory' else 'from the file mapping in both (llama.cpp by default, bitnet-pack --mmap)'}.",
        f"- llama.cpp: llama-cpp-python {versions['llama_cpp_python']}, low-level API, "
        "one warm-up before timing, logits for the last position only; llama.cpp commit "
        f"{versions['llama_cpp_commit']}. bitnet-pack: {versions['bitnet_pack']} "
        f"({versions['bitnet_pack_git']}), `bench --no-memcpy`.",
        f"- Convert: warm page cache, `sync` before each run, wall by the driver, peak RSS by "
        f"{'GNU time' if use_time else 'wait4 rusage'}. Page cache in huge folios "
        f"(`FileHugePages`): {huge_text(machine)}, beside {source_bytes / 1e9:.2f} GB of "
        "checkpoint (mapping 4 KiB pages costs bitnet-pack's conversion up to 1 s of system time).",
        f"- Memory copy (`bitnet-pack bench`: best of five copies of 1 GiB, one thread): "
        f"{memcpy_text(machine)}.",
        f"- Machine: {machine['cpu']}, {machine['cpus']} CPUs ({machine['cpus_usable']} usable), "
        f"{machine['ram_gib']} GiB RAM; avx2 {'yes' if fl['avx2'] else 'no'}, avx512f "
        f"{'yes' if fl['avx512f'] else 'no'}, avx512_vnni {'yes' if fl['avx512_vnni'] else 'no'}, "
        f"avx_vnni {'yes' if fl['avx_vnni'] else 'no'}; Linux {machine['kernel']}; load average "
        f"{machine['loadavg_start'][0]:.2f} at the start, {machine['loadavg_end'][0]:.2f} at the end; "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}; {load_note}.",
        "",
        "Commands:",
        "",
        "```sh",
        *[f"# {k}\n{v}" for k, v in commands.items()],
        "```",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    results = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "machine": machine,
        "versions": versions,
        "commands": commands,
        "checkpoint": {"dir": str(ckpt), "files": len(sources), "safetensors_bytes": source_bytes},
        "llama_gguf": {"path": str(gguf_path), "bytes": gsize, **gtypes},
        "bitnet_pack_bpk": {"path": str(bpk_path), "bytes": bsize, "encodings": btypes,
                            "embedding": bemb, "bytes_per_decoded_token": ours_bytes},
        "convert": convert,
        "bench": bench,
        "table": [dict(zip(("figure", "llama.cpp", "bitnet-pack", "ratio"), r)) for r in rows],
    }
    (a.work / "side_by_side.json").write_text(json.dumps(results, indent=1) + "\n")
    (a.work / "side_by_side.md").write_text(report)
    log(f"saved {a.work / 'side_by_side.md'} and {a.work / 'side_by_side.json'}; logs in {logs}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ENTRIES:
        ENTRIES[sys.argv[1]](sys.argv[2:])
        sys.exit(0)
    try:
        sys.exit(main())
    except Fail as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
