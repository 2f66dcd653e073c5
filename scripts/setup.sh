#!/usr/bin/env bash
# Set up dmpq-compile on a fresh machine: Python package (+ dev tools, onnxruntime-genai, the app
# runtime that loads ort-cpu artifacts, and Ray, which `compile --ray` and its byte-identity test
# use) and the text corpus that
# calibration, evaluation and the sample models use (Debian's python3.11-doc reST sources).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch 2.13.0: a CPU build of it lies on local disk in this workplace; elsewhere pip fetches it.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[dev,genai,ray]"

corpus=${DMPQ_PYDOC_DIR:-/usr/share/doc/python3.11/html/_sources}
if [ ! -d "$corpus" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO="none"; fi
  if [ "$SUDO" != none ] && command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3.11-doc >/dev/null
  else
    echo "note: the python3.11-doc corpus is missing and cannot be installed here (no root/apt);" >&2
    echo "      get it with 'apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb DIR'" >&2
    echo "      and set DMPQ_PYDOC_DIR=DIR/usr/share/doc/python3.11/html/_sources" >&2
  fi
fi
echo "dmpq-compile is installed: $("$PY" -m dmpq_compile.cli --version)"
