"""torchrun helpers (training/distributed.py) in real two-process gloo groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent

AGREE = """
import json, math, sys
from pathlib import Path

import torch
from training.distributed import agree, setup, teardown

info = setup("cpu")
views = []
for losses, stops in (((1.0, 3.0), (False, False)), ((1.0, math.inf), (False, True))):
    loss, stop = agree(torch.tensor(losses[info.rank]), stops[info.rank])
    views.append([float(loss), stop])
Path(sys.argv[1], f"rank{info.rank}.json").write_text(json.dumps(views))
teardown()
"""


def _two_ranks(source: str, tmp_path: Path, port: int) -> None:
    """Run `source` as a script in a real two-process torchrun group; its argv[1] is tmp_path."""
    script = tmp_path / "script.py"
    script.write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(port), str(script), str(tmp_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


def test_distributed_agree_spreads_a_nonfinite_loss_and_a_stop(tmp_path: Path) -> None:
    _two_ranks(AGREE, tmp_path, 29531)
    for rank in (0, 1):  # every rank sees the same: the mean, and rank 1's inf and stop
        views = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert views == [[2.0, False], [float("inf"), True]]


MAIN_FIRST = """
import json, sys
from pathlib import Path

from training.config import ConfigError
from training.distributed import main_first, setup, teardown

info = setup("cpu")
seen = [main_first(info, lambda: "scanned")]
def refuse():
    raise ConfigError("runs/x already holds checkpoints")
try:
    main_first(info, refuse)
except ConfigError as exc:  # every rank, not only the one that found it
    seen.append(f"{type(exc).__name__}: {exc}")
Path(sys.argv[1], f"rank{info.rank}.json").write_text(json.dumps(seen))
teardown()
"""


def test_distributed_main_first_raises_a_refusal_on_every_rank(tmp_path: Path) -> None:
    _two_ranks(MAIN_FIRST, tmp_path, 29532)
    error = "ConfigError: runs/x already holds checkpoints"
    assert json.loads((tmp_path / "rank0.json").read_text()) == ["scanned", error]
    assert json.loads((tmp_path / "rank1.json").read_text()) == [None, error]
