"""Aggregate decode throughput of `stackwise serve`: 1 stream, then N concurrent, through
/generate (120 new tokens greedy). Usage: python3 bench/serve_load.py STACKWISE_BIN MODEL_DIR N
"""
import subprocess, sys, threading, time, json, urllib.request
binary, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = subprocess.Popen([binary, "serve", "--model", model, "--bind", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True)
for line in p.stderr:
    if "on http://" in line: addr = line.split("on http://")[1].split()[0]; break
threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
def one(out, i):
    body = json.dumps({"prompt": "KING.\n", "max_new_tokens": 120, "temperature": 0}).encode()
    r = urllib.request.urlopen(urllib.request.Request(f"http://{addr}/generate", body, {"Content-Type": "application/json"}))
    out[i] = json.loads(r.read())["usage"]["completion_tokens"]
for c in [1, n]:
    out = [0]*c; t = time.time()
    th = [threading.Thread(target=one, args=(out, i)) for i in range(c)]; [x.start() for x in th]; [x.join() for x in th]
    dt = time.time() - t
    print(f"{c} concurrent: {sum(out)} tokens in {dt:.2f} s = {sum(out)/dt:.0f} tok/s aggregate")
p.terminate(); p.wait()
