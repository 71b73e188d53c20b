# Mirrors the segmented kernels of the step log (kernels/common.cuh segment_of_block, kernels/reduce.cu
# sum_squares_segments_f64 / finish_segments_f64, kernels/adamw.cu adamw_segments_f32 / advance_steps_u32)
# block by block, with the table packed as src/backend/segments.rs packs it, to check the index arithmetic on a
# machine without a GPU (tests/cuda_parity.rs on a GPU is the real check):
#  - every element of every segment is updated exactly once by the AdamW launch, and nothing outside them;
#  - block b of segment s in the sums launch reads exactly the elements block b of sum_partials_f32 reads on
#    that range with its fixed grid (so the sums keep sum_squares's bits), and the finishing block reads
#    exactly that segment's partials in reduce_finish_f64's order.
# Run: python3 reference/segments_sim.py (plain Python, seconds).
import random

BLOCK, MAX_BLOCKS, WORDS = 256, 1024, 8

def segment_blocks(n):
    return min(max(-(-n // BLOCK), 1), MAX_BLOCKS)

def pack(segs):
    words, blocks = [], 0
    for (offset, length, group, param) in segs:
        nblk = segment_blocks(length)
        words += [offset & 0xffffffff, offset >> 32, length, group, param, 0, blocks, nblk]
        blocks += nblk
    return words, blocks

def segment_of_block(table, nsegs, blk):
    s = 0
    while s + 1 < nsegs and table[(s + 1) * WORDS + 6] <= blk:
        s += 1
    w = table[s * WORDS:(s + 1) * WORDS]
    return dict(offset=w[0] | (w[1] << 32), len=w[2], group=w[3], param=w[4], block=blk - w[6], blocks=w[7], index=s)

def block_elements(sg, tid):
    # for (i = block*BLOCK + tid; i < len; i += blocks*BLOCK)
    return range(sg["block"] * BLOCK + tid, sg["len"], sg["blocks"] * BLOCK)

def check(segs, total):
    table, blocks = pack(segs)
    n = len(segs)
    visits = [0] * total
    for blk in range(blocks):
        sg = segment_of_block(table, n, blk)
        assert 0 <= sg["block"] < sg["blocks"], (blk, sg)
        reads = set()
        for tid in range(BLOCK):
            for i in block_elements(sg, tid):
                visits[sg["offset"] + i] += 1
                reads.add(i)
        # sum_partials_f32 on the range alone: grid = reduce_grid(len) = the segment's blocks, block b reads
        # i = b*BLOCK + t + k*grid*BLOCK.
        grid = segment_blocks(sg["len"])
        want = {i for t in range(BLOCK) for i in range(sg["block"] * BLOCK + t, sg["len"], grid * BLOCK)}
        assert reads == want, ("partials differ from sum_partials_f32", blk)
    inside = set()
    for (offset, length, _, _) in segs:
        inside.update(range(offset, offset + length))
    for e in range(total):
        assert visits[e] == (1 if e in inside else 0), ("element visited", e, visits[e])
    # finish_segments_f64: block s reads partials[first .. first + nparts] — the blocks of segment s.
    for s in range(n):
        first, nparts = table[s * WORDS + 6], table[s * WORDS + 7]
        owners = {segment_of_block(table, n, b)["index"] for b in range(first, first + nparts)}
        assert owners == {s}, (s, owners)
    # advance_steps_u32: counts[table[s*WORDS + 4]] for s < nsegs — the segments' parameters.
    assert [table[s * WORDS + 4] for s in range(n)] == [p for (_, _, _, p) in segs]

random.seed(0)
cases = 0
for lens in ([0], [1], [256], [257], [262_144], [262_145, 3], [600_001, 0, 5], [3] * 40 + [70_000]):
    offset, segs = 0, []
    for j, l in enumerate(lens):
        segs.append((offset, l, j % 3, j))
        offset += l
    check(segs, offset + 7)
    cases += 1
for _ in range(30):
    k = random.randint(1, 12)
    offset, segs = 0, []
    for j in range(k):
        gap = random.randint(0, 300)
        l = random.choice([0, 1, random.randint(1, 600), random.randint(1, 5000)])
        segs.append((offset + gap, l, random.randint(0, 3), j))
        offset += gap + l
    check(segs, offset + 1)
    cases += 1
print(f"segments_sim: {cases} segment tables, every element updated once, sums' block reads = sum_partials_f32's: ok")
