"""Summarises the warp-stall samples of one kernel in an Nsight Compute source export.

Export a report's SASS with its per-instruction metrics, then read one kernel of it:
    ncu -i REPORT.ncu-rep --page source --print-source sass --csv > SOURCE.csv
    python3 ptx/tools/ncu_stalls.py SOURCE.csv INDEX [TOP]
INDEX counts the kernels in the export from 0 (the export lists each profiled launch, in launch
order). Prints the kernel's name, its instruction and sample counts, the ten largest stall
reasons summed over the kernel, and with TOP the TOP instructions with the most samples, each
with its address, samples, executions, SASS and stall reasons. No GPU needed."""

import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, which = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    rows = list(csv.reader(open(path, newline="")))
    starts = [i for i, row in enumerate(rows) if row and row[0] == "Kernel Name"]
    if not 0 <= which < len(starts):
        sys.exit(f"{path}: kernel {which} out of range (the export holds {len(starts)})")
    end = starts[which + 1] if which + 1 < len(starts) else len(rows)
    header = rows[starts[which] + 1]
    data = [row for row in rows[starts[which] + 2 : end] if len(row) == len(header)]
    column = {name: i for i, name in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

    def count(row, name):
        value = row[column[name]]
        return int(value) if value.isdigit() else 0

    totals = collections.Counter()
    for row in data:
        for reason in reasons:
            totals[reason] += count(row, reason)
    print(rows[starts[which]][1], "instructions", len(data), "samples",
          sum(count(row, SAMPLES) for row in data))
    print("  ".join(f"{name[6:]}={n}" for name, n in totals.most_common(10)))
    if top:
        for row in sorted(data, key=lambda r: -count(r, SAMPLES))[:top]:
            detail = " ".join(f"{r[6:]}={count(row, r)}" for r in reasons if count(row, r))
            print(f"{row[column['Address']][-5:]} {count(row, SAMPLES):5d} "
                  f"ex={row[column['Instructions Executed']]:>7} "
                  f"{row[column['Source']].strip()[:56]:56s} {detail}")


if __name__ == "__main__":
    main()
