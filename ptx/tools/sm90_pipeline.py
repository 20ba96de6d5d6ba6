#!/usr/bin/env python3
"""Replays the stage / barrier / wait bookkeeping of ptx/matmul_sm90.cu's main loop and checks it.

Run: python3 ptx/tools/sm90_pipeline.py   (no arguments; prints "ok" or the first violation, and
then checks that a few wrong variants of the schedule are caught.)

The model. The CTA's two warpgroups run the same program; shared memory holds stages
('A', s), ('C', s) (codes and scales), ('W', s) (bf16 W). Asynchronous work is adversarial: a
cp.async group lands only when its thread waits for it (cp.async.wait_group N: all but the N newest
groups), a wgmma group reads its operands until its warpgroup waits for it (wgmma.wait_group N).
Between two __syncthreads the two warpgroups are unordered: a write by one is checked against
every wgmma of the other that was in flight at any time in that interval, and against every
generic read in that interval. Rules checked:
  - a stage is never written while a cp.async still writes it, a wgmma may read it, or a thread
    of the same barrier interval reads it;
  - a wgmma of step t reads A stage and W stage holding tile t, written by both warpgroups, each
    landed, then fenced (fence.proxy.async), then a barrier;
  - the dequantization of tile t reads a code stage holding tile t, landed in both warpgroups and
    a barrier since;
  - every step is issued once, in order, and every wgmma group is complete at the end.
"""

import sys


class Violation(Exception):
    pass


class Record:
    """What a stage holds: tile, and per writer warpgroup its progress."""

    def __init__(self, tile, wg, landed):
        self.tile = tile
        self.state = {0: None, 1: None}
        self.state[wg] = {"landed": landed, "fenced": False, "gen": False, "async": False}

    def add_writer(self, wg, landed):
        self.state[wg] = {"landed": landed, "fenced": False, "gen": False, "async": False}


