"""The real OpenAI Python client against `stackwise serve` (by hand; CI tests the same over raw
HTTP in cli/tests/serve.rs). Usage:

    python tests/py/check_serve_openai.py STACKWISE_BIN MODEL_DIR

Starts the server on a free port, then: /v1/models; a greedy completion equal to
`stackwise generate --greedy`; the same streamed; 8 concurrent streams; a 4xx for a huge
max_tokens and for an unknown model; /metrics parsed as Prometheus text.
"""

import json
import subprocess
import sys
import threading
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

binary, model = sys.argv[1], sys.argv[2]
proc = subprocess.Popen([binary, "serve", "--model", model, "--bind", "127.0.0.1:0", "--served-model-name", "m"],
                        stderr=subprocess.PIPE, text=True)
try:
    for line in proc.stderr:
        if "on http://" in line:
            addr = line.split("on http://")[1].split()[0]
            break
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="unused")
    print("models:", [m.id for m in client.models.list().data])
    prompt = "KING.\n"
    want = json.loads(subprocess.check_output(
        [binary, "generate", "--model", model, "--prompt", prompt, "--greedy", "--max-new-tokens", "24", "--json"],
        stderr=subprocess.DEVNULL))["text"]
    got = client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    assert got == want, (got, want)
    print("greedy completion == stackwise generate --greedy:", repr(got))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt=prompt, max_tokens=24, temperature=0, stream=True) if c.choices)
    assert streamed == want, (streamed, want)
    print("streamed == the same")
    results = [None] * 8

    def one(i):
        results[i] = "".join(c.choices[0].text for c in client.completions.create(
            model="m", prompt=prompt, max_tokens=24, temperature=0, stream=True) if c.choices)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(r == want for r in results), results
    print("8 concurrent streams == the single one")
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Speak."}], max_tokens=12,
                                          temperature=0)
    print("chat:", repr(chat.choices[0].message.content))
    for kwargs, name in [(dict(model="m", prompt=prompt, max_tokens=100_000), "huge max_tokens"),
                         (dict(model="nope", prompt=prompt), "unknown model")]:
        try:
            client.completions.create(**kwargs)
            raise SystemExit(f"{name}: no error")
        except openai.APIStatusError as e:
            assert 400 <= e.status_code < 500, e
            print(f"{name}: {e.status_code} {e.message}")
    text = urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
    families = [f.name for f in text_string_to_metric_families(text)]
    print("/metrics parses:", len(families), "families, e.g.", families[:4])
finally:
    proc.terminate()
    proc.wait(timeout=30)
