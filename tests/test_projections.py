"""Projection schemes (issue 17): the svd A and B are made from the public checkpoint, bit-identical
on device and cloud; their recipe travels in ``Open`` and a mismatch is refused; adapter files
record the scheme and old files still load."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from privatelora import wire
from privatelora.api import build_split, load_device_backbone
from privatelora.config import ConfigError, PrivateLoRAConfig
from privatelora.model.adapters import (AdapterError, PrivateAdapter, config_from_adapter, load_adapter,
                                        read_adapter_metadata, save_adapter)
from privatelora.model.loading import load_backbone
from privatelora.model.projections import PublicProjections, hf_weights, svd_a
from privatelora.runtime.cloud import CloudPart
from privatelora.runtime.device import DevicePart
from privatelora.serving.endpoint import CloudEndpoint
from privatelora.transport import Client, RemoteError

TINY_DIR = Path(__file__).resolve().parents[1] / "privatelora" / "zoo" / "tiny"


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def _same(p, q, keys=None):
    """Every A and B of ``p`` equals ``q``'s bit for bit (on ``keys`` layers if given)."""
    n = 0
    for mine, theirs in ((p.A, q.A), (p.B, q.B)):
        for k, v in mine.items():
            if keys is None or k[0] in keys:
                assert v.dtype == theirs[k].dtype and torch.equal(v, theirs[k]), k
                n += 1
    return n


@pytest.mark.parametrize("shared_a", [False, True])
def test_svd_projections_are_bit_identical_on_device_and_cloud(tiny, shared_a):
    """The device makes A and B for its own layers from its own (partial) load of the
    checkpoint; the cloud for the layers it runs; both equal a reference made from the
    whole model, bit for bit, also under another torch thread count."""
    cfg = PrivateLoRAConfig(rank=8, shared_a=shared_a, device_head_layers=1, device_tail_layers=1)
    assert cfg.projection == "svd"                                       # the default scheme
    device_bb = load_device_backbone(TINY_DIR, cfg)                      # layers 0 and 3 only
    assert device_bb.fingerprint == tiny.fingerprint
    device = DevicePart(device_bb, cfg)
    cloud = CloudPart(tiny, cfg)
    assert sorted({k[0] for k in device.proj.A}) == [0, 3] and sorted({k[0] for k in cloud.proj.A}) == [1, 2]
    before = torch.get_num_threads()
    torch.set_num_threads(2 if before == 1 else 1)
    try:
        everything = PublicProjections(tiny.config, cfg, range(4), weights=hf_weights(tiny.model))
    finally:
        torch.set_num_threads(before)
    # an all-cloud split computes the device's layers on the cloud side: the same numbers
    cloud_all = CloudPart(tiny, replace(cfg, device_head_layers=0, device_tail_layers=0))
    n_a = 1 if shared_a else 3
    assert _same(device.proj, everything) == 2 * (n_a + 3)
    assert _same(cloud.proj, everything) == 2 * (n_a + 3)
    assert _same(cloud_all.proj, device.proj, keys=(0, 3)) == 2 * (n_a + 3)


