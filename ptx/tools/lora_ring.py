#!/usr/bin/env python3
"""Replays ptx/lora.cu's pipelined main loop (`Mainloop`) on the host, and checks it.

Run: python3 ptx/tools/lora_ring.py   (no arguments; numpy; prints what it checked and "ok", or
fails on the first mismatch; then checks that wrong variants of the addressing are caught.)

For each of the kernels' operand layouts (z: A stored [m][k], B stored [n][k]; dz: A [m][k], B
[k][n]; the gradients: A [k][m], B [k][n]) on the tall (128 x 64) and the wide (64 x 128) tiles:

1. The copies. Every thread's chunks (i = tid + c * 256 at tile row i / (COLS / 8), column
   8 (i % (COLS / 8))) cover each operand tile exactly once (drop_tile walks the same chunks, so
   a thread drops in place only bytes its own cp.async wait covers).
2. The ring. Slot of step s is s % STAGES; the copies of step s + STAGES - 1 are issued after
   step s's barrier into the slot step s - 1 used; with one commit group a step (empty past the
   end), wait_group(STAGES - 2) at step s leaves step s landed. Checked by replaying the group
   counts for 1..9 steps and STAGES 3 and 4.
3. The fragments. ldmatrix .x4 (and .trans) is modelled exactly (PTX ISA: matrix q's 8 row
   addresses come from lanes 8q..8q+7; lane l receives row l / 4, elements 2 (l % 4), 2 (l % 4)
   + 1 of each matrix, of the transposed matrix with .trans), the m16n8k16 fragments as in
   ptx/mma.cuh's header. Each warp's 2 x 4 accumulators from the kernel's lane addresses, over
   every k16 step of a 64-deep slot, must equal the tile's A · B, and the epilogue's (row, col)
   of each accumulator element must be the element it holds.
"""
import numpy as np

BK, PAD, THREADS = 64, 8, 256


