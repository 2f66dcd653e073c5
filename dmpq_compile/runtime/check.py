"""Whether the runtimes that run an ``ort-cpu`` artifact accept it: onnxruntime on the CPU and, where
the artifact has a ``genai_config.json``, onnxruntime-genai (both imported lazily; onnxruntime-genai
is optional). Used by ``dmpq-compile check``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENAI_CONFIG = "genai_config.json"
_MESSAGES = json.dumps([{"role": "user", "content": "Hello"}])  # what the chat-template check applies


@dataclass(frozen=True)
class Finding:
    """One result: ``severity`` is ``"error"`` (a runtime refuses the artifact) or ``"warning"``."""

    severity: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: [{self.rule}] {self.message}"


def check_ort_cpu(model_file: Path, manifest: Mapping[str, Any] | None = None) -> tuple[list[Finding], list[str]]:
    """Load ``model_file`` with onnxruntime (CPU), then its folder with onnxruntime-genai where the
    folder holds a ``genai_config.json``.

    With ``manifest`` (the artifact's), onnxruntime-genai also loads the tokenizer where the manifest
    lists ``tokenizer.json``, and applies the chat template where it records one (a failure there is
    a warning: a template may refuse a lone user message).

    Returns:
        ``(findings, checked)``: findings, errors first; ``checked`` names the runtimes (with their
        versions) that loaded the artifact or, with an error, refused it.
    """
    findings, checked = onnxruntime_findings(model_file, (manifest or {}).get("target") or {})
    if (model_file.parent / GENAI_CONFIG).is_file():
        more, names = genai_findings(model_file.parent, (manifest or {}).get("tokenizer") or {})
        findings, checked = findings + more, checked + names
    return sorted(findings, key=lambda f: f.severity != "error"), checked


def onnxruntime_findings(model_file: Path, target: Mapping[str, Any] | None = None) -> tuple[list[Finding], list[str]]:
    """An error where onnxruntime cannot create a CPU session for ``model_file`` (by path, so external
    data is read beside it), with the custom-op library the manifest's ``target`` names registered;
    ``([], ["onnxruntime X"])`` when it can."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # load-time warnings are for model authors, as in Session
    name = f"onnxruntime {ort.__version__}"
    try:
        from .session import register_custom_ops

        register_custom_ops(options, model_file.parent, target or {})
        ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; the message is the finding
        return [Finding("error", "onnxruntime", f"{name} cannot load {model_file.name} on the CPU: {_first(e)}")], [name]
    return [], [name]


def genai_findings(root: Path, tokenizer: Mapping[str, Any]) -> tuple[list[Finding], list[str]]:
    """onnxruntime-genai on the folder ``root``: parse its genai_config.json, load the model, then
    (per the manifest's ``tokenizer`` entry) the tokenizer and the chat template.

    A missing onnxruntime-genai is a warning (the check is skipped), not an error.
    """
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        return [Finding("warning", "genai", f"onnxruntime-genai is not installed ({e}), so {GENAI_CONFIG} was not "
                        "checked: pip install onnxruntime-genai")], []
    name = f"onnxruntime-genai {og.__version__}"
    try:
        config = og.Config(str(root))
    except Exception as e:  # noqa: BLE001 - as for onnxruntime above
        return [Finding("error", "genai", f"{name} cannot parse {root / GENAI_CONFIG}: {_first(e)}")], [name]
    try:
        model = og.Model(config)
    except Exception as e:  # noqa: BLE001
        return [Finding("error", "genai", f"{name} parses {GENAI_CONFIG} but cannot load the model: {_first(e)}")], \
            [name]
    if not tokenizer.get("tokenizer_file"):
        return [], [name]
    try:
        tok = og.Tokenizer(model)
    except Exception as e:  # noqa: BLE001
        return [Finding("error", "genai", f"{name} cannot load the artifact's tokenizer: {_first(e)}")], [name]
    if tokenizer.get("chat_template"):
        try:
            tok.apply_chat_template(_MESSAGES, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001
            return [Finding("warning", "genai", f"{name} cannot apply the chat template (from the source's "
                            f"{tokenizer['chat_template']}) to one user message: {_first(e)}")], [name]
    return [], [name]


def _first(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
