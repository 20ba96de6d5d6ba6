#!/usr/bin/env python3
"""Replays ptx/gemm_sm90.cu's bookkeeping and addressing on the host, and checks it.

Run: python3 ptx/tools/gemm_sm90_ring.py   (no arguments; prints what it checked and "ok", or the
first violation; then checks that wrong variants of the ring are caught.)

1. The ring. One producer thread and 8 consumer warps (two warpgroups of 4) run the kernel's
   loops over a CTA's tiles, interleaved at random (many seeds). The mbarriers are modelled
   exactly: a phase completes when its pending arrival count reaches 0 and its transaction count
   is 0; try_wait.parity(P) succeeds iff the current (incomplete) phase's parity differs from P,
   so a fresh barrier reports parity 1 as complete. TMA copies land at a random later time. A
   wgmma group reads its stage until a warp of its warpgroup returns from a wait_group that
   covers it (the latest moment the hardware may still read it). Checked: a stage is never
   written (a copy lands) while an incomplete wgmma group reads it; every wgmma reads a stage
   holding its own step, fully landed; every step is consumed once, in order, by each warp; no
   deadlock; every wgmma group complete at the end.
2. The addressing. TMA's 128-byte swizzle writes box element (r, k) (k < 64) of a stage at the
   physical address f(stage + r * 128 + 2 k), f(x) = x ^ (((x >> 7) & 7) << 4); the wgmma core
   matrix reads of the descriptor (start + 32 kk, stride byte offset 1024, rows 8 apart in a
   group at 128 bytes) go through the same f. Checked for both consumers' A (64 rows at + 8192)
   and B (256 rows), every k16 step and every stage base: the element wgmma takes as (row, k)
   is the one TMA stored for (row, k).
2b. The addressing of B stored (K, N) (gemm_nn_bf16_sm90): TMA writes box j (64 k-rows x 64
   columns) at stage + 8192 j, element (k, n) at f(box + k * 128 + 2 n). wgmma reads the MN-major
   canonical layout ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO)) (T = 8 bf16, in 16-byte units; PTX ISA
   "Shared Memory Matrix Layout") through the same f: element (n, k) of the k16 slice at
   f(start + 2 (n % 64) + LBO (n / 64) + 128 (k % 8) + SBO (k / 8)), start = stage + 2048 kk,
   LBO = 8192, SBO = 1024. Checked for every stage, k16 step, n < 256 and k < 16; and that the
   descriptor with LBO and SBO swapped, or the k16 step of the K-major layout (+ 32 bytes), is
   caught.
3. The tiles. tile_origin is a bijection of the tiles onto the (m, n) tile grid (shapes with a
   partial last group), and the epilogue's (consumer, warp, lane, j, half, pair) covers each
   element of a 128 x 256 C tile exactly once.
"""

import random
import sys

STAGES = 4
A_STAGE, B_STAGE = 16384, 32768
A_OFFSET, B_OFFSET = 0, STAGES * A_STAGE
BM, BN, BK, GROUP_M = 128, 256, 64, 16


class Violation(Exception):
    pass


class Barrier:
    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def arrive(self, expect_tx=0):
        if self.pending == 0:
            raise Violation("arrival on a barrier with no pending arrivals")
        self.tx += expect_tx
        self.pending -= 1
        self._maybe_complete()

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        if self.tx < 0:
            raise Violation("more transaction bytes than expected")
        self._maybe_complete()

    def try_wait(self, parity):
        return (self.phase & 1) != parity


