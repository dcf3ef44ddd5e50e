#!/usr/bin/env bash
# Build and run the plain C++ rANS tests under AddressSanitizer + UBSan (no Python).
# Usage: rans/run_asan_tests.sh [build-dir]   (default: build/rans-asan)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build/rans-asan}"
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi
cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DRANS_PYTHON=OFF -DRANS_TESTS=ON -DRANS_ASAN=ON
cmake --build "$BUILD" --parallel
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
ctest --test-dir "$BUILD" --output-on-failure
# again on the portable paths: the AVX-512 kernels and native coders are selected at run
# time when the CPU has them (the run above), RANS_NO_AVX512=1 disables them
RANS_NO_AVX512=1 "$BUILD/test_rans"
