"""The autoscaler's decisions (plain Python): when it adds or removes a replica, which one,
and why; it holds through a cooldown, never leaves [min, max], and reports its inputs."""

import pytest

from privatelora.serving.autoscale import Autoscaler, AutoscalePolicy


def _st(sessions, stages=0, queue=0.0):
    return {"sessions": sessions, "stages": stages, "queue_s_total": queue}


def test_sessions_per_replica_past_the_bound_add_a_replica_once_held_long_enough():
    a = Autoscaler(AutoscalePolicy(min_replicas=1, max_replicas=3, up_sessions=4, down_sessions=1, up_after_s=2,
                                   cooldown_s=5))
    assert a.decide(0.0, {0: _st(5)})["action"] == "hold"          # hot, but not for long enough yet
    d = a.decide(2.5, {0: _st(5)})
    assert d["action"] == "up" and d["replicas_after"] == 2 and "5.0 sessions per replica > 4" in d["reason"]
    assert d["sessions"] == 5 and d["sessions_per_replica"] == 5.0
    a.changed(2.5)
    assert a.decide(4.0, {0: _st(9), 1: _st(9)})["reason"] == "cooling down after a change"
    assert a.decide(8.0, {0: _st(9), 1: _st(9)})["action"] == "hold"    # hot again: the clock restarts
    assert a.decide(10.5, {0: _st(9), 1: _st(9)})["action"] == "up"


def test_queue_time_alone_adds_a_replica():
    a = Autoscaler(AutoscalePolicy(min_replicas=1, max_replicas=2, up_sessions=100, up_queue_s=0.1, up_after_s=0))
    assert a.decide(0.0, {0: _st(2, stages=100, queue=1.0)})["action"] == "hold"    # first look: no window yet
    d = a.decide(1.0, {0: _st(2, stages=200, queue=31.0)})                          # 30 s queued over 100 stages
    assert d["action"] == "up" and d["queue_s"] == pytest.approx(0.3) and "queued 300 ms" in d["reason"]


def test_low_load_removes_the_emptiest_replica_and_never_goes_below_min():
    a = Autoscaler(AutoscalePolicy(min_replicas=2, max_replicas=4, up_sessions=8, down_sessions=3, down_after_s=10,
                                   cooldown_s=0))
    three = {0: _st(1), 1: _st(0), 2: _st(2)}
    assert a.decide(0.0, three)["action"] == "hold"
    d = a.decide(10.0, three)
    assert d["action"] == "down" and d["replica"] == 1 and d["replicas_after"] == 2
    a.changed(10.0)
    assert a.decide(100.0, {0: _st(0), 2: _st(0)})["action"] == "hold"        # at the minimum


def test_bounds_are_enforced_at_once_and_bad_policies_refused():
    a = Autoscaler(AutoscalePolicy(min_replicas=2, max_replicas=3))
    assert a.decide(0.0, {0: _st(0)})["action"] == "up"                         # below min: no waiting
    d = a.decide(0.0, {0: _st(3), 1: _st(0), 2: _st(1), 3: _st(5)})
    assert d["action"] == "down" and d["replica"] == 1                          # above max
    with pytest.raises(ValueError):
        AutoscalePolicy(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError):
        AutoscalePolicy(up_sessions=2, down_sessions=2)


def test_a_restarted_replica_does_not_poison_the_queue_window():
    a = Autoscaler(AutoscalePolicy(max_replicas=2, up_sessions=100, up_queue_s=0.1))
    a.decide(0.0, {0: _st(1, stages=1000, queue=50.0)})
    d = a.decide(1.0, {0: _st(1, stages=10, queue=0.01)})                      # counters went back to ~0
    assert d["queue_s"] == 0.0 and d["action"] == "hold"
