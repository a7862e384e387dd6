"""The dashboards against a real Prometheus: a `privatelora cloud` process with /metrics
and a discovery file, a short multi-user load, Prometheus (Debian package `prometheus`,
installed by .ci/run) scraping it with a config made from dashboards/prometheus.yml, and
every PromQL expression of every panel of dashboards/grafana.json evaluated through the
HTTP API: each must return data. Then `privatelora serve` as users run it, without any
metrics flag: Prometheus scrapes its replica directly (dashboards/prometheus.yml's
fallback target) and through Ray's metrics agent, found in the discovery file Ray writes,
and every query of the dashboard returns data under either naming (privatelora_*,
ray_privatelora_*). The dashboard's variables are resolved the way Grafana resolves them,
through Prometheus' label API. All traffic stays on this machine."""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "grafana.json"
PROM_CONFIG = ROOT / "dashboards" / "prometheus.yml"
CLI = [sys.executable, "-m", "privatelora.cli"]
PROMETHEUS = shutil.which("prometheus")
# skipped only where no Prometheus is installed; .ci/run installs it and sets the variable
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None and not os.environ.get("PRIVATELORA_REQUIRE_PROMETHEUS"),
    reason="the `prometheus` binary is not on PATH (Debian: apt-get install -y prometheus; .ci/run installs it)")
WINDOW = "30s"        # stands in for Grafana's $__rate_interval / $__range


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports (replica i serves /metrics on base + i)."""
    for _ in range(100):
        base, socks = _free_port(), []
        try:
            for i in range(n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])          # collapsed rows hold their panels


def substitute(text: str, values: dict[str, str]) -> str:
    """Grafana's interpolation: interval macros by a fixed window, template variables by value."""
    text = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", WINDOW, text)
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]",
                  lambda m: values.get(m.group(1) or m.group(2) or m.group(3), m.group(0)), text)


