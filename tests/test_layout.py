"""The package's shape: folders in the order data flows, imports that only point down, no loops.

qbench is layered; a module may import its own layer and the layers below, never above (a
metric reaching up into the planner, say, is how knowledge ends up in the wrong place). Every
import counts, also those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qbench"

# bottom to top; the README's "Layout" section lists the same order
LAYERS: tuple[tuple[str, ...], ...] = (
    ("qbench.errors", "qbench.options", "qbench.version"),   # foundations every layer uses
    ("qbench.host",),      # the machine and its files: environment, cache folders, plugins
    ("qbench.inputs",),    # what cells read: model sources, datasets, MMLU questions
    ("qbench.quantize",),  # making variants: GGUF quantization, imatrix, transformers recipes
    ("qbench.backends",),  # running variants: the registry, llama.cpp, transformers
    ("qbench.metrics",),   # measuring: the registry and one module per metric
    ("qbench.suite",),     # suite files -> validated specs -> planned cells with keys
    ("qbench.results",),   # records: schema, store, regression gate, exports
    ("qbench.run",),       # running a plan: jobs, executors, the worker process
    ("qbench.report",),    # records -> HTML
    ("qbench.cli", "qbench"),   # the command line and the package's public face
)


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """qbench modules ``module`` imports (absolute or relative, anywhere in the file)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "qbench")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qbench":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    out.discard(module)
    return out


GRAPH = {m: _imports(m, p, set(_modules())) for m, p in _modules().items()}


def test_every_module_is_in_a_layer() -> None:
    for module in GRAPH:
        _layer(module)


def test_no_upward_imports() -> None:
    """A module imports only its own layer and those below (``__version__`` lives in
    qbench.version, a foundation: nothing imports the package's face from below)."""
    upward = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
                    if _layer(t) > _layer(m))
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_loops() -> None:
    """No two modules import each other, directly or through others (Tarjan's SCC)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w == "qbench" or w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                loops.append(sorted(scc))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not loops, f"import loops: {loops}"


def test_the_checks_catch_what_they_claim(tmp_path: Path) -> None:
    """The graph reader sees lazy and relative imports (else the two tests above prove
    nothing)."""
    fake = tmp_path / "qbench" / "metrics" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..suite.plan import expand\n    import qbench.run.job\n")
    found = _imports("qbench.metrics.x", fake, {"qbench.suite.plan", "qbench.run.job"})
    assert found == {"qbench.suite.plan", "qbench.run.job"}
    assert _layer("qbench.suite.plan") > _layer("qbench.metrics.x")


@pytest.mark.parametrize("folder", ["host", "inputs", "quantize", "backends", "metrics",
                                    "suite", "results", "run", "report"])
def test_layer_folders_exist_and_say_what_they_hold(folder: str) -> None:
    init = PACKAGE / folder / "__init__.py"
    assert init.is_file()
    assert ast.get_docstring(ast.parse(init.read_text())), f"{init} needs a docstring"


def test_top_level_modules_are_few() -> None:
    """The flow shows in folders, not in a flat list of helpers."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "cli.py", "errors.py", "options.py", "version.py"]


def test_a_run_without_report_never_imports_plotly(tmp_path: Path) -> None:
    """`qbench run --no-report` (a CI shard) needs neither plotly nor jinja2: the report is
    imported only where one is made."""
    import subprocess
    import sys
    suite = tmp_path / "s.toml"
    suite.write_text('[suite]\nname = "s"\n[[models]]\nid = "m"\nsource = "missing.gguf"\n'
                     '[[variants]]\nbackend = "llama.cpp"\nquant = ["F16"]\n'
                     '[metrics.perplexity]\n')
    code = ("import sys\nfrom qbench import cli\n"
            f"rc = cli.main(['run', {str(suite)!r}, '--no-report', '--out', "
            f"{str(tmp_path / 'r')!r}])\n"
            "print('RC', rc, sorted(m for m in ('plotly', 'jinja2') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert "RC 1 []" in proc.stdout, proc.stdout + proc.stderr   # refused (no model): no report


def test_the_worker_reads_metric_options_as_strictly_as_the_suite_parser() -> None:
    """A job whose options carry a key the metric does not know is refused, naming the key
    (it used to be dropped silently, so a typo'd or newer option measured the defaults)."""
    from qbench.errors import ConfigError
    from qbench.run.job import Job
    from qbench.run.worker import metric_options

    cell = {"id": "m/llama.cpp/Q8_0/perplexity", "key": "k", "metric": "perplexity",
            "options": {"dataset": "wikitext-2", "ctx": 256, "chunks": 4}}
    job = Job(cell=cell, base_dir=".", cache_dir=".")
    opts = metric_options(job)
    assert (opts.ctx, opts.chunks) == (256, 4)
    bad = job.replace(cell=cell | {"options": {**cell["options"], "ctxx": 512}})
    with pytest.raises(ConfigError, match="unknown key 'ctxx'"):
        metric_options(bad)


def test_a_job_from_another_version_is_refused() -> None:
    from qbench.errors import QbenchError
    from qbench.run.job import Job

    job = Job(cell={"id": "x", "key": "k"}, base_dir=".", cache_dir=".")
    assert Job.from_json(job.to_json()) == job
    with pytest.raises(QbenchError, match="does not know: future_field"):
        Job.from_json(job.to_json()[:-1] + ', "future_field": 1}')
