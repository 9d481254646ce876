"""Load on a running `hallmark serve`: sustained verification jobs per minute, and the API's
latency under concurrent clients (wrk). Used by scripts/bench-service; prints one JSON line.

Arguments: SERVICE_URL ADMIN_KEY MODEL_URL SECRET_JSON JOBS CONNECTIONS DURATION_S LABEL
"""
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

url, admin, model_url, secret_path, jobs, conns, duration, label = sys.argv[1:9]
jobs, conns, duration = int(jobs), int(conns), int(duration)


def call(method, path, key, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + key)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read()
        return json.loads(text) if text else None


publisher = call("POST", "/v1/keys", admin, {"name": "bench publisher", "role": "publisher"})["secret"]
auditor_key = call("POST", "/v1/keys", admin, {"name": "bench auditor", "role": "auditor"})
auditor = auditor_key["secret"]
holdout = call("POST", "/v1/datasets", publisher, {
    "name": "fashion test", "path": "/usr/share/datasets/fashion-mnist", "format": "idx", "split": "test"})
with open(secret_path) as f:
    record = json.load(f)
wm = call("POST", "/v1/watermarks/import", publisher, {
    "name": "bench", "holdout_dataset_id": holdout["id"], "secret_record": record})["id"]
call("POST", f"/v1/watermarks/{wm}/grants", publisher, {"auditor_id": auditor_key["key"]["id"]})

# 1. Sustained verification jobs: submit JOBS fixed-design verifications (m = 100 pairs, 300
# images each) at once and time until the last one is done.
start = time.monotonic()
ids = []
for i in range(jobs):
    v = call("POST", "/v1/verifications", auditor, {
        "watermark_id": wm, "seed": i,
        "endpoint": {"url": model_url, "protocol": "v2", "model": "badnets"}})
    ids.append(v["job"]["id"])
pending = set(ids)
states = {}
while pending:
    for j in list(pending):
        s = call("GET", f"/v1/jobs/{j}", auditor)
        if s["state"] in ("succeeded", "failed", "cancelled"):
            states[j] = s["state"]
            pending.discard(j)
    time.sleep(0.2)
elapsed = time.monotonic() - start
ok = sum(1 for s in states.values() if s == "succeeded")
decisions = {}
for v in call("GET", "/v1/verifications", auditor):
    decisions[v["decision"]] = decisions.get(v["decision"], 0) + 1

# 2. API latency: CONNECTIONS concurrent keep-alive clients reading a job (authenticated, one
# database lookup for the key and one for the job) for DURATION seconds.
with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
    lua.write(f'wrk.headers["Authorization"] = "Bearer {auditor}"\n')
    script = lua.name
out = subprocess.run(
    ["wrk", "-t", "2", "-c", str(conns), "-d", f"{duration}s", "--latency", "-s", script,
     f"{url}/v1/jobs/{ids[0]}"],
    capture_output=True, text=True, check=True).stdout


def latency(pct):
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
print(json.dumps({
    "database": label,
    "verification_jobs": jobs,
    "succeeded": ok,
    "seconds": round(elapsed, 2),
    "jobs_per_minute": round(60 * ok / elapsed, 1),
    "decisions": decisions,
    "api_clients": conns,
    "api_requests_per_s": rps,
    "api_p50_ms": round(latency(50), 2),
    "api_p99_ms": round(latency(99), 2),
    "api_errors": int(non2xx.group(1)) if non2xx else 0,
}))
