"""Summary of a scripts/bench-robustness run: per family, each defence against the models as
trained (the baseline), then what the family survives and the cheapest defence that removes it.

usage: robustness_summary.py OUT SPEC...  (OUT holds SPEC/calibration.json for each SPEC)
"""
import json
import statistics
import sys


def attack_rate(row):
    m = row["metrics"]
    return m["asr"] if m.get("asr") is not None else m.get("asr_a")


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else float("nan")


def main():
    out, specs = sys.argv[1], sys.argv[2:]
    verdicts = []
    print("| family | defence | BA watermarked (change) | ASR | detected | median p | queries "
          "| withheld benign / triggered | independent accused |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec in specs:
        rows = json.load(open(f"{out}/{spec}/calibration.json"))["rows"]
        base = {(r["kind"], r["index"]): r for r in rows if not r.get("defence")}
        order = [None] + list(dict.fromkeys(r["defence"] for r in rows if r.get("defence")))
        survives, weakened, removed = [], [], []
        for d in order:
            rs = [r for r in rows if r.get("defence") == d]
            wm = [r for r in rs if r["kind"] == "watermarked"]
            ind = [r for r in rs if r["kind"] != "watermarked"]
            ba = mean(r["metrics"]["benign_accuracy"] for r in wm)
            change = mean(r["metrics"]["benign_accuracy"]
                          - base[(r["kind"], r["index"])]["metrics"]["benign_accuracy"] for r in wm)
            used = sum(r["decision"] == "used" for r in wm)
            accused = sum(r["decision"] == "used" for r in ind)
            withheld = [r.get("withheld") for r in wm + ind if r.get("withheld")]
            wh = ("%d / %d" % (sum(w[0] for w in withheld), sum(w[1] for w in withheld))
                  if withheld else "–")
            print(f"| {spec} | {d or 'none (baseline)'} | {ba:.3f} ({change * 100:+.1f} pt) "
                  f"| {mean(attack_rate(r) for r in wm):.3f} | {used}/{len(wm)} "
                  f"| {statistics.median(r['p_value'] for r in wm):.1e} "
                  f"| {statistics.median(r['queries'] for r in wm):g} | {wh} | {accused}/{len(ind)} |")
            if d is None:
                continue
            if used == len(wm):
                survives.append(d)
            elif used == 0:
                removed.append((d, change))
            else:
                weakened.append(f"{d} ({used}/{len(wm)})")
        cheapest = min(removed, key=lambda x: -x[1], default=None)
        detected_as_trained = all(r["decision"] == "used" for r in base.values()
                                  if r["kind"] == "watermarked")
        verdicts.append((spec, survives, weakened, cheapest, detected_as_trained))
    print()
    print("| family | survives (every watermarked model still `used`) | weakens (still `used` of) "
          "| cheapest defence that removes it (accuracy change) |")
    print("| --- | --- | --- | --- |")
    for spec, survives, weakened, cheapest, detected in verdicts:
        if not detected:
            print(f"| {spec} | – (not every watermarked model is detected as trained) | – | – |")
            continue
        c = f"{cheapest[0]} ({cheapest[1] * 100:+.1f} pt)" if cheapest else "none"
        print(f"| {spec} | {', '.join(survives) or 'none'} | {', '.join(weakened) or 'none'} | {c} |")


main()
