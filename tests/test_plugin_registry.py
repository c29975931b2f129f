"""The one rule both registries (backends, metrics) share for what plugins declare."""

from __future__ import annotations

import pytest

from qbench.errors import QbenchError
from qbench.host import plugins


def test_plugins_come_after_builtins_sorted_and_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugins, "entry_points_of",
                        lambda group: {"zeta": "z.mod:INFO", "alpha": "a.mod"} if group == "g" else {})
    out = plugins.with_plugins("g", {"own": 1}, "thing", lambda name, target: f"{name}={target}")
    assert list(out) == ["own", "alpha", "zeta"]
    assert out["alpha"] == "alpha=a.mod" and out["own"] == 1


def test_a_plugin_may_not_take_a_builtin_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugins, "entry_points_of", lambda group: {"perplexity": "evil:INFO"})
    with pytest.raises(QbenchError, match=r"metric name 'perplexity'.*evil:INFO.*rename"):
        plugins.with_plugins("g", {"perplexity": "qbench.metrics.perplexity"}, "metric",
                             lambda name, target: target)


def test_the_backend_registry_refuses_an_entry_point_that_is_not_a_backend_info(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import qbench.backends as backends

    monkeypatch.setattr(plugins, "entry_points_of", lambda group: {"toy2": "qbench.errors:QbenchError"})
    backends._registered.cache_clear()
    try:
        with pytest.raises(QbenchError, match="must name a BackendInfo with name='toy2'"):
            backends.backend_names()
    finally:
        monkeypatch.undo()
        backends._registered.cache_clear()
