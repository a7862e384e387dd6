"""The scheduler is plain Python: tested without torch, Ray or sockets."""

import subprocess
import sys

import pytest

from privatelora.serving.scheduler import Busy, Scheduler, UnknownSession


def test_scheduler_imports_neither_torch_nor_ray():
    code = "import sys, privatelora.serving.scheduler; assert 'torch' not in sys.modules and 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_groups_by_stage_trailing_first():
    s = Scheduler()
    for sid in range(5):
        s.open(sid, 0.0)
    s.submit(0, 3, 1, "a3", 0.0)
    s.submit(1, 1, 1, "b1", 0.0)
    s.submit(2, 1, 1, "c1", 0.0)
    s.submit(3, -1, 7, "d-entry", 0.0)
    s.submit(4, 3, 1, "e3", 0.0)
    assert s.next_batch(0.0) == ["d-entry"]
    assert s.next_batch(0.0) == ["b1", "c1"]
    assert s.next_batch(0.0) == ["a3", "e3"]
    assert s.next_batch(0.0) == []
    assert s.stats.mean_batch_size == 5 / 3


def test_out_of_phase_sessions_converge():
    """Simulate sessions cycling through 4 layers; they end up sharing every stage."""
    s = Scheduler()
    layers = 4
    stage = {sid: (sid * 2) % layers for sid in range(6)}   # all out of phase
    for sid in stage:
        s.open(sid, 0.0)
        s.submit(sid, stage[sid], 1, sid, 0.0)
    sizes = []
    for _ in range(60):
        batch = s.next_batch(0.0)
        sizes.append(len(batch))
        for sid in batch:
            stage[sid] = (stage[sid] + 1) % layers
            s.submit(sid, stage[sid], 1, sid, 0.0)
    assert sizes[-10:] == [6] * 10


def test_fairness_old_items_win():
    s = Scheduler(max_wait_s=0.01)
    s.open(1, 0.0)
    s.open(2, 0.0)
    s.submit(1, 5, 1, "late-stage", 0.0)
    s.submit(2, 0, 1, "early", 0.001)
    assert s.next_batch(0.002) == ["early"]          # trailing first while nobody waits long
    s.submit(2, 0, 1, "early-again", 0.003)
    assert s.next_batch(0.05) == ["late-stage"]      # waited 50 ms > 10 ms: it goes first
    assert s.stats.fairness_picks == 1


def test_token_budget_splits_a_group_but_never_starves_a_big_item():
    s = Scheduler(token_budget=10)
    for sid in range(4):
        s.open(sid, 0.0)
    s.submit(0, -1, 6, "p6", 0.0)
    s.submit(1, -1, 6, "q6", 0.0)
    s.submit(2, -1, 30, "huge", 0.0)
    s.submit(3, -1, 1, "t1", 0.0)
    assert s.next_batch(0.0) == ["p6"]
    assert s.next_batch(0.0) == ["q6"]
    assert s.next_batch(0.0) == ["huge"]       # bigger than the budget: runs alone
    assert s.next_batch(0.0) == ["t1"]


def test_admission_queue_and_busy():
    s = Scheduler(max_running=2, max_waiting=1)
    for sid in range(4):
        s.open(sid, 0.0)
    s.submit(0, -1, 3, "s0", 0.0)
    s.submit(1, -1, 3, "s1", 0.0)
    s.submit(2, -1, 3, "s2", 0.0)            # waits for a slot
    with pytest.raises(Busy):
        s.submit(3, -1, 3, "s3", 0.0)
    assert s.running == 2 and s.waiting == 1 and s.stats.busy == 1
    assert s.next_batch(0.0) == ["s0", "s1"]
    assert s.close(0) == [2]                  # a slot frees: the waiting session runs
    assert s.next_batch(0.0) == ["s2"]
    assert s.close(3) == []                   # a session that never ran frees nothing
    with pytest.raises(UnknownSession):
        s.submit(3, -1, 1, "x", 0.0)


def test_idle_sessions_are_reported_and_closing_drops_their_work():
    s = Scheduler(idle_timeout_s=5.0)
    s.open(1, 0.0)
    s.open(2, 0.0)
    s.submit(1, -1, 2, "a", 0.0)
    s.submit(2, -1, 2, "b", 4.0)
    assert s.idle(6.0) == [1]
    s.close(1)
    assert s.next_batch(6.0) == ["b"]
    assert s.open_sessions == 1 and s.stats.reclaimed == 1


def test_gathering_waits_for_owed_members_but_at_most_gather_s():
    s = Scheduler(gather_s=0.002)
    for sid in range(3):
        s.open(sid, 0.0)
    for sid in range(3):
        s.expect(sid, 4)                      # the cloud sent all three their layer-4 activations
    s.submit(0, 4, 1, "a", 0.0)
    s.submit(1, 4, 1, "b", 0.0005)
    assert s.next_batch(0.001) == [] and s.wake_at == 0.002   # session 2 still owes stage 4
    s.submit(2, 4, 1, "c", 0.0015)
    assert s.next_batch(0.0015) == ["a", "b", "c"]            # complete: runs at once
    for sid in range(3):
        s.expect(sid, 5)
    s.submit(0, 5, 1, "a5", 0.010)
    assert s.next_batch(0.011) == []
    assert s.next_batch(0.0121) == ["a5"]                     # never waits beyond gather_s
    s.open(3, 0.02)                                           # a fresh, punctual session
    s.submit(2, 7, 1, "c7", 0.020)                            # nobody else owes stage 7
    s.submit(0, 6, 1, "a6", 0.020)
    s.expect(3, 6)
    assert s.next_batch(0.0201) == ["c7"]   # a complete group runs while stage 6 gathers


