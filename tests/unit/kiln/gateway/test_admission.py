"""Load shedding by expected queue time, on a fake clock: an idle model always admits up to
its floor, the limit follows the measured answer rate times the budget, a refusal says how
long to wait, and leaving (answered or not) gives the place back."""

from __future__ import annotations

import pytest

from kiln.gateway.admission import MAX_RETRY_S, Admission, Overloaded


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def served(admission: Admission, clock: Clock, model: str, rate: float, seconds: float) -> None:
    """``rate`` requests a second answered for ``seconds``, one at a time."""
    for _ in range(int(rate * seconds)):
        admission.enter(model)
        clock.now += 1.0 / rate
        admission.leave(model, answered=True)


def fill(admission: Admission, model: str) -> int:
    """Admit until refused; how many got in."""
    n = 0
    while True:
        try:
            admission.enter(model)
        except Overloaded:
            return n
        n += 1


def test_an_idle_model_admits_its_floor_and_then_refuses(clock):
    admission = Admission(clock=clock)
    admission.configure("emb", budget_s=0.5, min_in_flight=8)
    assert fill(admission, "emb") == 8  # no rate measured yet: the floor only
    with pytest.raises(Overloaded) as refused:
        admission.enter("emb")
    assert refused.value.in_flight == 8 and "emb" in str(refused.value)


def test_the_limit_is_the_measured_rate_times_the_budget(clock):
    admission = Admission(clock=clock)
    admission.configure("emb", budget_s=0.5, min_in_flight=4)
    served(admission, clock, "emb", rate=200, seconds=2.0)
    assert admission.rate("emb") == pytest.approx(200, rel=0.02)
    assert admission.limit("emb") == pytest.approx(100, abs=2)
    assert fill(admission, "emb") == admission.limit("emb")


def test_a_refusal_asks_the_client_to_wait_as_long_as_the_queue(clock):
    admission = Admission(clock=clock)
    admission.configure("emb", budget_s=0.5, min_in_flight=4)
    served(admission, clock, "emb", rate=100, seconds=2.0)
    fill(admission, "emb")
    with pytest.raises(Overloaded) as refused:
        admission.enter("emb")
    # 50 in flight at 100 answers a second: half a second of queue
    assert refused.value.wait_s == pytest.approx(0.5, rel=0.05)
    assert refused.value.retry_after == pytest.approx(0.5, rel=0.05)


def test_a_stalled_model_sheds_and_its_retry_hint_stays_bounded(clock):
    admission = Admission(clock=clock)
    admission.configure("emb", budget_s=0.5, min_in_flight=4)
    served(admission, clock, "emb", rate=100, seconds=2.0)
    fill(admission, "emb")
    clock.now += 10  # nothing answered for ten seconds: the rate is forgotten, the floor remains
    assert admission.rate("emb") == 0.0 and admission.limit("emb") == 4
    with pytest.raises(Overloaded) as refused:
        admission.enter("emb")
    assert 0 < refused.value.retry_after <= MAX_RETRY_S


def test_leaving_gives_the_place_back_and_only_answers_count_in_the_rate(clock):
    admission = Admission(clock=clock)
    admission.configure("emb", budget_s=0.5, min_in_flight=2)
    fill(admission, "emb")
    admission.leave("emb", answered=False)  # refused by Triton or failed: no work done
    assert admission.in_flight("emb") == 1 and admission.rate("emb") == 0.0
    admission.enter("emb")
    admission.leave("emb", answered=True)
    assert admission.in_flight("emb") == 1 and admission.rate("emb") > 0


def test_a_model_without_a_budget_is_never_shed(clock):
    admission = Admission(clock=clock)
    for _ in range(1000):
        admission.enter("lm")
    assert admission.refusal("lm") is None
