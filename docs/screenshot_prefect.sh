#!/usr/bin/env bash
# Doc helper (not a test): screenshot the Prefect UI's graph of the newest completed `distill-pipeline` flow
# run (e.g. `make distill`'s) with headless Chromium (Debian package `chromium`). It serves the flow runs that
# the embedded server recorded in PREFECT_HOME (the project's .cache/prefect by default) on 127.0.0.1.
#
#   bash docs/screenshot_prefect.sh [out.png]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/img/prefect_pipeline.png}
PORT=${PORT:-4277}
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.cache/prefect}
command -v chromium >/dev/null || { echo "needs Debian's chromium: apt-get install -y chromium" >&2; exit 2; }

PREFECT_UI_API_URL="http://127.0.0.1:$PORT/api" .venv/bin/prefect server start --host 127.0.0.1 --port "$PORT" >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
API="http://127.0.0.1:$PORT/api"
for _ in $(seq 90); do curl -sf "$API/health" >/dev/null && break; sleep 1; done
RUN=$(curl -sf -X POST "$API/flow_runs/filter" -H 'Content-Type: application/json' -d '{
  "flows": {"name": {"any_": ["distill-pipeline"]}},
  "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
  "sort": "START_TIME_DESC", "limit": 1}' | .venv/bin/python -c 'import json, sys; runs = json.load(sys.stdin)
sys.exit("no completed distill-pipeline run in " + __import__("os").environ["PREFECT_HOME"]) if not runs else print(runs[0]["id"])')
URL="http://127.0.0.1:$PORT/runs/flow-run/$RUN"
mkdir -p "$(dirname "$OUT")"
chromium --headless --no-sandbox --enable-unsafe-swiftshader --use-angle=swiftshader --hide-scrollbars \
  --window-size=1600,1100 --virtual-time-budget=30000 --screenshot="$OUT" "$URL" 2>/dev/null
echo "wrote $OUT ($URL)"
