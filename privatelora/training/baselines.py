"""The methods personalization compares, behind one interface: ``params``, ``num_params``,
``step(inputs, labels)`` (forward + backward of the mean label-token loss) and
``evaluate(inputs, labels)`` (summed nats).

``PrivateLoRAMethod`` trains M through the split (``training/cloud.py``,
``training/device.py``), in process or over a ``transport.Session``; ``PeftLoRA`` (LoRA
through the ``peft`` library, the one users compare against, on the same targets and
layers as the split) and ``FullFineTune`` (every backbone weight) are the baselines;
``LoRAMethod`` is the earlier hand-written LoRA, kept as the parity reference of
``PeftLoRA`` (tests/test_tuning.py); ``Untuned`` only evaluates.
"""

from __future__ import annotations

import copy
import inspect
import math

import torch

from privatelora.training.data import ce_sum, label_count


class Untuned:
    name = "untuned"

    def __init__(self, backbone):
        self.model = backbone.model
        self.params: list = []

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @torch.no_grad()
    def evaluate(self, inputs, labels) -> float:
        return float(ce_sum(self.model(input_ids=torch.tensor(inputs)).logits, labels))

    def step(self, inputs, labels) -> float:
        with torch.enable_grad():
            loss = ce_sum(self.model(input_ids=torch.tensor(inputs)).logits, labels) / max(label_count(labels), 1)
            loss.backward()
        return float(loss.detach())


class LoRAMethod(Untuned):
    """Standard LoRA on q, k, v of every layer: W x + (alpha / r) B A x, A Kaiming-uniform
    (as peft), B = 0. Forward hooks on a private copy of the frozen backbone; A and B train."""

    name = "lora"

    def __init__(self, backbone, rank: int = 16, alpha: float = 32, targets=("q", "k", "v"), seed: int = 0):
        self.model = copy.deepcopy(backbone.model)   # hooks never touch the shared backbone
        g = torch.Generator().manual_seed(seed)
        self.scale = alpha / rank
        self.params, self._hooks = [], []
        for layer in self.model.model.layers:
            for t in targets:
                lin = getattr(layer.self_attn, f"{t}_proj")
                bound = 1 / math.sqrt(lin.in_features)   # kaiming_uniform_(a=sqrt(5)) as nn.Linear / peft
                A = ((torch.rand(rank, lin.in_features, generator=g) * 2 - 1) * bound).requires_grad_(True)
                B = torch.zeros(lin.out_features, rank, requires_grad=True)
                self.params += [A, B]
                self._hooks.append(lin.register_forward_hook(
                    lambda mod, inp, out, A=A, B=B: out + self.scale * ((inp[0] @ A.T) @ B.T)))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class PeftLoRA(Untuned):
    """LoRA through ``peft`` (``LoraConfig``: r, alpha, no dropout, no bias) on ``targets`` of
    ``layers`` (None: every layer), on a private copy of the frozen backbone. peft draws A
    (Kaiming-uniform) and zeroes B; the draw uses a torch RNG seeded with ``seed`` and forked,
    so the process's global RNG is untouched and a seed always gives the same A."""

    name = "lora"

    def __init__(self, backbone, rank: int = 16, alpha: float = 32, targets=("q", "k", "v"), seed: int = 0,
                 layers=None):
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                         target_modules=[f"{t}_proj" for t in targets],
                         layers_to_transform=None if layers is None else list(layers))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = get_peft_model(copy.deepcopy(backbone.model), cfg)
        self.model.eval()      # no dropout anywhere (the backbone's config may declare some)
        self.named = [(n, p) for n, p in sorted(self.model.named_parameters()) if p.requires_grad]
        self.params = [p for _, p in self.named]


class FullFineTune(Untuned):
    """Every backbone weight trains (a private copy of the model)."""

    name = "full"

    def __init__(self, backbone):
        self.model = copy.deepcopy(backbone.model)
        self.params = list(self.model.parameters())
        for p in self.params:
            p.requires_grad_(True)


class PrivateLoRAMethod:
    """M trains through the split: in process (a ``CloudTrainer`` on a ``CloudPart``) or over
    ``session`` (a ``transport.Session`` on a cloud endpoint). Evaluation runs through the
    split as well (forward only)."""

    def __init__(self, device_part, trainer=None, session=None, name: str = "privatelora"):
        if (trainer is None) == (session is None):
            raise ValueError("give exactly one of trainer (in process) or session (remote)")
        self.part, self.trainer, self.session, self.name = device_part, trainer, session, name
        self.params = [M for _, M in device_part.adapter.named_parameters()]
        self._sid = session.id if session is not None else 1

    @property
    def num_params(self) -> int:
        return self.part.adapter.num_parameters()

    def _run(self, step):
        from privatelora.training.device import run_step, run_step_remote
        if self.trainer is not None:
            return run_step(self.trainer, step)
        return run_step_remote(self.session, step)

    def step(self, inputs, labels):
        from privatelora.training.device import TrainStep
        r = self._run(TrainStep(self.part, self._sid, inputs, labels))
        if inspect.isawaitable(r):
            async def done():
                return (await r).loss
            return done()
        return r.loss

    def evaluate(self, inputs, labels):
        from privatelora.training.device import TrainStep
        r = self._run(TrainStep(self.part, self._sid, inputs, labels, backward=False))
        if inspect.isawaitable(r):
            async def done():
                return (await r).loss_sum
            return done()
        return r.loss_sum


# ---------------------------------------------------------------- the loop
