"""Writing a deployable artifact folder, atomically.

Layout of ``out/``::

    manifest.json      format + version, source model and its config, target and backend fields,
                       per-expert bits / group size / method / quant spec and, where the
                       backend reports them, the expert's tensors in the model file and their
                       bytes; the non-expert nodes (attention, shared experts, MLPs, lm_head)
                       with the bits of the --nonexpert-bits policy, method and, when quantized,
                       tensors and bytes (``nonexpert``); the storage summary; tool versions,
                       sha256 + size of every other file, creation time
    report.json        the compile report (allocation, metrics) given by the caller
    model.onnx(.data)  whatever the backend emits
    tokenizer.json ... tokenizer files from the source checkpoint (JSON ones rewritten without
                       indentation: the same object, about 60 % fewer bytes); tokenizer_config.json
                       made what onnxruntime-genai needs (see _tokenizer_config_for_genai); the
                       manifest's ``tokenizer.chat_template`` names the source file of the chat
                       template (null: the checkpoint has none)

Everything is written into a temporary folder next to ``out`` and renamed into place only when
complete, so a crash or an error never leaves a half-written artifact under ``out``. That folder
(``.NAME.*.partial``) records its owner process; the next write to the same ``out`` removes the
ones whose owner is gone (a killed write).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .backends.base import Backend
from .fileio import default_modes
from .frontend.hf import CHAT_TEMPLATE_FILE, chat_template_source
from .ir.graph import NONEXPERT_QUANTIZABLE_KINDS, QUANT_ROLES, Graph
from .runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, REPORT_NAME, ArtifactError, file_entries
from .sysinfo import peak_rss_mb, reset_peak_rss

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("dmpq-compile", "onnx", "onnxruntime", "torch", "transformers")


def write_artifact(graph: Graph, backend: Backend, out: str | Path, report: Mapping[str, Any] | None = None,
                   overwrite: bool = False, emit_options: Mapping[str, Any] | None = None) -> Path:
    """Emit ``graph`` with ``backend`` into the artifact folder ``out`` and return its path.

    Args:
        graph: the annotated (and, for quantized experts, quantized) IR.
        backend: the target's :class:`Backend` instance.
        out: the folder to create.
        report: JSON-serialisable compile report, written to ``report.json``.
        overwrite: replace an existing ``out`` (only once the new artifact is complete).
        emit_options: keyword options for ``backend.emit``.

    Raises:
        ArtifactError: ``out`` exists (and ``overwrite`` is False) or is a file, a tokenizer
            file named by the graph is missing, or the report is not JSON-serialisable.
        BackendError: the backend cannot emit this graph.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a Backend instance, got {type(backend).__name__}")

    def emit(folder: Path) -> dict[str, Any]:
        backend.check_bits(graph)
        return backend.emit(graph, folder, **dict(emit_options or {}))

    return _write(graph, backend.name, emit, out, report, overwrite)


def write_prebuilt_artifact(graph: Graph, files: Iterable[str | Path], target: Mapping[str, Any],
                            out: str | Path, report: Mapping[str, Any] | None = None,
                            overwrite: bool = False) -> Path:
    """Package model files that another tool built (a peer baseline) as an artifact at ``out``.

    The files are moved (not copied) into the artifact; everything else is what
    :func:`write_artifact` writes: manifest, report, tokenizer, checksums, atomic rename.

    Args:
        graph: the IR of the same checkpoint, annotated with what the files hold (``bits``,
            ``quant`` spec and routing statistics per expert): the manifest describes it.
        files: the model files (e.g. ``model.onnx`` and ``model.onnx.data``); each lands at the
            artifact's top level under its own name.
        target: the manifest's ``target`` fields; ``target["backend"]`` names the runtime that
            runs the files (``"ort-cpu"``), and the rest says what they are (format, file names, I/O).
        out, report, overwrite: as for :func:`write_artifact`.

    Raises:
        ArtifactError: as for :func:`write_artifact`, or ``target`` names no backend, or a
            file is missing.
    """
    fields = dict(target)
    name = fields.pop("backend", None)
    if not isinstance(name, str) or not name:
        raise ArtifactError("target must name the backend whose runtime runs the files (target['backend'])")
    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ArtifactError(f"cannot package missing model files {missing}")

    def place(folder: Path) -> dict[str, Any]:
        for p in paths:
            shutil.move(str(p), str(folder / p.name))
        return fields

    return _write(graph, name, place, out, report, overwrite)


