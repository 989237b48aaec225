#!/usr/bin/env bash
# Fetches llama.cpp's source as shipped in the PyPI sdist of llama-cpp-python 0.3.36
# (vendor/llama.cpp at commit 0c1e570) into third_party/ (git-ignored).
# It carries the reference implementation, tokenizer test vectors and chat templates.
# Prints the path of vendor/llama.cpp.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/third_party/llama-cpp-python-0.3.36"
if [ ! -f "$dest/vendor/llama.cpp/CMakeLists.txt" ]; then
  mkdir -p "$root/third_party"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # pip runs the sdist's build backend to read its metadata; give it one without isolation.
  python3 -m pip install -q scikit-build-core cmake ninja >&2
  python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$tmp" llama-cpp-python==0.3.36 >&2
  tar -xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
  rm -rf "$dest"
  mv "$tmp/llama_cpp_python-0.3.36" "$dest"
fi
echo "$dest/vendor/llama.cpp"
