#!/usr/bin/env bash
# Build llama.cpp's reference tools (llama-perplexity, llama-bench, llama-imatrix,
# llama-quantize) from the llama.cpp vendored in the llama-cpp-python sdist qbench uses, with
# the same CMake flags (qbench.host.buildflags), so tool and library run the very same kernels.
#
#   benchmarks/build_llama_tools.sh            # all four; prints the bin folder on its last line
#   benchmarks/build_llama_tools.sh llama-perplexity llama-quantize   # only these targets
#   export QBENCH_LLAMA_CPP_BIN="$(benchmarks/build_llama_tools.sh | tail -1)"
#
# Output: ${QBENCH_LLAMA_TOOLS:-~/.cache/qbench/llama-tools}/<hash of version + flags>/bin.
# Idempotent: a run whose targets are all there only prints the folder; targets missing are
# built and added to the folder (tools built earlier are kept). About 5-10 min on 2 cores.
# Any llama.cpp CMake target that produces bin/<name> may be named (llama-cli, ...).
# Env: LLAMA_CPP_VERSION (default 0.3.36), QBENCH_CMAKE_ARGS (default: python -m qbench.host.buildflags),
#      JOBS (default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
VPY="${PYTHON:-.venv/bin/python}"
if [ "$#" -gt 0 ]; then TOOLS=("$@"); else
  TOOLS=(llama-perplexity llama-bench llama-imatrix llama-quantize); fi

CMAKE_ARGS="${QBENCH_CMAKE_ARGS:-$($VPY -m qbench.host.buildflags)}"
# the same hash recipe as scripts/bootstrap.sh uses for the wheel
HASH="$(printf '%s %s' "$LLAMA_CPP_VERSION" "$CMAKE_ARGS" | sha256sum | cut -c1-16)"
ROOT="${QBENCH_LLAMA_TOOLS:-$HOME/.cache/qbench/llama-tools}/$HASH"
BIN="$ROOT/bin"

missing() {
  for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || echo "$t"; done
}

NEED=($(missing))
if [ "${#NEED[@]}" -gt 0 ]; then
  # one build at a time per folder (another shell may be building the same tools)
  mkdir -p "$ROOT"
  exec 9>"$ROOT/.lock"
  flock 9
  NEED=($(missing))
fi
if [ "${#NEED[@]}" -gt 0 ]; then
  echo "building ${NEED[*]} from llama-cpp-python $LLAMA_CPP_VERSION into $ROOT" >&2
  echo "CMAKE_ARGS=$CMAKE_ARGS" >&2
  mkdir -p "$ROOT"
  WORK="$(mktemp -d "$ROOT/.build.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
  $VPY -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" \
    -d "$WORK/sdist" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  tar -xzf "$WORK"/sdist/llama_cpp_python-"$LLAMA_CPP_VERSION".tar.gz -C "$WORK"
  SRC="$WORK/llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp"
  [ -f "$SRC/tools/perplexity/CMakeLists.txt" ] || { echo "no llama.cpp source in the sdist" >&2; exit 1; }
  # shellcheck disable=SC2086  # CMAKE_ARGS is a flag list
  cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF $CMAKE_ARGS >"$WORK/configure.log" 2>&1 \
    || { tail -40 "$WORK/configure.log" >&2; exit 1; }
  cmake --build "$WORK/build" -j"${JOBS:-$(nproc)}" --target "${NEED[@]}" >"$WORK/build.log" 2>&1 \
    || { tail -60 "$WORK/build.log" >&2; exit 1; }
  # each tool lands atomically (copy, then rename), next to those built before
  mkdir -p "$BIN"
  for t in "${NEED[@]}"; do
    cp "$WORK/build/bin/$t" "$BIN/.$t.tmp"
    mv "$BIN/.$t.tmp" "$BIN/$t"
  done
  printf 'llama-cpp-python %s\nCMAKE_ARGS=%s\n' "$LLAMA_CPP_VERSION" "$CMAKE_ARGS" > "$BIN/BUILD_INFO"
fi
echo "$BIN"
