"""The graph IR: nodes and weights, annotations, validation, (de)serialisation, interpreter."""

from .annotations import SCHEMA, AnnotationSpec, register_annotation
from .graph import KINDS, QUANTIZABLE_KINDS, Graph, IRError, Node
from .interpreter import Interpreter, RunOptions, logits_fn
from .serialize import load_graph, save_graph
from .validate import validate
from .weights import WeightStore

__all__ = [
    "KINDS",
    "QUANTIZABLE_KINDS",
    "SCHEMA",
    "AnnotationSpec",
    "Graph",
    "IRError",
    "Interpreter",
    "Node",
    "RunOptions",
    "WeightStore",
    "load_graph",
    "logits_fn",
    "register_annotation",
    "save_graph",
    "validate",
]
