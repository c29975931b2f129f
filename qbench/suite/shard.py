"""`--shard i/n`: split a suite's cells across the jobs of a CI matrix.

Every job plans the same suite, so every job can compute the same split on its own: no job
talks to another. The split is

- **complete and disjoint**: each cell is in exactly one shard;
- **deterministic**: it depends only on the cells' ids and options, never on their order in
  the plan, the machine, the clock or the installed library versions (which change cell keys);
- **balanced by estimated cost**: greedy longest-processing-time (LPT) assignment — cells in
  decreasing estimated cost (ties by id), each to the shard with the least work so far (ties to
  the lowest shard). LPT's makespan is within 4/3 of the optimum, and no shard exceeds the mean
  load by more than one cell's cost.

A cell's estimated cost is ``metric weight x model size x precision factor`` (see
:func:`estimate_cost`): rough, but it keeps a 72B perplexity cell from landing beside ten
others while another shard measures footprints. Within a shard, cells keep the plan's run order
(bases first). Shards are merged back into one results root with ``qbench merge``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from qbench.backends import nominal_bits
from qbench.errors import QbenchError
from qbench.metrics import known_metric_info
from qbench.suite.plan import Cell

# A metric's relative cost on a 1B model at 16 bits is its registry entry's (MetricInfo.cost,
# a perplexity pass over 16 x 512 tokens = 1.0); a metric without a cost model counts as 1.0.
DEFAULT_PARAMS_B = 1.0   # a model whose size cannot be read from its id or source
_SIZE_IN_NAME = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)([bm])(?![a-z])", re.IGNORECASE)


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)``: shard 2 of 4, 1-based. QbenchError naming the flag otherwise."""
    raw = str(text).strip()
    m = re.fullmatch(r"(\d+)\s*/\s*(\d+)", raw)
    if not m:
        raise QbenchError(f"expected I/N with whole numbers, 1 <= I <= N (e.g. 2/4), got {raw!r}",
                          key="--shard")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise QbenchError(f"expected at least 1 shard, got {raw!r}", key="--shard")
    if not 1 <= index <= count:
        raise QbenchError(f"shard index must be between 1 and {count} (shards are numbered from "
                          f"1), got {raw!r}", key="--shard")
    return index, count


def model_params_b(cell: Cell) -> float:
    """Billions of parameters, read from the model id or source ('Qwen2.5-1.5B' -> 1.5,
    'SmolLM2-135M' -> 0.135); the largest size named wins; DEFAULT_PARAMS_B if none is."""
    sizes: list[float] = []
    for text in (cell.model.id, cell.model.source):
        for number, unit in _SIZE_IN_NAME.findall(text):
            value = float(number)
            sizes.append(value if unit.lower() == "b" else value / 1000.0)
        if sizes:
            break
    sizes = [s for s in sizes if s > 0]
    return max(sizes) if sizes else DEFAULT_PARAMS_B


def precision_factor(cell: Cell) -> float:
    """0.5 + 0.5 x bits/16: a 16-bit variant 1.0, 4-bit 0.625, 32-bit 1.5 (memory traffic
    dominates decoding; compute-bound passes change less). Bits: what the variant's name
    promises (qbench.backends.nominal_bits), 16 when it promises nothing known."""
    bits = nominal_bits(cell.variant.backend, cell.variant.quant) or 16.0
    bits = min(max(bits, 1.0), 32.0)
    return 0.5 + 0.5 * bits / 16.0


def metric_weight(metric: str, options: Any) -> float:
    """The metric's relative cost with these options (its MetricInfo.cost)."""
    info = known_metric_info(metric)
    return info.weight(options) if info is not None else 1.0


def estimate_cost(cell: Cell) -> float:
    """Relative cost of running ``cell`` (unitless; only ratios matter)."""
    return (metric_weight(cell.metric, cell.options) * model_params_b(cell)
            * precision_factor(cell))


def assign_shards(cells: Sequence[Cell], count: int,
                  cost: Callable[[Cell], float] = estimate_cost) -> list[list[Cell]]:
    """All ``count`` shards (0-based list), each in the plan's order. LPT in a stable order."""
    if count < 1:
        raise QbenchError(f"expected at least 1 shard, got {count}", key="--shard")
    position = {id(c): i for i, c in enumerate(cells)}
    order = sorted(cells, key=lambda c: (-cost(c), c.id, c.key))
    loads = [0.0] * count
    members: list[list[Cell]] = [[] for _ in range(count)]
    for cell in order:
        target = min(range(count), key=lambda s: (loads[s], s))
        loads[target] += cost(cell)
        members[target].append(cell)
    return [sorted(m, key=lambda c: position[id(c)]) for m in members]


def shard_loads(cells: Sequence[Cell], count: int,
                cost: Callable[[Cell], float] = estimate_cost) -> list[float]:
    """The estimated cost of each shard (for `qbench plan` and the tests)."""
    return [sum(cost(c) for c in shard) for shard in assign_shards(cells, count, cost)]


def select_shard(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """The cells of shard ``index`` (1-based) of ``count``, in plan order."""
    if count < 1 or not 1 <= index <= count:
        raise QbenchError(f"shard {index}/{count}: the index must be between 1 and the count",
                          key="--shard")
    return assign_shards(cells, count)[index - 1]


def shard_selector(spec: str | None) -> Callable[[list[Cell]], list[Cell]] | None:
    """For ``run_suite(select=...)``: None without ``--shard``, else a function picking the
    shard's cells. Bad input fails here, before anything is planned or locked."""
    if spec is None or str(spec).strip() == "":
        return None
    index, count = parse_shard(spec)
    return lambda cells: select_shard(cells, index, count)
