#!/usr/bin/env bash
# Build llama.cpp's reference tools (llama-perplexity, llama-bench, llama-imatrix,
# llama-quantize) from the llama.cpp vendored in the installed llama-cpp-python's sdist, with
# the same CMake flags (qbench.host.buildflags), so tool and library run the very same kernels.
# qbench builds the tools it needs on first use by itself (qbench.quantize.llama_tools); this
# script is for the benchmarks, which also drive llama-perplexity and llama-bench.
#
#   benchmarks/build_llama_tools.sh            # all four; prints the bin folder on its last line
#   benchmarks/build_llama_tools.sh llama-perplexity llama-quantize   # only these targets
#   export QBENCH_LLAMA_CPP_BIN="$(benchmarks/build_llama_tools.sh | tail -1)"
#
# Output: ${QBENCH_LLAMA_TOOLS:-~/.cache/qbench/llama-tools}/<hash of version + flags>/bin, the
# hash bootstrap.sh uses for the wheel. Idempotent; about 5-10 min on 2 cores the first time.
# Env: QBENCH_CMAKE_ARGS (default: python -m qbench.host.buildflags), PYTHON (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m qbench.quantize.llama_tools "$@"
