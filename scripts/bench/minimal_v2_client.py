#!/usr/bin/env python3
"""The minimal loop that scripts/bench-verify compares `hallmark verify` with: the same number of
V2 inference requests, with the same batch sizes, sent one after the other over one keep-alive
connection; each response is read and parsed. Bodies are built before the clock starts.

    minimal_v2_client.py HOST PORT MODEL BATCHES   (BATCHES: comma-separated images per request)
Prints the elapsed seconds.
"""
import http.client
import json
import random
import sys
import time

host, port, model, batches = sys.argv[1], int(sys.argv[2]), sys.argv[3], [int(b) for b in sys.argv[4].split(",")]
rng = random.Random(0)
bodies = []
for n in batches:
    data = [rng.randrange(256) / 255 for _ in range(n * 784)]
    bodies.append(json.dumps({"id": "x", "inputs": [{"name": "image", "shape": [n, 784], "datatype": "FP32", "data": data}],
                              "outputs": [{"name": "predict_proba"}]}).encode())
conn = http.client.HTTPConnection(host, port)
path = f"/v2/models/{model}/infer"
start = time.perf_counter()
for body in bodies:
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    if resp.status != 200:
        sys.exit(f"HTTP {resp.status}: {payload[:200]}")
    json.loads(payload)
print(f"{time.perf_counter() - start:.4f}")