def run(ktiles, variant=None):
    a_stages = 3 if variant == "three_a_stages" else 4
    cp_wait_in_loop = 3 if variant == "cp_wait_3" else 2
    wgmma_wait_in_loop = 2 if variant == "wgmma_wait_2" else 1
    code_distance = 3 if variant == "codes_3_ahead" else 2
    skip_b1 = variant == "no_b1"
    loop_fence = [] if variant == "no_fence" else [("fence",)]
    a_distance = 3

    stages = {}  # resource -> Record
    cp_groups = {0: [], 1: []}  # wg -> list of groups (list of (resource, Record))
    cp_open = {0: [], 1: []}  # writes not yet committed
    wg_groups = {0: [], 1: []}  # wg -> list of in-flight wgmma groups (sets of resources)
    issued = {0: [], 1: []}
    dequantized = {0: [], 1: []}

    def program():
        """Yields per segment (between barriers) a list of ops; the same for both warpgroups."""
        seg = [("load_a", 0, 0), ("load_c", 0, 0), ("commit",)]
        if ktiles > 1:
            seg += [("load_c", 1, 1)]
        seg += [("commit",)]
        if ktiles > 1:
            seg += [("load_a", 1, 1)]
        seg += [("commit",)]
        if ktiles > 2:
            seg += [("load_a", 2, 2)]
        seg += [("commit",), ("cp_wait", 3)]
        yield seg
        yield [("dequant", 0, 0, 0), ("fence",)]
        for kt in range(ktiles):
            seg = []
            if kt + code_distance < ktiles:
                seg.append(("load_c", (kt + code_distance) % 2, kt + code_distance))
            seg += [("commit",), ("wgmma", kt, kt % a_stages, kt % 2),
                    ("wgmma_wait", wgmma_wait_in_loop), ("cp_wait", cp_wait_in_loop)]
            if not skip_b1:
                yield seg
                seg = []
            if kt + a_distance < ktiles:
                seg.append(("load_a", (kt + a_distance) % a_stages, kt + a_distance))
            seg.append(("commit",))
            if kt + 1 < ktiles:
                seg.append(("dequant", kt + 1, (kt + 1) % 2, (kt + 1) % 2))
            seg += loop_fence
            yield seg
        yield [("wgmma_wait", 0), ("cp_wait", 0)]

    def in_flight(wg):
        return set().union(*wg_groups[wg]) if wg_groups[wg] else set()

    def write(res, tile, wg, landed, other_flight, seg_reads):
        # A cp.async still writing res? (The other warpgroup's part of the same tile is
        # disjoint from this one's: not a conflict.)
        current = stages.get(res)
        same_tile_part = current is not None and current.tile == tile and current.state[wg] is None
        for w in (0, 1):
            for group in cp_groups[w] + [cp_open[w]]:
                for r, rec in group:
                    if same_tile_part and rec is current:
                        continue
                    if r == res and not rec.state[w]["landed"]:
                        raise Violation(f"{res} written (tile {tile}) while a cp.async of warpgroup {w} still writes it (tile {rec.tile})")
        if res in in_flight(wg) or res in other_flight:
            raise Violation(f"{res} written (tile {tile}) while a wgmma may read it")
        if res in seg_reads:
            raise Violation(f"{res} written (tile {tile}) in the barrier interval where it is read")
        rec = current
        if same_tile_part:
            rec.add_writer(wg, landed)
        else:
            rec = Record(tile, wg, landed)
            stages[res] = rec
        return rec

    def require(res, tile, key, who):
        rec = stages.get(res)
        if rec is None or rec.tile != tile:
            raise Violation(f"{who}: {res} holds tile {None if rec is None else rec.tile}, not {tile}")
        for w in (0, 1):
            st = rec.state[w]
            if st is None or not st[key]:
                raise Violation(f"{who}: {res} (tile {tile}) part of warpgroup {w} not {key}")

    for seg in program():
        start_flight = {w: in_flight(w) for w in (0, 1)}
        issued_in_seg = {0: set(), 1: set()}
        seg_reads = set()
        # Generic reads of the interval (dequant's code reads) by either warpgroup.
        for op in seg:
            if op[0] == "dequant":
                seg_reads.add(("C", op[2]))
        for wg in (0, 1):
            other = 1 - wg
            for op in seg:
                other_flight = start_flight[other].union(*issued_in_seg[other])
                if op[0] == "load_a":
                    rec = write(("A", op[1]), op[2], wg, False, other_flight, seg_reads)
                    cp_open[wg].append((("A", op[1]), rec))
                elif op[0] == "load_c":
                    rec = write(("C", op[1]), op[2], wg, False, other_flight, seg_reads)
                    cp_open[wg].append((("C", op[1]), rec))
                elif op[0] == "commit":
                    cp_groups[wg].append(cp_open[wg])
                    cp_open[wg] = []
                elif op[0] == "cp_wait":
                    n = op[1]
                    done = cp_groups[wg][: len(cp_groups[wg]) - n] if n else cp_groups[wg]
                    for group in done:
                        for _, rec in group:
                            rec.state[wg]["landed"] = True
                    cp_groups[wg] = cp_groups[wg][len(done):]
                elif op[0] == "dequant":
                    _, tile, cs, ws = op
                    require(("C", cs), tile, "gen", f"dequantize tile {tile}")
                    write(("W", ws), tile, wg, True, other_flight, set())
                    dequantized[wg].append(tile)
                elif op[0] == "fence":
                    for rec in stages.values():
                        st = rec.state[wg]
                        if st is not None and st["landed"]:
                            st["fenced"] = True
                elif op[0] == "wgmma":
                    _, tile, a_s, w_s = op
                    require(("A", a_s), tile, "async", f"wgmma step {tile}")
                    require(("W", w_s), tile, "async", f"wgmma step {tile}")
                    group = {("A", a_s), ("W", w_s)}
                    wg_groups[wg].append(group)
                    issued_in_seg[wg].add(frozenset(group))
                    issued[wg].append(tile)
                elif op[0] == "wgmma_wait":
                    n = op[1]
                    wg_groups[wg] = wg_groups[wg][len(wg_groups[wg]) - n:] if n else []
        # The barrier ending the interval.
        for rec in stages.values():
            for w in (0, 1):
                st = rec.state[w]
                if st is None:
                    continue
                if st["landed"]:
                    st["gen"] = True
                if st["fenced"]:
                    st["async"] = True
    for wg in (0, 1):
        if issued[wg] != list(range(ktiles)):
            raise Violation(f"warpgroup {wg} issued steps {issued[wg]}")
        if dequantized[wg] != list(range(ktiles)):
            raise Violation(f"warpgroup {wg} dequantized tiles {dequantized[wg]}")
        if wg_groups[wg] or cp_groups[wg]:
            raise Violation("asynchronous work left at the end")


def main():
    for ktiles in range(1, 13):
        run(ktiles)
    print("ok: the schedule holds for 1 .. 12 tiles")
    caught = 0
    variants = ["three_a_stages", "cp_wait_3", "wgmma_wait_2", "codes_3_ahead", "no_b1", "no_fence"]
    for variant in variants:
        try:
            for ktiles in range(1, 13):
                run(ktiles, variant)
            print(f"NOT caught: {variant}")
        except Violation as e:
            caught += 1
            print(f"caught {variant}: {e}")
    if caught != len(variants):
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except Violation as e:
        print(f"violation: {e}")
        sys.exit(1)
