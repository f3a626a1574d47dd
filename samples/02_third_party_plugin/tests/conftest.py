"""Make sure the plugin is registered, installed or not.

Installed (``pip install samples/02_third_party_plugin``), graphopt already loaded it through its
entry point. From a plain checkout, ``pythonpath = ["src"]`` (pyproject) makes it importable and
this fixture registers it for the session, exactly as the entry point would, and unregisters it
after.
"""

from __future__ import annotations

import pytest

import graphopt


@pytest.fixture(scope="session", autouse=True)
def linear_scale_plugin():
    pm = graphopt.get_plugin_manager()
    if "fold-linear-scale" in pm.passes.valid_names():
        yield pm.plugins[pm.passes.get("fold-linear-scale").plugin]
        return
    import graphopt_linear_scale

    info = pm.register_plugin(graphopt_linear_scale, name="linear-scale")
    assert info.error is None, info.error
    try:
        yield info
    finally:
        pm.unregister_plugin("linear-scale")
