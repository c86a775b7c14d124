"""The picture of the residual stream: networkx graph, DOT text, SVG through Graphviz when installed."""
import shutil


import geonorm_fx as gf
from geonorm_fx.cli import main
from geonorm_fx.visualize import stream_graph, to_dot

from .stacks import MixedStack
from .tiny import tokens


def test_graph_follows_the_stream_with_one_node_per_site():
    report = gf.inspect(MixedStack(["post", "parallel", "pre"]).eval(), (tokens(),))
    g = stream_graph(report)
    path = ["stream0_in"] + [f"site{i}" for i in range(5)] + ["stream0_out"]
    assert all(g.has_edge(a, b) for a, b in zip(path, path[1:]))
    assert [g.nodes[f"site{i}"]["kind"] for i in range(5)] == ["post", "post", "parallel", "pre", "pre"]
    assert [g.nodes[f"site{i}"]["block"] for i in range(5)] == [0, 0, 1, 2, 2]
    assert g.nodes["skip0"]["kind"] == "skip"
    dot = to_dot(g)
    assert dot.startswith("digraph") and dot.count("subgraph") == 3
    assert "decay 0.3333" in dot and '"site4" -> "stream0_out"' in dot


def test_cli_writes_dot_and_svg(tmp_path, capsys):
    dot_file, svg_file = tmp_path / "stream.dot", tmp_path / "stream.svg"
    argv = ["inspect", "tests.tiny:factory", "--dot", str(dot_file)]
    if shutil.which("dot"):
        argv += ["--svg", str(svg_file)]
    assert main(argv) == 0
    assert dot_file.read_text().startswith("digraph")
    if shutil.which("dot"):
        assert "<svg" in svg_file.read_text()


def test_svg_without_graphviz_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` on this PATH
    assert main(["inspect", "tests.tiny:factory", "--svg", str(tmp_path / "x.svg")]) == 2
    assert "Graphviz 'dot' is not installed" in capsys.readouterr().err
    assert (tmp_path / "x.svg.dot").exists()
