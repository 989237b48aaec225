#!/usr/bin/env bash
# Builds the reference llama.cpp (commit 0c1e570, as vendored in the PyPI sdist
# llama-cpp-python==0.3.36; see scripts/fetch-llama-cpp-src.sh) for this machine's CPU
# into third_party/llama.cpp-build (git-ignored).
#
# Flags: GGML_NATIVE=OFF with AVX-512/VNNI/BF16 on and AMX off. The VM's CPUID lists AMX
# but AMX instructions fault (SIGILL), so a native build crashes (see /work/shared/REFERENCE.md).
#
# Targets: llama-simple llama-perplexity llama-tokenize llama-bench. (llama-cli is not
# built: at this commit it links the whole server.) Also builds libllama/libggml* shared
# libraries; binaries need LD_LIBRARY_PATH=third_party/llama.cpp-build/bin.
#
# Idempotent: does nothing when all binaries exist. Set KILN_LLAMA_REBUILD=1 to force.
# Set KILN_LLAMA_JOBS to change the parallelism (default: nproc).
# Prints the bin directory on stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/third_party/llama.cpp-build"
bin="$build/bin"
targets=(llama-simple llama-perplexity llama-tokenize llama-bench)

all_built() {
  for t in "${targets[@]}"; do [ -x "$bin/$t" ] || return 1; done
  [ -f "$bin/libllama.so" ] || return 1
}

if [ "${KILN_LLAMA_REBUILD:-0}" != 1 ] && all_built; then
  echo "$bin"
  exit 0
fi

src=$("$root/scripts/fetch-llama-cpp-src.sh")
gen=()
if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi

cmake -S "$src" -B "$build" "${gen[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON \
  -DGGML_NATIVE=OFF \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DGGML_AVX_VNNI=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DGGML_OPENMP=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  >&2

cmake --build "$build" --config Release -j "${KILN_LLAMA_JOBS:-$(nproc)}" --target "${targets[@]}" >&2

all_built || { echo "build-llama-cpp: missing binaries in $bin" >&2; exit 1; }
echo "$bin"
