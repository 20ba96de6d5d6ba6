"""Replays the tile loops of ptx/attention.cu (branch attn2) at the level of (query, key) pairs:
which tiles a warp computes, which it masks (only tiles reaching past its first row / last
key) and the int column bounds, and checks that every warp's rows below T see exactly the keys
0 ..= pos0 + t (forward, dQ) and every key row below T exactly the queries t >= s (dK/dV), for
several T, pos0 and both tile orders. No GPU: run `python3 ptx/tools/attention_masks.py`."""

FQ = FT = 64
WARPS = 4


def forward_pairs(T, pos0, blockidx, grid):
    q0 = (grid - 1 - blockidx) * FQ  # longest query tiles first
    keys_end = pos0 + min(T, q0 + FQ)
    seen = {}
    for warp in range(WARPS):
        warp_first = pos0 + q0 + warp * 16
        warp_last = warp_first + 15
        for k0 in range(0, keys_end, FT):
            if k0 > warp_last:
                continue
            diagonal = k0 + FT - 1 > warp_first
            for g in range(8):
                for r in range(2):
                    row = q0 + warp * 16 + g + 8 * r
                    last_col = warp_first + g + 8 * r - k0
                    if diagonal:
                        assert -15 <= last_col <= 77, last_col
                    for col in range(FT):
                        key = k0 + col
                        # keys >= keys_end are zero rows in shared memory: s = 0, finite
                        masked = diagonal and col > last_col
                        if not masked:
                            seen.setdefault(row, set()).add(key)
    return seen


def dq_pairs(T, blockidx, grid):
    return forward_pairs(T, 0, blockidx, grid)


def dkv_pairs(T, blockidx):
    j0 = blockidx * FT
    seen = {}
    for warp in range(WARPS):
        warp_key0 = j0 + warp * 16
        for t0 in range(j0, T, FQ):
            diagonal = t0 < warp_key0 + 15
            for g in range(8):
                for r in range(2):
                    key = j0 + warp * 16 + g + 8 * r
                    first_col = key - t0
                    if diagonal:
                        assert -14 <= first_col <= 63, first_col
                    for col in range(FQ):
                        t = t0 + col
                        masked = diagonal and col < first_col
                        # queries t >= T contribute zero (zero q and dout rows): drop them here
                        if not masked and t < T:
                            seen.setdefault(key, set()).add(t)
    return seen


def main():
    checked = 0
    for T in [1, 3, 7, 15, 16, 17, 63, 64, 65, 77, 100, 127, 128, 129, 512, 700]:
        grid = (T + FQ - 1) // FQ
        for pos0 in [0, 1, 5, 50, 63, 64, 200]:
            rows = {}
            for b in range(grid):
                rows.update(forward_pairs(T, pos0, b, grid))
            for t in range(T):
                assert rows[t] == set(range(pos0 + t + 1)), (T, pos0, t)
            checked += 1
        rows = {}
        for b in range(grid):
            rows.update(dkv_pairs(T, b))
        for s in range(T):
            assert rows.get(s, set()) == set(range(s, T)), (T, s)
    print(f"attention masks: {checked} forward/dQ cases and the dK/dV ones match causality")


if __name__ == "__main__":
    main()
