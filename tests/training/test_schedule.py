"""The training length that fits a job's time limit, and the learning rate over it."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from autoseg.planning.plans import TrainingSpec
from autoseg.training.schedule import fit_epochs

LIMIT_35_S = 35 / 3600


def test_epochs_are_kept_without_a_limit_or_when_they_fit():
    assert fit_epochs(TrainingSpec(epochs=10), [100.0, 200.0]) == (10, None)
    assert fit_epochs(TrainingSpec(epochs=10, time_limit_hours=1.0), [10.0, 20.0]) == (10, None)  # 100 s of 3600


def test_slow_epochs_shorten_the_schedule_to_what_fits():
    t = TrainingSpec(epochs=10, time_limit_hours=LIMIT_35_S)
    epochs, why = fit_epochs(t, [10.0])  # 10 s per epoch, 25 s left: two more
    assert epochs == 3 and why is not None and "3 of 10 epochs fit at 10.0 s per epoch" in why
    assert fit_epochs(t, [10.0, 20.0, 30.0])[0] == 3  # 5 s left: stop after the epoch just done
    assert fit_epochs(t, [10.0, 20.0, 30.0, 40.0])[0] == 4  # over the limit: never fewer than done
    # the next epochs are priced at the recent ones: a first epoch slowed by start-up does not count for ever
    assert fit_epochs(dataclasses.replace(t, time_limit_hours=100 / 3600), [40.0, 45.0, 50.0, 55.0, 60.0])[0] == 10


@given(
    epochs=st.integers(1, 50),
    limit=st.floats(1e-4, 10.0),
    steps=st.lists(st.floats(0.1, 500.0), min_size=1, max_size=60),
)
def test_fit_epochs_stays_between_the_epochs_done_and_the_plan(epochs, limit, steps):
    elapsed = [sum(steps[: k + 1]) for k in range(len(steps))]
    t = TrainingSpec(epochs=epochs, time_limit_hours=limit)
    fitted, why = fit_epochs(t, elapsed)
    assert min(len(elapsed), epochs) <= fitted <= epochs
    assert (why is None) == (fitted == epochs)
