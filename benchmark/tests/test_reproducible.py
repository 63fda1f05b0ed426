"""Two identical smoke-sized runs in separate processes give identical accuracy and MAC figures.

Each process trains its own scratch start (the step that used to build the backbone before seeding) and
fine-tunes the baseline for 2 batches, so the test stays small: the start is a quarter epoch on digits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import hashlib, json, sys
from dataclasses import replace
from pathlib import Path

import torch

from benchmark.presets import StartSpec, get_preset
from benchmark.runner import run_preset
from benchmark.start import start_path
from common.run import load_checkpoint

smoke = get_preset("smoke")
metrics = replace(smoke.metrics, mis_images=0, latency_batches=(1,), latency_repeats=1, explain_images=2,
                  figure_images=1)
preset = replace(smoke, methods=("baseline",), start=StartSpec("scratch", epochs=0.25, lr=0.1), max_batches=2,
                 metrics=metrics)
out = Path(sys.argv[1])
run_preset(preset, out, device="cpu")
state = load_checkpoint(start_path(preset, out / preset.name))["model"]
digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in state.values())).hexdigest()
row = json.loads((out / preset.name / "runs" / "baseline-seed0" / "metrics.json").read_text())
print(json.dumps({"start": digest, **{k: row[k] for k in ("top1", "dense_macs", "mean_macs", "params")}}))
"""


@pytest.mark.slow
def test_two_runs_in_separate_processes_agree(tmp_path: Path) -> None:
    env = {**os.environ, "ICNN_PROGRESS": "0", "OMP_NUM_THREADS": "1", "ICNN_CACHE": str(tmp_path / "cache")}
    root = Path(__file__).resolve().parents[2]
    figures = []
    for name in ("a", "b"):
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / name)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        figures.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert figures[0] == figures[1]
