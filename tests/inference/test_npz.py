"""ADM sample batches (inference/npz.py) from the tiny run of tests/conftest.py: the file the
evaluators read, resuming from kept chunks, and refusing what is not this run's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.npz import (NpzError, NpzJob, Sampling, open_parts, prepare_parts,
                           sample_chunk, write_chunk, write_npz)
from inference.pipelines import generate, to_uint8

N, CHUNK = 8, 3  # chunks of 3, 3 and 2 samples
PARAMS = {"checkpoint": "runs/tiny", "seed": 0, "steps": 2}


def _sampling(info, labels: torch.Tensor | None) -> Sampling:
    return Sampling(16, 16, labels, cfg_scale=3.0, steps=2, seed=4,
                    base_tokens=info.base_tokens, batch_size=2)


def _job(tmp_path: Path, name: str = "samples.npz", **params) -> NpzJob:
    return NpzJob(tmp_path / name, N, CHUNK, {**PARAMS, **params})


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def test_npz_file_is_an_adm_sample_batch_with_balanced_labels(loaded, tmp_path: Path) -> None:
    from training.fid import _npz_images, inspect_input

    model, vae, info = loaded
    labels = info.condition.parse(None, N)  # what the command line gives: i mod classes
    job = _job(tmp_path)
    sampling = _sampling(info, labels)
    result = write_npz(model, vae, job, sampling, prepare_parts(job))
    arrays = _arrays(job.out)
    assert sorted(arrays) == ["arr_0", "arr_1"]
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (N, 16, 16, 3)
    assert arrays["arr_1"].dtype == np.int64 and arrays["arr_1"].tolist() == labels.tolist()
    assert np.bincount(arrays["arr_1"]).tolist() == [2, 2, 2, 2]  # 4 classes, balanced
    # the pixels generate() gives in the same batches: chunks change nothing
    expected = generate(model, vae, 16, 16, num_samples=N, cond=labels, cfg_scale=3.0, steps=2,
                        seed=4, base_tokens=info.base_tokens, batch_size=2)
    assert np.array_equal(arrays["arr_0"], to_uint8(expected))
    # scripts/evaluate.py reads it as a sample batch, in batches straight from the archive
    assert inspect_input(job.out) == ("npz", [job.out])
    assert np.array_equal(np.concatenate(list(_npz_images(job.out, 5))), arrays["arr_0"])
    assert not job.parts.exists()
    assert (result.count, result.resumed, result.sampled) == (N, 0, [0, 1, 2])
    # an unconditional batch has no arr_1
    plain = write_npz(model, vae, _job(tmp_path, "plain.npz"), _sampling(info, None),
                      prepare_parts(_job(tmp_path, "plain.npz")))
    assert sorted(_arrays(plain.path)) == ["arr_0"]


def test_npz_rerun_keeps_finished_chunks_and_matches_an_uninterrupted_run(
        loaded, tmp_path: Path) -> None:
    model, vae, info = loaded
    sampling = _sampling(info, info.condition.parse(None, N))
    whole = _job(tmp_path, "whole.npz")
    write_npz(model, vae, whole, sampling, prepare_parts(whole))
    # an interrupted run: chunk 1 finished, a chunk half-written when it was killed
    job = _job(tmp_path)
    assert open_parts(job) == []
    kept = write_chunk(job, 1, *sample_chunk(model, vae, job, 1, sampling))
    (job.parts / "tmp-999-000002.npz").write_bytes(b"cut off")
    before = kept.stat()
    finished = open_parts(job)  # the rerun
    assert finished == [1] and not (job.parts / "tmp-999-000002.npz").exists()
    after = kept.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    result = write_npz(model, vae, job, sampling, finished)
    assert result.sampled == [0, 2] and result.resumed == 3  # chunk 1 was not sampled again
    whole_arrays, arrays = _arrays(whole.out), _arrays(job.out)
    assert all(np.array_equal(arrays[k], whole_arrays[k]) for k in ("arr_0", "arr_1"))
    assert not job.parts.exists()


def test_npz_parts_of_other_parameters_or_an_existing_output_are_refused(
        tmp_path: Path) -> None:
    job = _job(tmp_path)
    assert open_parts(job) == []
    write_chunk(job, 2, np.zeros((2, 16, 16, 3), np.uint8), np.array([2, 3]))
    assert open_parts(job) == [2]  # the same parameters: resumed
    with pytest.raises(NpzError, match=r"other parameters \(seed 0 there, 1 here\); rerun"):
        open_parts(_job(tmp_path, seed=1))
    with pytest.raises(NpzError, match=r"chunk_size 3 there, 4 here"):
        open_parts(NpzJob(job.out, N, 4, PARAMS))
    with pytest.raises(NpzError, match=r"num_samples 8 there, 9 here"):
        open_parts(NpzJob(job.out, 9, CHUNK, PARAMS))
    (tmp_path / "other.npz.parts").mkdir()
    with pytest.raises(NpzError, match=r"other.npz.parts: exists without a readable params"):
        open_parts(_job(tmp_path, "other.npz"))
    (tmp_path / "done.npz").write_bytes(b"an earlier batch")
    with pytest.raises(NpzError, match=r"done.npz: exists; refusing to overwrite it"):
        open_parts(_job(tmp_path, "done.npz"))
    with pytest.raises(NpzError, match=r"give a name ending in .npz"):
        open_parts(_job(tmp_path, "samples"))
    assert (tmp_path / "done.npz").read_bytes() == b"an earlier batch"
    assert sorted(p.name for p in job.parts.iterdir()) == ["000002.npz", "params.json"]
