"""Does a second worker add throughput? Proposals evaluated per minute for 1, 2 (and 4) workers on PostgreSQL.

    .venv/bin/python benchmarks/scaleout.py [--workers 1,2] [--repeats 2] [--storage URL] [--out results/benchmarks]

The same small run (`mnv3-search netadapt small`, Fashion-MNIST at 32 px, a MACs budget so that no latency is
timed and every run makes the same choices, `--max-iterations`) is started with `--workers N` against one
PostgreSQL server (a throwaway one started here, as tests/support/postgres.py does, unless `--storage` names one), each
N in turn and the whole sequence `--repeats` times (1, 2, 1, 2, ...), so that the machine's drift falls on every
N alike. Per run: proposals and finished trials (a rung of a proposal is one trial) per minute of the
iterations' wall time (iterations.csv: the seed's training is left out), and the storage's share of the CPU
(the PostgreSQL server's CPU seconds, its exited connection backends included, over all CPU seconds the run
and the server used). Prints medians with their range and the N-worker / 1-worker ratio (the issue's goal: 2
workers on 2 cores >= 1.7x one worker), writes CSV. The load average is printed beside the figures: on a
shared machine a busy neighbour takes the second core and the ratio with it.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from support.postgres import running_postgres  # noqa: E402  (tests/support/postgres.py: a throwaway server)

RUN = ["--data", "fashion-mnist", "--limit", "4000", "--resolution", "32", "--batch-size", "64",
       "--seed-epochs", "1", "--long-epochs", "0", "--short-steps", "32", "--threads", "1", "--quiet"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated (default 1,2)")
    p.add_argument("--repeats", type=int, default=2, help="times the whole sequence of worker counts runs")
    p.add_argument("--budget", default="1.95M-macs", help="the run's budget (a count: no latency timed)")
    p.add_argument("--max-iterations", type=int, default=2)
    p.add_argument("--storage", default=None, help="a PostgreSQL URL (default: a throwaway local server)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks")
    return p.parse_args()


def server_cpu_seconds(url: str) -> float:
    """CPU seconds of the PostgreSQL server listening on `url`'s port: every postgres process's own time plus
    what its exited children (one backend per connection) left in their parent's cutime/cstime."""
    port = url.rsplit(":", 1)[1].split("/", 1)[0]
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in subprocess.run(["pgrep", "-f", f"postgres.*-p {port}"], capture_output=True, text=True).stdout.split():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the ")": state is field 3 of stat; utime, stime, cutime, cstime are fields 14-17
        total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / tick
    return total


def one_run(url: str, workers: int, args: argparse.Namespace, work: Path, index: int) -> dict[str, float]:
    out = work / f"run{index}-w{workers}"
    command = [sys.executable, "-m", "mnv3_search", "netadapt", "small", "--budget", args.budget, "--out", str(out),
               "--max-iterations", str(args.max_iterations), "--workers", str(workers), "--storage", url, *RUN]
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    before_server = server_cpu_seconds(url)
    done = subprocess.run(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    # exit 3 with this line is the run stopping at --max-iterations short of its budget: the iterations it ran
    # are what is measured (a budget met within them would make the run's length depend on its choices)
    if done.returncode != 0 and not (done.returncode == 3 and "stopped after --max-iterations" in done.stderr):
        sys.exit(f"scaleout: the {workers}-worker run failed (exit {done.returncode}):\n{done.stderr}")
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server = server_cpu_seconds(url) - before_server
    client = (after_children.ru_utime + after_children.ru_stime) - (before_children.ru_utime + before_children.ru_stime)
    iterations = pd.read_csv(out / "iterations.csv")
    iterations = iterations[iterations["iteration"] > 0]
    minutes = float(iterations["wall_seconds"].sum()) / 60
    import optuna  # here: the benchmark's own import stays light until a run is read

    trials = sum(s.n_trials for s in optuna.get_all_study_summaries(url) if s.study_name.startswith(out.name))
    return {"workers": workers, "repeat": index, "iterations": len(iterations),
            "proposals": int(iterations["proposals"].sum()), "trials": trials, "minutes": minutes,
            "proposals_per_minute": float(iterations["proposals"].sum()) / minutes,
            "trials_per_minute": trials / minutes, "storage_cpu_share": server / max(server + client, 1e-9),
            "load_average": os.getloadavg()[0]}


def main() -> None:
    args = parse()
    counts = [int(n) for n in args.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mnv3-scaleout-"))
    rows = []
    try:
        # the throwaway server's generator runs to its end (stopping the server) when the loop does
        for url in [args.storage] if args.storage else running_postgres():
            for index, workers in enumerate(counts * args.repeats):
                row = one_run(url, workers, args, work, index)
                rows.append(row)
                print(f"{workers} worker(s): {row['proposals_per_minute']:.2f} proposals/min, "
                      f"{row['trials_per_minute']:.2f} trials/min, storage {100 * row['storage_cpu_share']:.1f} "
                      f"% of CPU, load {row['load_average']:.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    csv = args.out / "scaleout.csv"
    table.to_csv(csv, index=False)
    base = table[table["workers"] == counts[0]]["proposals_per_minute"].median()
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load average now {os.getloadavg()[0]:.1f}")
    for workers, group in table.groupby("workers"):
        ppm = group["proposals_per_minute"]
        print(f"{workers} worker(s): {ppm.median():.2f} proposals/min (range {ppm.min():.2f}-{ppm.max():.2f}), "
              f"{ppm.median() / base:.2f}x {counts[0]} worker(s); "
              f"storage {100 * group['storage_cpu_share'].median():.1f} % of CPU")
    print(f"CSV: {csv}")


if __name__ == "__main__":
    main()
