"""What the device's HTTP API costs: side by side against one `privatelora cloud`, a greedy
64-token completion through `privatelora api` (timed by the official client, HTTP included)
and through `privatelora edge` (its own generation time), 5 interleaved rounds; prints JSON
with the medians and their ratio. Run it alone on the machine:

    .venv/bin/python benchmarks/api_cost.py
"""
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from procs import JsonProc  # noqa: E402
PROMPT = "ROMEO:\nBut soft, what light"

cloud = JsonProc("cloud", "--port", 0, "--json", "--no-metrics")
port = cloud.wait_for("listening")["port"]
api = JsonProc("api", "--port", 0, "--json", "--connect", f"127.0.0.1:{port}")
url = api.wait_for("listening")["url"]
c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)   # warm
api_s, edge_s, same, n = [], [], [], set()
for _ in range(5):
    t0 = time.perf_counter()
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=64, temperature=0)
    api_s.append(time.perf_counter() - t0)
    out = subprocess.run([sys.executable, "-m", "privatelora.cli", "edge", "--connect", f"127.0.0.1:{port}",
                          "--prompt", PROMPT, "--max-new-tokens", "64", "--json"],
                         capture_output=True, text=True, check=True)
    e = json.loads(out.stdout.strip().splitlines()[-1])
    edge_s.append(e["seconds"])
    same.append(e["text"] == r.choices[0].text)
    n |= {r.usage.completion_tokens, len(e["tokens"])}
api.stop()
cloud.stop()
m_api, m_edge = statistics.median(api_s), statistics.median(edge_s)
print(json.dumps({"tokens": sorted(n), "api_s": api_s, "edge_s": edge_s, "median_api_s": m_api, "median_edge_s": m_edge,
                  "api_over_edge": m_api / m_edge, "same_text": all(same)}, indent=1))