def ldmatrix_x4(smem, addrs, trans):
    """smem: 1-D array of u16 elements; addrs[l]: element offset of the row lane l addresses.
    Returns regs[l][q] = (lo, hi) element values of matrix q for lane l."""
    regs = [[None] * 4 for _ in range(32)]
    for q in range(4):
        rows = [smem[addrs[8 * q + i]: addrs[8 * q + i] + 8] for i in range(8)]
        mat = np.array(rows)  # 8 x 8
        if trans:
            mat = mat.T
        for l in range(32):
            regs[l][q] = (mat[l // 4][2 * (l % 4)], mat[l // 4][2 * (l % 4) + 1])
    return regs


def a_from_regs(regs):
    """A 16 x 16 from lanes' a[0..3]: (g, 2t..), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..)."""
    a = np.zeros((16, 16))
    for l in range(32):
        g, t = l // 4, l % 4
        for q, (r, c) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            a[r][c], a[r][c + 1] = regs[l][q]
    return a


def b_from_regs(regs, first):
    """B 16 x 8 (k x n) from lanes' b[0..1] = regs q first, first + 1: (k 2t.., n g), (k 2t + 8.., n g)."""
    b = np.zeros((16, 8))
    for l in range(32):
        g, t = l // 4, l % 4
        for h, k in enumerate([2 * t, 2 * t + 8]):
            b[k][g], b[k + 1][g] = regs[l][first + h]
    return b


def check(tm, tn, a_km, b_kn, variant=None):
    rng = np.random.default_rng(tm * 7 + tn + 2 * a_km + b_kn)
    A = rng.integers(-8, 8, size=(tm, BK)).astype(float)  # (M, K)
    B = rng.integers(-8, 8, size=(BK, tn)).astype(float)  # (K, N)
    a_rows, a_cols = (tm, BK) if a_km else (BK, tm)
    b_rows, b_cols = (BK, tn) if b_kn else (tn, BK)
    a_pitch, b_pitch = a_cols + PAD, b_cols + PAD
    a_st = A if a_km else A.T
    b_st = B if b_kn else B.T
    # 1. the copies: every chunk once.
    for rows, cols in [(a_rows, a_cols), (b_rows, b_cols)]:
        chunks = rows * cols // 8 // THREADS
        assert chunks * THREADS * 8 == rows * cols
        seen = np.zeros((rows, cols), int)
        for tid in range(THREADS):
            for c in range(chunks):
                i = tid + c * THREADS
                r, q = i // (cols // 8), 8 * (i % (cols // 8))
                seen[r, q:q + 8] += 1
        assert (seen == 1).all()
    sa = np.full(a_rows * a_pitch, np.nan)
    sb = np.full(b_rows * b_pitch, np.nan)
    for r in range(a_rows):
        sa[r * a_pitch:r * a_pitch + a_cols] = a_st[r]
    for r in range(b_rows):
        sb[r * b_pitch:r * b_pitch + b_cols] = b_st[r]
    warps_n = tn // 32
    got = np.full((tm, tn), np.nan)
    for warp in range(THREADS // 32):
        wm, wn = 32 * (warp // warps_n), 32 * (warp % warps_n)
        acc = np.zeros((2, 4, 16, 8))
        for kk in range(0, BK, 16):
            fa = []
            for i in range(2):
                ii = wm + 16 * i
                if a_km:
                    addrs = [(ii + (l & 15)) * a_pitch + kk + (l >> 4) * 8 for l in range(32)]
                else:
                    addrs = [(kk + (l & 7) + (l >> 4) * 8) * a_pitch + ii + ((l >> 3) & 1) * 8
                             for l in range(32)]
                    if variant == "a-trans-halves-swapped":
                        addrs = [(kk + (l & 7) + ((l >> 3) & 1) * 8) * a_pitch + ii + (l >> 4) * 8
                                 for l in range(32)]
                fa.append(a_from_regs(ldmatrix_x4(sa, addrs, not a_km)))
            fb = []
            for j in range(2):
                jj = wn + 16 * j
                if b_kn:
                    addrs = [(kk + (l & 7) + ((l >> 3) & 1) * 8) * b_pitch + jj + (l >> 4) * 8
                             for l in range(32)]
                else:
                    addrs = [(jj + (l & 7) + (l >> 4) * 8) * b_pitch + kk + ((l >> 3) & 1) * 8
                             for l in range(32)]
                    if variant == "b-nontrans-halves-swapped":
                        addrs = [(jj + (l & 7) + ((l >> 3) & 1) * 8) * b_pitch + kk + (l >> 4) * 8
                                 for l in range(32)]
                regs = ldmatrix_x4(sb, addrs, b_kn)
                fb.append(b_from_regs(regs, 0))
                fb.append(b_from_regs(regs, 2))
            for i in range(2):
                for j in range(4):
                    acc[i][j] += fa[i] @ fb[j]
        # The epilogue: lane l's element e of acc[i][j] at row wm + 16 i + g + 8 (e / 2), col wn
        # + 8 j + 2 t + e % 2.
        for i in range(2):
            for j in range(4):
                for l in range(32):
                    g, t = l // 4, l % 4
                    for e in range(4):
                        got[wm + 16 * i + g + 8 * (e // 2), wn + 8 * j + 2 * t + e % 2] = \
                            acc[i][j][g + 8 * (e // 2)][2 * t + e % 2]
    want = A @ B
    return np.array_equal(got, want)


def check_ring():
    for stages in (3, 4):
        for steps in range(1, 10):
            committed = stages - 1  # groups 0 .. stages - 2 (empty past the end)
            for step in range(steps):
                # wait_group(stages - 2): the oldest committed - (stages - 2) groups are done
                done = committed - (stages - 2)
                assert done >= step + 1, (stages, steps, step)
                ahead = step + stages - 1
                if ahead < steps:
                    # the slot written now is the one step - 1 read (all warps past the barrier)
                    assert ahead % stages == (step - 1) % stages
                committed += 1


def main():
    check_ring()
    print("ring: steps 1..9 at 3 and 4 stages: each step landed at its wait; refills reuse the"
          " slot the previous step read")
    cases = [("z (tall, A [m][k], B [n][k])", 128, 64, True, False),
             ("dz (tall, A [m][k], B [k][n])", 128, 64, True, True),
             ("dB (tall, A [k][m], B [k][n])", 128, 64, False, True),
             ("dA (wide, A [k][m], B [k][n])", 64, 128, False, True),
             ("z-like on wide tiles", 64, 128, True, False)]
    for name, tm, tn, a_km, b_kn in cases:
        assert check(tm, tn, a_km, b_kn), name
        print(f"fragments and epilogue: {name}: C = A B exactly")
    # Wrong variants must be caught.
    assert not check(64, 128, False, True, "a-trans-halves-swapped")
    assert not check(128, 64, True, False, "b-nontrans-halves-swapped")
    print("wrong lane addressing (8-row halves swapped) caught")
    print("ok")


if __name__ == "__main__":
    main()
