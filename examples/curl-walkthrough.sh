#!/usr/bin/env bash
# The publisher and auditor flows of the hallmark service with curl, step by step: the same
# walk-through as examples/client.rs and examples/client.py. Each step prints the request it
# sends; python3 only picks fields out of the JSON answers.
#
#   ADMIN_KEY=$(cat hallmark-data/admin.key) DATASET=$PWD/hallmark-data/imports/train \
#   HOLDOUT=$PWD/hallmark-data/imports/test SPEC=watermark_specs/badnets-square-28x28-grey.toml \
#   [ENDPOINT=http://127.0.0.1:8081 MODEL=my-model] [HOLDOUT_SPLIT=test] [SEED=7] [NONCE=64 hex digits] \
#   examples/curl-walkthrough.sh
#
# Exit code: 0 when the flows ran (and, with an endpoint, the verdict is `used`), 1 when the
# verdict is another, 2 on an error.
set -euo pipefail
URL=${HALLMARK_URL:-http://127.0.0.1:8080}
: "${ADMIN_KEY:?set ADMIN_KEY to an admin key}" "${DATASET:?}" "${HOLDOUT:?}" "${SPEC:?}"
trap 'echo "error: step failed (line $LINENO)" >&2; exit 2' ERR

# field JSON PATH...: prints one field of a JSON document (keys and list indices).
field() {
  python3 -c 'import json, sys
v = json.loads(sys.argv[1])
for k in sys.argv[2:]:
    v = v[int(k)] if isinstance(v, list) else v[k]
print(v if isinstance(v, str) else json.dumps(v))' "$@"
}
# call METHOD PATH KEY [BODY]: one request; prints the answer, fails on an error status.
call() {
  echo "> $1 $2" >&2
  local out status
  out=$(curl -sS -X "$1" "$URL$2" -H "Authorization: Bearer $3" \
    ${4:+-H 'Content-Type: application/json' --data "$4"} -w '\n%{http_code}')
  status=${out##*$'\n'}
  out=${out%$'\n'*}
  if [ "$status" -ge 300 ]; then
    echo "$2: HTTP $status: $out" >&2
    return 1
  fi
  echo "$out"
}
# wait_job KEY JOB_ID: polls until the job ends.
wait_job() {
  local j state
  while :; do
    j=$(call GET "/v1/jobs/$2" "$1" 2>/dev/null)
    state=$(field "$j" state)
    echo "  job $2: $state $(field "$j" progress_done)/$(field "$j" progress_total)" >&2
    case $state in
      succeeded) return 0 ;;
      failed|cancelled) echo "job $2 $state: $(field "$j" error)" >&2; return 1 ;;
    esac
    sleep 0.5
  done
}
json_str() { python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }

# 1. The admin creates a publisher key and an auditor key (each secret is shown once).
PUBLISHER=$(field "$(call POST /v1/keys "$ADMIN_KEY" '{"name": "curl publisher", "role": "publisher"}')" secret)
AUDITOR=$(field "$(call POST /v1/keys "$ADMIN_KEY" '{"name": "curl auditor", "role": "auditor"}')" secret)

# 2. The publisher registers its training set and a held-out set by their paths on the server.
DS=$(call POST /v1/datasets "$PUBLISHER" "{\"name\": \"training set\", \"path\": $(json_str "$DATASET")}")
echo "dataset $(field "$DS" id) ($(field "$DS" count) images, sha256 $(field "$DS" sha256))"
split=null; [ -n "${HOLDOUT_SPLIT:-}" ] && split=$(json_str "$HOLDOUT_SPLIT")
HO=$(call POST /v1/datasets "$PUBLISHER" "{\"name\": \"held-out set\", \"path\": $(json_str "$HOLDOUT"), \"split\": $split}")

# 3. It watermarks the training set with a spec (a job writes the release), then reads the
#    commitment to publish with the release.
W=$(call POST /v1/watermarks "$PUBLISHER" "{\"name\": \"release 1\", \"dataset_id\": \"$(field "$DS" id)\",
  \"holdout_dataset_id\": \"$(field "$HO" id)\", \"spec\": $(json_str "$(cat "$SPEC")"), \"seed\": ${SEED:-null},
  \"nonce\": $( [ -n "${NONCE:-}" ] && json_str "$NONCE" || echo null)}")
WM=$(field "$W" watermark id)
wait_job "$PUBLISHER" "$(field "$W" job id)"
INFO=$(call GET "/v1/watermarks/$WM" "$PUBLISHER")
echo "watermark $WM: $(field "$INFO" poisoned) samples poisoned"
echo "commitment (publish it with the release): $(field "$INFO" commitment)"

# 4. The auditor tells the publisher its key id; the publisher grants it the watermark.
AUDITOR_ID=$(field "$(call GET /v1/keys/me "$AUDITOR")" id)
call POST "/v1/watermarks/$WM/grants" "$PUBLISHER" "{\"auditor_id\": \"$AUDITOR_ID\"}" >/dev/null
echo "granted auditor $AUDITOR_ID"

# 5. The auditor verifies a model endpoint and reads the verdict.
if [ -z "${ENDPOINT:-}" ]; then
  echo "no ENDPOINT given: skipping the auditor flow"
  exit 0
fi
V=$(call POST /v1/verifications "$AUDITOR" "{\"watermark_id\": \"$WM\", \"sequential\": true,
  \"endpoint\": {\"url\": $(json_str "$ENDPOINT"), \"protocol\": \"v2\", \"model\": $(json_str "${MODEL:-model}")}}")
wait_job "$AUDITOR" "$(field "$V" job id)"
DONE=$(call GET "/v1/verifications/$(field "$V" verification id)" "$AUDITOR")
DECISION=$(field "$DONE" decision)
echo "verdict: $DECISION (p = $(field "$DONE" p_value), $(field "$DONE" verdict pairs) pairs, $(field "$DONE" verdict queries) queries)"
[ "$DECISION" = used ] || exit 1
