"""The rewritten graphs: lint-clean, one GeodesicUpdate per site under one submodule, norms dropped."""
import torch
from torch import nn

import geonorm_fx as gf

from .tiny import PostNormBlock, PreNormBlock, Stack, tokens

aten = torch.ops.aten


def _layer_norms(graph):
    return sum(1 for n in graph.nodes if n.target is aten.layer_norm.default)


def test_pre_norm_rewrite_keeps_branch_norms():
    model = Stack(PreNormBlock, depth=3).eval()
    module = gf.convert(model, (tokens(),))
    for mode in ("train", "eval"):
        graph = module._geonorm_graphs[mode]
        graph.lint()
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target.startswith("geonorm.")]
        assert [n.target for n in calls] == [f"geonorm.{i}" for i in range(6)]
        assert _layer_norms(graph) == 7  # 6 branch-input norms + the final norm
    updates = module.geonorm
    assert isinstance(updates, nn.ModuleList) and len(updates) == 6
    assert all(isinstance(u, gf.GeodesicUpdate) for u in updates)
    assert [u.decay for u in updates] == [1.0, 1.0, 0.5, 0.5, 1 / 3, 1 / 3]


def test_post_norm_rewrite_removes_the_norms_and_their_parameters():
    model = Stack(PostNormBlock, depth=2, final_norm=False).eval()
    module = gf.convert(model, (tokens(),))
    for graph in module._geonorm_graphs.values():
        graph.lint()
        assert _layer_norms(graph) == 0
        assert not any(n.op == "get_attr" and ".norm" in n.target for n in graph.nodes)
    assert not any(".norm" in name for name, _ in module.named_parameters())


def test_name_clash_with_an_existing_geonorm_attribute():
    model = Stack(PreNormBlock, depth=1).eval()
    model.geonorm = nn.Linear(2, 2)  # unused, but taken
    module = gf.convert(model, (tokens(),))
    assert module.geonorm.weight is module.get_parameter("geonorm.weight")
    assert "geonorm.weight" in module.state_dict() and "geonorm_1.0.scale" in module.state_dict()
    assert len(module.geonorm_1) == 2


def test_the_update_is_one_call_per_site_in_the_generated_code():
    module = gf.convert(Stack(PreNormBlock, depth=2).eval(), (tokens(),)).eval()
    code = module.code
    assert code.count('getattr(self.geonorm, "') == 4
    assert "aten.add.Tensor" not in code.split("embedding")[-1].split("linear")[0]  # no residual add left
