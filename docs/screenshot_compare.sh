#!/usr/bin/env bash
# Doc helper (not a test): screenshot the MLflow compare view of the two newest pipeline runs
# (e.g. `make distill` and `make baseline`) with headless Chromium (Debian package `chromium`).
#
#   bash docs/screenshot_compare.sh [tracking-uri] [out.png]
set -euo pipefail
cd "$(dirname "$0")/.."
URI=${1:-sqlite:///$PWD/mlflow.db}
OUT=${2:-docs/img/mlflow_compare.png}
PORT=${PORT:-5077}
command -v chromium >/dev/null || { echo "needs Debian's chromium: apt-get install -y chromium" >&2; exit 2; }

URL=$(.venv/bin/python - "$URI" "$PORT" <<'EOF'
import json, sys, urllib.parse
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
experiments = [e.experiment_id for e in mlflow.search_experiments()]
runs = mlflow.search_runs(experiments, "tags.`mmtp.stage` = 'pipeline' and attributes.status = 'FINISHED'",
                          order_by=["attributes.start_time DESC"], max_results=2, output_format="list")
if len(runs) < 2:
    sys.exit("needs two finished pipeline runs (make distill, make baseline)")
ids = json.dumps([r.info.run_id for r in runs])
exps = json.dumps(sorted({r.info.experiment_id for r in runs}))
print(f"http://127.0.0.1:{sys.argv[2]}/#/compare-runs?runs={urllib.parse.quote(ids)}"
      f"&experiments={urllib.parse.quote(exps)}")
EOF
)
.venv/bin/mlflow ui --backend-store-uri "$URI" --host 127.0.0.1 --port "$PORT" >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
mkdir -p "$(dirname "$OUT")"
# the training view, the differing params only, the charts folded: the run details, the params that differ
# and the headline metrics in one window
.venv/bin/python docs/cdp_screenshot.py "$URL" "$OUT" --wait "Run details" --height ${HEIGHT:-1500} \
  --click "Model training" --click "Visualizations" --click "Show diff only" --click "label:close" ${CLICKS:-}
echo "wrote $OUT ($URL)"
