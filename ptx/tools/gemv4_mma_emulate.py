"""Replays gemv4_mma (ptx/nf4.cu) lane by lane: every index the kernel computes (chunks, pair
table bytes, x slots, mma fragments, absmax shuffles, warp and CTA sums) with the m16n8k16
fragment layouts of the PTX ISA, against W x computed directly. Usage: python3 gemv4_mma_emulate.py
(numpy; exits non-zero on a mismatch)."""
import sys
import numpy as np

TABLE = np.array([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796,
                  0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0], dtype=np.float32)


def bf16(v):
    """Round f32 to bf16 (nearest even), returned as f32."""
    b = np.asarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16 << 16
    return b.astype(np.uint32).view(np.float32)


def x_slot(c, q):
    return 4 * c + ((q + (c >> 1)) & 3)


def emulate(rows, cols, blocksize, rng):
    n = rows * cols
    codes = rng.integers(0, 16, n)
    packed = (codes[0::2] << 4 | codes[1::2]).astype(np.uint8)
    absmax = rng.uniform(0.1, 2.0, -(-n // blocksize)).astype(np.float32)
    x = bf16(rng.uniform(-1, 1, cols).astype(np.float32))
    w = bf16(TABLE[codes]) * np.repeat(absmax, blocksize)[:n]  # the kernel's bf16 table
    want = (w.reshape(rows, cols).astype(np.float64) @ x.astype(np.float64))
    cpr = cols // 32
    tiles = (cpr + 3) // 4
    pair = [(bf16(TABLE[b >> 4]), bf16(TABLE[b & 15])) for b in range(256)]
    x_sh = {}
    for i in range(cols // 8):
        x_sh[x_slot(i >> 2, i & 3)] = x[8 * i:8 * i + 8]
    got = np.zeros(rows)
    for cta in range((rows + 15) // 16):
        row0 = cta * 16
        warp_sums = np.zeros((8, 16))
        for warp in range(8):
            tb, te = tiles * warp // 8, tiles * (warp + 1) // 8
            acc = np.zeros((32, 4))
            for tile in range(tb, te):
                # per lane: its chunk's 16 bytes for rows g, g+8 and their absmax
                lane_codes, lane_scale = {}, {}
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    c = tile * 4 + t
                    for h in range(2):
                        row = row0 + g + 8 * h
                        if c < cpr and row < rows:
                            chunk = row * cpr + c
                            lane_codes[lane, h] = packed[16 * chunk:16 * chunk + 16]
                            lane_scale[lane, h] = absmax[chunk // (blocksize // 32)]
                        else:
                            lane_codes[lane, h] = np.zeros(16, np.uint8)
                            lane_scale[lane, h] = np.float32(0)
                part = np.zeros((16, 8))
                for q in range(4):
                    for half in range(2):
                        A = np.zeros((16, 16))
                        B = np.zeros((16, 8))
                        for lane in range(32):
                            g, t = lane >> 2, lane & 3
                            c = tile * 4 + t
                            xq = x_sh[x_slot(c, q)] if (g == t and c < cpr) else np.zeros(8)
                            byte = lambda h, b: lane_codes[lane, h][4 * q + b]
                            regs = [pair[byte(0, 2 * half)], pair[byte(1, 2 * half)],
                                    pair[byte(0, 2 * half + 1)], pair[byte(1, 2 * half + 1)]]
                            for i, (r, k) in enumerate([(g, 2 * t), (g + 8, 2 * t),
                                                        (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
                                A[r, k], A[r, k + 1] = regs[i]
                            bw = [xq[4 * half:4 * half + 2], xq[4 * half + 2:4 * half + 4]]
                            B[2 * t, g], B[2 * t + 1, g] = bw[0]
                            B[2 * t + 8, g], B[2 * t + 9, g] = bw[1]
                        part += A @ B
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    src0 = (lane & ~3) | ((2 * t) & 3)
                    for h in range(2):
                        for j in range(2):
                            a = lane_scale[src0 + j, h]
                            acc[lane, 2 * h + j] += a * part[g + 8 * h, 2 * t + j]
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                if t == 0:
                    warp_sums[warp, g] = acc[lane, 0] + acc[lane, 1] + acc[lane + 1, 0] + acc[lane + 1, 1]
                    warp_sums[warp, g + 8] = acc[lane, 2] + acc[lane, 3] + acc[lane + 1, 2] + acc[lane + 1, 3]
        for r in range(16):
            if row0 + r < rows:
                got[row0 + r] = warp_sums[:, r].sum()
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    return err


rng = np.random.default_rng(1)
bad = 0
for shape in [(1, 64, 64), (7, 96, 128), (37, 1024, 64), (16, 160, 32), (20, 2048, 256)]:
    e = emulate(*shape, rng)
    print(shape, f"{e:.2e}")
    bad += e > 1e-6
sys.exit(1 if bad else 0)
