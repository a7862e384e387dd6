"""The label attack of an honest-but-curious cloud on split tuning (bench/privacy_labels.py)."""

import pytest
import torch

from privatelora.bench.privacy_labels import PublicHead, label_attack, record_tuning, recover_labels
from privatelora.config import PrivateLoRAConfig
from privatelora.model.loading import load_backbone
from privatelora.privacy import is_private
from privatelora.runtime.messages import Reply
from privatelora.runtime.train_messages import GradActivations, GradHandoff, TrainHandoff
from privatelora.training.data import encode_text, read_text


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # device and cloud in one process: one thread each (bench.geometry)
    yield load_backbone("tiny")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sequences(tiny):
    """2 windows of 65 tokens (64 labels each) of the held-out Sonnets."""
    ids = encode_text(tiny.tokenizer, read_text("sonnets")[1])
    return [ids[2000 + i * 65: 2000 + (i + 1) * 65].tolist() for i in range(2)]


@pytest.mark.parametrize("private_m", [False, True])
def test_labels_leak_from_the_gradient_without_tail_layers(tiny, sequences, private_m):
    r = label_attack(tiny, PrivateLoRAConfig(rank=16), sequences, private_m=private_m)
    print(r)
    assert r["labels"] == 128 and r["attack"] == "gradient_match"
    assert r["recovered"] >= 0.95                      # measured 1.0
    assert r["recovered"] > r["baseline"] + 0.5        # baseline: the most frequent label, 0.06
    assert set(r["messages_received"]) == {"TrainHandoff", "Reply", "GradHandoff", "GradActivations"}


def test_the_attack_uses_only_what_the_cloud_received(tiny, sequences):
    cfg = PrivateLoRAConfig(rank=16)
    rec, truth = record_tuning(tiny, cfg, sequences, private_m=True)
    for msg in rec.received:                           # nothing private travels up
        assert isinstance(msg, (TrainHandoff, Reply, GradHandoff, GradActivations))
        for t in vars(msg).values():
            for x in (t if isinstance(t, tuple) else (t,)):
                assert not is_private(x)
    (view,), (labels,) = rec.views(), truth
    head = PublicHead.from_backbone(tiny, cfg)
    guess, _ = recover_labels(head, view)
    assert (guess == labels).float().mean() >= 0.95
    # the gradient rows shuffled between positions: the same traffic, misaligned
    perm = torch.randperm(view.grad.shape[0], generator=torch.Generator().manual_seed(0))
    view.grad = view.grad[perm]
    guess, _ = recover_labels(head, view)
    assert (guess == labels).float().mean() < 0.2


def test_device_tail_layers_with_a_private_m_leak_less(tiny, sequences):
    """Measured (2 x 64 labels): tail 1: 0.98 (M = 0), 0.91 (private M); tail 2: 0.98, 0.53."""
    res = {}
    for tail in (0, 1, 2):
        for pm in (False, True):
            r = label_attack(tiny, PrivateLoRAConfig(rank=16, device_tail_layers=tail), sequences, private_m=pm)
            res[tail, pm] = r["recovered"]
            print(f"tail {tail} private M {pm}: recovered {r['recovered']:.3f} of {r['labels']}, "
                  f"baseline {r['baseline']:.3f}, {r['seconds']:.1f}s")
    assert res[2, True] < res[0, True]
    assert res[2, False] > 0.8                          # M = 0: the public replay is exact
