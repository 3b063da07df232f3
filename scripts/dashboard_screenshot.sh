#!/usr/bin/env bash
# docs/dashboard.png: optuna-dashboard on a finished run's study, photographed by Debian's Chromium headless
# (apt-get install -y chromium). Nothing leaves the machine: the dashboard listens on 127.0.0.1 only.
# Usage: bash scripts/dashboard_screenshot.sh RUN_DIR [OUT.png]     (RUN_DIR holds study.journal)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
run=$(cd "$1" && pwd)
out=${2:-$repo/docs/dashboard.png}
py="$repo/.venv/bin/python"
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$repo/.venv/bin/optuna-dashboard" "$run/study.journal" --host 127.0.0.1 --port "$port" --quiet &
dashboard=$!
profile=$(mktemp -d)
trap 'kill "$dashboard"; rm -rf "$profile"' EXIT
# the study's id once the server answers (a run folder holds one study)
study=$("$py" - "$port" <<'PY'
import json, sys, time, urllib.request
for _ in range(300):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/studies", timeout=5) as r:
            print(json.load(r)["study_summaries"][0]["study_id"])
            break
    except OSError:
        time.sleep(0.2)
else:
    sys.exit("optuna-dashboard did not answer in 60 s")
PY
)
# --virtual-time-budget: the page is a script that fetches the study; let it draw before the picture is taken
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
    --virtual-time-budget=15000 --screenshot="$out" --window-size=1280,900 \
    "http://127.0.0.1:$port/dashboard/studies/$study" 2>/dev/null
echo "wrote $out ($(stat -c %s "$out") bytes)"
