"""llama.cpp as a peer: locate a build, register a pre-tokenizer, convert, quantize, measure, parse.

Used by ``bench_llamacpp.py``; nothing here imports onnxruntime or the compiler. The pure parts
(pre-tokenizer registration on the converter's source text, bits per weight, output parsing)
are tested in ``tests/test_bench_llamacpp.py``; the rest runs llama.cpp's own tools.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-tokenize")
BUILD_HELP = """\
Build llama.cpp from the source vendored in llama-cpp-python's sdist (package registry only):

  pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llcpp
  tar xzf /tmp/llcpp/llama_cpp_python-*.tar.gz -C /tmp/llcpp
  cd /tmp/llcpp/llama_cpp_python-*/vendor/llama.cpp
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \\
        -DBUILD_SHARED_LIBS=OFF
  nice -n 19 cmake --build build --config Release -j2 \\
        --target llama-quantize llama-imatrix llama-perplexity llama-bench llama-tokenize
  pip install 'sentencepiece>=0.1.98,<0.3.0'   # convert_hf_to_gguf.py imports it for Llama-family models

then pass --llama-cpp /tmp/llcpp/llama_cpp_python-*/vendor/llama.cpp/build."""
# Where the converter keeps get_vocab_base_pre (conversion/base.py since the converter was split up).
CONVERTER_FILES = ("conversion/base.py", "convert_hf_to_gguf.py")
MARKER_END = "# Marker: End get_vocab_base_pre"


class LlamaCppError(RuntimeError):
    """llama.cpp is missing, incomplete or failed; the message says what to do."""


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp build: its source tree (converter, gguf-py) and the folder of its tools."""

    source: Path
    bin: Path

    def tool(self, name: str) -> str:
        return str(self.bin / name)

    def converter_file(self) -> Path:
        """The file holding ``get_vocab_base_pre`` (where pre-tokenizer hashes are registered)."""
        for rel in CONVERTER_FILES:
            path = self.source / rel
            if path.is_file() and "def get_vocab_base_pre" in path.read_text(encoding="utf-8"):
                return path
        raise LlamaCppError(f"no get_vocab_base_pre in {', '.join(CONVERTER_FILES)} under {self.source}: "
                            "an unsupported llama.cpp version")


def find_llama_cpp(build_dir: str | Path) -> LlamaCpp:
    """The build in ``build_dir`` (a cmake build folder) and its source tree (from ``CMakeCache.txt``).

    Raises:
        LlamaCppError: the folder, its cache or one of :data:`TOOLS` is missing (with how to build).
    """
    build = Path(build_dir).resolve()
    cache = build / "CMakeCache.txt"
    if not cache.is_file():
        raise LlamaCppError(f"{build} is not a cmake build folder of llama.cpp (no CMakeCache.txt).\n{BUILD_HELP}")
    match = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.+)$", cache.read_text(), re.MULTILINE)
    source = Path(match.group(1)) if match else build.parent
    missing = [t for t in TOOLS if not (build / "bin" / t).is_file()]
    if missing:
        raise LlamaCppError(f"{build / 'bin'} lacks {', '.join(missing)}: build them.\n{BUILD_HELP}")
    if not (source / "convert_hf_to_gguf.py").is_file():
        raise LlamaCppError(f"{source} (the build's source tree) has no convert_hf_to_gguf.py")
    return LlamaCpp(source=source, bin=build / "bin")


# -- pre-tokenizer registration ----------------------------------------------------------------
def checker_text(converter_source: str) -> str:
    """The string ``get_vocab_base_pre`` encodes and hashes (its ``chktxt``), read from the source."""
    for node in ast.walk(ast.parse(converter_source)):
        if isinstance(node, ast.FunctionDef) and node.name == "get_vocab_base_pre":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "chktxt" for t in stmt.targets):
                    return ast.literal_eval(stmt.value)
    raise LlamaCppError("get_vocab_base_pre has no `chktxt = ...` assignment: an unsupported llama.cpp version")