def test_svd_projections_are_lora_xs(tiny):
    """A = the top-r right singular vectors of W (orthonormal rows, sign fixed: largest entry
    positive), B = W A^T = U_r S_r, so B A is W's best rank-r approximation; a shared A comes
    from q, k, v stacked."""
    r = 8
    p = PublicProjections(tiny.config, PrivateLoRAConfig(rank=r), [2], weights=hf_weights(tiny.model))
    for t in ("q", "k", "v"):
        W = hf_weights(tiny.model)(2, t).double()
        A, B = p.A[(2, t)].double(), p.B[(2, t)].double()
        assert torch.allclose(A @ A.T, torch.eye(r, dtype=torch.float64), atol=1e-6)
        assert (A.gather(1, A.abs().argmax(1, keepdim=True)) > 0).all()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        assert torch.allclose(B.norm(dim=0), S[:r], rtol=1e-5)                   # columns: U_r S_r
        tail = S[r:].pow(2).sum().sqrt()                                          # Eckart-Young
        assert torch.linalg.norm(W - B @ A) == pytest.approx(float(tail), rel=1e-4)
    shared = PublicProjections(tiny.config, PrivateLoRAConfig(rank=r, shared_a=True), [2],
                               weights=hf_weights(tiny.model))
    stack = torch.cat([hf_weights(tiny.model)(2, t) for t in ("q", "k", "v")])
    assert torch.equal(shared.A[(2, "shared")], svd_a(stack, r).float())
    assert torch.equal(shared.B[(2, "k")], (hf_weights(tiny.model)(2, "k").double() @ svd_a(stack, r).T).float())
    # a random-scheme split and an svd split are different A and B
    rnd = PublicProjections(tiny.config, PrivateLoRAConfig(rank=r, projection="random"), [2])
    assert not torch.equal(rnd.A[(2, "q")], p.A[(2, "q")])
    with pytest.raises(ConfigError, match="needs the weights"):
        PublicProjections(tiny.config, PrivateLoRAConfig(rank=r), [2])
    with pytest.raises(ConfigError, match="rank <="):
        svd_a(torch.ones(4, 6), 5)
    with pytest.raises(ConfigError, match="projection must be one of"):
        PrivateLoRAConfig(projection="qr")


def test_projection_fingerprint_names_the_recipe():
    base = PrivateLoRAConfig(rank=8)
    fp = base.projection_fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert PrivateLoRAConfig(rank=8, device_tail_layers=1, dtype="bfloat16").projection_fingerprint() == fp
    assert PrivateLoRAConfig(rank=8, seed=5).projection_fingerprint() == fp            # svd takes no seed
    differ = [replace(base, projection="random"), replace(base, rank=4), replace(base, shared_a=True),
              replace(base, targets=("q", "v"))]
    assert len({fp, *(c.projection_fingerprint() for c in differ)}) == 5
    rnd = replace(base, projection="random")
    assert replace(rnd, seed=1).projection_fingerprint() != rnd.projection_fingerprint()
    g = wire.session_geometry([1, 2], 256, base)
    on_wire = {**g.to_wire(), "targets": list(g.targets), "layers": list(g.layers)}   # msgpack arrays
    assert g.projections == fp and wire.Geometry.from_wire(on_wire) == g
    for bad in ("xyz", "0" * 15, "A" * 16, 7):
        with pytest.raises(wire.GeometryError):
            replace(g, projections=bad).validate()


def test_open_with_other_projections_is_refused(tiny):
    """A device whose A and B differ from the endpoint's (random vs svd, or another seed) is
    refused at Open with geometry_mismatch; the matching one opens."""
    cfg = PrivateLoRAConfig(rank=4)
    split = build_split(cfg=cfg, backbone=tiny)

    async def main():
        refused = []
        async with CloudEndpoint(split.cloud) as ep:
            client = await Client.connect(*ep.address)
            ok = await client.open(wire.session_geometry(split.cloud.exchange_ids, split.cloud.hidden, cfg))
            await ok.close()
            for other in (replace(cfg, projection="random"), replace(cfg, projection="random", seed=3)):
                with pytest.raises(RemoteError, match="geometry_mismatch") as e:
                    await client.open(wire.session_geometry(split.cloud.exchange_ids, split.cloud.hidden, other))
                refused.append(str(e.value))
            await client.close()
        return refused
    refused = asyncio.run(main())
    assert all("svd projections" in r for r in refused)
    rsplit = build_split(cfg=replace(cfg, projection="random", seed=3), backbone=tiny)

    async def random_endpoint():
        async with CloudEndpoint(rsplit.cloud) as ep:
            client = await Client.connect(*ep.address)
            with pytest.raises(RemoteError, match="geometry_mismatch"):
                await client.open(wire.session_geometry(rsplit.cloud.exchange_ids, rsplit.cloud.hidden,
                                                        replace(cfg, projection="random")))   # seed 0, not 3
            s = await client.open(wire.session_geometry(rsplit.cloud.exchange_ids, rsplit.cloud.hidden, rsplit.cfg))
            await s.close()
            await client.close()
    asyncio.run(random_endpoint())


