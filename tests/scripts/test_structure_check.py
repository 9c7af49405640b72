"""The structure stays legible: files, functions, imports, and what one training step touches."""

from __future__ import annotations

import json

from scripts import structure_check


def test_structure_check_limits_hold(capsys) -> None:
    assert structure_check.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["long_files"] == {} and report["long_functions"] == {}
    assert report["root_imports"] == []
    step = report["step_files"]
    assert len(step) <= structure_check.MAX_STEP_FILES, step
    # the step's own files: the loop, the stage, the objective, the condition and the model
    assert {"training/loop.py", "training/dit_stage.py", "training/flow.py",
            "models/dit.py"} <= set(step)
    assert "training/latent_cache/read.py" in report["data_files"]  # on the prefetch thread
