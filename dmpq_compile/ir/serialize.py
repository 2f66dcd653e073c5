"""Save and load a :class:`Graph` as ``graph.json`` + ``weights.safetensors`` (exact round trip)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .annotations import decode_annotation
from .graph import Graph, IRError
from .weights import WeightStore

FORMAT = "dmpq-ir"
FORMAT_VERSION = 1


def graph_to_dict(graph: Graph) -> dict:
    nodes = []
    for node_id in graph.topo_order():
        d = graph.g.nodes[node_id]
        nodes.append({"id": node_id, "kind": d["kind"], "inputs": list(graph.inputs(node_id)),
                      "params": d["params"], "attrs": d["attrs"], "ann": d["ann"]})
    return {"format": FORMAT, "version": FORMAT_VERSION, "meta": graph.meta, "nodes": nodes}


def graph_from_dict(data: dict, weights: WeightStore) -> Graph:
    if data.get("format") != FORMAT:
        raise IRError(f"not a dmpq IR file (format {data.get('format')!r}, expected {FORMAT!r})")
    if data.get("version") != FORMAT_VERSION:
        raise IRError(f"IR format version {data.get('version')} is not supported (this build reads "
                      f"version {FORMAT_VERSION}); re-export the IR with this version of dmpq-compile")
    graph = Graph(data["meta"], weights)
    for n in data["nodes"]:
        graph.add(n["id"], n["kind"], n["inputs"], n["params"], **n["attrs"])
        for key, value in n["ann"].items():
            graph.g.nodes[n["id"]]["ann"][key] = decode_annotation(key, value)
    return graph


def save_graph(graph: Graph, path: str | Path) -> Path:
    """Write the graph to folder ``path`` atomically (temp folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "graph.json").write_text(json.dumps(graph_to_dict(graph), indent=1, sort_keys=False))
        graph.weights.save(tmp / "weights.safetensors")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_graph(path: str | Path) -> Graph:
    """Load a graph written by :func:`save_graph`."""
    path = Path(path)
    gj, wf = path / "graph.json", path / "weights.safetensors"
    for f in (gj, wf):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: {path} is not a saved dmpq IR folder")
    graph = graph_from_dict(json.loads(gj.read_text()), WeightStore.load(wf))
    from .validate import validate

    validate(graph)
    return graph
