#!/usr/bin/env python3
"""Summarises target/bench-train/<spec>/calibration.json files as one Markdown table.

    calibration_summary.py DIR...
"""
import json
import sys


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


print("| spec | watermarked BA | clean BA | other-trigger BA | ASR (or ASR-A / ASR-C / D_p) | detected | watermarked p-values | independent accused | inconclusive |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for d in sys.argv[1:]:
    c = json.load(open(f"{d}/calibration.json"))
    rows = c["rows"]
    by = {k: [r for r in rows if r["kind"] == k] for k in ["watermarked", "clean", "other-trigger"]}
    ba = {k: mean([r["metrics"]["benign_accuracy"] for r in v]) for k, v in by.items()}
    w = by["watermarked"]
    m = w[0]["metrics"]
    if m.get("asr") is not None:
        attack = f"{mean([r['metrics']['asr'] for r in w]):.4f}"
    else:
        attack = " / ".join(f"{mean([r['metrics'][k] for r in w]):.4f}" for k in ["asr_a", "asr_c", "dispersibility"])
    detected = sum(r["decision"] == "used" for r in w)
    indep = by["clean"] + by["other-trigger"]
    accused = sum(r["decision"] == "used" for r in indep)
    inconclusive = sum(r["decision"] == "inconclusive" for r in rows)
    ps = sorted(r["p_value"] for r in w)
    attack_mode = c["settings"].get("attack", "None")
    name = c["spec"] if attack_mode in ("None", None) else f"{c['spec']} (--attack {attack_mode})"
    if attack_mode == "Blind":
        # Calibrations from before the Neural Cleanse evasion task have no such setting.
        nc = c["settings"].get("blind_neural_cleanse", False)
        name = name[:-1] + (", Neural Cleanse evasion)" if nc else ", no Neural Cleanse evasion)")
    print(f"| {name} | {ba['watermarked']:.4f} | {ba['clean']:.4f} | {ba['other-trigger']:.4f} | {attack} | "
          f"{detected}/{len(w)} | {ps[0]:.1e} – {ps[-1]:.1e} | {accused}/{len(indep)} | {inconclusive}/{len(rows)} |")
