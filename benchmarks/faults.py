"""Fault injection (issue 18) as a result file: kill -9 at seeded random moments of every writing command.

Runs the fault-injection tests of ``Testing/test_faults.py`` (the same fork server, inputs, kill schedule and
invariant checks: nothing is re-implemented here) with ``AFLOC_FAULTS_JSON`` pointing at a temporary file,
and writes their table with the machine it ran on (``benchmarks/machine.py``) to ``--out``. docs/faults.md
quotes it::

    python benchmarks/faults.py --out benchmarks/results/faults.json

Per command the JSON holds ``kills`` (SIGKILLs that landed), ``kills_mid_write`` (kills that left a
temporary file or folder behind), ``kills_after_new_result``, ``runs`` (killed runs + the uninterrupted
runs after them + the first), ``violations`` (invariant failures: 0 when the command survived every kill),
``seconds`` (wall time of the command's whole trial loop) and ``clean_run_seconds`` (median length of an
uninterrupted run). Exit code: pytest's (non-zero when an invariant was violated); the JSON is written
only when every command's row came back, atomically (no half-written file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("localize", "finetune", "train run", "models install", "convert-reference", "evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="result JSON to write")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs that must land per command")
    parser.add_argument("--seed", type=int, default=18, help="seed of the kill schedule")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import load_average, machine_info

    info = machine_info("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "faults.json"
        env = {
            **os.environ,
            "AFLOC_FAULTS_JSON": str(table),
            "AFLOC_FAULT_KILLS": str(args.kills),
            "AFLOC_FAULT_SEED": str(args.seed),
        }
        cmd = [sys.executable, "-m", "pytest", "Testing/test_faults.py", "-q", "-s", "-p", "no:cacheprovider"]
        cmd += ["-k", "kill_9"]
        rc = subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode
        if not table.is_file():
            print(f"faults: the fault tests wrote no table (pytest exit {rc})", file=sys.stderr)
            return rc or 1
        measured = json.loads(table.read_text())
    missing = [c for c in COMMANDS if c not in measured["results"]]
    if missing:
        print(f"faults: no result for {', '.join(missing)} (pytest exit {rc}); {args.out} not written", file=sys.stderr)
        return rc or 1
    report = {
        "command": info["command"],
        "seed": args.seed,
        "kills_per_command": args.kills,
        "pytest_exit_code": rc,
        "results": measured["results"],
        "machine": {**info, "load_average_end": load_average()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".part")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, args.out)
    print(json.dumps({name: r["violations"] for name, r in report["results"].items()}))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
