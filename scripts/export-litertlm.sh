#!/usr/bin/env bash
# Exports a pulled GGUF model to LiteRT-LM's `.litertlm` format, so that `bench/compare --litert`
# can measure LiteRT-LM (the system kiln is modelled on) side by side with kiln on this machine.
#
#   scripts/export-litertlm.sh [MODEL] [OUT]     (default: gemma3-270m, third_party/litert/MODEL.litertlm)
#
# The recipe REFERENCE.md describes: GGUF -> transformers (dequantized to f32) -> litert-torch's
# export with int8 per-channel weights and float activations (`dynamic_wi8_afp32`), a KV cache of
# 1024 and a prefill signature of 512 tokens. Everything lives in the git-ignored third_party/litert
# (a virtual environment of about 7 GB: torch, TensorFlow and LiteRT's converters). Only models
# litert-torch knows how to export work (Gemma 3 does).
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-gemma3-270m}"
dir="third_party/litert"
out="${2:-$dir/$model.litertlm}"
gguf="${KILN_HOME:-$HOME/.cache/kiln}/models/$model.gguf"
[ -f "$gguf" ] || { echo "export-litertlm: $gguf is missing: run \`kiln pull $model\`" >&2; exit 1; }
venv="$dir/venv"
if [ ! -x "$venv/bin/litert-torch" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q litert-lm==0.18.1 litert-torch==0.10.0 torch==2.14.1 transformers==5.25.0 \
    tensorflow-cpu==2.21.0 accelerate==1.16.0 gguf==0.19.0
  # (Some of those pull in Hugging Face's `kernels`, whose layer decorators refuse the
  # exporter's patched Gemma 3 at import: see USE_HUB_KERNELS below.)
  "$venv/bin/pip" uninstall -y -q kernels || true
fi
# transformers 5.25 would otherwise ask for Hugging Face's `kernels` package when it loads a model.
export USE_HUB_KERNELS=NO
hf="$dir/$model-hf"
"$venv/bin/python" - "$gguf" "$hf" <<'EOF'
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = Path(sys.argv[1]), sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
# A model loaded from GGUF counts as quantized and refuses to save, though its weights are plain
# f32 tensors by now: drop the marks.
model.hf_quantizer = None
model.is_quantized = False
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tokenizer.save_pretrained(out)
EOF
tmp="$dir/$model-export"
rm -rf "$tmp"
"$venv/bin/litert-torch" export_hf "$hf" "$tmp" --task=text_generation --cache_length=1024 \
  --prefill_lengths=512 --quantization_recipe=dynamic_wi8_afp32
mv "$tmp/model.litertlm" "$out"
rm -rf "$tmp" "$hf"
echo "$out"
echo "litert-lm: $venv/bin/litert-lm (bench/compare --litert $out --litert-lm $venv/bin/litert-lm)" >&2
