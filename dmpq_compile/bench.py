"""Side-by-side benchmarks of compiled artifacts: speed, memory, energy estimate and quality.

Every artifact is loaded once and measured in interleaved rounds (artifact order rotates each
round), so slow drift of a shared machine hits all of them alike; results are reported as
ratios to the first artifact. Per artifact:

* prefill tokens/s on ``prefill_tokens`` real text tokens (batch 1), asking for the last position's
  logits only, as generation does (``logits_to_keep=1``; artifacts compiled before that input compute
  every position, and the row says so: ``prefill_logits``),
* decode ms/token (batch 1, KV cache, greedy continuation of the prefill): the mean time per token over
  all rounds' decode steps (``decode_ms``; llama-bench's statistic), with the median step
  (``decode_median_ms``) and its IQR beside it,
* peak RSS of a fresh process that loads the artifact and runs one prefill + decode,
* weight bytes (model files) and expected weight bytes *read* per decoded token (non-expert
  weights + each expert's bytes times its routing frequency; the embedding reads one row),
* achieved bandwidth = bytes read per token / decode time,
* energy per decoded token, estimated with :mod:`dmpq_compile.backends.cost`'s energy model,
* perplexity measured on the artifact itself under the evaluation protocol (docs/evaluation.md): on
  each set (default: the test split of pydoc and of pystdlib), with a 95 % bootstrap interval over
  documents and the paired ratio to the first artifact's perplexity.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import DATA_FILE, MODEL_FILE
from .runtime.manifest import MANIFEST_NAME, ArtifactError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    prefill_tokens: int = 128
    decode_tokens: int = 32
    rounds: int = 3
    threads: int | None = None
    corpus: str | None = "pydoc"  # None: random token ids for speed, no perplexity
    split: str = "auto"  # auto: test of a built-in domain, all of a user's corpus
    quality: tuple[str, ...] | None = None  # sets scored for perplexity (None: corpus alone, or both domains for pydoc)
    windows: int = 64  # protocol windows per set
    context: int = 256
    max_doc_share: float = 0.15
    rss: bool = True

    def quality_sets(self) -> tuple[str, ...]:
        if self.corpus is None:
            return ()
        if self.quality is not None:
            return self.quality
        from .eval import DOMAINS

        return DOMAINS if self.corpus in DOMAINS else (self.corpus,)


@dataclass
class WeightStats:
    file_bytes: int
    read_bytes_per_token: float
    macs_int8: float
    macs_fp32: float


def weight_stats(path: Path, manifest: Mapping[str, Any], freqs: Mapping[str, float]) -> WeightStats:
    """Bytes on disk and expected bytes/MACs read per decoded token.

    Which initializers hold which expert, and each expert's bytes, come from the manifest
    (``experts[id].tensors`` / ``.bytes``, written by the emitter or the baseline packager), never
    from initializer names. Per token, an expert counts with its routing frequency (``freqs``,
    expert id -> frequency), a table read only through ``Gather`` (the embedding) with one row,
    and any other weight in full. MACs: ``K x N`` of every ``MatMulNBits`` (int8), elements of
    every other 2-D fp32 weight (fp32).

    Raises:
        ArtifactError: the manifest does not list its experts' tensors (written before they were
            recorded); re-create the artifact.
    """
    import onnx

    from .backends.onnx_io import tensor_bytes

    experts = manifest.get("experts") or {}
    if any("tensors" not in e or "bytes" not in e for e in experts.values()):
        raise ArtifactError(f"{path / MANIFEST_NAME} does not list each expert's tensors and bytes (an artifact "
                            "written before the manifest recorded them); re-create it to bench its bytes read")
    owner: dict[str, list[str]] = {}  # a fused MoE op's tensor belongs to every expert it stacks
    for key, e in experts.items():
        for name in e["tensors"]:
            owner.setdefault(name, []).append(key)
    model = onnx.load(str(path / manifest["target"].get("model_file", MODEL_FILE)), load_external_data=False)
    files = sum(f.stat().st_size for f in path.iterdir() if f.name in (MODEL_FILE, DATA_FILE))
    nbits, rows = _matmulnbits_weights(model.graph, {k: len(v) for k, v in owner.items()}), _gathered_tables(model.graph)
    read = sum(freqs.get(key, 0.0) * e["bytes"] for key, e in experts.items())
    int8, fp32 = 0.0, 0.0
    for init in model.graph.initializer:
        if init.name in owner:  # per token: its experts' frequencies, each over its share of the tensor
            share = sum(freqs.get(k, 0.0) for k in owner[init.name]) / len(owner[init.name])
        else:
            share = 1.0 / max(1, init.dims[0]) if init.name in rows and init.dims else 1.0  # one row per token
            read += share * tensor_bytes(init)
        if init.name in nbits:  # packed codes of any layout (2-D or 3-D): count logical weights K x N
            int8 += share * nbits[init.name]
        elif init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2:
            fp32 += share * int(np.prod(init.dims))
    return WeightStats(files, read, int8, fp32)


def _subgraph_nodes(graph: Any) -> Any:
    """Every node of ``graph`` and of its subgraphs (``If`` branches)."""
    graphs = [graph]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
            yield node


def _matmulnbits_weights(graph: Any, held: Mapping[str, int]) -> dict[str, int]:
    """``{B initializer: K * N}`` of every ``MatMulNBits`` and ``PanelMatMul`` node, subgraphs (``If``
    branches) included, ``{fc1/fc2 codes: E * N * K}`` of every ``QMoE`` node and ``{codes: n * 3 * hidden
    * inter}`` of every ``MixedMoE`` node whose codes ``n`` experts share (``held``: initializer -> how many
    experts the manifest lists as holding it).

    Read from the node's ``K``/``N`` attributes, so dmpq-compile's and onnxruntime's quantizer's
    weights count alike whatever their packing.
    """
    out = {}
    dims = {t.name: list(t.dims) for t in graph.initializer}
    for node in _subgraph_nodes(graph):
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type in ("MatMulNBits", "PanelMatMul"):
            out[node.input[1]] = int(attrs["K"]) * int(attrs["N"])
        elif node.op_type == "MixedMoE" and held.get(node.input[3]):  # codes: every expert's gate, up, down
            out[node.input[3]] = held[node.input[3]] * 3 * int(attrs["hidden"]) * int(attrs["inter"])
        elif node.op_type == "QMoE":  # fc1 / fc2 codes [E, N, K * bits / 8]: E x N x K weights
            for i in (2, 5):
                if node.input[i] in dims:
                    e, n, packed = dims[node.input[i]]
                    out[node.input[i]] = e * n * packed * 8 // int(attrs["expert_weight_bits"])
    return out


def _gathered_tables(graph: Any) -> set[str]:
    """Initializers whose every use is as a table of a ``Gather`` (input 0) or of a quantized
    ``GatherBlockQuantized`` (codes, scales and zero points: inputs 0, 2, 3): an embedding, of which
    a token reads one row. A table also used by a MatMul/Gemm (a tied lm_head) is read in full."""
    tables = {"Gather": (0,), "GatherBlockQuantized": (0, 2, 3)}
    gathered, other = set(), set()
    for node in _subgraph_nodes(graph):
        for i, name in enumerate(node.input):
            (gathered if i in tables.get(node.op_type, ()) else other).add(name)
    return gathered - other


def open_artifact(path: Path, threads: int | None = None) -> Any:
    """A session for any artifact: the ONNX Runtime session, or the TensorRT engine of a trt-a100 one.

    A trt-a100 artifact runs only through its built engine (``dmpq-compile build``) on a CUDA GPU
    with TensorRT; without them the error says so.
    """
    from .runtime import load
    from .runtime.manifest import load_manifest

    manifest = load_manifest(path, verify=False)
    if manifest["target"].get("backend") == "trt-a100":
        if not manifest["target"].get("engine"):
            raise RuntimeError(f"{path} is a trt-a100 artifact without an engine: build it on a GPU machine with "
                               f"`dmpq-compile build {path}` (needs TensorRT), then bench it there")
        from .engine import open_engine

        return open_engine(path)
    return load(path, threads=threads)


def _rss_probe(path: Path, cfg: BenchConfig, ids: list[int]) -> float:
    """Peak RSS (MiB) of a fresh process that loads ``path`` and runs one prefill + decode."""
    code = (
        "import json,sys\n"
        "from dmpq_compile.runtime import load\n"
        "a=json.loads(sys.argv[2]); m=load(sys.argv[1], threads=a['threads'])\n"
        "lo,past=m.forward([a['ids']],logits_to_keep=1)\n"
        "for _ in range(a['decode']):\n"
        "    lo,past=m.forward([[int(lo[0,-1].argmax())]],past)\n"
        "from dmpq_compile.sysinfo import peak_rss_mb\n"  # VmHWM: ru_maxrss carries the parent's over
        "print(peak_rss_mb())\n")
    arg = json.dumps({"ids": ids, "decode": cfg.decode_tokens, "threads": cfg.threads})
    res = subprocess.run([sys.executable, "-c", code, str(path), arg], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"RSS probe of {path} failed: {res.stderr.strip()[-500:]}")
    return float(res.stdout.strip().splitlines()[-1])


def _time_one(session: Any, ids: np.ndarray, decode_tokens: int) -> tuple[float, list[float]]:
    # what generation does: a KV buffer for the prompt and every new token (decode steps write in
    # place), and only the prefill's last logits
    past = session.empty_cache(ids.shape[0], capacity=ids.shape[1] + decode_tokens) \
        if hasattr(session, "empty_cache") else None
    t0 = time.perf_counter()
    logits, past = session.forward(ids, past, logits_to_keep=1)
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(decode_tokens):
        nxt = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)  # numpy or CUDA tensor logits
        t0 = time.perf_counter()
        logits, past = session.forward(nxt, past)
        steps.append(time.perf_counter() - t0)
    return prefill, steps


def _token_stream(path: Path, cfg: BenchConfig, n: int) -> np.ndarray:
    from tokenizers import Tokenizer

    if cfg.corpus is None:
        vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size() if (
            path / "tokenizer.json").is_file() else 1000
        return np.random.default_rng(0).integers(0, vocab, n)
    from .eval import load_corpus, resolve_split, tokenize_corpus
    from .eval.tokens import eos_token

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    split = resolve_split(cfg.corpus, cfg.split, "test")
    return tokenize_corpus(load_corpus(cfg.corpus, split), tok, separator=eos_token(tok), max_tokens=n)


def bench(paths: list[str | Path], cfg: BenchConfig = BenchConfig(), progress: bool = True) -> list[dict]:
    """Measure every artifact (interleaved) and return one result dict per artifact."""
    from tqdm.auto import tqdm

    paths = [Path(p) for p in paths]
    sessions = [open_artifact(p, cfg.threads) for p in paths]
    stream = _token_stream(paths[0], cfg, cfg.prefill_tokens)
    prompt = stream[: cfg.prefill_tokens][None, :].astype(np.int64)
    for s in sessions:  # warm-up: first-run allocations and kernel selection
        _time_one(s, prompt, 2)
    prefill = [[] for _ in paths]
    decode = [[] for _ in paths]
    bar = tqdm(total=cfg.rounds * len(paths), desc="bench", disable=not progress, leave=False)
    for r in range(cfg.rounds):
        order = [(i + r) % len(paths) for i in range(len(paths))]
        for i in order:
            p, steps = _time_one(sessions[i], prompt, cfg.decode_tokens)
            prefill[i].append(p)
            decode[i].extend(steps)
            bar.update(1)
    bar.close()
    results = []
    for i, path in enumerate(paths):
        results.append(_summarise(path, sessions[i], cfg, prefill[i], decode[i], prompt))
    if cfg.quality_sets():
        _quality(paths, sessions, cfg, results, progress)
    return results


def expert_frequencies(path: Path) -> dict[str, float]:
    """Each expert's routing frequency in the compile's calibration (the artifact's report.json): what
    :func:`weight_stats` weighs its bytes by; {} for an artifact without a report."""
    report = json.loads((path / "report.json").read_text()) if (path / "report.json").is_file() else {}
    return {row["id"]: row.get("freq", 0.0) for row in report.get("experts", [])}


def _summarise(path: Path, session: Any, cfg: BenchConfig, prefill: list[float], decode: list[float],
               prompt: np.ndarray) -> dict:
    from .backends.cost import energy_mj, mac_ops, merge_ops

    freqs = expert_frequencies(path)
    decode_ms = statistics.fmean(decode) * 1e3  # llama-bench's statistic: the mean time a token
    out = {
        "artifact": str(path),
        "label": path.name,
        "prefill_tok_s": cfg.prefill_tokens / statistics.median(prefill),
        "prefill_logits": "last" if session.keeps_logits else "all",
        "decode_ms": decode_ms,
        "decode_mean_ms": decode_ms,  # the same figure under its explicit name (bench_llamacpp reads it)
        "decode_median_ms": statistics.median(decode) * 1e3,
        "decode_ms_iqr": float(np.subtract(*np.percentile(decode, [75, 25])) * 1e3),
        "bits_histogram": session.manifest.get("quantization", {}).get("bits_histogram"),
    }
    try:
        ws = weight_stats(path, session.manifest, freqs)
    except ArtifactError as e:
        log.warning("%s: no bytes read, bandwidth or energy figures: %s", path, e)
    else:
        ops = merge_ops(mac_ops(ws.macs_int8, "int8_mul", "int32_add"),
                        mac_ops(ws.macs_fp32, "fp32_mul", "fp32_add"))
        out.update({"weight_bytes": ws.file_bytes, "read_bytes_per_token": ws.read_bytes_per_token,
                    "bandwidth_gb_s": ws.read_bytes_per_token / (decode_ms * 1e-3) / 1e9,
                    "energy_mj_per_token": energy_mj(ws.read_bytes_per_token, ops)})
    if cfg.rss and session.manifest["target"].get("backend") != "trt-a100":  # GPU memory is not RSS
        out["peak_rss_mb"] = _rss_probe(path, cfg, prompt[0].tolist())
    return out


def _quality(paths: list[Path], sessions: list[Any], cfg: BenchConfig, results: list[dict], progress: bool) -> None:
    """Perplexity of every artifact on every quality set under the protocol, with intervals and the paired
    ratio to the first artifact (artifacts of one model share its tokenizer: checked)."""
    from tokenizers import Tokenizer

    from .eval import DocBootstrap, NumpyLogits, eval_windows, score, summarize
    from .eval.corpus import resolve_split

    texts = {(p / "tokenizer.json").read_text() if (p / "tokenizer.json").is_file() else None for p in paths}
    if len(texts) != 1 or None in texts:
        raise ValueError("bench's perplexity needs artifacts with one and the same tokenizer.json (of one model); "
                         "pass --corpus none to time artifacts of different models")
    tok = Tokenizer.from_file(str(paths[0] / "tokenizer.json"))
    limits = [getattr(s, "max_positions", None) for s in sessions]  # windows never run past a model's context
    context = min([cfg.context, *[lim for lim in limits if lim]])
    context -= context % 2
    for spec in cfg.quality_sets():
        windows = eval_windows(spec, resolve_split(spec, cfg.split, "test"), tok, context=context,
                               max_windows=cfg.windows, max_share=cfg.max_doc_share)
        scores = {r["label"] + f"#{i}": score(NumpyLogits(s.logits), windows, progress=progress)
                  for i, (r, s) in enumerate(zip(results, sessions))}
        boot = DocBootstrap(windows)
        summary = summarize(windows, scores, baseline=next(iter(scores)), boot=boot)
        for r, q in zip(results, summary.values()):
            r.setdefault("quality", {})[windows.name] = {**q, "set": windows.record(), "bootstrap": boot.record()}
    first = results[0].get("quality", {})
    if first:  # the first set's perplexity is the table's ppl column
        name = next(iter(first))
        for r in results:
            r["ppl"] = r["quality"][name]["ppl"]["value"]
            r["ppl_set"] = name


STATISTICS = {"prefill_tok_s": "prefill tokens / median prefill time over rounds",
              "decode_ms": "mean time per decoded token over all rounds' steps (llama-bench's statistic)",
              "decode_median_ms": "median decode step", "ppl": "protocol perplexity (docs/evaluation.md)"}
METRICS = (("prefill_tok_s", "prefill tok/s", "{:.1f}"), ("decode_ms", "decode ms/tok (mean)", "{:.3f}"),
           ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("weight_bytes", "weight MB", "{:.2f}"),
           ("bandwidth_gb_s", "GB/s", "{:.2f}"), ("energy_mj_per_token", "mJ/tok", "{:.3f}"),
           ("ppl", "ppl", "{:.3f}"))


def format_results(results: list[dict]) -> str:
    """A table with absolute values and ratios to the first artifact, then one line per artifact and quality
    set: perplexity and its paired ratio to the first artifact's, with 95% bootstrap intervals."""
    from .eval.protocol import format_interval

    base = results[0]
    head = ["artifact"] + [h for key, h, _ in METRICS if key in base]
    lines = ["  ".join(f"{h:>16}" for h in head)]
    for r in results:
        cells = [f"{r['label'][:16]:>16}"]
        for key, _, fmt in METRICS:
            if key not in base:
                continue
            v = r.get(key)
            if v is None:
                cells.append(f"{'-':>16}")
                continue
            shown = v / 2**20 if key == "weight_bytes" else v
            ratio = v / base[key] if base.get(key) else float("nan")
            cells.append(f"{fmt.format(shown) + f' ({ratio:.2f}x)':>16}")
        lines.append("  ".join(cells))
    if "ppl_set" in base:
        lines.append(f"ppl: {base['ppl_set']}; per set, with 95% bootstrap intervals over documents (ratios paired):")
    for r in results:
        for name, q in (r.get("quality") or {}).items():
            ratio = f"  ppl/ppl({base['label']}) {format_interval(q['ppl_ratio'], '{:.4f}')}" if "ppl_ratio" in q else ""
            lines.append(f"  {r['label'][:24]:>24}  {name:<14} ppl {format_interval(q['ppl'], '{:.3f}')}{ratio}  "
                         f"({q['set']['windows']} windows, {q['set']['documents']} documents)")
    return "\n".join(lines)


def to_json(results: list[dict], cfg: BenchConfig) -> dict:
    return {"config": asdict(cfg), "machine": machine(), "statistics": STATISTICS, "results": results}


def write_results(out: Path | None, folder: Path, stem: str, script: str, args: Any, rows: list, **fields: Any) -> Path:
    """Write a benchmark script's results: ``{"command": "python SCRIPT ARGV...", **fields, "args", "rows"}`` as
    indented JSON at ``out`` (default ``folder/STEM-YYYYmmdd-HHMMSS.json``), its folder made; prints and returns
    the path. ``args``: the script's parsed arguments (written as strings)."""
    out = out or folder / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", script, *sys.argv[1:]]), **fields,
                               "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return out


def machine() -> dict:
    """What a timing depends on: CPU model, its SIMD flags (AVX2-only and AVX-512 VNNI machines differ),
    the CPUs this process may use, the load average, Python."""
    import os
    import platform

    from .sysinfo import available_cpus, cpu_flags, cpu_model

    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpus": available_cpus(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version()}


def _cpu() -> str:
    """CPU model and SIMD flags in one line (printed by the benchmark scripts)."""
    m = machine()
    return f"{m['cpu']} ({' '.join(m['cpu_flags']) or 'flags unknown'})"