def test_merge_holds_a_leading_group_for_the_sessions_behind_it():
    """Two cohorts one layer apart: with merge, the leader waits (bounded by gather_s)
    while the trailer runs its stage and answers, and from then on they share stages."""
    s = Scheduler(gather_s=0.05, merge=True)
    for sid in range(4):
        s.open(sid, 0.0)
    for sid in (0, 1):
        s.expect(sid, 5)                    # cohort A owes layer 5
    for sid in (2, 3):
        s.submit(sid, 6, 1, f"b{sid}", 0.0)  # cohort B is already at layer 6
    assert s.next_batch(0.001) == [] and s.wake_at == 0.05     # B waits for A, behind it
    s.submit(0, 5, 1, "a0", 0.002)
    s.submit(1, 5, 1, "a1", 0.003)
    assert s.next_batch(0.003) == ["a0", "a1"]                 # trailing first: A catches up
    for sid in (0, 1):
        s.expect(sid, 6)
    assert s.next_batch(0.004) == []                            # B now waits for A's owed replies
    s.submit(0, 6, 1, "a0", 0.010)
    s.submit(1, 6, 1, "a1", 0.011)
    assert s.next_batch(0.011) == ["b2", "b3", "a0", "a1"]     # merged
    # without merge the leader runs at once; with it, never beyond gather_s
    s2 = Scheduler(gather_s=0.05)
    for sid in range(3):
        s2.open(sid, 0.0)
    s2.expect(0, 5)
    s2.submit(1, 6, 1, "b1", 0.0)
    assert s2.next_batch(0.001) == ["b1"]
    s.expect(2, 2)                                              # a trailer that never answers
    s.submit(3, 9, 1, "late", 0.1)
    assert s.next_batch(0.12) == [] and s.next_batch(0.151) == ["late"]


def test_a_silent_member_costs_its_cohort_one_gathering_bound_then_rejoins():
    """Session 2 stops answering mid-step: its cohort waits for it once (gather_s), then
    runs without waiting for it at every later stage; once it answers it is waited for again."""
    s = Scheduler(gather_s=0.01)
    for sid in range(3):
        s.open(sid, 0.0)
    t, waited = 0.0, []
    for layer in range(6):
        for sid in range(3):
            s.expect(sid, layer) if sid < 2 or layer == 0 else None
        s.submit(0, layer, 1, f"a{layer}", t)
        s.submit(1, layer, 1, f"b{layer}", t)
        batch = s.next_batch(t)
        if not batch:                          # held back for session 2
            waited.append(layer)
            t += 0.01
            batch = s.next_batch(t)
        assert batch == [f"a{layer}", f"b{layer}"]
        t += 0.001
    assert waited == [0] and s.excused == 1    # one gathering bound in all, not one per stage
    s.submit(2, 0, 1, "c0", t)                 # it answers at last: runs (trailing first) ...
    s.submit(0, 6, 1, "a6", t)
    assert s.next_batch(t) == ["c0"] and s.excused == 0
    s.expect(2, 6)                             # ... and is owed again, so its cohort waits for it
    s.submit(1, 6, 1, "b6", t)
    assert s.next_batch(t) == []
    s.submit(2, 6, 1, "c6", t + 0.001)
    assert s.next_batch(t + 0.001) == ["a6", "b6", "c6"]


def test_training_runs_one_at_a_time_after_serving_and_is_never_starved():
    from privatelora.serving.scheduler import TRAIN
    s = Scheduler(max_running=2, max_waiting=0, max_wait_s=0.05)
    for sid in range(4):
        s.open(sid, 0.0)
    s.submit(0, TRAIN, 1, "t0", 0.0)
    s.submit(1, TRAIN, 1, "t1", 0.0)
    with pytest.raises(Busy):                  # admitted like serving: two sessions run at most
        s.submit(2, 3, 1, "x", 0.0)
    s.close(1)
    s.submit(2, 3, 1, "s2", 0.001)
    assert s.next_batch(0.002) == ["s2"]       # serving first
    assert s.next_batch(0.003) == ["t0"]       # then training, one item per batch
    s.submit(0, TRAIN, 1, "t0b", 0.004)
    for i in range(5):                         # a steady stream of serving work ...
        s.submit(2, 3, 1, f"s{i}", 0.005 + 0.02 * i)
        if s.next_batch(0.005 + 0.02 * i + 0.001) == ["t0b"]:
            break
    assert i == 3 and s.stats.fairness_picks == 1   # ... holds training back at most max_wait_s
