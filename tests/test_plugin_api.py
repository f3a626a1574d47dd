"""The plugin author's API: the built-in plugins and the sample plugin use only public names
(``__all__`` of graphopt, graphopt.fx, graphopt.ir, graphopt.verify, graphopt.testing,
graphopt.parallel; the typed errors; ``hookimpl``), so everything a third party needs is public; and the helpers behave."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import graphopt
import graphopt.errors
import graphopt.fx
import graphopt.ir
import graphopt.parallel
import graphopt.testing
import graphopt.verify

REPO = Path(__file__).resolve().parents[1]
PUBLIC = {
    "graphopt": set(graphopt.__all__),
    "graphopt.fx": set(graphopt.fx.__all__),
    "graphopt.ir": set(graphopt.ir.__all__),
    "graphopt.verify": set(graphopt.verify.__all__),
    "graphopt.testing": set(graphopt.testing.__all__),
    "graphopt.parallel": set(graphopt.parallel.__all__),
    "graphopt.errors": {n for n, v in vars(graphopt.errors).items()
                        if inspect.isclass(v) and issubclass(v, Exception) and not n.startswith("_")},
    "graphopt.hookspecs": {"hookimpl", "hookspec"},
}
FILES = sorted([*(REPO / "plugins").rglob("*.py"), *(REPO / "samples" / "02_third_party_plugin").rglob("*.py")])


def _violations(path: Path, root: Path = REPO) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "graphopt" or node.module.startswith("graphopt.")):
            allowed = PUBLIC.get(node.module)
            for alias in node.names:
                if allowed is None:
                    bad.append(f"{path.relative_to(root)}:{node.lineno}: from {node.module} (not a public module)")
                elif alias.name.startswith("_") or alias.name not in allowed:
                    bad.append(f"{path.relative_to(root)}:{node.lineno}: {node.module}.{alias.name} is not public")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("graphopt.") and alias.name not in PUBLIC:
                    bad.append(f"{path.relative_to(root)}:{node.lineno}: import {alias.name} (not a public module)")
    return bad


def test_plugins_and_the_sample_import_only_public_names():
    assert len(FILES) > 20
    bad = [v for f in FILES for v in _violations(f)]
    assert not bad, "\n".join(bad)


def test_the_check_catches_private_and_deep_imports(tmp_path):
    f = tmp_path / "p.py"
    f.write_text("from graphopt.ir.nodes import packet\nfrom graphopt.fx import _aten\nimport graphopt.calibration\n"
                 "from graphopt.fx import constant\n")
    got = _violations(f, tmp_path)
    assert len(got) == 3 and "graphopt.ir.nodes" in got[0] and "_aten" in got[1] and "calibration" in got[2]


def test_public_names_exist():
    for module, names in PUBLIC.items():
        mod = __import__(module, fromlist=["_"])
        for name in names:
            assert hasattr(mod, name), f"{module}.{name}"
    # every exception class is exported, at the top level too
    assert set(graphopt.errors.__all__) == PUBLIC["graphopt.errors"]
    assert set(graphopt.errors.__all__) <= set(graphopt.__all__)


def test_constant_helpers_are_copy_on_write():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x):
            return self.lin(x) * self.scale

    m = M().eval()
    ir = graphopt.capture(m, (torch.randn(2, 4),))
    gm = ir.graph_module
    attrs = {str(n.target): n for n in ir.graph.nodes if n.op == "get_attr"}
    w_node = next(n for t, n in attrs.items() if t.endswith("weight"))
    w = graphopt.fx.constant(w_node)
    assert w is graphopt.fx.attribute(gm, str(w_node.target))
    assert graphopt.fx.constant(next(iter(ir.placeholders()))) is None
    assert graphopt.fx.attribute(gm, "no.such.thing") is None

    before = w.detach().clone()
    graphopt.fx.replace_attribute(gm, str(w_node.target), w * 3)
    new = graphopt.fx.attribute(gm, str(w_node.target))
    assert isinstance(new, torch.nn.Parameter) and not new.requires_grad and new is not w
    assert torch.equal(w, before)  # the old tensor (shared with other graphs) is untouched

    name = graphopt.fx.add_constant(gm, "lin.weight", torch.ones(2))
    name2 = graphopt.fx.add_constant(gm, "lin.weight", torch.ones(3), parameter=True)
    assert name == "lin_weight" and name2 == "lin_weight_1"
    assert name in dict(gm.named_buffers()) and name2 in dict(gm.named_parameters())


@pytest.mark.parametrize("plugin", ["graphopt-fusion", "graphopt-quant"])
def test_builtin_custom_ops_are_lowered_through_their_plugins_hook(plugin):
    from graphopt.plugins import get_plugin_manager

    info = get_plugin_manager().plugins[plugin]
    assert info.status == "ok" and info.onnx_translations, info


def test_pass_result_after_rewrites():
    ir = graphopt.capture(torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),))
    calls = []
    ir.recompile = lambda: calls.append(1) or ir  # what the helper must call when the graph changed
    r = graphopt.PassResult.after_rewrites(ir, {"fused": 0, "seen": 3.5, "flag": True})
    assert r.changed and r.stats == {"fused": 0, "seen": 3.5, "flag": True} and calls == [1]
    r = graphopt.PassResult.after_rewrites(ir, {"fused": 0, "flag": True})  # a bool is not a count
    assert not r.changed and calls == [1]
    r = graphopt.PassResult.after_rewrites(ir, {"fused": 2}, changed=False)  # the pass's own word wins
    assert not r.changed and r.ir is ir and calls == [1]
