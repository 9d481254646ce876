"""Summary table of a scripts/calibrate-families run: one line per spec.

usage: families_summary.py OUT SPEC...  (OUT holds SPEC/calibration.json for each SPEC)
"""
import json
import statistics
import sys


def attack_rate(row):
    m = row["metrics"]
    return m["asr"] if m.get("asr") is not None else m.get("asr_a")


def main():
    out, specs = sys.argv[1], sys.argv[2:]
    print("| spec | BA watermarked / clean | ASR (or ASR-A) of the watermarked models | detected "
          "| rank of the secret | independent accused | rank p of the independent models "
          "(clean; other release; other family) | queries to a used verdict (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec in specs:
        rows = json.load(open(f"{out}/{spec}/calibration.json"))["rows"]
        wm = [r for r in rows if r["kind"] == "watermarked"]
        ind = [r for r in rows if r["kind"] != "watermarked"]
        used = [r for r in wm if r["decision"] == "used"]
        clean = [r["metrics"]["benign_accuracy"] for r in rows if r["kind"] == "clean"]
        ba = "%.3f / %.3f" % (
            statistics.mean(r["metrics"]["benign_accuracy"] for r in wm),
            statistics.mean(clean) if clean else float("nan"),
        )
        asr = ", ".join("%.2f" % (attack_rate(r) or 0.0) for r in wm)
        ranks = ", ".join(str(r.get("rank")) for r in wm)
        by_kind = "; ".join(
            ", ".join("%.2f" % (r.get("rank_p") or 1.0) for r in ind if r["kind"] == k)
            for k in ["clean", "other-trigger", "other-family"]
        )
        accused = sum(r["decision"] == "used" for r in ind)
        q = "%g" % statistics.median(r["queries"] for r in used) if used else "–"
        print(f"| {spec} | {ba} | {asr} | {len(used)}/{len(wm)} | {ranks} | {accused}/{len(ind)} "
              f"| {by_kind} | {q} |")


if __name__ == "__main__":
    main()
