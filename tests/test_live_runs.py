"""The panel's numbers: an ETA that counts preview time and does not jump, and Stop & save reaching only the runs
it names. Pure Python on the pack's core as ComfyUI imported it."""
import pytest


@pytest.fixture
def live(core):
    return core.live_runs


def test_eta_counts_preview_pauses_and_stays_steady(live):
    """1 s steps and a 10 s preview every 5 steps: 3 s a step on average, and the estimate stays near that
    between previews and through them, instead of swinging with the last step's time."""
    runs = live.Runs()
    run = runs.start("7", "p", total=100, first_step=0, preview_every=5)
    now, estimates = 0.0, []
    for step in range(1, 41):
        now += 1.0 + (10.0 if step % 5 == 0 else 0.0)
        runs.step(run, step, 100, loss=0.5, learning_rate=1e-4, seconds=1.0, now=now)
        if step >= 12:
            estimates.append(run.eta_seconds / (100 - step))
    assert all(2.4 <= e <= 3.6 for e in estimates), estimates
    assert run.seconds_per_step == 1.0  # the step's own time is reported apart


def test_eta_is_unknown_until_two_steps_and_never_negative(live):
    runs = live.Runs()
    run = runs.start("7", "p", total=3, first_step=0)
    runs.step(run, 1, 3, 0.5, 1e-4, 1.0, now=1.0)
    assert run.eta_seconds is None
    runs.step(run, 2, 3, 0.5, 1e-4, 1.0, now=2.0)
    runs.step(run, 3, 3, 0.5, 1e-4, 1.0, now=3.0)
    assert run.eta_seconds == 0
    runs.end(run, live.FINISHED, "finished at step 3 of 3")
    assert run.summary()["eta_seconds"] is None


def test_stop_reaches_only_the_running_trainers_it_names(live):
    runs = live.Runs()
    a = runs.start("1", "prompt-a", 10, 0)
    b = runs.start("2", "prompt-b", 10, 0)
    done = runs.start("3", "prompt-a", 10, 0)
    runs.end(done, live.FINISHED)
    assert runs.request_stop(node="9") == []
    assert runs.request_stop(prompt_id="prompt-a") == ["1"]
    assert a.stop_requested and a.status == live.STOPPING and not b.stop_requested and not done.stop_requested
    assert runs.request_stop() == ["2"], "a stopping run is not asked twice"


def test_a_continued_run_shows_the_curve_it_continues(live):
    runs = live.Runs()
    run = runs.start("5", None, total=6, first_step=3, losses=[0.9, 0.8, 0.7])
    runs.step(run, 4, 6, 0.6, 1e-4, 1.0)
    assert run.summary()["losses"] == [[1, 0.9], [2, 0.8], [3, 0.7], [4, 0.6]]
    assert runs.saved("5", "models/loras/x_00001.safetensors") is run and run.saved == ["models/loras/x_00001.safetensors"]
    assert runs.saved(None, "y") is None
