"""The graph IR: nodes and weights, annotations, validation, (de)serialisation, interpreter."""

from .annotations import SCHEMA, AnnotationSpec, register_annotation
from .graph import KINDS, QUANTIZABLE_KINDS, Graph, IRError, Node
from .interpreter import Interpreter, RunOptions, logits_fn
from .serialize import load_graph, save_graph
from .validate import validate
from .weights import WeightStore

__all__ = [
    "SCHEMA", "AnnotationSpec", "register_annotation", "KINDS", "QUANTIZABLE_KINDS", "Graph", "IRError",
    "Node", "Interpreter", "RunOptions", "logits_fn", "load_graph", "save_graph", "validate", "WeightStore",
]
