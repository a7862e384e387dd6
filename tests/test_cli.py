import json
import subprocess
import sys

import pytest

from privatelora.cli.main import main
from privatelora.model.zoo import byte_tokenizer, tiny_random


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A save_pretrained checkpoint directory (model + tokenizer) per family."""
    out = {}
    for fam in ("llama", "mistral", "qwen2"):
        d = tmp_path_factory.mktemp(fam)
        tiny_random(fam, seed=11).save_pretrained(d)
        byte_tokenizer().save_pretrained(d)
        out[fam] = d
    return out


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_generate_json_split_equals_monolithic_from_checkpoint(checkpoints, capsys, tmp_path, family):
    ckpt = str(checkpoints[family])
    adapter = str(tmp_path / "a.safetensors")
    info = run_json(capsys, "adapter", "init", "--model", ckpt, "--rank", "8", "--random-scale", "2",
                    "--seed", "3", "--out", adapter)
    assert info["rank"] == "8" and info["parameters"] == 4 * 3 * 64
    common = ["generate", "--model", ckpt, "--prompt", "Now is the winter", "--max-new-tokens", "24",
              "--adapter", adapter, "--no-eos-stop"]
    split = run_json(capsys, *common, "--mode", "split")
    mono = run_json(capsys, *common, "--mode", "monolithic")
    base = run_json(capsys, "generate", "--model", ckpt, "--prompt", "Now is the winter", "--max-new-tokens", "24",
                    "--no-eos-stop", "--mode", "monolithic")
    assert len(split["tokens"]) == 24
    assert split["tokens"] == mono["tokens"] and split["text"] == mono["text"]
    assert base["tokens"] != split["tokens"]          # the adapter is really applied
    b = split["bytes"]
    assert b["to_cloud"] > 0 and b["to_device"] > 0
    assert b["per_token_per_layer"]["total"] == 6 * 8 * 4
    assert "bytes" not in mono


def test_generate_variants_through_cli(checkpoints, capsys):
    ckpt = str(checkpoints["qwen2"])
    args = ["generate", "--model", ckpt, "--prompt", "abc", "--max-new-tokens", "8", "--rank", "4"]
    a = run_json(capsys, *args, "--shared-a", "--device-head-layers", "1", "--device-tail-layers", "1")
    assert a["config"]["shared_a"] and a["bytes"]["per_token_per_layer"]["total"] == 4 * 4 * 4
    s1 = run_json(capsys, *args, "--temperature", "0.8", "--seed", "1")
    s2 = run_json(capsys, *args, "--temperature", "0.8", "--seed", "1", "--mode", "monolithic")
    assert s1["tokens"] == s2["tokens"]


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--model", "/does/not/exist", "--prompt", "x"], "not a directory"),
    (["generate", "--model", "tiny", "--prompt", "x", "--adapter", "/no/such.safetensors"], "does not exist"),
    (["generate", "--model", "tiny", "--prompt", "x", "--rank", "0"], "rank"),
    (["generate", "--model", "tiny", "--prompt", "x", "--targets", "q,o"], "targets"),
    (["generate", "--model", "tiny", "--prompt", "x", "--device-head-layers", "3", "--device-tail-layers", "3"], "leave none"),
    (["generate", "--model", "tiny", "--prompt", "x", "--max-new-tokens", "100000"], "positions"),
    (["generate", "--model", "tiny", "--prompt-ids", "1,2,99999"], "token ids"),
    (["generate", "--model", "tiny"], "--prompt"),
    (["generate", "--model", "tiny-gpt", "--prompt", "x"], "unknown model"),
    (["generate", "--bogus"], "unrecognized"),
    (["bench", "throughput", "--users", "1,x"], "comma-separated integers"),
    (["bench", "throughput", "--users", "0,4"], "positive"),
    (["bench", "throughput", "--link", "dialup"], "unknown link profile"),
    (["bench", "throughput", "--new-tokens", "2"], "at least 4"),
    (["bench", "throughput", "--edge-hosts", "-1"], "edge-hosts"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        sys.exit(main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_adapter_for_other_backbone_refused(checkpoints, capsys, tmp_path):
    adapter = str(tmp_path / "llama.safetensors")
    run_json(capsys, "adapter", "init", "--model", str(checkpoints["llama"]), "--rank", "4", "--out", adapter)
    assert main(["generate", "--model", str(checkpoints["mistral"]), "--prompt", "x", "--adapter", adapter]) == 2
    assert "another backbone" in capsys.readouterr().err
    assert main(["generate", "--model", str(checkpoints["llama"]), "--prompt", "x", "--adapter", adapter,
                 "--rank", "8"]) == 2
    assert "conflicts with the adapter" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a tensor file")
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--adapter", str(bad)]) == 2


def test_console_script_entry_point(tmp_path):
    """The installed `privatelora` command: JSON on stdout, and exit 2 on bad input."""
    exe = [sys.executable, "-m", "privatelora.cli"]
    ok = subprocess.run([*exe, "generate", "--model", "tiny", "--prompt", "Hi", "--max-new-tokens", "4", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    res = json.loads(ok.stdout)
    assert len(res["tokens"]) <= 4 and "to_cloud" in res["bytes"] and "to_device" in res["bytes"]
    bad = subprocess.run([*exe, "generate", "--model", "tiny", "--prompt", "Hi", "--max-new-tokens", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_import_privatelora_does_not_import_ray():
    code = "import sys, privatelora, privatelora.cli, privatelora.api; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("argv, needle", [
    (["serve", "--gpus-per-replica", "-1"], "--gpus-per-replica: expected a number >= 0"),
    (["serve", "--gpus-per-replica", "one"], "--gpus-per-replica: expected a number"),
    (["serve", "--kv-cache-bytes", "lots"], "--kv-cache-bytes: expected a byte count"),
    (["cloud", "--kv-cache-bytes", "0"], "--kv-cache-bytes: expected a positive byte count"),
    (["bench", "throughput", "--repeat", "0"], "--repeat must be >= 1"),
    (["bench", "throughput", "--geometry", "7b"], "7b only with --gpus-per-replica"),
])
def test_gpu_and_kv_budget_arguments_exit_2_with_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        sys.exit(main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_kv_cache_bytes_takes_integers_and_binary_suffixes():
    from privatelora.cli.common import kv_cache_kw
    from privatelora.cli.main import build_parser
    p = build_parser()
    for text, n in (("1000", 1000), ("512M", 512 * 2 ** 20), ("4G", 4 * 2 ** 30), ("4gib", 4 * 2 ** 30),
                    ("64k", 64 * 1024), ("1.5G", 3 * 2 ** 29)):
        assert p.parse_args(["serve", "--kv-cache-bytes", text]).kv_cache_bytes == n, text
        assert p.parse_args(["cloud", "--kv-cache-bytes", text]).kv_cache_bytes == n, text
    given = p.parse_args(["serve", "--kv-cache-bytes", "4G", "--gpus-per-replica", "0.5"])
    assert kv_cache_kw(given) == {"kv_cache_bytes": 4 * 2 ** 30} and given.gpus_per_replica == 0.5
    default = p.parse_args(["serve"])
    assert kv_cache_kw(default) == {} and default.gpus_per_replica == 0     # CloudPart's own default