def pre_tokenizer_hash(token_ids: Iterable[int]) -> str:
    """The converter's identifier of a pre-tokenizer: sha256 of ``str(list of ids of chktxt)``."""
    return sha256(str(list(token_ids)).encode()).hexdigest()


def llama_pre_name(tokenizer_json: Mapping[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a Hugging Face ``tokenizer.json``, when one reproduces it exactly.

    Only the byte-level BPE with GPT-2's split regex and no normalizer is mapped (to ``gpt-2``),
    which is what the project's samples use; anything else is refused rather than approximated.

    Raises:
        LlamaCppError: no llama.cpp pre-tokenizer is known to match.
    """
    pre, norm = tokenizer_json.get("pre_tokenizer") or {}, tokenizer_json.get("normalizer")
    model = tokenizer_json.get("model") or {}
    if (model.get("type") == "BPE" and norm is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)):
        return "gpt-2"
    raise LlamaCppError(f"no llama.cpp pre-tokenizer known to match model {model.get('type')}, normalizer {norm}, "
                        f"pre_tokenizer {pre}; register one by hand (convert_hf_to_gguf_update.py)")


def register_pre_tokenizer(converter_source: str, chkhsh: str, name: str, ref: str) -> str:
    """``converter_source`` with ``chkhsh -> name`` registered in ``get_vocab_base_pre``.

    Inserts the same three lines that ``convert_hf_to_gguf_update.py`` generates for a model
    (``if chkhsh == ...: # ref: ...; res = name``) just before the ``if res is None:`` check of
    the generated block. Idempotent: a hash already present is left as it is (whatever it maps to).

    Raises:
        LlamaCppError: the generated block's end marker or its ``if res is None:`` is not found.
    """
    if f'if chkhsh == "{chkhsh}":' in converter_source:
        return converter_source
    end = converter_source.find(MARKER_END)
    check = converter_source.rfind("        if res is None:", 0, end)
    if end < 0 or check < 0:
        raise LlamaCppError(f"the converter has no '{MARKER_END}' block ending in `if res is None:`")
    block = f'        if chkhsh == "{chkhsh}":\n            # ref: {ref}\n            res = "{name}"\n\n'
    return converter_source[:check] + block + converter_source[check:]


def ensure_pre_tokenizer(llama: LlamaCpp, model_dir: Path) -> dict[str, str]:
    """Register ``model_dir``'s pre-tokenizer in the build's converter (a no-op when already there)."""
    from transformers import AutoTokenizer

    path = llama.converter_file()
    text = path.read_text(encoding="utf-8")
    name = llama_pre_name(json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")))
    chkhsh = pre_tokenizer_hash(AutoTokenizer.from_pretrained(model_dir).encode(checker_text(text)))
    new = register_pre_tokenizer(text, chkhsh, name, f"{model_dir} (registered by dmpq-compile bench_llamacpp.py)")
    if new != text:
        path.write_text(new, encoding="utf-8")
    return {"chkhsh": chkhsh, "name": name, "file": str(path)}


# -- sizes ---------------------------------------------------------------------------------------
def stored_bpw(nbytes: float, params: int) -> float:
    """Stored bits per weight: ``bytes * 8 / parameters``."""
    if params <= 0:
        raise ValueError(f"parameters must be positive, got {params}")
    return nbytes * 8 / params


def is_hf_expert(name: str) -> bool:
    """A routed expert's weight in a Hugging Face MoE checkpoint (not the router, not a shared expert)."""
    return ".experts." in name and "shared_expert" not in name


def is_gguf_expert(name: str) -> bool:
    """A routed expert tensor in a GGUF file (``blk.N.ffn_{gate,up,down}_exps.weight``)."""
    return "_exps." in name


def safetensors_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every tensor of a checkpoint, read from the safetensors headers only."""
    shapes = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    if not shapes:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors")
    return shapes


def count_params(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    """(all parameters, routed expert parameters) of a checkpoint's ``{name: shape}``."""
    def n(shape: tuple[int, ...]) -> int:
        out = 1
        for d in shape:
            out *= d
        return out

    return sum(n(s) for s in shapes.values()), sum(n(s) for k, s in shapes.items() if is_hf_expert(k))


def gguf_tensors(llama: LlamaCpp, path: Path) -> dict[str, dict[str, Any]]:
    """``{name: {elements, bytes, type, rows}}`` of a GGUF file, read with the build's own gguf-py (rows: the
    elements over the first, innermost dimension's; the embedding's rows are its vocabulary)."""
    sys.path.insert(0, str(llama.source / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    reader = GGUFReader(str(path))
    return {t.name: {"elements": int(t.n_elements), "bytes": int(t.n_bytes), "type": t.tensor_type.name,
                     "rows": int(t.n_elements) // max(1, int(t.shape[0]))} for t in reader.tensors}


# -- running the tools ---------------------------------------------------------------------------
def run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a llama.cpp tool; its stdout+stderr, or an error quoting the end of its output."""
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=False)
    out = res.stdout + res.stderr
    if res.returncode != 0:
        raise LlamaCppError(f"{what} failed ({res.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return out


def parse_bench_json(text: str) -> dict[str, float]:
    """``{"prefill_tok_s" | "decode_ms": value}`` from ``llama-bench -o json`` output (mean of its reps)."""
    start = text.find("[")
    rows = json.loads(text[start:text.rfind("]") + 1]) if start >= 0 else []
    out = {}
    for row in rows:
        if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
            out["prefill_tok_s"] = float(row["avg_ts"])
        elif row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
            out["decode_ms"] = 1e3 / float(row["avg_ts"])
    if not out:
        raise LlamaCppError(f"no pp/tg rows in llama-bench output: {text[-500:]}")
    return out


_FLOAT = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"


def parse_perplexity(text: str) -> dict[str, float]:
    """Perplexity and KL figures from ``llama-perplexity`` output (base run or ``--kl-divergence``)."""
    patterns = {"ppl": rf"Final estimate: PPL = {_FLOAT}", "ppl_q": rf"Mean PPL\(Q\)\s*:\s*{_FLOAT}",
                "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_FLOAT}", "kl": rf"Mean\s+KLD:\s*{_FLOAT}",
                "top1_vs_base": rf"Same top p:\s*{_FLOAT}"}
    out = {k: float(m.group(1)) for k, p in patterns.items() if (m := re.search(p, text))}
    if "ppl" not in out and "ppl_q" in out:
        out["ppl"] = out["ppl_q"]
    if "top1_vs_base" in out:
        out["top1_vs_base"] /= 100.0  # printed as a percentage
    if "ppl" not in out:
        raise LlamaCppError(f"no perplexity in llama-perplexity output: {text[-800:]}")
    return out


def run_perplexity(cmd: list[str], what: str, tries: int = 5, log_file: Path | None = None,
                   pause: float = 1.0) -> dict[str, float]:
    """Run ``llama-perplexity`` and parse its figures, running it again (up to ``tries`` times in all)
    when they are missing: on a loaded machine it often exits 0 before its final lines reach the pipe.

    With ``log_file``, the tool also writes its log there (``--log-file``) and the figures are read from
    the pipe's output or from that file, whichever holds them.

    Raises:
        LlamaCppError: no try produced the figures (the message names the tries and quotes the output).
    """
    out = ""
    for attempt in range(1, tries + 1):
        full = [*cmd, "--log-file", str(log_file)] if log_file is not None else cmd
        if log_file is not None:
            log_file.unlink(missing_ok=True)
        out = run(full, what)
        for text in (out, _read_log(log_file)):
            try:
                return parse_perplexity(text)
            except LlamaCppError:
                pass
        print(f"  {what}: no figures in its output (try {attempt} of {tries}); running it again", flush=True)
        time.sleep(pause)
    raise LlamaCppError(f"{what}: no perplexity in llama-perplexity's output after {tries} tries (it exits 0 "
                        f"before its last lines are written on a loaded machine); last output: {out[-800:]}")


def run_logprobs(cmd: list[str], what: str, out_file: Path, tries: int = 5, pause: float = 1.0) -> dict[str, float]:
    """Run ``llama-perplexity ... --kl-divergence-base OUT_FILE`` until ``out_file`` is complete (at most
    ``tries`` runs); the per-token log-probabilities are read from that file, not from the pipe. Returns
    the figures it printed when they reached the pipe or its log (a cross-check), else ``{}``.

    Raises:
        LlamaCppError: the tool failed (non-zero exit: not retried), or no run wrote a complete file (the
            message names the tries and quotes the output).
    """
    out, why = "", ""
    log_file = out_file.with_suffix(out_file.suffix + ".log")
    for attempt in range(1, tries + 1):
        out_file.unlink(missing_ok=True)
        log_file.unlink(missing_ok=True)
        out = run([*cmd, "--kl-divergence-base", str(out_file), "--log-file", str(log_file)], what)  # failed: raised
        try:
            read_logprobs_header(out_file)
        except LlamaCppError as e:  # exited 0 before the end of its work reached the disk: run it again
            why = str(e)
            print(f"  {what}: try {attempt} of {tries} failed ({why.splitlines()[0][:200]}); running it again",
                  flush=True)
            time.sleep(pause)
            continue
        for text in (out, _read_log(log_file)):
            try:
                return parse_perplexity(text)
            except LlamaCppError:
                pass
        return {}
    raise LlamaCppError(f"{what}: no complete log-probability file after {tries} tries: {why[-1500:]}\n"
                        f"last output: {out[-800:]}")


def _read_log(path: Path | None) -> str:
    if path is None or not path.is_file():
        return ""
    for _ in range(10):  # the log thread may still be flushing when the process has exited
        text = path.read_text(errors="replace")
        if "Final estimate" in text or "Mean    KLD" in text:
            return text
        time.sleep(0.2)
    return path.read_text(errors="replace")


# -- llama-perplexity's log-probability files (--kl-divergence-base) ------------------------------
LOGITS_MAGIC = b"_logits_"


def logprob_row_width(n_vocab: int) -> int:
    """uint16 words one scored position takes: two float32 (scale, min log-prob) and ``n_vocab`` codes, padded."""
    return 2 * ((n_vocab + 1) // 2) + 4


def logprobs_file_size(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    """Bytes of a complete file for ``n_chunk`` chunks (header, tokens, ``n_ctx - 1 - n_ctx/2`` rows a chunk)."""
    scored = n_ctx - 1 - n_ctx // 2
    return 8 + 4 + 4 + 4 + 4 * n_ctx * n_chunk + 2 * logprob_row_width(n_vocab) * scored * n_chunk


def read_logprobs_header(path: Path) -> tuple[int, int, int, np.ndarray]:
    """``(n_ctx, n_vocab, n_chunk, tokens [n_chunk, n_ctx])`` of a ``--kl-divergence-base`` file.

    Raises:
        LlamaCppError: no such file, not such a file, or cut short (the tool stopped before writing every chunk).
    """
    if not path.is_file():
        raise LlamaCppError(f"{path} was not written: llama-perplexity stopped before writing its log-probabilities")
    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20 or head[:8] != LOGITS_MAGIC:
            raise LlamaCppError(f"{path} is not a llama-perplexity log-probability file (no '_logits_' header)")
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:20])
        tokens = np.fromfile(f, dtype="<i4", count=n_ctx * n_chunk)
    size, want = path.stat().st_size, logprobs_file_size(n_ctx, n_vocab, n_chunk)
    if size != want or tokens.size != n_ctx * n_chunk:
        raise LlamaCppError(f"{path} holds {size} bytes, a complete file of {n_chunk} chunks of {n_ctx} tokens "
                            f"(vocabulary {n_vocab}) {want}: llama-perplexity stopped before the end")
    return n_ctx, n_vocab, n_chunk, tokens.reshape(n_chunk, n_ctx).astype(np.int64)


def iter_logprobs(path: Path, batch: int = 4) -> Iterator[np.ndarray]:
    """The stored log-probabilities, ``float64 [<=batch, n_ctx - 1 - n_ctx/2, n_vocab]`` per step, chunk order.

    Row ``i`` of a chunk is position ``n_ctx/2 + i``'s distribution over the next token (llama.cpp
    stores ``min_log_prob + code * scale``; codes are 16-bit, so values carry an error of at most
    ``scale / 2`` = 1.2e-4 nats and values below ``max - 16`` are clipped there).
    """
    n_ctx, n_vocab, n_chunk, _ = read_logprobs_header(path)
    scored, width = n_ctx - 1 - n_ctx // 2, logprob_row_width(n_vocab)
    offset = 20 + 4 * n_ctx * n_chunk
    data = np.memmap(path, dtype="<u2", mode="r", offset=offset, shape=(n_chunk, scored, width))
    for i in range(0, n_chunk, batch):
        rows = np.asarray(data[i:i + batch])
        head = rows[..., :4].copy().view("<f4")  # [b, scored, 2]: scale, min log-prob
        codes = rows[..., 4:4 + n_vocab].astype(np.float64)
        yield head[..., 1:2].astype(np.float64) + codes * head[..., 0:1].astype(np.float64)


def write_logprobs_file(path: Path, tokens: np.ndarray, logprobs: Iterable[np.ndarray]) -> None:
    """Write a ``--kl-divergence-base`` file from ``tokens [n_chunk, n_ctx]`` and log-probabilities
    ``[n_ctx - 1 - n_ctx/2, n_vocab]`` per chunk, as llama-perplexity writes it: ``llama-perplexity
    --kl-divergence`` then measures a GGUF against these (e.g. another tool's fp32 reference)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n_chunk, n_ctx = tokens.shape
    with open(path, "wb") as f:
        f.write(LOGITS_MAGIC + struct.pack("<I", n_ctx))
        n_vocab = None
        for i, lp in enumerate(logprobs):
            lp = np.asarray(lp, dtype=np.float64)
            if n_vocab is None:
                n_vocab = lp.shape[-1]
                f.write(struct.pack("<ii", n_vocab, n_chunk))
                f.write(tokens.astype("<i4").tobytes())
            f.write(_encode_logprobs(lp, n_vocab).tobytes())
        if n_vocab is None or i + 1 != n_chunk:
            raise ValueError(f"write_logprobs_file: {n_chunk} chunks of tokens but log-probabilities for "
                             f"{0 if n_vocab is None else i + 1}")


def _encode_logprobs(lp: np.ndarray, n_vocab: int) -> np.ndarray:
    """llama.cpp's 16-bit code of log-probabilities ``[rows, n_vocab]`` (``log_softmax`` in perplexity.cpp)."""
    top = lp.max(-1, keepdims=True)
    low = np.maximum(lp.min(-1, keepdims=True), top - 16)
    scale = ((top - low) / 65535.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.where(lp > low, np.rint((lp - low) / safe), 0).clip(0, 65535).astype("<u2")
    out = np.zeros((lp.shape[0], logprob_row_width(n_vocab)), dtype="<u2")
    head = np.concatenate([scale, low.astype(np.float32)], axis=-1).astype("<f4")
    out[:, :4] = head.view("<u2").reshape(lp.shape[0], 4)
    out[:, 4:4 + n_vocab] = codes
    return out


def parse_token_ids(text: str) -> list[int]:
    """Token ids from ``llama-tokenize --ids`` output (a Python-style list on the last list line)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("[") and ln.rstrip().endswith("]")]
    if not lines:
        raise LlamaCppError(f"no id list in llama-tokenize output: {text[-500:]}")
    return [int(x) for x in lines[-1].strip("[] \n").split(",") if x.strip()]
