#!/usr/bin/env bash
# On the GPU machine: Nsight Compute on some launches of a command, reduced there to what is
# worth carrying back (a report and its full source export are tens of MB).
#   usage: ptx/tools/ncu_profile.sh OUT REGEX SKIP COUNT COMMAND...
#   OUT     a folder for the outputs (created)
#   REGEX   the kernels to profile (ncu --kernel-name regex:REGEX)
#   SKIP    matching launches to skip first; COUNT how many to profile after them
# Writes OUT/details.txt (ncu's details page: durations, throughputs, occupancy, stall
# summaries) and OUT/stalls.txt (ptx/tools/ncu_stalls.py over every profiled kernel: its
# largest stall reasons and the 15 instructions with the most samples), and removes the report.
# Clocks are left alone (--clock-control none, as the machine's notes ask); caches are flushed
# before each profiled kernel, so durations run a little above graph replay.
# Example, one decode layer of the 7B shape (q/k/v, attention, o, gate/up, down):
#   ptx/tools/ncu_profile.sh $OUT/step 'gemv4_tiled_fused|attention_decode_fused' 60 5 \
#     ./sun bench generate --device cuda --shape 7b --lora-r 64 --prompt-tokens 32 --new-tokens 8
set -euo pipefail
[ $# -ge 5 ] || { sed -n 2,17p "$0"; exit 2; }
out=$1 regex=$2 skip=$3 count=$4
shift 4
mkdir -p "$out"
tools=$(dirname "$(realpath "$0")")
ncu --clock-control none --kernel-name "regex:$regex" --launch-skip "$skip" \
  --launch-count "$count" --set full --import-source no -o "$out/report" "$@" > "$out/command.txt" 2>&1
ncu -i "$out/report.ncu-rep" --page details > "$out/details.txt"
ncu -i "$out/report.ncu-rep" --page source --print-source sass --csv > "$out/source.csv"
# The export may list a kernel's table more than once in a row: each is summarised once.
kernels=$(grep -c '^"Kernel Name"' "$out/source.csv" || true)
previous=""
for ((i = 0; i < kernels; i++)); do
  summary=$(python3 "$tools/ncu_stalls.py" "$out/source.csv" "$i" 15)
  [ "$summary" = "$previous" ] || printf '%s\n\n' "$summary"
  previous=$summary
done > "$out/stalls.txt"
rm -f "$out/report.ncu-rep" "$out/source.csv"
grep -E '^  [a-zA-Z_0-9]+ \(|Duration  ' "$out/details.txt"
