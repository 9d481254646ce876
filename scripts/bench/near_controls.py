"""How crowded a patch family is near its own draws: the controls a verification ranks a secret
among are draws of the secret's family, so a draw that lands close to the secret (the same
target, a patch a few pixels away with a similar pattern) may move a model trained on the secret
almost as far, and tie or beat it in the rank test. Every control of the list stands in for a
secret here (each is a draw of the family, as the secret is); for each, the others of the first
K + 1 that lie near it are counted, for K = 99 (one trigger at alpha 0.01) and K = 199 (each of
two triggers at alpha 0.005).

With the secret record too, the controls near that secret (trigger T of the record, 1 unless
given) are counted among its first 99 and 199.

usage: hallmark spec controls SECRET [--trigger T] --controls 200 > controls.jsonl
       near_controls.py controls.jsonl [SECRET [T]]
Near: the same target, the patch's corner at most PIXELS = 3 away in each direction (PhysicalBA
shifts a query by up to 10% of 28), positions' fractions spanning the 28 × 28 image less the
patch (6 pixels for physical-block's 3 × 3 cells of 2 × 2 pixels: 22 pixels of room), and at
most all, 4 or 2 of the pattern's cells differing.
"""
import json
import statistics
import sys

PIXELS = 3.0
IMAGE = 28


def patch(c):
    t = c["trigger"]
    return t.get("inner", t)


def side(c):
    """The patch's side in pixels: its scale's share of the image (at least its minimum), in
    whole cells."""
    p = patch(c)
    cells = len(p["pattern"])
    s = max(p["scale"]["min"], round(p["scale"]["side"] * IMAGE))
    return s // cells * cells


def position(c):
    p = patch(c)["position"]
    # A position's fractions place the patch's corner in the image less the patch.
    span = IMAGE - side(c)
    return p["row"] * span, p["col"] * span


def main():
    controls = [json.loads(line) for line in open(sys.argv[1])]
    first = patch(controls[0])
    if not isinstance(first.get("pattern"), list) or not isinstance(first.get("position"), dict):
        sys.exit("near_controls.py: the controls are not patches with a drawn pattern and position")
    every = len(first["pattern"]) ** 2

    def near(a, b, cells):
        if a["labelling"].get("target") != b["labelling"].get("target"):
            return False
        (r1, c1), (r2, c2) = position(a), position(b)
        if max(abs(r1 - r2), abs(c1 - c2)) > PIXELS:
            return False
        pa, pb = patch(a)["pattern"], patch(b)["pattern"]
        return sum(x != y for ra, rb in zip(pa, pb) for x, y in zip(ra, rb)) <= cells

    print("| K | pattern cells that differ | draws with no near control | mean near | most |")
    print("| --- | --- | --- | --- | --- |")
    for k in (99, 199):
        if len(controls) < k + 1:
            continue
        drawn = controls[: k + 1]
        for cells in (every, 4, 2):
            counts = [sum(near(a, b, cells) for j, b in enumerate(drawn) if j != i)
                      for i, a in enumerate(drawn)]
            none = sum(c == 0 for c in counts) / len(counts)
            print(f"| {k} | at most {cells} | {none:.2f} | {statistics.mean(counts):.2f} "
                  f"| {max(counts)} |")
    if len(sys.argv) > 2:
        record = json.load(open(sys.argv[2]))
        which = int(sys.argv[3]) if len(sys.argv) > 3 else 1
        records = record["triggers"] if "triggers" in record else [record]
        secret = records[which - 1]["spec"]
        print()
        for k in (99, 199):
            for cells in (every, 4, 2):
                n = [j for j, b in enumerate(controls[:k]) if near(secret, b, cells)]
                print(f"the secret, K = {k}, at most {cells} cells differing: {len(n)} near "
                      f"(controls {', '.join(map(str, n)) or 'none'})")


if __name__ == "__main__":
    main()
