#!/usr/bin/env python3
"""Replays ptx/gemv4_tiled.cu's fused decode GEMV (gemv4_tiled_fused_*) index by index in numpy.

What it replays, as the kernel does it:
  - tile4_pack_codes / tile4_pack_scales_*: every (tile, lane, j, q) byte and (tile, g, h) scale
    of a SPLIT row space (1..3 matrices, each padded to whole units) or a PAIR (gate, up), from
    bitsandbytes-layout codes (even element in the high nibble) and per-block absmax;
  - the tile math: lane 4g + t's word j, byte q is A register q of mma j (half q & 1, columns
    16t + 4j + 2 (q >> 1) + {0, 1}); B column g < 2 is x at PC p + HO g + 16t + (0..15) (zero
    past K); C[g][0] (half 0) and C[g + 8][1] (half 1), scaled by the tile's two absmax;
  - the CTA split of the units (units * b / G), the warps' strided walks (tile w, w + W, ...),
    TileWalk.advance's slot writes, and the finish: slot sums in warp order, the shuffles
    that bring v to lane rho, the B rows staged as bf16 pairs at lora_words u32 a row (with
    the bank check of the finish's loads), z as f32, the xor-shuffle reduction, and the three
    epilogues with their rounding points.
It checks every output against W x + s (B z) computed directly from the dense matrices (the
code table rounded to bf16, as the kernel's pair table is). f32 sums are replayed as float32
in the kernel's order where it matters (slot sums, halves, the LoRA fma), so the comparison is
to float32 round-off. Run: python3 ptx/tools/gemv4_tiled_emulate.py
"""
import numpy as np

UNIT_ROWS, HALF, WARPS, SMS = 8, 64, 16, 132
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32)


def bf16(v):
    """Round float32 values to bf16 (nearest even), returned as float32."""
    b = np.asarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return (b.astype(np.uint32) << 16).view(np.float32)


