#!/usr/bin/env python3
"""Golden values for BATT's rotation trigger: what Pillow's Image.rotate(angle) (nearest
neighbour, black fill, as BackdoorBox's BATT applies it) makes of two test images.

Needs Pillow (`pip install pillow`). Writes tests/fixtures/rotate_golden.json.
"""
import json
import os

import PIL
from PIL import Image

cases = []
for (h, w, mode) in [(28, 28, "L"), (32, 32, "RGB"), (5, 7, "L")]:
    c = 1 if mode == "L" else 3
    data = bytes((i * 37 + 11) % 256 for i in range(h * w * c))
    img = Image.frombytes(mode, (w, h), data)
    for angle in [16, -16, 45, 90, 7.5, 180]:
        out = img.rotate(angle)
        cases.append({"height": h, "width": w, "channels": c, "angle": angle,
                      "input": list(data), "output": list(out.tobytes())})
path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "rotate_golden.json")
with open(path, "w") as f:
    json.dump({"pillow": PIL.__version__, "cases": cases}, f)
print(len(cases), "cases")