def ring(tiles, ksteps, seed, variant=None):
    rng = random.Random(seed)
    empty_count = 4 if variant == "empty_count_4" else 8
    full = [Barrier(1) for _ in range(STAGES)]
    empty = [Barrier(empty_count) for _ in range(STAGES)]
    stage_holds = [None] * STAGES  # step whose bytes are (being) written there
    stage_landed = [0] * STAGES  # landed bytes of that step
    in_flight_copies = []  # (stage, step, bytes)
    groups = {0: [], 1: []}  # warpgroup -> list of [step, stage, complete]
    total = tiles * ksteps

    def producer():
        step = 0
        for _tile in range(tiles):
            for _ks in range(ksteps):
                s, parity = step % STAGES, (step // STAGES) & 1
                want = parity if variant == "producer_parity" else parity ^ 1
                while not empty[s].try_wait(want):
                    yield "wait"
                full[s].arrive(expect_tx=A_STAGE + B_STAGE)
                for nbytes in (A_STAGE, B_STAGE):
                    in_flight_copies.append((s, step, nbytes))
                step += 1
                yield "issued"

    def consumer(wg, warp):
        step = 0
        for _tile in range(tiles):
            for ks in range(ksteps):
                s, parity = step % STAGES, (step // STAGES) & 1
                while not full[s].try_wait(parity):
                    yield "wait"
                if stage_holds[s] != step or stage_landed[s] != A_STAGE + B_STAGE:
                    raise Violation(f"warp {wg}.{warp}: step {step} reads stage {s} holding "
                                    f"step {stage_holds[s]} ({stage_landed[s]} bytes landed)")
                # One group per warpgroup and step: the first of its warps to get here issues it.
                if not any(g[0] == step for g in groups[wg]):
                    groups[wg].append([step, s, False])
                yield "issued"
                if variant == "release_current":
                    empty[s].arrive()  # wrong: before the wgmmas reading it are waited for
                else:
                    for g in groups[wg]:  # wgmma.wait_group 1: every older group is complete
                        if g[0] < step:
                            g[2] = True
                    if ks > 0:
                        empty[(step - 1) % STAGES].arrive()
                step += 1
                yield "stepped"
            for g in groups[wg]:  # wgmma.wait_group 0
                g[2] = True
            if variant != "release_current":
                empty[(step - 1) % STAGES].arrive()
            yield "tile"

    actors = {"p": producer()}
    for wg in (0, 1):
        for w in range(4):
            actors[(wg, w)] = consumer(wg, w)
    done = set()
    idle_rounds = 0
    while len(done) < len(actors) or in_flight_copies:
        choices = [a for a in actors if a not in done] + (["land"] if in_flight_copies else [])
        pick = rng.choice(choices)
        if pick == "land":
            s, step, nbytes = in_flight_copies.pop(rng.randrange(len(in_flight_copies)))
            for wg in (0, 1):
                for g in groups[wg]:
                    if g[1] == s and not g[2]:
                        raise Violation(f"a copy for step {step} lands in stage {s} while the "
                                        f"wgmmas of step {g[0]} (warpgroup {wg}) may read it")
            if stage_holds[s] != step:
                stage_holds[s], stage_landed[s] = step, 0
            stage_landed[s] += nbytes
            full[s].complete_tx(nbytes)
            idle_rounds = 0
            continue
        try:
            what = next(actors[pick])
            idle_rounds = idle_rounds + 1 if what == "wait" else 0
        except StopIteration:
            done.add(pick)
        if idle_rounds > 5000:
            raise Violation("deadlock: every actor waits")
    for wg in (0, 1):
        if any(not g[2] for g in groups[wg]):
            raise Violation("a wgmma group is incomplete at the end")
        if sorted(g[0] for g in groups[wg]) != list(range(total)):
            raise Violation("a step was not consumed exactly once")


def swizzle(x):
    return x ^ (((x >> 7) & 7) << 4)


def addressing():
    base = 4096 * 1024  # any 1024-aligned shared base
    for s in range(STAGES):
        for what, offset, rows, consumer_rows in (("A", A_OFFSET + s * A_STAGE, 128, 64),
                                                  ("B", B_OFFSET + s * B_STAGE, 256, 256)):
            stage = base + offset
            stored = {}
            for r in range(rows):
                for k in range(BK):
                    stored[swizzle(stage + r * 128 + 2 * k)] = (r, k)
            for consumer in ((0, 1) if what == "A" else (0,)):
                start = stage + consumer * 64 * 128 if what == "A" else stage
                if start % 1024:
                    raise Violation(f"{what} descriptor start not 1024-aligned")
                for kk in range(BK // 16):
                    desc_start = start + 32 * kk
                    for row in range(consumer_rows):
                        for c in range(2):  # the two 8-element chunks of the k16 slice
                            for e in range(8):
                                logical = (desc_start + (row // 8) * 1024 + (row % 8) * 128
                                           + 16 * c + 2 * e)
                                want = (row + (consumer * 64 if what == "A" else 0),
                                        16 * kk + 8 * c + e)
                                got = stored.get(swizzle(logical))
                                if got != want:
                                    raise Violation(f"{what} stage {s} consumer {consumer} kk {kk}"
                                                    f" row {row}: read {got}, want {want}")


B_BOX, B_BOX_COLS = 8192, 64


def addressing_mn_major(lbo=B_BOX, sbo=1024, kk_bytes=2048):
    base = 4096 * 1024
    for s in range(STAGES):
        stage = base + B_OFFSET + s * B_STAGE
        stored = {}
        for box in range(BN // B_BOX_COLS):
            for k in range(BK):
                for n in range(B_BOX_COLS):
                    address = stage + box * B_BOX + k * 128 + 2 * n
                    stored[swizzle(address)] = (k, box * B_BOX_COLS + n)
        for kk in range(BK // 16):
            start = stage + kk_bytes * kk
            for n in range(BN):
                for k in range(16):
                    logical = (start + 2 * (n % 64) + lbo * (n // 64) + 128 * (k % 8)
                               + sbo * (k // 8))
                    want = (16 * kk + k, n)
                    got = stored.get(swizzle(logical))
                    if got != want:
                        raise Violation(f"B (K, N) stage {s} kk {kk} (k {k}, n {n}): read {got}, "
                                        f"want {want}")


def tile_origin(tile, m_tiles, n_tiles):
    per_group = GROUP_M * n_tiles
    group = tile // per_group
    first_m = group * GROUP_M
    rows = min(m_tiles - first_m, GROUP_M)
    local = tile - group * per_group
    return (first_m + local % rows) * BM, (local // rows) * BN


def tiles_and_epilogue():
    for m_tiles, n_tiles in ((1, 1), (32, 43), (32, 16), (17, 3), (40, 5), (3, 40)):
        seen = {tile_origin(t, m_tiles, n_tiles) for t in range(m_tiles * n_tiles)}
        want = {(m * BM, n * BN) for m in range(m_tiles) for n in range(n_tiles)}
        if seen != want:
            raise Violation(f"tile_origin is not a bijection for {m_tiles} x {n_tiles}")
    covered = {}
    for consumer in (0, 1):
        for warp in range(4):
            for lane in range(32):
                for half in (0, 1):
                    row = consumer * 64 + warp * 16 + lane // 4 + 8 * half
                    for j in range(32):
                        for pair in (0, 1):
                            col = 8 * j + 2 * (lane % 4) + pair
                            covered[(row, col)] = covered.get((row, col), 0) + 1
    if len(covered) != BM * BN or set(covered.values()) != {1}:
        raise Violation("the epilogue does not cover the C tile exactly once")


def main():
    try:
        for tiles, ksteps in ((1, 1), (1, 3), (2, 1), (3, 2), (2, 5), (4, 4), (3, 9)):
            for seed in range(40):
                ring(tiles, ksteps, seed)
        print("ring: 7 tile/step counts x 40 interleavings: ok")
        addressing()
        print("addressing: 4 stages, A of both consumers and B, 4 k16 steps: ok")
        addressing_mn_major()
        print("addressing of B stored (K, N): 4 stages, 4 boxes, 4 k16 steps: ok")
        tiles_and_epilogue()
        print("tiles and epilogue: ok")
    except Violation as v:
        print(f"VIOLATION: {v}")
        return 1
    for variant in ("producer_parity", "empty_count_4", "release_current"):
        caught = False
        for tiles, ksteps in ((2, 5), (3, 9)):
            for seed in range(40):
                try:
                    ring(tiles, ksteps, seed, variant)
                except Violation:
                    caught = True
        print(f"wrong variant {variant}: {'caught' if caught else 'NOT caught'}")
        if not caught:
            return 1
    for name, wrong in (("lbo_sbo_swapped", {"lbo": 1024, "sbo": B_BOX}),
                        ("k_major_k16_step", {"kk_bytes": 32})):
        try:
            addressing_mn_major(**wrong)
            caught = False
        except Violation:
            caught = True
        print(f"wrong variant {name}: {'caught' if caught else 'NOT caught'}")
        if not caught:
            return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