def panel_queries(dash, values: dict[str, str]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, with ``values`` for the template variables."""
    out = []
    for p in _panels(dash):
        for t in p.get("targets", []):
            expr = substitute(t["expr"], values)
            assert "$" not in expr, f"{p['title']}: unknown variable in {t['expr']}"
            out.append((p["title"], expr))
    return out


def resolve_variables(url: str, dash, pick: dict[str, str] | None = None) -> dict[str, str]:
    """Every template variable's value as Grafana sets it: a query variable's options come
    from ``label_values(selector, label)`` (Prometheus' label-values API, matched by the
    selector) through the variable's regex; it takes ``pick[name]`` (which must be one of
    them), else "All" (its ``allValue``, or the alternation of its options), else the first."""
    pick, values = pick or {}, {}
    for v in dash["templating"]["list"]:
        if v["type"] == "datasource":
            continue
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", substitute(v["definition"], values))
        assert m, v["definition"]
        selector, label = m.groups()
        body = json.loads(_get(f"{url}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": selector})))
        options = body["data"]
        if v.get("regex"):
            rx = re.compile(v["regex"].strip("/"))
            options = [(mm.group(1) if mm.groups() else mm.group(0)) for o in options if (mm := rx.search(o))]
        options = sorted(set(options))
        assert options, f"variable {v['name']}: no options for {selector}"
        if v["name"] in pick:
            assert pick[v["name"]] in options, (v["name"], pick[v["name"]], options)
            values[v["name"]] = pick[v["name"]]
        elif v.get("includeAll"):
            values[v["name"]] = v.get("allValue") or "(" + "|".join(re.escape(o) for o in options) + ")"
        else:
            values[v["name"]] = options[0]
    return values


def wait_for_every_query(url: str, dash, values: dict[str, str], deadline: float) -> None:
    pending = panel_queries(dash, values)
    assert len(pending) >= 20
    while pending:                           # a rate() needs two samples in its window
        pending = [(title, e) for title, e in pending if not query(url, e)]
        if not pending or time.time() > deadline:
            break
        time.sleep(1.0)
    assert not pending, "panel queries without data:\n" + "\n".join(f"{t}: {e}" for t, e in pending)


def test_dashboard_is_importable_as_is():
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"] and dash["title"] and dash.get("id") is None
    assert "__inputs" not in dash           # nothing to answer on import: file provisioning takes it as is
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert list(variables) == ["datasource", "prefix", "job", "replica"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    # one dashboard for both namings: the endpoints' own /metrics and Ray's metrics agent
    prefix = variables["prefix"]
    assert prefix["definition"] == 'label_values({__name__=~"(ray_)?privatelora_replica_up"}, __name__)'
    rx = re.compile(prefix["regex"].strip("/"))
    assert [rx.search(n).group(1) for n in ("privatelora_replica_up", "ray_privatelora_replica_up")] == \
        ["privatelora_", "ray_privatelora_"]
    for name in ("job", "replica"):
        assert variables[name]["definition"] == f"label_values(${{prefix}}replica_up, {name})"
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids = set()
    for p in _panels(dash):
        assert p["id"] not in ids and {"h", "w", "x", "y"} <= set(p["gridPos"])
        assert p["type"] in ("stat", "timeseries", "row", "bargauge", "table"), (p["title"], p["type"])
        ids.add(p["id"])
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip()
            # every metric name goes through the prefix (no literal privatelora_ left)
            assert "privatelora_" not in t["expr"] and ("${prefix}" in t["expr"] or t["expr"].startswith("up{"))
    titles = " ".join(p["title"].lower() for p in _panels(dash))
    for needed in ("throughput", "time to first token", "inter-token", "end-to-end", "batch size", "naive split",
                   "refused", "replica health", "kv cache"):
        assert needed in titles, needed
    exprs = " ".join(e for _, e in panel_queries(dash, {"prefix": "ray_privatelora_", "job": "ray", "replica": ".*"}))
    assert "histogram_quantile" in exprs and "ray_privatelora_replica_up" in exprs and 'up{job=~"ray"' in exprs


def test_dashboard_installs_next_to_rays_generated_dashboards():
    """Ray's head writes its Grafana dashboards into one provisioned folder (docs/metrics.md:
    ours goes next to them); nothing of ours may collide with theirs."""
    from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory
    dash = json.loads(DASHBOARD.read_text())
    ray_dashboards = [json.loads(getattr(factory, n)()[0]) for n in dir(factory)
                      if n.startswith("generate_") and n.endswith("_grafana_dashboard")]
    assert len(ray_dashboards) >= 5
    assert dash["uid"] not in {d["uid"] for d in ray_dashboards}
    assert dash["title"] not in {d["title"] for d in ray_dashboards}
    for d in ray_dashboards:                 # the same data-source variable, so Ray's provisioned source fits both
        assert d["templating"]["list"][0]["name"] == "datasource"


def prometheus_config(sd_file: Path, out: Path, ray_sd: Path | None = None, fallback: bool = False) -> Path:
    """dashboards/prometheus.yml scraping every second: the privatelora job discovers targets
    from ``sd_file`` (and keeps its static fallback, the default port, with ``fallback``);
    the ray job reads Ray's discovery file ``ray_sd`` (dropped without one)."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"privatelora", "ray"}
    job = jobs["privatelora"]
    (static,) = job["static_configs"] if fallback else job.pop("static_configs")
    # the fallback is a plain `cloud` (or `serve`'s replica 0) here, labelled like its
    # discovery entry, so the same target in a targets file is scraped once (checked by hand
    # on Prometheus 2.42)
    assert static == {"targets": ["127.0.0.1:9431"], "labels": {"replica": "0"}}
    job["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": "1s"}]
    (ray_files,) = jobs["ray"]["file_sd_configs"]
    assert ray_files["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]     # Ray's default temp dir
    if ray_sd is None:
        cfg["scrape_configs"].remove(jobs["ray"])
    else:
        jobs["ray"]["file_sd_configs"] = [{"files": [str(ray_sd)], "refresh_interval": "1s"}]
    out.write_text(yaml.safe_dump(cfg))
    return out


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def cloud(tmp_path):
    sd = tmp_path / "targets" / "privatelora.json"
    mport = _free_port()
    proc = subprocess.Popen([*CLI, "cloud", "--model", "tiny", "--port", "0", "--idle-timeout", "2",
                             "--metrics-port", str(mport), "--metrics-sd-file", str(sd), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield proc, sd, mport
    _stop(proc)


@pytest.fixture
def prometheus(tmp_path):
    procs, logs = [], []

    def start(sd_file: Path, **kw) -> str:
        assert PROMETHEUS, "PRIVATELORA_REQUIRE_PROMETHEUS is set but `prometheus` is not on PATH"
        port = _free_port()
        config = prometheus_config(sd_file, tmp_path / "prometheus.yml", **kw)
        logs.append(open(tmp_path / "prometheus.log", "w"))
        procs.append(subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            assert procs[-1].poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                if _get(url + "/-/ready", 1) is not None:
                    return url
            except OSError:
                time.sleep(0.2)
        pytest.fail("Prometheus did not become ready:\n" + (tmp_path / "prometheus.log").read_text())

    yield start
    for p in procs:                          # never outlives the test
        _stop(p)
    for f in logs:
        f.close()


def query(url: str, expr: str) -> list:
    body = json.loads(_get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _load(port: int, host: str = "127.0.0.1") -> int:
    """Four users on two connections (mixed wire dtypes), one silent session the cloud
    reclaims, one peer that sends garbage; returns the tokens the devices received."""
    import torch

    from privatelora.api import build_split
    from privatelora.config import PrivateLoRAConfig
    from privatelora.model.sampling import SamplingParams
    from privatelora.serving.remote import run_remote
    from privatelora import wire
    from privatelora.wire import session_geometry
    from privatelora.transport import Client

    torch.set_num_threads(1)
    split = build_split("tiny", PrivateLoRAConfig())      # what `cloud`'s defaults serve
    split.adapter.randomize_(1, scale=0.3)
    ids = split.backbone.tokenizer.encode("ROMEO:\nBut soft, what light", add_special_tokens=False)

    async def main():
        clients = [await Client.connect(host, port) for _ in range(2)]
        silent = await clients[1].open(session_geometry(split.cloud.layer_ids, split.cloud.hidden, split.cfg))

        async def user(u):
            await asyncio.sleep(0.05 * u)
            return await run_remote(clients[u % 2], split.device, ids[: 4 + u], SamplingParams(max_new_tokens=12,
                                    seed=u), dtype=("fp32", "fp16", "int8", "bf16")[u])
        gens = await asyncio.gather(*[user(u) for u in range(4)])
        # an fp16 session whose replies push the hand-off past fp16's range: the cloud cannot
        # encode its answer (a fault it survives, counted), and the device gets an Error
        g16 = session_geometry(split.cloud.layer_ids, split.cloud.hidden, split.cfg, "fp16")
        s16 = await clients[0].open(g16)
        await s16.send(wire.Handoff(s16.id, 0, torch.randn(2, g16.hidden)), dtype="fp16")
        while isinstance(msg := await s16.recv(10), wire.Activations):
            await s16.send(wire.Reply(s16.id, msg.layer, tuple(torch.full((2, g16.rank), 6e4) for _ in g16.targets)))
        assert isinstance(msg, wire.Error) and msg.code == "encode_failed", msg
        r, w = await asyncio.open_connection(host, port)
        w.write(b"\x00\x00\x00\x05hello")
        await w.drain()
        await r.read()
        w.close()
        assert silent.id and all(g.error is None for g in gens)
        await asyncio.sleep(3.0)             # the silent session goes past --idle-timeout
        for c in clients:
            await c.close()
        return sum(len(g.tokens) for g in gens)

    return asyncio.run(main())


@needs_prometheus
def test_every_dashboard_query_returns_data_from_a_real_prometheus(cloud, prometheus):
    t0 = time.time()
    proc, sd, mport = cloud
    dash = json.loads(DASHBOARD.read_text())
    url = prometheus(sd)              # scraping starts as soon as the targets file appears
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    ready = json.loads(line)
    assert ready["metrics"] == f"127.0.0.1:{mport}"
    assert json.loads(sd.read_text()) == [{"targets": [f"127.0.0.1:{mport}"], "labels": {"replica": "0"}}]
    tokens = _load(ready["port"])

    deadline = time.time() + 30
    while True:                              # a scrape after the load has finished
        got = query(url, "privatelora_generation_tokens_total")
        if got and float(got[0]["value"][1]) == tokens:
            break
        assert time.time() < deadline, f"Prometheus never scraped the load: {got}"
        time.sleep(0.5)
    (up,) = query(url, 'up{job="privatelora"}')     # the target the file named, with its label
    assert up["metric"]["replica"] == "0" and up["value"][1] == "1"
    # the load's events, counted (every reason exists from the start, at 0: these are > 0)
    for expr in ('privatelora_errors_total{reason="idle_timeout"}',
                 'privatelora_frames_refused_total{reason="bad_length"}', 'privatelora_faults_total{reason="encode"}'):
        (got,) = query(url, expr)
        assert float(got["value"][1]) >= 1, expr
    assert query(url, 'privatelora_disconnects_total{reason="slow_reader"}')[0]["value"][1] == "0"
    values = json.loads(_get(f"{url}/api/v1/label/replica/values?match[]=privatelora_replica_up"))["data"]
    assert values == ["0"]                   # what the dashboard's replica variable lists

    values = resolve_variables(url, dash)    # what Grafana would show: one naming, one job
    assert values == {"prefix": "privatelora_", "job": "(privatelora)", "replica": ".*"}
    wait_for_every_query(url, dash, values, deadline)

    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["event"] == "stopped"
    assert json.loads(sd.read_text()) == []  # a clean stop leaves no target behind
    assert time.time() - t0 < 90


@needs_prometheus
def test_serve_replicas_each_expose_metrics_and_are_discovered(tmp_path, prometheus):
    """`privatelora serve` on Ray: replica i serves /metrics on PORT+i and the targets file
    lists every replica with its index; Prometheus finds and scrapes both."""
    from privatelora.placement.cluster import auth_env

    sd = tmp_path / "targets" / "privatelora.json"
    base = _free_ports(2)
    proc = subprocess.Popen([*CLI, "serve", "--replicas", "2", "--port", "0", "--metrics-port", str(base),
                             "--metrics-sd-file", str(sd), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, **auth_env(), "RAY_ADDRESS": "local"})   # a cluster of its own
    try:
        url = prometheus(sd)
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        ready = json.loads(line)
        assert [r["metrics"] for r in ready["replicas"]] == [["127.0.0.1", base], ["127.0.0.1", base + 1]]
        assert json.loads(sd.read_text()) == [{"targets": [f"127.0.0.1:{base + i}"], "labels": {"replica": str(i)}}
                                              for i in range(2)]
        deadline = time.time() + 30
        while True:
            up = query(url, "sum by (replica) (privatelora_replica_up)")
            if len(up) == 2:
                break
            assert time.time() < deadline, f"Prometheus did not scrape both replicas: {up}"
            time.sleep(0.5)
        assert sorted((r["metric"]["replica"], r["value"][1]) for r in up) == [("0", "1"), ("1", "1")]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(sd.read_text()) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)     # our own process group: the driver and its Ray
            proc.wait(30)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# the labels Ray's metrics agent adds to every application series (none names a user or a
# privatelora session: SessionName is the Ray cluster's session), and the router's own
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "otel_scope_name",
              "otel_scope_schema_url", "otel_scope_version"}
ROUTER_METRICS = ("ray_privatelora_router_", "ray_privatelora_autoscaler_", "ray_privatelora_session_re")


@needs_prometheus
def test_a_plain_serve_is_scraped_directly_and_through_rays_discovery_file(tmp_path, prometheus):
    """`privatelora serve` with no metrics flag, and Prometheus configured from
    dashboards/prometheus.yml: its privatelora job scrapes the replica's /metrics on the
    default port (the file's fallback target), its ray job the metrics agents listed in the
    discovery file Ray writes. Under load, every dashboard query returns data with either
    naming. (Should the default port be taken on this machine by something else, the run
    falls back to --metrics-port 0 with a targets file: then the default port itself goes
    untested here, the rest is the same.)"""
    from privatelora.placement.cluster import auth_env
    from privatelora.serving.metrics import DEFAULT_PORT, LABELS

    t0 = time.time()
    dash = json.loads(DASHBOARD.read_text())
    sd = tmp_path / "targets" / "privatelora.json"
    ray_tmp = Path(tempfile.mkdtemp(prefix="plr-", dir="/tmp"))     # short (Ray's socket paths), and ours alone
    ray_sd = ray_tmp / "ray" / "prom_metrics_service_discovery.json"
    plain = _port_free(DEFAULT_PORT)
    flags = [] if plain else ["--metrics-port", "0", "--metrics-sd-file", str(sd)]
    env = {**os.environ, **auth_env(), "RAY_ADDRESS": "local", "RAY_TMPDIR": str(ray_tmp),
           "RAY_metrics_report_interval_ms": "1000", "OMP_NUM_THREADS": "1"}     # Ray reports every second
    proc = subprocess.Popen([*CLI, "serve", "--port", "0", "--idle-timeout", "2", "--json", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        url = prometheus(sd, ray_sd=ray_sd, fallback=plain)
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        (replica,) = json.loads(line)["replicas"]
        assert replica["ray_metrics"] is True
        if plain:
            assert replica["metrics"] == ["127.0.0.1", DEFAULT_PORT]
        deadline = time.time() + 60
        # a fresh replica: every known reason is there already, at 0, under both namings
        for name in ("privatelora_disconnects_total", "ray_privatelora_disconnects_total"):
            while not (got := query(url, f'sum({name}{{reason="slow_reader"}})')) or not query(url, name):
                assert time.time() < deadline, f"no {name} from a fresh serve: {got}"
                time.sleep(0.5)
            assert got[0]["value"][1] == "0"
        (agents,) = json.loads(ray_sd.read_text())           # Ray's own file: its agents, job "ray"
        assert agents["labels"] == {"job": "ray"} and agents["targets"]

        tokens = _load(replica["port"], replica["host"])
        while True:                              # both namings count the load
            got = [query(url, f"sum({p}generation_tokens_total)") for p in ("privatelora_", "ray_privatelora_")]
            if all(g and float(g[0]["value"][1]) == tokens for g in got):
                break
            assert time.time() < deadline, f"Prometheus never saw the load ({tokens} tokens): {got}"
            time.sleep(0.5)
        for prefix, job in (("privatelora_", "privatelora"), ("ray_privatelora_", "ray")):
            values = resolve_variables(url, dash, {"prefix": prefix})
            assert values == {"prefix": prefix, "job": f"({job})", "replica": ".*"}
            body = json.loads(_get(f"{url}/api/v1/label/replica/values?" +
                                   urllib.parse.urlencode({"match[]": f"{prefix}replica_up"})))
            assert body["data"] == ["0"]         # the replica variable's options: the one bounded tag
            wait_for_every_query(url, dash, values, deadline)

        # through Ray: the replica tag, the exported labels and Ray's own, nothing else
        series = json.loads(_get(f"{url}/api/v1/series?" + urllib.parse.urlencode(
            {"match[]": '{__name__=~"ray_privatelora_.+"}'})))["data"]
        assert len(series) > 100
        for s in series:
            assert set(s) <= LABELS | RAY_LABELS | {"__name__", "instance", "job", "replica", "state", "action"}, s
            assert s["__name__"].startswith(ROUTER_METRICS) or s["replica"] == "0", s
        # Ray's generated Grafana folder, where docs/metrics.md puts the dashboard
        grafana = ray_tmp / "ray" / "session_latest" / "metrics" / "grafana"
        assert (grafana / "dashboards" / "default_grafana_dashboard.json").exists()
        provider = yaml.safe_load((grafana / "provisioning" / "dashboards" / "default.yml").read_text())
        assert Path(provider["providers"][0]["options"]["path"]).resolve() == (grafana / "dashboards").resolve()

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)     # our own process group: the driver and its Ray
            proc.wait(30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert time.time() - t0 < 120
