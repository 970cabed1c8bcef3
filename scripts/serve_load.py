"""Load on `apr serve`: CLIENTS concurrent seeded completion requests (stdlib only), each
checked against the same request sent alone afterwards; p50/p99 latency and generated tokens/s;
then the same load with a fifth of the clients hanging up mid-stream, after which every slot
must be free and the server still answer. Usage:
    python serve_load.py URL MODEL [CLIENTS=256] [MAX_TOKENS=64]"""
import http.client
import json
import socket
import sys
import threading
import time
import urllib.parse

url, model = sys.argv[1], sys.argv[2]
clients = int(sys.argv[3]) if len(sys.argv) > 3 else 256
max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 64
host = urllib.parse.urlparse(url)
PROMPTS = [
    "Moving to Node #0\nCurrent State: %d:[%d, %d, %d], Operations: []" % (t, a, b, c)
    for t, a, b, c in [(19, 18, 19, 20), (24, 3, 4, 8), (10, 1, 2, 7), (36, 6, 6, 9)]
]


def body(i, stream=False):
    return json.dumps({"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                       "temperature": 1.0, "seed": i, "stream": stream})


def post(data):
    c = http.client.HTTPConnection(host.hostname, host.port, timeout=600)
    c.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
    r = c.getresponse()
    out = r.read()
    c.close()
    return r.status, json.loads(out)


def metric(name):
    c = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    return int(next(l.split()[1] for l in text.splitlines() if l.startswith(name + " ")))


def run(hang_up_every=0):
    results, latency = {}, {}

    def one(i):
        t = time.time()
        if hang_up_every and i % hang_up_every == 0:
            s = socket.create_connection((host.hostname, host.port))
            data = body(i, stream=True).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(data) + data)
            s.recv(200)
            s.close()
            return
        status, r = post(body(i))
        latency[i] = time.time() - t
        results[i] = (status, r)

    start = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results, latency, time.time() - start


results, latency, wall = run()
assert all(s == 200 for s, _ in results.values()), [r for s, r in results.values() if s != 200][:3]
tokens = sum(r["usage"]["completion_tokens"] for _, r in results.values())
lat = sorted(latency.values())
print(f"{clients} concurrent requests: all answered; {tokens} tokens in {wall:.1f} s "
      f"({tokens / wall:.0f} tokens/s); latency p50 {lat[len(lat) // 2]:.2f} s, "
      f"p99 {lat[min(len(lat) - 1, int(len(lat) * 0.99))]:.2f} s")
mismatch = 0
for i in range(clients):
    _, alone = post(body(i))
    mismatch += alone["choices"][0]["text"] != results[i][1]["choices"][0]["text"]
print(f"each response against the same request alone: {clients - mismatch}/{clients} identical")
assert mismatch == 0

results, latency, wall = run(hang_up_every=5)
for _ in range(600):
    if metric("apr_busy_slots") == 0 and metric("apr_queue_length") == 0:
        break
    time.sleep(0.1)
busy = metric("apr_busy_slots")
status, _ = post(body(0))
print(f"with every 5th client hanging up mid-stream: {len(results)} answered, busy slots after: "
      f"{busy}, cancelled so far: {metric('apr_sequences_cancelled_total')}, server answers: {status == 200}")
assert busy == 0 and status == 200
