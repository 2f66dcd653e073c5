"""Building and running the TensorRT engine of a ``trt-a100`` artifact (needs an NVIDIA GPU).

:func:`build_engine` follows the TensorRT 10 Python API (``tensorrt`` docs, "Builder",
"INetworkDefinition", "OnnxParser", "IBuilderConfig", "ITimingCache"): ``Builder`` ->
``create_network`` with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (explicit quantization
"with Strong Typing", where "precision-control build flags are not required and should not be
specified") -> ``OnnxParser.parse_from_file`` (a path, so ``model.onnx.data`` resolves) ->
``IBuilderConfig`` with a workspace ``MemoryPoolType.WORKSPACE`` limit, a timing cache
(``create_timing_cache`` / ``set_timing_cache`` / ``get_timing_cache().serialize()``) and one
optimization profile over the dynamic axes -> ``build_serialized_network`` -> ``engine.plan``.
:class:`TrtEngineRunner` deserializes it (``Runtime.deserialize_cuda_engine``) and runs it with
``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on torch CUDA buffers.

``tensorrt`` is imported lazily, only here; without it :func:`import_tensorrt` says what to install.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...fileio import atomic_write_bytes
from ..base import BackendError

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.plan"
TIMING_CACHE_FILE = "timing.cache"
BACKEND_NAME = "trt-a100"
A100_CAPABILITY = (8, 0)


class TensorRTNotInstalled(BackendError):
    """The ``tensorrt`` Python package does not import on this machine."""


def import_tensorrt() -> Any:
    """``import tensorrt`` or raise :class:`TensorRTNotInstalled` saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTNotInstalled(
            f"the TensorRT Python package does not import ({e}). Building or running an engine needs a machine "
            "with an NVIDIA GPU and TensorRT 10.x: install it with `pip install 'dmpq-compile[trt]'` (NVIDIA's "
            "tensorrt wheels, fetched from NVIDIA's pip index, https://pypi.nvidia.com). The artifact's ONNX "
            "model is ready without it: `trtexec --onnx=ARTIFACT/model.onnx --stronglyTyped "
            "--saveEngine=ARTIFACT/engine.plan` plus the shapes in manifest.json target.build.trtexec") from None
    return trt


# -- shapes -------------------------------------------------------------------------------------
def default_profile(io: Mapping[str, Any], max_positions: int, max_sequence: int | None = None,
                    max_context: int | None = None) -> dict[str, dict[str, list[int]]]:
    """One optimization profile: batch 1, ``sequence`` 1..max_sequence, ``past`` 0..max_context-1.

    ``opt`` is the decode step (sequence 1) at half the context, the shape generation runs most.

    Raises:
        BackendError: Non-positive or inconsistent limits.
    """
    ctx = int(max_context or min(4096, max_positions))
    seq = int(max_sequence or min(512, ctx))
    if seq < 1 or ctx < 1 or seq > ctx:
        raise BackendError(f"need 1 <= max_sequence ({seq}) <= max_context ({ctx})")
    profile = {io["input_ids"]: {"min": [1, 1], "opt": [1, 1], "max": [1, seq]}}
    for kv in io["kv_cache"]:
        heads, dim = int(kv["num_kv_heads"]), int(kv["head_dim"])
        for name in (kv["past_key"], kv["past_value"]):
            profile[name] = {"min": [1, heads, 0, dim], "opt": [1, heads, ctx // 2, dim],
                             "max": [1, heads, ctx - 1, dim]}
    return profile


def trtexec_command(profile: Mapping[str, Mapping[str, list[int]]], model: str = "model.onnx",
                    engine: str = ENGINE_FILE) -> str:
    """The equivalent ``trtexec`` command line (for machines without the Python package)."""
    def shapes(key: str) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in s[key])}" for name, s in profile.items())

    return (f"trtexec --onnx={model} --stronglyTyped --saveEngine={engine} --minShapes={shapes('min')} "
            f"--optShapes={shapes('opt')} --maxShapes={shapes('max')}")


