"""A stand-in for experiments.sweep_run in the sweep launcher's tests: `run_dir=PATH [dice=X] [fail=1]`
finishes that run folder (done, metrics.json) at once, or fails. Imports nothing heavy."""
import json
import sys
from pathlib import Path

args = dict(a.split("=", 1) for a in sys.argv[1:])
run_dir = Path(args["run_dir"])
run_dir.mkdir(parents=True, exist_ok=True)
print(f"fake run {run_dir}")
if args.get("fail"):
    sys.exit(3)
(run_dir / "metrics.json").write_text(json.dumps({"test/mean/dice": float(args.get("dice", 0.5))}), encoding="utf-8")
(run_dir / "done").write_text("x\n", encoding="utf-8")