def _write(graph: Graph, backend_name: str, produce: Callable[[Path], Mapping[str, Any]], out: str | Path,
           report: Mapping[str, Any] | None, overwrite: bool) -> Path:
    """Write an artifact whose model files ``produce(folder)`` puts into ``folder`` (returning the
    manifest's target fields), in a temporary folder renamed to ``out`` only when complete."""
    out = Path(out)
    _check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_partial(out)
    try:
        file_mode, folder_mode = default_modes(tmp)
        reset_peak_rss()
        t0 = time.perf_counter()
        target = produce(tmp)
        storage = storage_summary(graph, target.get("expert_weights"), _model_bytes(tmp, target),
                                  target.get("nonexpert_weights"), target.get("weight_bytes"))
        report = {**dict(report or {}), "emit": {"seconds": round(time.perf_counter() - t0, 3),
                                                 "peak_rss_mb": round(peak_rss_mb(), 1)}, "storage": storage}
        tokenizer = _copy_tokenizer(graph, tmp)
        _write_json(tmp / REPORT_NAME, dict(report or {}), "report")
        (tmp / OWNER_FILE).unlink()  # the owner record is not part of the artifact
        manifest = build_manifest(graph, backend_name, target, tokenizer, file_entries(tmp))
        manifest["storage"] = storage
        _write_json(tmp / MANIFEST_NAME, manifest, "manifest")
        _set_modes(tmp, file_mode, folder_mode)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote artifact %s (%d files)", out, len(manifest["files"]))
    return out


def _model_bytes(folder: Path, target: Mapping[str, Any]) -> int:
    """Bytes of the model files the target fields name (``model_file``, ``external_data_file``), or of every
    file the backend wrote when they name none; runtime configs beside them (``genai_config.json``) are
    not the model."""
    names = [target.get(k) for k in ("model_file", "external_data_file") if target.get(k)]
    files = [folder / n for n in names] if names else \
        [f for f in folder.iterdir() if f.is_file() and f.name != OWNER_FILE]
    return sum(f.stat().st_size for f in files)


OWNER_FILE = ".dmpq-owner.json"  # inside a .partial folder while it is being written
_SCRATCH = r"\.{}\.[a-z0-9_]+{}"  # what mkdtemp(prefix='.NAME.', suffix=SUFFIX) makes
_UNOWNED_STALE_S = 24 * 3600  # a .partial without owner record (older versions) is stale after a day


def _new_partial(out: Path) -> Path:
    return scratch_folder(out, ".partial")


def scratch_folder(out: Path, suffix: str) -> Path:
    """A new ``.{out.name}.*{suffix}`` folder beside ``out`` that records its owner process
    (``.partial``: an artifact being written; ``.work``: a compile's scratch codes).

    Stale ones of the same name and kind go first: left by a killed process, their owner is gone
    (same host, and a dead pid, a reused pid or another boot). Others are never touched.
    """
    pattern = re.compile(_SCRATCH.format(re.escape(out.name), re.escape(suffix)))
    for old in out.parent.iterdir():
        if pattern.fullmatch(old.name) and old.is_dir() and not old.is_symlink() and _is_stale(old):
            log.warning("removing %s, left by an interrupted compile whose process is gone", old)
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent))
    (tmp / OWNER_FILE).write_text(json.dumps(_owner_record()), encoding="utf-8")
    return tmp


def _owner_record() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "start": _start_ticks(pid)}


