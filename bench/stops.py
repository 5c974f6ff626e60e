"""How long a command takes to end after SIGTERM, on a real config (the reliability tests assert a loose 30 s on
the tiny config; this measures the default one).

    python bench/stops.py [--config configs/default.yaml] [--command collect] [--at "smollm2/shard-"] [--after 20]

Starts `mmtp <command>` with a fresh output_dir (the teachers' cache, corrected adapters included, is shared), waits
for a log line containing `--at` (default: the language teacher's first shard task) plus `--after` seconds, sends
SIGTERM and times the exit. Prints JSON: the exit code, the seconds from the signal to the exit, and whether a
shard or temp file of the stopped work was left behind (there should be none) and every finished shard's sha256
matches its sidecar.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--command", default="collect")
    p.add_argument("--at", default="smollm2/shard-", help="a log line that says the work has begun")
    p.add_argument("--after", type=float, default=20.0, help="seconds after that line before SIGTERM")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from data.shards import sha256_file, stray_temp_files

    out = Path(tempfile.mkdtemp(prefix="mmtp-stop-"))
    cmd = [sys.executable, "-m", "flows.cli", args.command, "--config", args.config, f"output_dir={out}",
           f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if args.at in line:
            break
    else:
        sys.exit(f"the command ended (code {proc.wait()}) before {args.at!r}")
    time.sleep(args.after)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    code = proc.wait()
    seconds = time.perf_counter() - sent
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    targets = list((out / "targets").glob("*/shard-*.arrow"))
    intact = all(sha256_file(t) == json.loads(t.with_suffix(".json").read_text())["sha256"] for t in targets
                 if t.with_suffix(".json").exists())
    print(json.dumps({"command": " ".join(cmd[2:]), "exit_code": code, "seconds_after_sigterm": round(seconds, 2),
                      "traceback": "Traceback" in rest, "finished_target_shards": len(targets),
                      "finished_shards_intact": intact,
                      "temp_files_left": sum(len(stray_temp_files(d)) for d in (out / "targets").glob("*")),
                      "machine": "2-core CPU, no GPU"}, indent=1))


if __name__ == "__main__":
    main()
