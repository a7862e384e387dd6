"""The GPU path: what a replica asks Ray for (CPU tests), and the CUDA code itself (tests
that skip without a GPU): the limit forward and the cloud part on a CUDA backbone equal
their CPU runs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from privatelora.actors.backbone import replica_cores
from privatelora.actors.pool import replica_resources, split_cores
from privatelora.placement import CLOUD

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_replica_asks_ray_for_gpus_only_when_told():
    bundle, options = replica_resources(1)
    assert bundle == {"CPU": 1, CLOUD: 1} and options == {"num_cpus": 1, "resources": {CLOUD: 1}}
    assert "GPU" not in bundle and "num_gpus" not in options         # G = 0: exactly as before
    bundle, options = replica_resources(2, 1)
    assert bundle == {"CPU": 2, CLOUD: 1, "GPU": 1}
    assert options == {"num_cpus": 2, "resources": {CLOUD: 1}, "num_gpus": 1}
    assert replica_resources(1, 0.5)[0]["GPU"] == 0.5                  # Ray takes fractions
    with pytest.raises(ValueError):
        replica_resources(1, -1)


def test_the_replica_process_spans_its_compute_and_io_cores():
    assert replica_cores([0], [1, 2]) == [0, 1, 2]        # the endpoint pins its two threads apart
    assert replica_cores([0], None) == [0]                # not pinning apart: the compute cores only
    assert replica_cores(None, None) is None and replica_cores(None, [1]) is None


def test_the_replica_never_shares_a_core_with_the_simulated_devices():
    assert split_cores(2) == ([0], [0], [1])                # its event loop on the stages' core
    assert split_cores(3) == ([0], [1], [2])                # a core of its own once there is one
    assert split_cores(16, 2) == ([0, 1], [2], list(range(3, 16)))
    assert split_cores(1) == (None, None, None)             # one core: nothing to pin apart
    for n in range(2, 9):
        cloud, io, edges = split_cores(n)
        assert not (set(cloud) | set(io)) & set(edges) and sorted(set(cloud) | set(io) | set(edges)) == list(range(n))


def _on(model, where: str):
    """A copy of ``model`` on ``where`` (the fixture's model stays on the CPU)."""
    return copy.deepcopy(model).to(where).eval()


@cuda
def test_limit_forward_on_cuda_equals_the_cpu(backbones):
    """Caches and inputs follow the weights to the GPU; the same random inputs (drawn on
    the CPU) give the same prefill output."""
    from privatelora.bench.throughput import limit_decode
    model = backbones["llama"].model
    cpu = limit_decode(model, users=3, prompt_tokens=7, new_tokens=4)
    gpu = limit_decode(_on(model, "cuda"), users=3, prompt_tokens=7, new_tokens=4)
    assert gpu["prefill_out"].device.type == "cuda"
    assert torch.allclose(gpu["prefill_out"].cpu(), cpu["prefill_out"], atol=1e-4, rtol=1e-4)
    assert gpu["step_s"] > 0 and gpu["tok_s"] == pytest.approx(3 / gpu["step_s"])


@cuda
def test_hf_reference_runs_on_the_models_device(backbones):
    from privatelora.bench.throughput import hf_decode
    r = hf_decode(_on(backbones["llama"].model, "cuda"), users=2, prompt_tokens=5, new_tokens=3)
    assert r["step_s"] > 0 and r["tok_s"] == pytest.approx(2 / r["step_s"])


def _cpu(msg):
    """``msg`` with its tensors on the CPU, as the wire delivers them to a device."""
    moved = {}
    for f in dataclasses.fields(msg):
        v = getattr(msg, f.name)
        if isinstance(v, torch.Tensor):
            moved[f.name] = v.cpu()
        elif isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v):
            moved[f.name] = tuple(t.cpu() for t in v)
    return dataclasses.replace(msg, **moved)


def generate_through_cloud_on(where: str, session: int = 1) -> tuple[list[int], list[torch.Tensor]]:
    """Tokens and hand-offs of one greedy generation on the tiny model, the cloud part
    loaded cloud-only and moved to ``where``, the device part on the CPU."""
    from privatelora.api import build_device, load_cloud_backbone
    from privatelora.config import PrivateLoRAConfig
    from privatelora.model.sampling import SamplingParams
    from privatelora.runtime.cloud import CloudPart
    from privatelora.runtime.generation import Generation
    from privatelora.runtime.messages import Handoff
    from privatelora.runtime.runner import InProcessRunner

    cfg = PrivateLoRAConfig(rank=8)
    device = build_device("tiny", cfg)
    device.adapter.randomize_(2, scale=0.5)
    backbone = load_cloud_backbone("tiny", cfg)
    backbone.model.to(where)
    cloud = CloudPart(backbone, cfg)
    assert cloud.device.type == where
    handoffs = []

    def recording(requests, run=cloud.run):
        answers = [_cpu(a) for a in run(requests)]
        handoffs.extend(a.hidden for a in answers if isinstance(a, Handoff))
        return answers
    cloud.run = recording
    g = Generation(device.session(session), [5, 9, 2, 77, 31], SamplingParams(max_new_tokens=6))
    InProcessRunner(cloud).run([g])
    return g.tokens, handoffs


@cuda
def test_cloud_part_on_a_cuda_backbone_hands_back_what_the_cpu_does():
    """A cloud-only backbone moved to CUDA (as a replica with a GPU does) serves the same
    generation: the same hand-offs within fp32 tolerance, the same tokens."""
    cpu_tokens, cpu_h = generate_through_cloud_on("cpu")
    gpu_tokens, gpu_h = generate_through_cloud_on("cuda")
    assert gpu_tokens == cpu_tokens and len(gpu_h) == len(cpu_h) > 0
    for a, b in zip(cpu_h, gpu_h):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