def _is_stale(folder: Path) -> bool:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return time.time() - folder.stat().st_mtime > _UNOWNED_STALE_S
    except (OSError, ValueError):
        return False
    pid = owner.get("pid") if isinstance(owner, dict) else None
    if not isinstance(pid, int) or pid <= 0 or owner.get("host") != socket.gethostname():
        return False  # unreadable, or another machine's process on a shared file system: cannot tell
    if owner.get("boot_id") and owner["boot_id"] != _boot_id():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = _start_ticks(pid)
    return owner.get("start") is not None and start is not None and start != owner["start"]  # pid reused


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def build_manifest(graph: Graph, backend: str, target: Mapping[str, Any], tokenizer: Mapping[str, Any],
                   files: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest dict (see the module docstring) from the graph, the backend's name and fields, and the files.

    ``target["expert_weights"]`` (``{expert id: {"tensors", "bytes"}}``, see
    :func:`dmpq_compile.backends.onnx_io.owned_weights`), where present, moves into the
    per-expert entries.
    """
    meta = graph.meta
    target = dict(target)
    weights = target.pop("expert_weights", None) or {}
    nonexpert_weights = target.pop("nonexpert_weights", None) or {}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"path": meta.get("source"), "model_type": meta.get("model_type"),
                   "architectures": meta.get("architectures"), "config": meta.get("source_config")},
        "model": {k: meta.get(k) for k in ("family", "vocab_size", "hidden_size", "num_layers", "num_experts",
                                           "top_k", "rope_theta", "max_position_embeddings")},
        "target": {"backend": backend, **target},
        "quantization": _quantization(graph),
        "experts": {n.id: _stored_bits({**_expert_entry(n), **weights.get(n.id, {})}, _params(graph, n.params.values()))
                    for n in graph.experts()},
        "dense_nodes": {n.id: {"kind": n.kind, "bits": n.ann.get("bits", 16)}
                        for kind in ("shared_expert", "mlp") for n in graph.nodes(kind)},
        "nonexpert": {n.id: _stored_bits({**_nonexpert_entry(n), **nonexpert_weights.get(n.id, {})},
                                         _params(graph, _quant_keys(n)))
                      for n in graph.nodes() if n.kind in NONEXPERT_QUANTIZABLE_KINDS},
        "tokenizer": dict(tokenizer),
        "versions": {name: _version(name) for name in VERSIONED_PACKAGES},
        "files": dict(files),
    }


def _params(graph: Graph, keys: Iterable[str]) -> int:
    return sum(math.prod(graph.weights.shape(k)) for k in keys)


def _quant_keys(node: Any) -> list[str]:
    """Store keys of a node's quantizable linear weights (``QUANT_ROLES``)."""
    return [node.params[r] for r in QUANT_ROLES.get(node.kind, ()) if r in node.params]


def _nonexpert_entry(node: Any) -> dict[str, Any]:
    """A non-expert node's manifest entry: its kind, the policy's bits and how they were made."""
    spec = (node.ann.get("quant") or {}).get("spec")
    bits = node.ann.get("bits", 16)
    quantized = bool(spec) and bits < 16
    return {"kind": node.kind, "bits": bits, "roles": list(QUANT_ROLES[node.kind]),
            "group_size": spec.get("group_size") if quantized else None,
            "method": spec.get("method") if quantized else None,
            "scheme": spec.get("scheme") if quantized else None}


def storage_summary(graph: Graph, expert_weights: Mapping[str, Mapping[str, Any]] | None,
                    model_bytes: int, nonexpert_weights: Mapping[str, Mapping[str, Any]] | None = None,
                    weight_bytes: int | None = None) -> dict[str, Any]:
    """Stored bits per weight of the model files: whole file, experts, and everything else.

    ``bits_per_weight`` is stored bits over parameters: codes, scales, zero points and every
    tensor kept in float, over the model files, as a user compares tools (llama.cpp's figure for
    a GGUF file). ``weights`` (where the backend reports its initializers' ``weight_bytes``) is the
    same over the weight tensors alone, without the graph's structure and the external-data
    alignment: what ``--budget-bits`` constrains. ``code_bits`` is the experts' assigned bit-width
    averaged over their parameters (what ``--budget-code-bits`` constrains). ``params`` counts each weight of the source model
    once (tied embeddings once). ``other`` is the file less the experts' own tensors: non-expert
    weights plus the graph's structure. ``experts`` is None where the backend does not report
    per-expert bytes. ``nonexpert`` (only where the ``precision`` policy quantized some) counts
    the quantized non-expert nodes' tensors (their linear weights' codes, scales and zero points
    plus any float tensors the node owns, e.g. q/k norms) over their linear weights' parameters;
    it is part of ``other``. ``scales`` counts the quantized nodes by how their scales are stored
    (e.g. ``{"float16": 40}``).
    """
    from .passes.infra.storage import param_count

    total = param_count(graph)
    out: dict[str, Any] = {"params": total, "bytes": model_bytes,
                           "bits_per_weight": round(8 * model_bytes / total, 4) if total else None, "experts": None,
                           "weights": {"bytes": int(weight_bytes), "bits_per_weight": round(8 * weight_bytes / total, 4)}
                           if weight_bytes and total else None}
    experts = graph.experts()
    if expert_weights and all(n.id in expert_weights for n in experts):
        n_exp = _params(graph, {k for n in experts for k in n.params.values()})
        b_exp = sum(int(expert_weights[n.id]["bytes"]) for n in experts)
        code = sum(n.ann.get("bits", 16) * _params(graph, n.params.values()) for n in experts)
        out["experts"] = {"params": n_exp, "bytes": b_exp, "bits_per_weight": round(8 * b_exp / n_exp, 4),
                          "code_bits": round(code / n_exp, 4)}
        out["other"] = {"params": total - n_exp, "bytes": model_bytes - b_exp,
                        "bits_per_weight": round(8 * (model_bytes - b_exp) / (total - n_exp), 4)
                        if total > n_exp else None}
    quantized = [n for n in graph.nodes() if n.kind in NONEXPERT_QUANTIZABLE_KINDS and n.ann.get("bits", 16) < 16]
    if quantized and nonexpert_weights and all(n.id in nonexpert_weights for n in quantized):
        n_q = sum(_params(graph, _quant_keys(n)) for n in quantized)
        b_q = sum(int(nonexpert_weights[n.id]["bytes"]) for n in quantized)
        code = sum(n.ann["bits"] * _params(graph, _quant_keys(n)) for n in quantized)
        out["nonexpert"] = {"params": n_q, "bytes": b_q, "bits_per_weight": round(8 * b_q / n_q, 4),
                            "code_bits": round(code / n_q, 4)}
    scales: dict[str, int] = {}
    for node in graph.nodes():
        spec = (node.ann.get("quant") or {}).get("spec")
        if spec and spec["bits"] < 16:
            dtype = spec.get("scale_dtype", "float32")
            scales[dtype] = scales.get(dtype, 0) + 1
    if scales:
        out["scales"] = dict(sorted(scales.items()))
    return out


def _stored_bits(entry: dict[str, Any], params: int) -> dict[str, Any]:
    """An expert's manifest entry with its stored bits per weight, where its bytes are known."""
    if "bytes" in entry and params:
        entry["bits_per_weight"] = round(8 * int(entry["bytes"]) / params, 4)
    return entry


def _expert_entry(node: Any) -> dict[str, Any]:
    spec = (node.ann.get("quant") or {}).get("spec")
    bits = node.ann.get("bits", 16)
    return {"layer": node.attrs["layer"], "expert": node.attrs["expert"], "bits": bits,
            "group_size": spec.get("group_size") if spec and bits < 16 else None,
            "method": spec.get("method") if spec and bits < 16 else None, "spec": spec}


def _quantization(graph: Graph) -> dict[str, Any]:
    experts = graph.experts()
    hist: dict[str, int] = {}
    for n in experts:
        hist[str(n.ann.get("bits", 16))] = hist.get(str(n.ann.get("bits", 16)), 0) + 1
    specs = [n.ann["quant"]["spec"] for n in experts if n.ann.get("quant") and n.ann.get("bits", 16) < 16]
    return {"bits_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
            "group_size": graph.meta.get("group_size"),
            "methods": sorted({s["method"] for s in specs}), "schemes": sorted({s["scheme"] for s in specs})}


def _copy_tokenizer(graph: Graph, dest: Path) -> dict[str, Any]:
    names = list(graph.meta.get("tokenizer_files") or [])
    source = graph.meta.get("source")
    if names and not source:
        raise ArtifactError("graph.meta lists tokenizer files but no 'source' folder to copy them from")
    for name in names:
        src = Path(source) / name
        if not src.is_file():
            raise ArtifactError(f"tokenizer file {src} is missing (the source checkpoint changed since it was "
                                "loaded); restore it or reload the model")
        _copy_compact(src, dest / name)
    if "tokenizer.json" not in names:
        log.warning("the source model has no tokenizer.json: the artifact can only be run on token ids")
    chat_template = chat_template_source(dest)
    _tokenizer_config_for_genai(dest, names, chat_template)
    eos = graph.meta.get("eos_token_id")
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return {"files": names, "tokenizer_file": "tokenizer.json" if "tokenizer.json" in names else None,
            "eos_token_ids": eos_ids, "bos_token_id": graph.meta.get("bos_token_id"), "chat_template": chat_template}


def _tokenizer_config_for_genai(dest: Path, names: list[str], chat_template: str | None) -> None:
    """Make ``dest/tokenizer_config.json`` what onnxruntime-genai needs, adding it to ``names`` when created.

    onnxruntime-genai (0.18, measured) loads no tokenizer without a tokenizer_config.json, so one is
    created beside a tokenizer.json, holding the generic ``tokenizer_class`` (without a class it
    ignores the file's chat template). It reads the ``chat_template`` key before chat_template.jinja,
    the reverse of transformers' order, so a chat_template.jinja's text is written into the key: it
    then applies the template transformers applies, whichever of the two files it reads.
    """
    path = dest / "tokenizer_config.json"
    embed = chat_template == CHAT_TEMPLATE_FILE
    if path.is_file():
        if not embed:
            return
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            config = None
        if not isinstance(config, dict):
            log.warning("the source's tokenizer_config.json is not a JSON object, so %s is carried but not written "
                        "into it: onnxruntime-genai may not find the chat template", CHAT_TEMPLATE_FILE)
            return
    elif embed or "tokenizer.json" in names:
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        names.append(path.name)
    else:
        return
    if embed:
        config["chat_template"] = (dest / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    path.write_text(json.dumps(config, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _copy_compact(src: Path, dst: Path) -> None:
    """Copy one tokenizer file; a JSON file is rewritten without indentation (the same object: a
    Hugging Face ``tokenizer.json`` shrinks by about 60 %, 156 KB on the 4,096-word samples, which
    is 0.14 stored bits per weight of a 9 M-parameter model). Other files are copied byte for byte."""
    if src.suffix == ".json":
        try:
            data = json.loads(src.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass  # not ours to judge: copied as it is, and the tokenizer loader reports it
        else:
            dst.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
            return
    shutil.copy2(src, dst)


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a folder; choose another output path")
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another output path or allow overwriting "
                            "(overwrite=True / --overwrite)")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; an old ``out`` is removed only after the swap."""
    if not out.exists():
        tmp.rename(out)
        return
    if not overwrite:  # appeared while we were writing
        raise ArtifactError(f"{out} appeared while the artifact was being written; nothing was replaced")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: Any, what: str) -> None:
    try:
        text = json.dumps(data, indent=2, sort_keys=False, default=_jsonable, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"the {what} cannot be written as JSON: {e}; give plain numbers, strings, lists "
                            "and dicts (finite floats)") from None
    path.write_text(text + "\n", encoding="utf-8")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()  # numpy / torch scalars
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _set_modes(root: Path, file_mode: int, folder_mode: int) -> None:
    """Give every file under ``root`` one mode and every folder another (``root`` included).

    An artifact is shared between users and machines like any folder they create, but writers
    differ: ``mkdtemp`` makes 0700, and onnx writes external data (``model.onnx.data``) 0600.
    """
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, folder_mode)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), file_mode)
