"""A picture of the residual stream: the sites of a :class:`Report` as a networkx graph and as
Graphviz DOT text (rendered to SVG by ``dot`` when Graphviz is installed)."""
from __future__ import annotations

import shutil
import subprocess

import networkx as nx

from .errors import GeoNormError
from .report import Report

_COLORS = {"pre": "#4c78a8", "post": "#f58518", "sandwich": "#54a24b", "respost": "#b279a2",
           "parallel": "#e45756", "deepnorm": "#9d755d"}


def stream_graph(report: Report) -> nx.DiGraph:
    """Nodes: one ``in``/``out`` pair per residual stream, one node per site (kind, block, decay, path),
    one node per skipped norm; edges follow each stream in order of application."""
    g = nx.DiGraph(name="residual stream")
    streams = sorted({s.stream for s in report.sites}) or []
    for k in streams:
        sites = [(i, s) for i, s in enumerate(report.sites) if s.stream == k]
        prev = f"stream{k}_in"
        g.add_node(prev, label=f"stream {k} in", shape="oval", kind="io")
        for i, site in sites:
            node = f"site{i}"
            g.add_node(node, label=f"{site.kind} ({site.norm})\\nblock {site.block}, decay {site.decay:.4g}"
                       f"\\n{site.path or site.node}", shape="box", kind=site.kind, stream=k, block=site.block)
            g.add_edge(prev, node)
            prev = node
        g.add_edge(prev, f"stream{k}_out")
        g.nodes[f"stream{k}_out"].update(label=f"stream {k} out", shape="oval", kind="io")
    for j, skip in enumerate(report.skipped):
        g.add_node(f"skip{j}", label=f"skipped: {skip.path or skip.node}\\n{skip.reason.split(':')[0]}",
                   shape="note", kind="skip")
    return g


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT text; sites of one block are drawn in one cluster."""
    lines = ["digraph residual_stream {", '  rankdir=TB; node [fontname="Helvetica", fontsize=10];']
    clusters: dict[tuple, list[str]] = {}
    for node, data in graph.nodes(data=True):
        if data.get("kind") not in ("io", "skip", None):
            clusters.setdefault((data["stream"], data["block"]), []).append(node)
    for (stream, block), nodes in clusters.items():
        lines.append(f'  subgraph "cluster_s{stream}_b{block}" {{ label="stream {stream}, block {block}"; '
                     'style=rounded; color=gray;')
        lines += [f"    {_node(n, graph.nodes[n])}" for n in nodes]
        lines.append("  }")
    clustered = {n for nodes in clusters.values() for n in nodes}
    lines += [f"  {_node(n, d)}" for n, d in graph.nodes(data=True) if n not in clustered]
    lines += [f'  "{a}" -> "{b}";' for a, b in graph.edges()]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _node(name: str, data: dict) -> str:
    color = _COLORS.get(data.get("kind"), "#888888")
    style = "filled" if data.get("kind") in _COLORS else "dashed" if data.get("kind") == "skip" else "solid"
    label = data.get("label", name).replace('"', "'")
    return (f'"{name}" [label="{label}", shape={data.get("shape", "box")}, style={style}, '
            f'fillcolor="{color}40", color="{color}"];')


def write_dot(report: Report, path: str) -> None:
    with open(path, "w") as f:
        f.write(to_dot(stream_graph(report)))


def render_svg(dot_path: str, svg_path: str) -> None:
    """Render with Graphviz ``dot``; :class:`GeoNormError` if it is not installed or fails."""
    exe = shutil.which("dot")
    if exe is None:
        raise GeoNormError("Graphviz 'dot' is not installed (e.g. apt-get install graphviz): "
                           f"the DOT file {dot_path} can still be opened with any Graphviz viewer")
    proc = subprocess.run([exe, "-Tsvg", dot_path, "-o", svg_path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise GeoNormError(f"dot failed on {dot_path}: {proc.stderr.strip().splitlines()[0]}")
