#!/usr/bin/env python
"""Rebuild a sample that is not committed (too large for the repository) bit for bit, and check it.

Each recipe below is a fixed ``samples/train.py`` command: a seed, a step count (never a time budget)
and one thread, so the run is deterministic on a given machine. The sha256 of the ``model.safetensors``
it wrote here is recorded next to it, with the torch version and CPU that gave it; a rebuild
compares its own file against that value.

    python samples/rebuild.py mixtral-h256 --out /tmp/samples/mixtral-h256       # about 1 h on 2 busy cores
    python samples/rebuild.py qwen3-moe-fine --out /tmp/samples/qwen3-moe-fine
    python samples/rebuild.py qwen3-moe-fine --prefix 3    # the first 3 steps, twice: is this machine deterministic?

``--prefix N`` trains the first N steps of the recipe (its learning-rate schedule unchanged,
``train.py --stop-after N``) twice into a temporary folder and compares the two files' sha256 with
each other and with the recorded prefix sha256. Floating-point results can differ between CPUs
(AVX2 or AVX-512 kernels) and torch versions; the recorded values hold for the environment named
beside them, and a mismatch elsewhere says so rather than failing silently.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> train.py arguments (besides --out), and what the recorded run gave
RECIPES: dict[str, dict] = {
    # hidden and expert width 256: llama.cpp's K- and i-quants apply to every row (benchmarks/README.md,
    # "llama.cpp side by side"); the 2026-11-30 headline sample was made with a wall-time budget and is lost
    "mixtral-h256": {
        "args": ["--family", "mixtral", "--tokenizer", str(HERE / "mixtral-tiny"), "--hidden", "256",
                 "--intermediate", "256", "--steps", "250", "--warmup-steps", "30", "--threads", "1", "--seed", "0"],
        "sha256": "5b65fdb4d798cf176eaadb4b61f25a14b3f2330f4f5b7e39c5bb0986da9d28d6",
        "prefix": {"steps": 3, "sha256": "fefaf2954adabfa7f5ad9ff570eacbe9537559237599403495e0d37cb7c89599"},
    },
    # fine-grained, the shape users run (Qwen3-30B-A3B: 128 experts, top-8): 64 experts of width 256, top-8
    "qwen3-moe-fine": {
        "args": ["--family", "qwen3_moe", "--tokenizer", str(HERE / "mixtral-tiny"), "--steps", "160",
                 "--warmup-steps", "30", "--threads", "1", "--seed", "0"],
        "sha256": "3260fa29c5c830708d238b97b9703ea522c326b1cbc4286edf4850e777d8a540",
        "prefix": {"steps": 3, "sha256": "79cf5077b2a1b4f4acd26805852c5f9be8890a8a2170dfaff92d4cc155cdd569"},
    },
}
# where the recorded values come from
RECORDED_ON = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "python": "3.11.7",
               "cpu": "AMD EPYC (avx2, avx512f/bw/vl/vnni/bf16)"}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train(name: str, out: Path, extra: list[str]) -> str:
    """Run the recipe into ``out``; return the sha256 of the model.safetensors it wrote."""
    cmd = [sys.executable, str(HERE / "train.py"), *RECIPES[name]["args"], "--out", str(out), *extra]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return sha256_of(out / "model.safetensors")


def environment() -> str:
    import platform

    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else "?"
    return f"torch {torch.__version__}, transformers {transformers.__version__}, CPU {cpu}"


def verdict(label: str, got: str, recorded: str | None) -> bool:
    if recorded is None:
        print(f"{label}: sha256 {got} (nothing recorded to compare with)")
        return True
    if got == recorded:
        print(f"{label}: sha256 {got} = the recorded value")
        return True
    print(f"{label}: sha256 {got} differs from the recorded {recorded}, which was made with "
          f"{RECORDED_ON}; this machine: {environment()}. A different CPU or torch version rounds differently; "
          "on the recorded environment this is a failed rebuild", file=sys.stderr)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="\n".join(f"{n}: train.py {' '.join(r['args'])}" for n, r in RECIPES.items()))
    p.add_argument("name", choices=sorted(RECIPES))
    p.add_argument("--out", type=Path, help="output checkpoint folder (required without --prefix)")
    p.add_argument("--prefix", type=int, metavar="N", help="train the first N steps twice and compare (no --out)")
    args = p.parse_args(argv)
    recipe = RECIPES[args.name]
    if args.prefix is None:
        if args.out is None:
            p.error("give --out DIR (the rebuilt checkpoint) or --prefix N (a determinism check)")
        return 0 if verdict(args.name, train(args.name, args.out, []), recipe["sha256"]) else 1
    steps = int(recipe["args"][recipe["args"].index("--steps") + 1])
    if not 0 < args.prefix <= steps:
        p.error(f"--prefix must be between 1 and the recipe's {steps} steps")
    with tempfile.TemporaryDirectory(prefix=f"rebuild-{args.name}-") as tmp:
        extra = ["--stop-after", str(args.prefix), "--eval-tokens", "2048"]  # the eval does not touch the weights
        a, b = (train(args.name, Path(tmp) / run, extra) for run in ("a", "b"))
    if a != b:
        print(f"{args.name}: the first {args.prefix} steps gave two different files ({a} and {b}): this machine "
              "does not train deterministically with this recipe", file=sys.stderr)
        return 1
    print(f"{args.name}: the first {args.prefix} steps twice gave the same file")
    recorded = recipe["prefix"]["sha256"] if recipe["prefix"]["steps"] == args.prefix else None
    return 0 if verdict(f"{args.name} first {args.prefix} steps", a, recorded) else 1


if __name__ == "__main__":
    sys.exit(main())
