#!/usr/bin/env python3
"""Load on `stackwise serve` with httpx: C concurrent clients, each sending R streamed greedy
/v1/completions of exactly NEW tokens (min_tokens = max_tokens), for 1 client and then for C.
Prints aggregate generated tokens/s, p50/p99 time to first token, and the C-vs-1 ratio.
Bounded: C x R requests per level, each with a 120 s timeout.
Usage: serve_load.py STACKWISE_BIN MODEL_DIR [C] [R] [NEW] [PROMPT]"""
import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time

import httpx

binary, model = sys.argv[1], sys.argv[2]
clients = int(sys.argv[3]) if len(sys.argv) > 3 else 16
per_client = int(sys.argv[4]) if len(sys.argv) > 4 else 2
new = int(sys.argv[5]) if len(sys.argv) > 5 else 128
prompt = sys.argv[6] if len(sys.argv) > 6 else "KING.\n"

server = subprocess.Popen([binary, "serve", "--model", model, "--bind", "127.0.0.1:0",
                           "--served-model-name", "m"], stderr=subprocess.PIPE, text=True)
addr = None
for line in server.stderr:
    if "on http://" in line:
        addr = line.split("on http://")[1].split()[0]
        print(line.strip(), file=sys.stderr)
        break
if addr is None:
    sys.exit("the server did not start")
threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()


async def one(client, ttfts):
    body = {"model": "m", "prompt": prompt, "max_tokens": new, "min_tokens": new,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"http://{addr}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    ttfts.append(first)
    return tokens


async def level(c):
    ttfts = []
    limits = httpx.Limits(max_connections=c)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker():
            return sum([await one(client, ttfts) for _ in range(per_client)])
        t = time.perf_counter()
        tokens = sum(await asyncio.gather(*[worker() for _ in range(c)]))
        dt = time.perf_counter() - t
    q = statistics.quantiles(ttfts, n=100, method="inclusive") if len(ttfts) > 1 else ttfts * 99
    return {"clients": c, "requests": len(ttfts), "tokens": tokens, "seconds": dt,
            "tokens_per_s": tokens / dt, "ttft_p50_ms": 1e3 * statistics.median(ttfts),
            "ttft_p99_ms": 1e3 * q[98]}


try:
    asyncio.run(level(1))  # warm-up
    rows = [asyncio.run(level(1)), asyncio.run(level(clients))]
finally:
    server.terminate()
    server.wait()
for r in rows:
    print(f"serve, {r['clients']:2} client(s): {r['requests']} requests, {r['tokens']} tokens in "
          f"{r['seconds']:.2f} s = {r['tokens_per_s']:.0f} tok/s aggregate | time to first token "
          f"p50 {r['ttft_p50_ms']:.0f} ms, p99 {r['ttft_p99_ms']:.0f} ms")
print(json.dumps({"impl": "serve", "levels": rows,
                  "ratio": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]}))
