import pytest
import torch

from dmpq_compile.frontend import load
from dmpq_compile.ir import Graph, Interpreter, IRError, WeightStore, load_graph, save_graph, validate


def test_save_load_round_trips_exactly(tiny_dirs, tmp_path):
    g = load(tiny_dirs("qwen2_moe"))
    g.annotate("L0.E1", "bits", 4)
    g.annotate("L0.E1", "sensitivity", {2: 0.5, 4: 0.1, 16: 0.0})
    g.annotate("L1.E0", "cost", {"ort-cpu": {4: {"decode_ms": 1.0, "bytes": 10}}})
    save_graph(g, tmp_path / "ir")
    h = load_graph(tmp_path / "ir")
    assert h.topo_order() == g.topo_order()
    for n in g.nodes():
        m = h.node(n.id)
        assert (m.kind, dict(m.params), dict(m.attrs), dict(m.ann), m.inputs) == \
            (n.kind, dict(n.params), dict(n.attrs), dict(n.ann), n.inputs)
    assert h.meta == g.meta
    assert set(h.weights) == set(g.weights)
    for k in g.weights:
        assert torch.equal(h.weights[k], g.weights[k]) and h.weights[k].dtype == g.weights[k].dtype
    assert h.node("L0.E1").ann["sensitivity"][2] == 0.5  # int keys restored


def test_params_are_references_not_tensors(tiny_dirs):
    g = load(tiny_dirs("mixtral"))
    for n in g.nodes():
        for key in n.params.values():
            assert isinstance(key, str) and key in g.weights
        assert not any(isinstance(v, torch.Tensor) for v in n.attrs.values())


def test_annotation_schema_rejects_bad_values(tiny_dirs):
    g = load(tiny_dirs("mixtral"))
    with pytest.raises(IRError, match="unknown annotation 'frequency'"):
        g.annotate("L0.E0", "frequency", 0.1)
    with pytest.raises(IRError, match="expected bits"):
        g.annotate("L0.E0", "bits", 5)
    with pytest.raises(IRError, match="not allowed on kind 'router'"):
        g.annotate("L0.router", "bits", 4)
    with pytest.raises(IRError, match=r"\[0.0, 1.0\]"):
        g.annotate("L0.E0", "freq", 1.5)


def test_validation_names_the_node():
    g = Graph(weights=WeightStore({"w": torch.zeros(4, 4)}))
    g.add("tokens", "input")
    g.add("embed", "embed", ["tokens"], {"weight": "w"})
    g.add("n", "norm", ["embed"], {"weight": "missing"}, eps=1e-5)
    with pytest.raises(IRError, match="'n'.*missing weight 'missing'"):
        validate(g)
    with pytest.raises(IRError, match="unknown kind"):
        g.add("x", "conv", ["n"])
    with pytest.raises(IRError, match="input 'nope' does not exist"):
        g.add("y", "add", ["n", "nope"])


def test_expert_wiring_checked(tiny_dirs):
    g = load(tiny_dirs("mixtral"))
    g.g.remove_edge("L0.router", "L0.E0")
    g.g.add_edge("L0.attn_res", "L0.E0", port=1)
    with pytest.raises(IRError, match="input 1 must be a router"):
        validate(g)


def test_load_graph_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved dmpq IR folder"):
        load_graph(tmp_path)


def test_fake_quantization_changes_only_quantized_experts(tiny_dirs):
    g = load(tiny_dirs("olmoe"))
    ids = torch.arange(20).view(1, 20) % g.meta["vocab_size"]
    fp = Interpreter(g, quantize=False)(ids)
    assert torch.equal(Interpreter(g, quantize=True)(ids), fp)  # no bits annotated: nothing quantized
    for n in g.experts():
        g.annotate(n.id, "bits", 2)
    q = Interpreter(g, quantize=True)(ids)
    assert not torch.allclose(q, fp, atol=1e-3)


def test_node_ids_come_from_the_ir_helpers_and_parse_back(tiny_dirs):
    from dmpq_compile.ir.graph import LAYER_ROLES, expert_node, layer_node, layer_role

    g = load(tiny_dirs("qwen2_moe"))  # with a shared expert; no dense layer, so no "mlp"
    for role in LAYER_ROLES:
        assert layer_role(layer_node(0, role)) == role
    roles = {n.id: layer_role(n.id) for n in g.nodes()}
    assert {r for r in roles.values() if r} == set(LAYER_ROLES) - {"mlp"}
    assert {i for i, r in roles.items() if r is None} == {"tokens", "embed", "final_norm", "lm_head",
                                                          *(n.id for n in g.experts())}
    assert layer_role(expert_node(1, 2)) is None and layer_role("lm_head") is None and layer_role("Lx.router") is None
    assert all(n.id == expert_node(n.attrs["layer"], n.attrs["expert"]) for n in g.experts())
    with pytest.raises(IRError, match="unknown layer role 'routr'"):
        layer_node(0, "routr")
