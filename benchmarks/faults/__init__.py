"""The fault-injection benchmark (issue 5's fault table against real `qbench run`s), split by
fault family so that each module holds one kind of fault and its checks:

    common.py   the tiny suite, Row, the results-folder audit, Bench (runs `qbench`)
    process.py  kill -9, crash, oom, hang; signals to qbench with a grandchild running
    storage.py  disk full, concurrent runs, stored schema versions; planted links, lying
                records, a changed cached artifact
    inputs.py   bad GGUF files, broken suites, missing inputs, hostile model ids; nan/inf,
                FIFO and device sources, unpinned hub sources, ids aimed at CI pages and CSV
    hf.py       pickle checkpoints, remote code (transformers backend)
    output.py   the Markdown table and totals
    cli.py      SCENARIOS (the one table: name, function, family, fault, expected) and main()

Run it with `python -m benchmarks.faults` (see cli.py); the names below are what tests use.
"""

from .cli import SCENARIOS, Scenario, main
from .common import Bench, Row
from .hf import scenario_pickle, scenario_remote_code
from .inputs import (scenario_ci_output, scenario_config, scenario_gguf, scenario_hostile,
                     scenario_missing, scenario_values)
from .process import scenario_crash, scenario_hang, scenario_kill, scenario_oom, scenario_signals
from .storage import (scenario_artifact_cache, scenario_concurrent, scenario_disk,
                      scenario_links, scenario_records, scenario_schema)

__all__ = ["SCENARIOS", "Bench", "Row", "Scenario", "main", "scenario_artifact_cache",
           "scenario_ci_output", "scenario_concurrent", "scenario_config", "scenario_crash",
           "scenario_disk", "scenario_gguf", "scenario_hang", "scenario_hostile",
           "scenario_kill", "scenario_links", "scenario_missing", "scenario_oom",
           "scenario_pickle", "scenario_records", "scenario_remote_code", "scenario_schema",
           "scenario_signals", "scenario_values"]
