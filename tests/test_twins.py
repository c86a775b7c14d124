"""Reusing the eval graph's site analysis for a train graph that computes the same program."""
import copy

import pytest
import torch

import geonorm_fx as gf
from geonorm_fx.capture import capture
from geonorm_fx.passes.ops import GraphView
from geonorm_fx.passes.sites import analyze
from geonorm_fx.passes.twins import analysis_twin, remap_analysis

from .tiny import PostNormBlock, PreNormBlock, Stack, tokens


def _norm_facts(n):
    return (n.kind, n.input.name, n.source.name, n.output.name, sorted(x.name for x in n.nodes), n.dim,
            n.output_in_source_layout, n.path)


def _facts(analysis):
    """Everything an analysis says, nodes by name (so analyses of two graphs compare)."""
    sites = [(s.kind, s.x.name, [b.name for b in s.branches], s.sum.name, _norm_facts(s.norm),
              [_norm_facts(n) for n in s.norms], s.output.name, sorted(d.name for d in s.dead), s.block, s.path,
              s.stream, s.dim) for s in analysis.sites]
    return sites, [(k.reason, k.node, k.path) for k in analysis.skipped], analysis.blocks_per_stream


@pytest.mark.parametrize("block,p", [(PreNormBlock, 0.0), (PostNormBlock, 0.0), (PreNormBlock, 0.3)])
def test_train_graph_gets_the_eval_analysis_mapped_over(block, p):
    # dropout calls differ between the modes only in their mode flag, which the analysis does not read
    torch.manual_seed(0)
    cap = capture(Stack(block, depth=3, p=p).eval(), (tokens(),))
    eval_gm, train_gm = cap.graphs["eval"], cap.graphs["train"]
    nodes = analysis_twin(eval_gm, train_gm)
    assert nodes is not None
    mapped = remap_analysis(analyze(GraphView(eval_gm)), nodes)
    fresh = analyze(GraphView(train_gm))
    assert len(mapped.sites) == 6
    assert _facts(mapped) == _facts(fresh)
    owned = set(train_gm.graph.nodes)
    for site in mapped.sites:
        assert {site.x, site.sum, site.output, *site.branches, *site.dead} <= owned
        assert any(site.norm is n for n in site.norms)  # shared objects stay shared


def test_other_shapes_or_module_state_break_the_twin():
    torch.manual_seed(0)
    model = Stack(PreNormBlock, depth=2).eval()
    small = capture(model, (tokens(seq=6),), dynamic=False, modes=("eval",)).graphs["eval"]
    same = capture(model, (tokens(seq=6, seed=1),), dynamic=False, modes=("eval",)).graphs["eval"]
    other = capture(model, (tokens(seq=7),), dynamic=False, modes=("eval",)).graphs["eval"]
    assert analysis_twin(small, same) is not None
    assert analysis_twin(small, other) is None  # same program, other static shapes

    traced = capture(model, (tokens(),), tracer="fx")
    assert analysis_twin(traced.graphs["eval"], traced.graphs["train"]) is not None
    holder = traced.graphs["train"].get_submodule("blocks.0")
    holder.norm1 = copy.deepcopy(holder.norm1)
    holder.norm1.eps = 0.5  # a module attribute the analysis reads
    assert analysis_twin(traced.graphs["eval"], traced.graphs["train"]) is None


def test_convert_result_is_unchanged_by_the_reuse():
    # end to end: both modes rewritten, same sites, the train graph computes the eval graph's function
    torch.manual_seed(0)
    model = Stack(PreNormBlock, depth=3).eval()
    toks = tokens()
    converted = gf.convert(model, (toks,))
    assert converted.geonorm_report.counts() == {"pre": 6}
    for mode in ("eval", "train"):
        graph = converted._geonorm_graphs[mode]
        assert sum(n.op == "call_module" and n.target.startswith("geonorm.") for n in graph.nodes) == 6
    with torch.no_grad():
        torch.testing.assert_close(converted.train()(toks), converted.eval()(toks))
