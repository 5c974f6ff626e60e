"""How long a command takes to end after SIGTERM, on a real config (the reliability tests assert a loose 30 s on
the tiny config; this measures the default one).

    python bench/stops.py [--config configs/default.yaml] [--command collect] [--at "targets/smollm2/shard-*.json"]
                          [--after 10]

Starts `mmtp <command>` with a fresh output_dir (the teachers' cache, corrected adapters included, is shared), waits
until a file matching `--at` exists under it (default: the language teacher's first finished shard, so the next
one is in progress) plus `--after` seconds, sends SIGTERM and times the exit. Prints JSON: the exit code, the
seconds from the signal to the exit, whether a temp file of the stopped work was left behind (there should be
none), and whether every finished shard's sha256 matches its sidecar.
"""

import argparse
import json
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
    p.add_argument("--at", default="targets/smollm2/shard-*.json", help="a glob under output_dir: the work has begun")
    p.add_argument("--after", type=float, default=10.0, help="seconds after it appears before SIGTERM")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from data.shards import sha256_file, stray_temp_files

    out = Path(tempfile.mkdtemp(prefix="mmtp-stop-"))
    cmd = [sys.executable, "-m", "flows.cli", args.command, "--config", args.config, f"output_dir={out}",
           f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    while not list(out.glob(args.at)):
        if proc.poll() is not None:
            sys.exit(f"the command ended (code {proc.returncode}) before {args.at!r} appeared; see {log}")
        time.sleep(0.2)
    time.sleep(args.after)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    seconds = time.perf_counter() - sent
    rest = log.read_text()
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
