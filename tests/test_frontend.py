import json

import pytest
import torch

from dmpq_compile.frontend import FrontendError, load
from dmpq_compile.ir import Interpreter, RunOptions
from dmpq_compile.testing import TINY_FAMILIES


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_interpreter_matches_transformers(family, tiny_dirs):
    path = tiny_dirs(family)
    graph = load(path)
    model = _hf(path)
    ids = torch.randint(0, graph.meta["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, output_router_logits=True)
    routers = {}

    def observe(node_id, kind, value):
        if kind == "router":
            routers[node_id] = value

    with torch.no_grad():
        got = Interpreter(graph).run(ids, RunOptions(quantize=False, observer=observe))["lm_head"]
    assert got.shape == ref.logits.shape
    assert torch.allclose(got, ref.logits, atol=1e-4, rtol=0), (got - ref.logits).abs().max()
    k = graph.meta["top_k"]
    for layer, hf_logits in enumerate(ref.router_logits):
        ours = routers[f"L{layer}.router"]
        assert torch.allclose(ours.logits, hf_logits, atol=1e-5)
        hf_top = torch.topk(torch.softmax(hf_logits.float(), -1), k, dim=-1).indices
        assert torch.equal(ours.indices, hf_top)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_expert_is_a_node(family, tiny_dirs):
    graph = load(tiny_dirs(family))
    n_layers, n_exp = graph.meta["num_layers"], graph.meta["num_experts"]
    experts = graph.experts()
    assert len(experts) == n_layers * n_exp
    assert {(e.attrs["layer"], e.attrs["expert"]) for e in experts} == {
        (layer, e) for layer in range(n_layers) for e in range(n_exp)}
    assert (family == "qwen2_moe") == any(True for _ in graph.nodes("shared_expert"))


def test_fused_expert_layout_is_accepted(tiny_dirs, tmp_path):
    """transformers 5 in-memory layout (gate_up_proj [E, 2I, H]) lowers to the same experts."""
    from safetensors.torch import load_file, save_file

    src = tiny_dirs("mixtral")
    tensors = load_file(str(src / "model.safetensors"))
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe"
        gate = torch.stack([tensors[f"{p}.experts.{e}.w1.weight"] for e in range(4)])
        up = torch.stack([tensors[f"{p}.experts.{e}.w3.weight"] for e in range(4)])
        fused[f"{p}.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        fused[f"{p}.experts.down_proj"] = torch.stack([tensors[f"{p}.experts.{e}.w2.weight"] for e in range(4)])
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file(fused, str(tmp_path / "model.safetensors"))
    a, b = load(src), load(tmp_path)
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.equal(Interpreter(a, quantize=False)(ids), Interpreter(b, quantize=False)(ids))


def test_errors_name_supported_families(tmp_path):
    with pytest.raises(FrontendError, match="not a folder"):
        load(tmp_path / "nope")
    with pytest.raises(FrontendError, match="config.json is missing"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(FrontendError, match="dense model.*mixtral"):
        load(tmp_path)


def test_missing_weights_file(tiny_dirs, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dirs("olmoe") / "config.json").read_text())
    with pytest.raises(FrontendError, match="no \\*.safetensors"):
        load(tmp_path)


def test_truncated_checkpoint_is_refused(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_dirs("qwen3_moe")
    tensors = load_file(str(src / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.experts.3.up_proj.weight")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(FrontendError, match="expert 3"):
        load(tmp_path)


def test_damaged_or_missing_shards_are_named_before_any_work(tmp_path):
    import shutil

    from dmpq_compile.testing.scale import write_random_checkpoint

    src = write_random_checkpoint("mixtral", tmp_path / "src", shard_bytes=200_000, hidden_size=64,
                                  intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96)
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 2 and len(load(src).experts()) == 8  # sharded with an index, loads whole

    cut = tmp_path / "cut"
    shutil.copytree(src, cut)
    data = (cut / shards[1].name).read_bytes()
    (cut / shards[1].name).write_bytes(data[: len(data) - 100])  # an interrupted download
    with pytest.raises(FrontendError, match=f"{shards[1].name} is truncated.*copy it again"):
        load(cut)
    (cut / shards[1].name).write_bytes(data[:5])
    with pytest.raises(FrontendError, match=f"{shards[1].name} is empty or truncated"):
        load(cut)
    (cut / shards[1].name).unlink()
    with pytest.raises(FrontendError, match=f"1 of {len(shards)} shards .* missing.*{shards[1].name}"):
        load(cut)
