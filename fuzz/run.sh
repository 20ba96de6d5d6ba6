#!/usr/bin/env bash
# Runs cargo-fuzz targets for a given time: fuzz/run.sh TARGET SECONDS, or fuzz/run.sh all SECONDS
# (one target after another). Needs cargo-fuzz 0.13 (`cargo install cargo-fuzz`); the stable
# toolchain builds the sanitizer flags with RUSTC_BOOTSTRAP=1. Corpus and crashes land in
# fuzz/corpus/TARGET and fuzz/artifacts/TARGET (both ignored by git).
set -euo pipefail

usage="usage: fuzz/run.sh <quant_roundtrip|safetensors_parse|gguf_parse|tokenizer_roundtrip|all> <seconds>"
target="${1:?$usage}"
seconds="${2:?$usage}"
cd "$(dirname "$0")/.."

targets=(quant_roundtrip safetensors_parse gguf_parse tokenizer_roundtrip)
if [[ "$target" != all ]]; then
    targets=("$target")
fi

for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    echo "== $t for ${seconds}s" >&2
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -artifact_prefix="fuzz/artifacts/$t/"
done
