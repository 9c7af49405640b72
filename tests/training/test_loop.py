"""The shared training loop and its parts: learning rate, step rate."""

from pathlib import Path


REPO = Path(__file__).resolve().parents[2]


def test_loop_lr_factor_warms_up_then_follows_the_schedule() -> None:
    import math

    from training.loop import lr_factor

    assert [lr_factor(s, 4, 100, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(0, 0, 100, "constant") == 1.0  # no warmup: the full rate from step 0
    assert lr_factor(4, 4, 104, "cosine") == 1.0  # cosine starts at the peak after warmup
    assert math.isclose(lr_factor(54, 4, 104, "cosine"), 0.55)  # halfway: (1 + 0.1) / 2
    assert math.isclose(lr_factor(104, 4, 104, "cosine"), 0.1)  # ends at 10 %
    assert math.isclose(lr_factor(500, 4, 104, "cosine"), 0.1)  # and stays there


def test_loop_step_rate_leaves_paused_time_out_and_restarts_each_window(monkeypatch) -> None:
    from training import loop

    now = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    rate = loop.StepRate(step=10)

    def advance(seconds: float) -> None:
        now[0] += seconds

    advance(1)
    with rate.waiting():  # 2 s waiting for a batch
        advance(2)
    with rate.pause():  # 5 s of checkpoint and validation, left out
        advance(5)
    advance(4)
    # 4 steps of 8 samples in 12 s of which 5 paused: 32 samples in 7 s, 2 of them waiting
    assert rate.scalars(14, 8) == {"speed/samples_per_s": 32 / 7,
                                   "speed/data_wait_fraction": 2 / 7}
    for _ in range(3):  # a `break` out of the pause (a stop request) still counts it
        with rate.pause():
            advance(10)
            break
    advance(2)
    assert rate.scalars(15, 8) == {"speed/samples_per_s": 4.0, "speed/data_wait_fraction": 0.0}