class Matrix:
    def __init__(self, rng, rows, cols, rank, blocksize=64):
        self.rows, self.cols, self.rank = rows, cols, rank
        self.codes = rng.integers(0, 16, size=rows * cols, dtype=np.uint8)
        self.packed = ((self.codes[0::2] << 4) | self.codes[1::2]).astype(np.uint8)
        self.absmax = rng.uniform(0.05, 2.0, size=(rows * cols) // blocksize).astype(np.float32)
        self.blocksize = blocksize
        # the kernel's weights: bf16(table[code]) * absmax (the absmax applied to partial sums)
        dense = bf16(NF4)[self.codes].astype(np.float64) * np.repeat(self.absmax, blocksize)
        self.dense = dense.reshape(rows, cols)
        self.b = bf16(rng.uniform(-1, 1, size=(rows, rank)).astype(np.float32))
        self.z = bf16(rng.uniform(-1, 1, size=rank).astype(np.float32))
        self.scale = np.float32(0.25)

    def want(self, x):
        v = self.dense @ x.astype(np.float64)
        if self.rank:
            v += float(self.scale) * (self.b.astype(np.float64) @ self.z.astype(np.float64))
        return v


def pack(rows, cols, piece_cols, half_offset, pieces, records, first_unit,
         half_mask, scales_from, codes_from):
    """tile4_pack_codes (when codes_from is given) and tile4_pack_scales_plain."""
    units = -(-rows // UNIT_ROWS)
    for tile in range(units * pieces):
        unit, piece = divmod(tile, pieces)
        rec = records[(first_unit * pieces + tile)]
        for g in range(8):
            for h in range(2):
                row, col = unit * UNIT_ROWS + g, piece * piece_cols + h * half_offset
                if (half_mask >> h) & 1:
                    m = scales_from
                    rec["scales"][g, h] = (m.absmax[(row * cols + col) // m.blocksize]
                                           if row < rows and col < cols else 0.0)
        if codes_from is None:
            continue
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for j in range(4):
                for q in range(4):
                    h = q & 1
                    row = unit * UNIT_ROWS + g
                    col = piece * piece_cols + h * half_offset + 16 * t + 4 * j + 2 * (q >> 1)
                    src = codes_from[h]
                    rec["codes"][lane, j, q] = (src.packed[(row * cols + col) >> 1]
                                                if row < rows and col < cols else 0)


def new_records(n):
    return [{"codes": np.zeros((32, 4, 4), np.uint8), "scales": np.zeros((8, 2), np.float32)}
            for _ in range(n)]


def tile_sums(rec, x, piece, piece_cols, half_offset, cols):
    """The tile's (8 g, 2 h) scaled partial sums: mma's C[g][0] and C[g + 8][1]."""
    table = bf16(NF4).astype(np.float64)
    out = np.zeros((8, 2))
    for g in range(8):
        for h in range(2):
            acc = 0.0
            for t in range(4):
                lane = 4 * g + t
                # B column h: x at PC p + HO h + 16 t (lanes g' = h supply it)
                xs = piece * piece_cols + half_offset * h + 16 * t
                for j in range(4):
                    for q in (h, h + 2):  # A registers of this half: q & 1 == h
                        byte = int(rec["codes"][lane, j, q])
                        col = 4 * j + 2 * (q >> 1)  # lane-relative column of the pair
                        for e, code in ((0, byte >> 4), (1, byte & 15)):
                            c = xs + col + e
                            xv = x[c] if c < cols else 0.0
                            acc += table[code] * xv
            out[g, h] = np.float32(rec["scales"][g, h]) * np.float32(acc)
    return out.astype(np.float32)


def lora_words(pair, max_rank):
    if max_rank == 0:
        return 0
    lpr = 2 if pair else 4
    words = -(-max_rank // 2)
    return lpr + -(-max(words - lpr, 0) // 32) * 32


def run(mode, mats, cols, residual=None, grid=SMS):
    pair = mode == "swiglu"
    piece_cols, half_offset = (64, 0) if pair else (128, 64)
    pieces = -(-cols // piece_cols)
    x = bf16(np.random.default_rng(7).uniform(-1, 1, size=cols).astype(np.float32))
    if pair:
        units = -(-mats[0].rows // 8)
        first = [0]
        records = new_records(units * pieces)
        pack(mats[0].rows, cols, piece_cols, half_offset, pieces, records, 0, 1, mats[0],
             (mats[0], mats[1]))
        pack(mats[1].rows, cols, piece_cols, half_offset, pieces, records, 0, 2, mats[1],
             None)
    else:
        first = [0]
        for m in mats:
            first.append(first[-1] + -(-m.rows // 8))
        units = first[-1]
        records = new_records(units * pieces)
        for m, f in zip(mats, first):
            pack(m.rows, cols, piece_cols, half_offset, pieces, records, f, 3, m, (m, m))
    words = lora_words(pair, max(m.rank for m in mats))
    rb, lpr = (16, 2) if pair else (8, 4)
    grid = min(grid, units)
    outs = [np.full(m.rows, np.nan) for m in mats]
    res_out = np.full(mats[0].rows, np.nan)

    def row_of(u, rho):
        if pair:
            return rho >> 3, u * 8 + (rho & 7)
        m = sum(1 for i in range(1, len(mats)) if u >= first[i])
        return m, (u - first[m]) * 8 + rho

    for b in range(grid):
        u0, u1 = units * b // grid, units * (b + 1) // grid
        count = u1 - u0
        slots = np.zeros((count, WARPS, 16), np.float32)
        n = count * pieces
        for w in range(WARPS):  # the strided walk, TileWalk.advance
            if w >= n:
                continue
            unit, piece = divmod(w, pieces)
            acc = np.zeros((8, 2), np.float32)
            for i in range((n - w + WARPS - 1) // WARPS):
                tile = (u0 * pieces + w) + i * WARPS
                assert tile == (u0 + unit) * pieces + piece
                acc += tile_sums(records[tile], x, piece, piece_cols, half_offset, cols)
                piece += WARPS
                if piece >= pieces:
                    slots[unit, w] = acc.reshape(16)  # lane 4g: slot 2g + h
                    acc[:] = 0
                    while piece >= pieces:
                        piece -= pieces
                        unit += 1
        # B staged as u32 words (bf16 pairs), z as f32
        b_sh = np.zeros((count * rb, words, 2), np.float32)
        for rr in range(count * rb):
            m, row = row_of(u0 + rr // rb, rr % rb)
            mat = mats[m]
            if mat.rank and row < mat.rows:
                b_sh[rr].reshape(-1)[:mat.rank] = mat.b[row]
        z_sh = np.zeros((3, words, 2), np.float32)
        for m, mat in enumerate(mats):
            z_sh[m].reshape(-1)[:mat.rank] = mat.z
        for k in range(count):  # the finish
            part = np.zeros(32, np.float32)
            for lane in range(16):  # f32 sums in warp order
                acc = np.float32(0)
                for w in range(WARPS):
                    acc = np.float32(acc + slots[k, w, lane])
                part[lane] = acc
            banks = set()
            vals = []
            for lane in range(32):
                rho, s = lane & (rb - 1), lane // rb
                if pair:
                    v = part[2 * (rho & 7) + (rho >> 3)]
                else:
                    v = np.float32(part[2 * rho] + part[2 * rho + 1])
                m, row = row_of(u0 + k, rho)
                dot = np.float32(0)
                for wd in range(s, words, lpr):
                    if wd == s:
                        banks.add(((k * rb + rho) * words + wd) % 32)
                    bb, zz = b_sh[k * rb + rho, wd], z_sh[m, wd]
                    dot = np.float32(bb[0] * zz[0] + dot)
                    dot = np.float32(bb[1] * zz[1] + dot)
                vals.append((rho, m, row, v, dot))
            assert words == 0 or len(banks) == 32, "the finish's B loads conflict"
            for rho in range(min(rb, 16)):
                # xor-shuffle sum over the lanes of row rho
                lanes = [l for l in range(32) if l & (rb - 1) == rho]
                dots = {l: vals[l][4] for l in lanes}
                o = rb
                while o < 32:
                    dots = {l: np.float32(dots[l] + dots[l ^ o]) for l in lanes}
                    o <<= 1
                dot = dots[rho]
                _, m, row, v, _ = vals[rho]
                mat = mats[m]
                value = np.float32(mat.scale * dot + v) if mat.rank else v
                vals[rho] = (rho, m, row, value, bf16(value))
            if pair:
                for g in range(8):
                    _, _, row, _, gate = vals[g]
                    up = vals[g + 8][4]
                    if row < mats[0].rows:
                        outs[0][row] = bf16(np.float32(gate / (1 + np.exp(-gate)) * up))
            else:
                for rho in range(8):
                    _, m, row, value, rounded = vals[rho]
                    if row >= mats[m].rows:
                        continue
                    if mode == "residual":
                        y = np.float32(residual[row] + rounded)
                        res_out[row] = y
                        outs[0][row] = bf16(y)
                    else:
                        outs[m][row] = bf16(value)
    return x, outs, res_out


def rel(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def main():
    rng = np.random.default_rng(1)
    worst = 0.0
    # q/k/v: SmolLM2's GQA shape (576 columns: a zero half in the last piece), rows not a
    # multiple of 8 mid-space, a rank-0 matrix, an odd rank; grids that split units unevenly.
    for shapes, cols, grid in [([(576, 5), (192, 5), (192, 5)], 576, 17),
                               ([(264, 0), (41, 3), (40, 0)], 256, 7),
                               ([(64, 64), (32, 64), (32, 64)], 4096, 5)]:
        mats = [Matrix(rng, r, cols, k) for r, k in shapes]
        x, outs, _ = run("rows", mats, cols, grid=grid)
        for m, o in zip(mats, outs):
            e = rel(o, m.want(x))
            worst = max(worst, e)
            assert not np.isnan(o).any() and e < 1e-2, (shapes, e)
    for rows, cols, rank, grid in [(250, 320, 0, 9), (96, 1536, 37, 5)]:
        m = Matrix(rng, rows, cols, rank)
        residual = rng.uniform(-4, 4, size=rows).astype(np.float32)
        x, outs, res = run("residual", [m], cols, residual=residual, grid=grid)
        want = residual + m.want(x)
        e = max(rel(res, want), rel(outs[0], want))
        worst = max(worst, e)
        assert not np.isnan(res).any() and e < 1e-2, (rows, cols, e)
    for rows, cols, rank, grid in [(100, 576, 37, 3), (40, 256, 0, 2), (24, 2048, 64, 2)]:
        gate, up = Matrix(rng, rows, cols, rank), Matrix(rng, rows, cols, rank)
        x, outs, _ = run("swiglu", [gate, up], cols, grid=grid)
        g, u = gate.want(x), up.want(x)
        e = rel(outs[0], g / (1 + np.exp(-g)) * u)
        worst = max(worst, e)
        assert not np.isnan(outs[0]).any() and e < 1e-2, (rows, cols, e)
    print(f"gemv4_tiled_fused replay: every mode matches W x + s B z (worst relative error "
          f"{worst:.2e}, the bf16 output rounding)")


if __name__ == "__main__":
    main()
