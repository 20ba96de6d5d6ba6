#!/usr/bin/env python3
"""Replays ptx/gemv4_tiled.cu lane by lane with numpy: the packing (tile4_pack_codes and the scale
packing into 576-byte records), the mma.m16n8k16 fragments each lane feeds (A from the pair
table, B from x as the predicated lanes g < 2 load it), the lanes t = 0 scaling their
accumulators, the CTA-strided walks with their unit slots, and finish_units. The mma itself is
C += A B on the PTX fragment layout (ISA, "Matrix Fragments for mma.m16n8k16"). The code table is
kept in f64 here, so the product must match W x to rounding (~1e-7): any index error shows as
an O(1) relative error.

usage: gemv4_tiled_emulate.py   (exits non-zero on a mismatch)
"""
import sys

import numpy as np

UNIT_ROWS, PIECE_COLS, HALF_COLS = 8, 128, 64


def pack(codes, absmax, blocksize):
    """(records codes (tiles, 32 lanes, 4 words, 4 bytes), scales (tiles, 8, 2)) as the pack
    kernels write them; codes (R, K) 4-bit values, bitsandbytes' byte order."""
    rows, cols = codes.shape
    flat = codes.reshape(-1)
    packed = (flat[0::2] << 4) | flat[1::2]  # element 2i in the high nibble
    units, pieces = -(-rows // UNIT_ROWS), -(-cols // PIECE_COLS)
    tiles = units * pieces
    tc = np.zeros((tiles, 32, 4, 4), dtype=np.int64)
    sc = np.zeros((tiles, 8, 2))
    for tile in range(tiles):
        unit, piece = divmod(tile, pieces)
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            row = unit * UNIT_ROWS + g
            for j in range(4):
                for q in range(4):
                    col = piece * PIECE_COLS + (q & 1) * HALF_COLS + 16 * t + 4 * j + 2 * (q >> 1)
                    if row < rows and col < cols:
                        tc[tile, lane, j, q] = packed[(row * cols + col) >> 1]
        for g in range(8):
            for h in range(2):
                row, col = unit * UNIT_ROWS + g, piece * PIECE_COLS + h * HALF_COLS
                if row < rows and col < cols:
                    sc[tile, g, h] = absmax[(row * cols + col) // blocksize]
    return tc, sc, units, pieces


def tile_sums(table, tc, sc, xs, tile, piece):
    """acc increments (8 rows, 2 halves) of one tile: the four mmas into a fresh C."""
    pair = lambda b: (table[b >> 4], table[b & 15])  # low half = the high nibble's element
    c = np.zeros((16, 8))
    for j in range(4):
        a, b = np.zeros((16, 16)), np.zeros((16, 8))
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            p = [pair(tc[tile, lane, j, q]) for q in range(4)]
            a[g, 2 * t:2 * t + 2], a[g + 8, 2 * t:2 * t + 2] = p[0], p[1]
            a[g, 2 * t + 8:2 * t + 10], a[g + 8, 2 * t + 8:2 * t + 10] = p[2], p[3]
            if g < 2:  # B column g: half g's 16 columns of this lane
                at = piece * PIECE_COLS + g * HALF_COLS + 16 * t
                words = xs[at:at + 16]
                b[2 * t:2 * t + 2, g] = words[4 * j:4 * j + 2]
                b[2 * t + 8:2 * t + 10, g] = words[4 * j + 2:4 * j + 4]
        c += a @ b
    return np.array([[sc[tile, g, 0] * c[g, 0], sc[tile, g, 1] * c[g + 8, 1]] for g in range(8)])


def gemv(table, tc, sc, x, rows, units, pieces, ctas, warps):
    xs = np.zeros(pieces * PIECE_COLS)
    xs[:len(x)] = x
    y = np.zeros(rows)
    for b in range(ctas):
        u0, u1 = units * b // ctas, units * (b + 1) // ctas
        n = (u1 - u0) * pieces
        slots = np.zeros((u1 - u0, warps, 8, 2))
        for w in range(warps):
            acc, unit, piece = np.zeros((8, 2)), w // pieces, w % pieces
            for j in range(w, n, warps):  # the strided walk
                acc += tile_sums(table, tc, sc, xs, u0 * pieces + j, piece)
                piece += warps
                if piece >= pieces:  # leaving the unit: its slot
                    slots[unit, w] = acc
                    acc = np.zeros((8, 2))
                    while piece >= pieces:
                        piece -= pieces
                        unit += 1
        for k in range(u1 - u0):  # finish_units
            s = sum(slots[k, w] for w in range(warps))
            for g in range(8):
                row = (u0 + k) * UNIT_ROWS + g
                if row < rows:
                    y[row] = s[g, 0] + s[g, 1]
    return y


def main():
    rng = np.random.default_rng(7)
    worst = 0.0
    # (rows, cols, blocksize, CTAs, warps): partial units, half-empty last pieces, more warps
    # than tiles, several units a CTA, x cached shapes (pieces == 2 warps).
    for rows, cols, blocksize, ctas, warps in [(13, 576, 64, 3, 16), (44, 192, 128, 5, 16),
                                               (16, 256, 64, 1, 2), (40, 640, 64, 2, 32),
                                               (24, 512, 256, 2, 2), (8, 64, 64, 1, 16)]:
        table = np.sort(rng.uniform(-1, 1, 16))
        codes = rng.integers(0, 16, (rows, cols))
        absmax = rng.uniform(0.1, 2.0, rows * cols // blocksize)
        w = table[codes] * np.repeat(absmax, blocksize).reshape(rows, cols)
        x = rng.uniform(-1, 1, cols)
        tc, sc, units, pieces = pack(codes, absmax, blocksize)
        y = gemv(table, tc, sc, x, rows, units, pieces, ctas, warps)
        ref = w @ x
        err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        worst = max(worst, err)
        print(f"{rows} x {cols} b{blocksize} {ctas} CTAs {warps} warps: relative error {err:.2e}")
    if worst > 1e-6:
        sys.exit(f"mismatch: {worst:.2e}")


if __name__ == "__main__":
    main()
