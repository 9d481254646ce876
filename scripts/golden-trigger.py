#!/usr/bin/env python3
"""Golden values for BackdoorBox's trigger arithmetic, x' = uint8((1 - w) * x + w * p) in float32.

BackdoorBox (core/attacks/BadNets.py, AddTrigger) precomputes res = w * p and w' = 1 - w as float32
tensors and returns (w' * img + res).type(torch.uint8). Each float32 operation is emulated exactly
here: the product or sum of two float32 values is exact in float64 for these magnitudes, and
rounding that to float32 (struct 'f') gives the IEEE float32 result. The cast truncates toward zero.

Writes tests/fixtures/trigger_golden.json: rows of [x, p, w, expected].
"""
import json
import os
import struct


def f32(v):
    return struct.unpack("f", struct.pack("f", v))[0]


def blend(x, p, w):
    w = f32(w)
    one_minus = f32(1.0 - w)
    res = f32(w * p)
    return int(f32(f32(one_minus * x) + res))


rows = []
for w in [1.0, 0.2, 0.1, 0.05, 0.3, 0.7, 0.999, 51 / 255]:
    for x in [0, 1, 5, 10, 37, 100, 128, 200, 254, 255]:
        for p in [0, 3, 128, 255]:
            rows.append([x, p, w, blend(x, p, w)])
# Add the cases where float32 truncation differs from real arithmetic, e.g. x = p = 3 at w = 0.1
# gives 2, not 3: an implementation that computes in float64 fails on them.
for w in [0.1, 0.2, 51 / 255]:
    found = 0
    for x in range(256):
        for p in range(256):
            e = blend(x, p, w)
            if e != int((1 - w) * x + w * p) and found < 40:
                rows.append([x, p, w, e])
                found += 1
out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "trigger_golden.json")
with open(out, "w") as f:
    json.dump({"generator": "scripts/golden-trigger.py", "rows": rows}, f)
    f.write("\n")
# The cases that real-number arithmetic gets wrong show why float32 matters.
print(sum(1 for x, p, w, e in rows if e != int((1 - w) * x + w * p)), "of", len(rows), "differ from float64")
