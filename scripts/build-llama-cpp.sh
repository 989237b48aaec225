#!/usr/bin/env bash
# Builds the reference llama.cpp (commit 0c1e570, as vendored in the PyPI sdist
# llama-cpp-python==0.3.36; see scripts/fetch-llama-cpp-src.sh) for this machine's CPU
# into third_party/llama.cpp-build (git-ignored).
#
# Flags: GGML_NATIVE=OFF, each x86 extension (AVX2, AVX-512, VNNI, BF16, AVX-VNNI) on
# only where /proc/cpuinfo lists it, and AMX always off. These VMs' CPUID lists AMX but
# AMX instructions fault (SIGILL), so a native build crashes (see
# /work/shared/REFERENCE.md); and AMD EPYC (Zen 4) VMs have AVX-512 VNNI but not the VEX
# AVX-VNNI, which a build with every flag on executes and faults on. The flags used are
# kept in the build directory; a machine that lists other flags rebuilds.
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

# -DGGML_X=ON|OFF for each extension, from the CPU's flags.
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
ggml_flags=()
for pair in AVX:avx AVX2:avx2 FMA:fma F16C:f16c AVX512:avx512f AVX512_VBMI:avx512vbmi \
  AVX512_VNNI:avx512_vnni AVX512_BF16:avx512_bf16 AVX_VNNI:avx_vnni; do
  if [[ "$cpu_flags" == *" ${pair#*:} "* ]]; then on=ON; else on=OFF; fi
  ggml_flags+=("-DGGML_${pair%%:*}=$on")
done
stamp="$build/kiln-cpu-flags"

all_built() {
  for t in "${targets[@]}"; do [ -x "$bin/$t" ] || return 1; done
  [ -f "$bin/libllama.so" ] || return 1
  [ "$(cat "$stamp" 2>/dev/null)" = "${ggml_flags[*]}" ] || return 1
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
  "${ggml_flags[@]}" \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DGGML_OPENMP=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  >&2

cmake --build "$build" --config Release -j "${KILN_LLAMA_JOBS:-$(nproc)}" --target "${targets[@]}" >&2
echo "${ggml_flags[*]}" > "$stamp"

all_built || { echo "build-llama-cpp: missing binaries in $bin" >&2; exit 1; }
echo "$bin"