# -- build --------------------------------------------------------------------------------------
def _parser_errors(parser: Any) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = getattr(err, "node_name", lambda: "")() or f"node #{err.node()}"
        op = getattr(err, "node_operator", lambda: "")()
        out.append(f"{node}{f' ({op})' if op else ''}: {err.desc()} [{err.code()}]")
    return out


def gpu_info() -> dict[str, Any]:
    """Name and compute capability of CUDA device 0 (via torch), or what is known without it."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception as e:  # noqa: BLE001 - informative only
        log.debug("no GPU info from torch: %s", e)
    return {"name": None, "compute_capability": None}


def build_plan(model_path: Path, io: Mapping[str, Any], max_positions: int, engine_path: Path, *,
               workspace_gb: float = 8.0, timing_cache: Path | None = None, fp16: bool = True,
               strongly_typed: bool = True, max_sequence: int | None = None, max_context: int | None = None,
               verbose: bool = False) -> dict[str, Any]:
    """Parse ``model_path``, build a serialized engine at ``engine_path`` and describe it.

    Knows nothing about artifacts: :func:`dmpq_compile.engine.build_engine` reads the manifest,
    calls this and records the returned entry (see there for the options).

    Returns:
        The manifest's ``target.engine`` entry (file, sha256, bytes, TensorRT version, GPU, profile).

    Raises:
        TensorRTNotInstalled: ``tensorrt`` does not import.
        BackendError: Parser errors (with node names) or a failed build.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        errs = _parser_errors(parser)
        raise BackendError(f"TensorRT {trt.__version__} cannot parse {model_path} ({len(errs)} error(s)):\n  "
                           + "\n  ".join(errs[:20]) + "\nrun `dmpq-compile check` on the artifact for the rules")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False)
    profile_spec = default_profile(io, max_positions, max_sequence, max_context)
    profile = builder.create_optimization_profile()
    for name, s in profile_spec.items():
        profile.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT {trt.__version__} failed to build an engine for {model_path}; rerun with "
                           "verbose=True (--verbose-trt) for the builder log")
    seconds = time.perf_counter() - t0
    data = bytes(serialized)
    atomic_write_bytes(engine_path, data)
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    gpu = gpu_info()
    if gpu["compute_capability"] and gpu["compute_capability"] != "{}.{}".format(*A100_CAPABILITY):
        log.warning("built on %s (sm %s): the engine runs only on that GPU model, not on the A100 this target "
                    "is costed for", gpu["name"], gpu["compute_capability"])
    log.info("built %s in %.1f s with TensorRT %s on %s", engine_path, seconds, trt.__version__, gpu["name"])
    return {"file": engine_path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "tensorrt_version": trt.__version__, "gpu": gpu, "strongly_typed": strongly_typed,
            "workspace_gb": workspace_gb, "profile": profile_spec, "build_seconds": round(seconds, 2),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# -- run ----------------------------------------------------------------------------------------
class TrtEngineRunner:
    """Runs an artifact's ``engine.plan`` with the TensorRT runtime on CUDA (torch buffers).

    Opened through :func:`dmpq_compile.engine.open_engine`, which reads the artifact's manifest.

    Args:
        engine_path: The serialized engine (``engine.plan``).
        manifest: The artifact's manifest (``target.io``, ``target.engine``, ``model.vocab_size``).

    Raises:
        TensorRTNotInstalled / BackendError: No TensorRT, no CUDA, or an engine that does not load.
    """

    def __init__(self, engine_path: str | Path, manifest: Mapping[str, Any]) -> None:
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise BackendError("running a TensorRT engine needs a CUDA GPU; torch.cuda.is_available() is False")
        target = manifest["target"]
        self.trt, self.torch, self.io, self.manifest = trt, torch, target["io"], manifest
        self.vocab_size = int(manifest["model"].get("vocab_size") or 2)
        self._logger = trt.Logger(trt.Logger.WARNING)
        data = Path(engine_path).read_bytes()
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(data)
        if self.engine is None:
            raise BackendError(f"TensorRT {trt.__version__} cannot deserialize {target['engine']['file']} (built "
                               f"with {target['engine'].get('tensorrt_version')} on {target['engine']['gpu']})")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                        trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        self.outputs = [self.io["logits"]] + [n for kv in self.io["kv_cache"]
                                              for n in (kv["present_key"], kv["present_value"])]

    def empty_past(self, batch: int = 1) -> list[Any]:
        """Zero-length KV tensors (one key and one value per layer) on the GPU."""
        return [self.torch.zeros(batch, kv["num_kv_heads"], 0, kv["head_dim"], device="cuda")
                for kv in self.io["kv_cache"] for _ in range(2)]

    keeps_logits = False  # the engine computes every position; forward slices (see Session.forward)

    def forward(self, ids: Any, past: list[Any] | None = None, logits_to_keep: int = 0) -> tuple[Any, list[Any]]:
        """Logits ``[B, T, V]`` (the last ``logits_to_keep`` positions when > 0) and the new KV list for
        ``ids [B, T]`` after ``past`` (CUDA tensors)."""
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), got {logits_to_keep!r}")
        torch = self.torch
        self._scratch: list[Any] = []
        ids = torch.as_tensor(ids, dtype=torch.int64, device="cuda")
        past = past if past is not None else self.empty_past(int(ids.shape[0]))
        names = [self.io["input_ids"]] + [n for kv in self.io["kv_cache"] for n in (kv["past_key"], kv["past_value"])]
        inputs = [t.contiguous() for t in (ids, *past)]  # referenced until execution has finished
        for name, t in zip(names, inputs):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, self._address(t))
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"output {name} has a data-dependent shape {shape}; this runner does not "
                                   "support output allocators")
            t = torch.empty(shape, dtype=self._dtypes[self.engine.get_tensor_dtype(name)], device="cuda")
            self.context.set_tensor_address(name, self._address(t))
            outs.append(t)
        self.stream.wait_stream(torch.cuda.current_stream())  # inputs were written on the current stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError("TensorRT execute_async_v3 failed; see the TensorRT log")
        self.stream.synchronize()
        return (outs[0][:, -logits_to_keep:] if logits_to_keep else outs[0]), outs[1:]

    def logits(self, ids: Any, past: list[Any] | None = None) -> Any:
        """float32 numpy logits ``[B, T, V]`` (the runtime Session's interface, for eval and bench)."""
        return self.forward(ids, past)[0].float().cpu().numpy()

    def _address(self, t: Any) -> int:
        if t.numel() == 0:  # keep a valid, non-null pointer for empty tensors
            t = self.torch.empty(1, dtype=t.dtype, device="cuda")
            self._scratch.append(t)
        return int(t.data_ptr())

    def time_decode(self, prompt_len: int = 128, steps: int = 32, seed: int = 0) -> dict[str, float]:
        """Prefill ``prompt_len`` random tokens, then time ``steps`` greedy one-token decode calls (ms)."""
        torch = self.torch
        if prompt_len < 1 or steps < 1:
            raise BackendError(f"need prompt_len >= 1 and steps >= 1, got {prompt_len}, {steps}")
        gen = torch.Generator(device="cuda").manual_seed(seed)
        ids = torch.randint(0, self.vocab_size, (1, prompt_len), device="cuda", generator=gen)
        t0 = time.perf_counter()
        logits, past = self.forward(ids)
        prefill = (time.perf_counter() - t0) * 1e3
        times = []
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            logits, past = self.forward(nxt, past)
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return {"prefill_ms": prefill, "decode_ms_median": times[len(times) // 2], "decode_ms_min": times[0]}