def test_adapter_files_record_the_scheme_and_old_files_load(tiny, tmp_path):
    svd = PrivateLoRAConfig(rank=4)
    rnd = replace(svd, projection="random")
    a = PrivateAdapter(svd, tiny.n_layers, tiny.fingerprint).randomize_(1)
    save_adapter(a, tmp_path / "svd.safetensors")
    assert read_adapter_metadata(tmp_path / "svd.safetensors")["projection_scheme"] == "svd-v1"
    assert config_from_adapter(tmp_path / "svd.safetensors").projection == "svd"
    with pytest.raises(AdapterError, match="projection_scheme"):
        load_adapter(tmp_path / "svd.safetensors", rnd, tiny.n_layers, tiny.fingerprint)
    # files written before the svd scheme: "normal-v1", or (older still) no scheme at all
    old = PrivateAdapter(rnd, tiny.n_layers, tiny.fingerprint).randomize_(2)
    save_adapter(old, tmp_path / "old.safetensors")
    meta = read_adapter_metadata(tmp_path / "old.safetensors")
    assert meta["projection_scheme"] == "normal-v1"
    del meta["projection_scheme"]
    save_file(load_file(tmp_path / "old.safetensors"), tmp_path / "older.safetensors", metadata=meta)
    for name in ("old", "older"):
        cfg = config_from_adapter(tmp_path / f"{name}.safetensors")
        assert cfg.projection == "random"
        got = load_adapter(tmp_path / f"{name}.safetensors", cfg, tiny.n_layers, tiny.fingerprint)
        assert all(torch.equal(got.M[k], old.M[k]) for k in old.M)
        split = build_split(cfg=cfg, adapter=tmp_path / f"{name}.safetensors", backbone=tiny)
        assert split.cfg.projection == "random" and split.cloud.cfg.projection == "random"
    meta["projection_scheme"] = "qr-v9"
    save_file(load_file(tmp_path / "old.safetensors"), tmp_path / "alien.safetensors", metadata=meta)
    with pytest.raises(AdapterError, match="unknown projection scheme"):
        config_from_adapter(tmp_path / "alien.safetensors")
    with pytest.raises(Exception, match="projection"):
        DevicePart(tiny, svd, old)


def test_tune_writes_the_scheme_it_trained_against(tmp_path, capsys):
    from privatelora.cli.main import main
    common = ["tune", "--data", "sonnets", "--rank", "4", "--steps", "1", "--batch", "1", "--seq", "16",
              "--eval-tokens", "16", "--json"]
    for flag, scheme in (([], "svd-v1"), (["--projection", "random"], "normal-v1")):
        out = tmp_path / f"{scheme}.safetensors"
        assert main([*common, *flag, "--out", str(out)]) == 0
        assert read_adapter_metadata(out)["projection_scheme"] == scheme
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*common, "--projection", "qr", "--out", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2 and "invalid choice: 'qr'" in capsys.readouterr().err


def test_every_split_command_takes_the_projection(tmp_path, capsys):
    import json

    from privatelora.cli.main import main
    path = tmp_path / "random.safetensors"
    assert main(["adapter", "init", "--projection", "random", "--random-scale", "0.2", "--out", str(path),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["projection_scheme"] == "normal-v1"
    # the file's scheme wins; a flag that contradicts it is a one-line error
    assert main(["generate", "--adapter", str(path), "--projection", "svd", "--prompt-ids", "5,6"]) == 2
    assert "--projection svd conflicts with the adapter file (random)" in capsys.readouterr().err
    runs = {}
    for mode in ("split", "monolithic"):
        assert main(["generate", "--adapter", str(path), "--prompt-ids", "5,6,7", "--max-new-tokens", "6",
                     "--mode", mode, "--json"]) == 0
        runs[mode] = json.loads(capsys.readouterr().out)
    assert runs["split"]["config"]["projection"] == "random" and runs["split"]["tokens"] == runs["monolithic"]["tokens"]
    for command in ("cloud", "serve", "edge", "api", "tune"):
        from privatelora.cli.main import build_parser
        args = build_parser().parse_args([command, "--projection", "random", *(
            ["--connect", "h:1", "--prompt", "x"] if command == "edge" else
            ["--data", "sonnets", "--out", "x"] if command == "tune" else [])])
        assert args.projection == "random", command
