"""Soak run: one `edgequant serve` under bounded mixed traffic, checked against its own /metrics.

One server on 127.0.0.1 serves two artifacts of the default model (GGUF q4_k_m and OpenVINO int8)
with `--batch 4 --max-queue 8 --api-key KEY --max-body-bytes 65536 --request-timeout 60`. A fixed
number of client threads, each with its own seeded random stream, send a mix over both models for
`--minutes`: completions and chat (greedy and sampled, max_tokens 8-48) through the official
`openai` client (max_retries=0) and plain `httpx`; streams read to the end and streams dropped after
a few chunks; malformed JSON, bodies over the size limit (with and without Content-Length), a
wrong API key and an unknown model. Once a minute a burst of 16 concurrent requests goes to one
model, past its batch and queue. Every loop is bounded in count and in time; the run stops by itself.

Each request is recorded: kind, client, model, path, HTTP status, outcome class (2xx, 4xx:code,
429, 5xx:code, 5xx_in_stream:type for an error event inside a 200 stream, client_timeout,
client_error:Exc), latency. Each minute the server's process tree RSS (psutil), the load average
and /metrics are sampled. After the traffic the server is drained (no request in flight), /metrics
is compared with the client's own counts, and the server is stopped with SIGTERM.

What the comparison allows, and why:
- edgequant_requests_total is counted by the server when a response's last body message goes out.
  A stream the client drops never sends it and is counted under 499 instead (nginx's "client
  closed request"), so for 200 on the generation paths the server may count up to the number of
  dropped streams fewer than the client, 499 at most that many, and 200 and 499 together must
  match the client's 200s; every other (path, status) must match (a request the client gave up on
  by timeout may still be counted by the server: allowed).
- edgequant_cancelled_requests_total counts a generation stopped before its last token. A dropped
  stream whose generation had already ended when its worker noticed is not a cancellation, so the
  server's count is at most the client's dropped streams plus the requests the server timed out
  (504 answers, timeout events inside a stream) and client timeouts; measured after the drain,
  when every worker has noticed.
- edgequant_generated_tokens_total per model: at least the completion tokens the client was told in
  `usage` plus one per content chunk received on each dropped stream, at most that plus the
  max_tokens of every dropped, timed-out or failed generation.

Writes bench/results/soak.json. Targets: zero 5xx; every request answered as expected (generation:
2xx or 429; the bad requests their 4xx), client timeouts counted separately; RSS growth under 10%
from minute 2 to the end; /metrics consistent with the client's counts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import openai
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from serve_helpers import free_port  # noqa: E402

KEY = "soak-key-3f9a"
BATCH, MAX_QUEUE, MAX_BODY, REQUEST_TIMEOUT = 4, 8, 65536, 60
CLIENT_TIMEOUT = 120.0  # past the server's request timeout: a client timeout means the server hung
BURST_SIZE, BURST_EVERY_S, BURST_FIRST_S = 16, 60.0, 30.0
MAX_REQUESTS_PER_THREAD = 20_000  # a count bound on every client loop, besides its deadline
GEN_PATHS = ("/v1/completions", "/v1/chat/completions")

PROMPTS = [
    "Write a short story about a lighthouse keeper who",
    "Explain to a child how rain forms in the clouds and",
    "The history of the printing press began when",
    "List three reasons why people enjoy walking in forests:",
    "A recipe for a simple tomato soup starts with",
    "The most important rule of writing clear code is",
]
QUESTIONS = [
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "Name a colour of the rainbow.",
    "What does a bee make?",
    "Say hello in Spanish.",
]
# kind -> weight in the mix; the burst is its own thread.
MIX = {"completion": 20, "chat": 20, "completion_stream": 8, "chat_stream": 8, "stream_cancelled": 10,
       "malformed_json": 3, "oversize_body": 3, "wrong_key": 3, "unknown_model": 3}
EXPECTED = {"completion": {"2xx", "429"}, "chat": {"2xx", "429"}, "completion_stream": {"2xx", "429"},
            "chat_stream": {"2xx", "429"}, "stream_cancelled": {"2xx", "429"}, "burst": {"2xx", "429"},
            "malformed_json": {"4xx:400"}, "oversize_body": {"4xx:413"}, "wrong_key": {"4xx:401"},
            "unknown_model": {"4xx:404"}, "metrics_scrape": {"2xx"}, "health": {"2xx"}, "models": {"2xx"}}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def outcome_of(status: int) -> str:
    if 200 <= status < 300:
        return "2xx"
    if status == 429:
        return "429"
    if 400 <= status < 500:
        return f"4xx:{status}"
    return f"5xx:{status}" if status >= 500 else f"other:{status}"


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        with self.lock:
            self.records.append(record)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.records)


# -- one request of each kind -------------------------------------------------------------------

def _body(kind: str, model: str, rng: random.Random, max_tokens: int, stream: bool) -> tuple[str, dict, bool]:
    chat = kind.startswith("chat") or (kind in ("stream_cancelled", "burst") and rng.random() < 0.5)
    sampled = rng.random() < 0.4
    body: dict = {"model": model, "max_tokens": max_tokens, "stream": stream}
    if sampled:
        body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 30))
    else:
        body["temperature"] = 0.0
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(QUESTIONS)}]
        return "/v1/chat/completions", body, sampled
    body["prompt"] = rng.choice(PROMPTS)
    return "/v1/completions", body, sampled


def _parse_sse(line: str, state: dict) -> bool:
    """Feed one SSE line; True when the stream is over ([DONE] or an error event)."""
    if not line.startswith("data: "):
        return False
    data = line[6:]
    if data.strip() == "[DONE]":
        state["done"] = True
        return True
    obj = json.loads(data)
    if "error" in obj:
        state["stream_error"] = obj["error"].get("type") or "error"
        return True
    choice = (obj.get("choices") or [{}])[0]
    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
    if text:
        state["chunks"] += 1
    if obj.get("usage"):
        state["tokens"] = obj["usage"]["completion_tokens"]
    if choice.get("finish_reason"):
        state["finish"] = choice["finish_reason"]
    return False


def httpx_generation(http: httpx.Client, base: str, kind: str, model: str, rng: random.Random, rec: dict) -> None:
    stream = kind in ("completion_stream", "chat_stream", "stream_cancelled")
    max_tokens = 48 if kind == "stream_cancelled" else rng.randint(8, 48)
    path, body, sampled = _body(kind, model, rng, max_tokens, stream)
    rec.update(path=path, sampled=sampled, max_tokens=max_tokens)
    if not stream:
        response = http.post(base + path, json=body)
        rec["status"] = response.status_code
        if response.status_code == 200:
            rec["tokens"] = response.json()["usage"]["completion_tokens"]
        return
    cancel_after = rng.randint(1, 3) if kind == "stream_cancelled" else None
    state = {"chunks": 0, "tokens": None, "done": False, "finish": None, "stream_error": None}
    with http.stream("POST", base + path, json=body) as response:
        rec["status"] = response.status_code
        if response.status_code != 200:
            response.read()
            return
        for line in response.iter_lines():
            if _parse_sse(line, state):
                break
            if cancel_after is not None and state["chunks"] >= cancel_after and not state["finish"]:
                rec["cancelled"] = True
                break  # leaving the block closes the connection mid-stream
    rec.update(chunks=state["chunks"], stream_error=state["stream_error"])
    if not rec.get("cancelled"):
        rec["tokens"] = state["tokens"]
        rec["stream_complete"] = state["done"]


def openai_generation(client: openai.OpenAI, kind: str, model: str, rng: random.Random, rec: dict) -> None:
    stream = kind in ("completion_stream", "chat_stream", "stream_cancelled")
    max_tokens = 48 if kind == "stream_cancelled" else rng.randint(8, 48)
    path, body, sampled = _body(kind, model, rng, max_tokens, stream)
    rec.update(path=path, sampled=sampled, max_tokens=max_tokens)
    extra = {k: body[k] for k in ("temperature", "top_p", "seed") if k in body}
    if path == "/v1/chat/completions":
        call = lambda: client.chat.completions.create(model=model, messages=body["messages"], max_tokens=max_tokens,  # noqa: E731
                                                      stream=stream, **extra)
    else:
        call = lambda: client.completions.create(model=model, prompt=body["prompt"], max_tokens=max_tokens,  # noqa: E731
                                                 stream=stream, **extra)
    if not stream:
        result = call()
        rec.update(status=200, tokens=result.usage.completion_tokens)
        return
    cancel_after = rng.randint(1, 3) if kind == "stream_cancelled" else None
    chunks, tokens, finish = 0, None, None
    result = call()
    rec["status"] = 200
    try:
        for chunk in result:
            if chunk.choices:
                choice = chunk.choices[0]
                text = choice.text if hasattr(choice, "text") else choice.delta.content
                chunks += bool(text)
                finish = finish or choice.finish_reason
            if getattr(chunk, "usage", None):
                tokens = chunk.usage.completion_tokens
            if cancel_after is not None and chunks >= cancel_after and not finish:
                rec["cancelled"] = True
                break
    finally:
        result.close()  # mid-stream: closes the connection
    rec["chunks"] = chunks
    if not rec.get("cancelled"):
        rec.update(tokens=tokens, stream_complete=True)


def bad_request(http: httpx.Client, client: openai.OpenAI, bad_client: openai.OpenAI, base: str, kind: str, model: str,
                rng: random.Random, rec: dict) -> None:
    path = rng.choice(GEN_PATHS)
    rec["path"] = path
    if kind == "malformed_json":
        raw = rng.choice([b'{"model": "' + model.encode() + b'", "prompt": "Hello', b"not json at all", b"\xff\xfe{}",
                          b'{"model": ' + b"[" * 50])
        rec["status"] = http.post(base + path, content=raw, headers={"Content-Type": "application/json"}).status_code
    elif kind == "oversize_body":
        payload = json.dumps({"model": model, "prompt": "word " * (MAX_BODY // 5 + 500), "max_tokens": 8}).encode()
        chunked = rng.random() < 0.5  # without Content-Length the app reads the body and measures it
        rec["chunked"] = chunked
        content = iter([payload[i:i + 16384] for i in range(0, len(payload), 16384)]) if chunked else payload
        rec["status"] = http.post(base + path, content=content, headers={"Content-Type": "application/json"}).status_code
    elif kind == "wrong_key":
        via_openai = rng.random() < 0.5
        rec["client"] = "openai" if via_openai else "httpx"
        if via_openai:
            rec["path"] = "/v1/completions"
            try:
                bad_client.completions.create(model=model, prompt="Hi", max_tokens=8)
                rec["status"] = 200
            except openai.APIStatusError as exc:
                rec["status"] = exc.status_code
        else:
            headers = rng.choice([{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
            rec["status"] = httpx.post(base + path, json={"model": model, "prompt": "Hi", "max_tokens": 8},
                                       headers=headers, timeout=CLIENT_TIMEOUT).status_code
    elif kind == "unknown_model":
        rec["client"] = "openai"
        try:
            if path == "/v1/chat/completions":
                client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
            else:
                client.completions.create(model="no-such-model", prompt="Hi", max_tokens=8)
            rec["status"] = 200
        except openai.APIStatusError as exc:
            rec["status"] = exc.status_code


def run_one(kind: str, model: str, client_name: str, fn, rec_sink: Recorder, t0: float) -> dict:
    rec = {"kind": kind, "model": model, "client": client_name, "path": None, "status": None, "t": round(time.monotonic() - t0, 2)}
    started = time.perf_counter()
    try:
        fn(rec)
    except (httpx.TimeoutException, openai.APITimeoutError):
        rec["outcome"] = "client_timeout"
    except openai.APIStatusError as exc:
        rec["status"] = exc.status_code
    except openai.APIConnectionError as exc:
        rec["outcome"] = f"client_error:{type(exc).__name__}"
    except openai.APIError as exc:  # an error event inside a 200 stream (openai raises it from the body)
        body = exc.body if isinstance(exc.body, dict) else {}
        rec["stream_error"] = body.get("type") or "error"
    except (httpx.HTTPError, openai.APIConnectionError, json.JSONDecodeError, OSError) as exc:
        rec["outcome"] = f"client_error:{type(exc).__name__}"
    except Exception as exc:  # a bug on the client's side must not end its thread: recorded, never hidden
        rec["outcome"] = f"client_error:unexpected:{type(exc).__name__}"
        rec["error"] = repr(exc)[:300]
    rec["latency_s"] = round(time.perf_counter() - started, 4)
    if "outcome" not in rec:
        rec["outcome"] = (f"5xx_in_stream:{rec['stream_error']}" if rec.get("stream_error")
                          else outcome_of(rec["status"]) if rec["status"] is not None else "client_error:no_status")
    if (rec["outcome"] == "2xx" and kind.endswith("_stream") and not rec.get("stream_complete")):
        rec["outcome"] = "client_error:stream_without_done"
    rec_sink.add(rec)
    return rec


# -- traffic ---------------------------------------------------------------------------------------

def client_thread(index: int, base: str, models: list[str], seed: int, deadline: float, recorder: Recorder, t0: float) -> None:
    rng = random.Random(seed * 1000 + index)
    kinds, weights = list(MIX), list(MIX.values())
    auth = {"Authorization": f"Bearer {KEY}"}
    timeout = httpx.Timeout(CLIENT_TIMEOUT, connect=10.0)
    with httpx.Client(headers=auth, timeout=timeout) as http:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=CLIENT_TIMEOUT)
        bad_client = openai.OpenAI(base_url=base + "/v1", api_key="wrong-key", max_retries=0, timeout=CLIENT_TIMEOUT)
        for _ in range(MAX_REQUESTS_PER_THREAD):
            if time.monotonic() >= deadline:
                break
            kind = rng.choices(kinds, weights)[0]
            model = rng.choice(models)
            if kind in ("malformed_json", "oversize_body", "wrong_key", "unknown_model"):
                run_one(kind, model, "httpx", lambda rec: bad_request(http, client, bad_client, base, kind, model, rng, rec),
                        recorder, t0)
            elif rng.random() < 0.5:
                run_one(kind, model, "openai", lambda rec: openai_generation(client, kind, model, rng, rec), recorder, t0)
            else:
                run_one(kind, model, "httpx", lambda rec: httpx_generation(http, base, kind, model, rng, rec), recorder, t0)
        client.close()
        bad_client.close()


def burst_thread(base: str, models: list[str], seed: int, deadline: float, recorder: Recorder, t0: float, bursts: list) -> None:
    rng = random.Random(seed * 1000 + 999)
    auth = {"Authorization": f"Bearer {KEY}"}
    next_at = t0 + BURST_FIRST_S
    with httpx.Client(headers=auth, timeout=httpx.Timeout(CLIENT_TIMEOUT, connect=10.0),
                      limits=httpx.Limits(max_connections=BURST_SIZE * 2)) as http, ThreadPoolExecutor(BURST_SIZE) as pool:
        for n in range(10_000):
            while time.monotonic() < next_at and time.monotonic() < deadline:
                time.sleep(min(1.0, max(0.0, next_at - time.monotonic())))
            if time.monotonic() >= deadline:
                return
            model = models[n % len(models)]
            barrier = threading.Barrier(BURST_SIZE, timeout=30)
            seeds = [rng.randrange(1 << 30) for _ in range(BURST_SIZE)]

            def one(i: int) -> dict:
                local = random.Random(seeds[i])

                def fn(rec):
                    with _suppress_broken_barrier():
                        barrier.wait()
                    httpx_generation(http, base, "burst", model, local, rec)
                return run_one("burst", model, "httpx", fn, recorder, t0)

            started = time.monotonic()
            futures = [pool.submit(one, i) for i in range(BURST_SIZE)]
            done, pending = wait(futures, timeout=CLIENT_TIMEOUT + 30)
            outcomes = Counter(f.result()["outcome"] for f in done)
            bursts.append({"t_s": round(started - t0, 1), "model": model, "outcomes": dict(outcomes), "unfinished": len(pending),
                           "wall_s": round(time.monotonic() - started, 2)})
            next_at += BURST_EVERY_S


class _suppress_broken_barrier:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is threading.BrokenBarrierError


# -- the server, its metrics and its memory --------------------------------------------------------

METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')


def parse_metrics(text: str) -> dict:
    """{name: {label tuple: value}} for every sample line."""
    out: dict = defaultdict(dict)
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if not match or line.startswith("#"):
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(3) or "")))
        out[match.group(1)][labels] = float(match.group(4))
    return out


def scrape(base: str, recorder: Recorder, t0: float, record: bool = True) -> tuple[dict, dict | None]:
    rec = {"kind": "metrics_scrape", "model": None, "client": "httpx", "path": "/metrics", "status": None,
           "t": round(time.monotonic() - t0, 2)}
    started = time.perf_counter()
    parsed = None
    try:
        response = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        rec["status"] = response.status_code
        if response.status_code == 200:
            parsed = parse_metrics(response.text)
    except httpx.HTTPError as exc:
        rec["outcome"] = "client_timeout" if isinstance(exc, httpx.TimeoutException) else f"client_error:{type(exc).__name__}"
    rec["latency_s"] = round(time.perf_counter() - started, 4)
    rec.setdefault("outcome", outcome_of(rec["status"]) if rec["status"] is not None else "client_error:no_status")
    if record:
        recorder.add(rec)
    return rec, parsed


def tree_rss_mb(pid: int) -> tuple[float, int]:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan"), 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(total / 2**20, 1), len(procs)


def summed(parsed: dict, name: str, **match) -> float:
    return sum(v for labels, v in parsed.get(name, {}).items() if all(dict(labels).get(k) == w for k, w in match.items()))


def per_model(parsed: dict) -> dict:
    """Per-model figures from one scrape: tokens, cancellations, in flight, queued."""
    names = {dict(k).get("model") for k in parsed.get("edgequant_in_flight_requests", {})} - {None}
    return {m: {"generated_tokens": summed(parsed, "edgequant_generated_tokens_total", model=m),
                "cancelled": summed(parsed, "edgequant_cancelled_requests_total", model=m),
                "in_flight": summed(parsed, "edgequant_in_flight_requests", model=m),
                "queue_depth": summed(parsed, "edgequant_queue_depth", model=m)} for m in sorted(names)}


def sampler_thread(base: str, pid: int, recorder: Recorder, t0: float, deadline: float, samples: list, stop: threading.Event) -> None:
    seen = 0
    for minute in range(10_000):
        target = t0 + 60.0 * minute
        while time.monotonic() < target and not stop.is_set():
            time.sleep(min(1.0, max(0.0, target - time.monotonic())))
        if stop.is_set() or time.monotonic() > deadline + 1:
            return
        rss, nproc = tree_rss_mb(pid)
        _, parsed = scrape(base, recorder, t0)
        sample = {"minute": minute, "t_s": round(time.monotonic() - t0, 1), "rss_mb": rss, "processes": nproc,
                  "load_avg": [round(x, 2) for x in os.getloadavg()]}
        if parsed:
            sample.update(requests_total=summed(parsed, "edgequant_requests_total"),
                          generated_tokens=summed(parsed, "edgequant_generated_tokens_total"),
                          cancelled=summed(parsed, "edgequant_cancelled_requests_total"),
                          in_flight=summed(parsed, "edgequant_in_flight_requests"),
                          queue_depth=summed(parsed, "edgequant_queue_depth"), per_model=per_model(parsed))
        finished = recorder.snapshot()
        sample["client_outcomes_since_last"] = dict(Counter(r["outcome"] for r in finished[seen:] if r["kind"] != "metrics_scrape"))
        seen = len(finished)
        samples.append(sample)
        print(f"soak: minute {minute}: {json.dumps(sample)}", flush=True)


def start_server(artifacts: list[Path], port: int, log_path: Path, recorder: Recorder, t0: float) -> subprocess.Popen:
    command = [sys.executable, "-m", "edgequant", "serve", *map(str, artifacts), "--port", str(port), "--host", "127.0.0.1",
               "--batch", str(BATCH), "--max-queue", str(MAX_QUEUE), "--api-key", KEY, "--max-body-bytes", str(MAX_BODY),
               "--request-timeout", str(REQUEST_TIMEOUT)]
    log = open(log_path, "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            status = httpx.get(base + "/health", timeout=2).status_code
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        recorder.add({"kind": "health", "model": None, "client": "httpx", "path": "/health", "status": status,
                      "outcome": outcome_of(status), "latency_s": 0.0, "t": round(time.monotonic() - t0, 2)})
        if status == 200:
            return proc
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not answer /health within 300 s")


# -- the report ------------------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float | None:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p * len(values)))], 3) if values else None


def latency_table(records: list[dict]) -> dict:
    by_kind: dict[str, list] = defaultdict(list)
    ok_by_kind: dict[str, list] = defaultdict(list)
    for r in records:
        if r["status"] is not None:
            by_kind[r["kind"]].append(r["latency_s"])
            if r["outcome"] == "2xx":
                ok_by_kind[r["kind"]].append(r["latency_s"])
    out = {}
    for kind in sorted(by_kind):
        answered, ok = by_kind[kind], ok_by_kind[kind]
        out[kind] = {"answered": {"n": len(answered), "p50_s": pct(answered, 0.5), "p95_s": pct(answered, 0.95),
                                  "p99_s": pct(answered, 0.99), "max_s": round(max(answered), 3)},
                     "2xx": {"n": len(ok), "p50_s": pct(ok, 0.5), "p95_s": pct(ok, 0.95), "p99_s": pct(ok, 0.99),
                             "max_s": round(max(ok), 3) if ok else None}}
    return out


def compare(records: list[dict], parsed: dict, models: list[str]) -> dict:
    """The final /metrics (after the drain) against the client's own counts; see the module docstring."""
    client_counts = Counter((r["path"], str(r["status"])) for r in records if r["status"] is not None and r["path"])
    dropped = Counter(r["path"] for r in records if r.get("cancelled"))
    timeouts = Counter(r["path"] for r in records if r["outcome"] == "client_timeout")
    server_counts = {(dict(k).get("path"), dict(k).get("status")): v for k, v in parsed.get("edgequant_requests_total", {}).items()}
    rows, ok = [], True
    for key in sorted(set(client_counts) | set(server_counts), key=lambda k: (k[0] or "", k[1] or "")):
        path, status = key
        client, server = client_counts.get(key, 0), int(server_counts.get(key, 0))
        lo, hi = client, client + timeouts.get(path, 0)  # a request the client gave up on may still be counted
        if status == "200" and path in GEN_PATHS:
            lo = client - dropped.get(path, 0)  # a dropped stream never sends its last body message
        if status == "499":  # ... and the server counts it here: the client saw its 200 start
            lo, hi = 0, dropped.get(path, 0)
        good = lo <= server <= hi
        ok &= good
        rows.append({"path": path, "status": status, "client": client, "server": server, "allowed": [lo, hi], "ok": good})
    for path in GEN_PATHS:  # every stream the client saw start is counted once: 200, or 499 if dropped
        client = client_counts.get((path, "200"), 0)
        server = int(server_counts.get((path, "200"), 0) + server_counts.get((path, "499"), 0))
        good = client <= server <= client + timeouts.get(path, 0)
        ok &= good
        rows.append({"path": path, "status": "200+499", "client": client, "server": server,
                     "allowed": [client, client + timeouts.get(path, 0)], "ok": good})

    in_stream_timeouts = sum(1 for r in records if r.get("stream_error") == "timeout_error")
    answered_504 = sum(1 for r in records if r["status"] == 504)  # the server's timeout stops the generation too
    n_dropped = sum(dropped.values())
    server_cancelled = int(summed(parsed, "edgequant_cancelled_requests_total"))
    cancel_hi = n_dropped + sum(timeouts.values()) + in_stream_timeouts + answered_504
    cancelled = {"client_dropped_streams": n_dropped, "client_timeouts": sum(timeouts.values()),
                 "in_stream_timeouts": in_stream_timeouts, "answered_504": answered_504, "server": server_cancelled,
                 "allowed": [0, cancel_hi],
                 "ok": 0 <= server_cancelled <= cancel_hi}

    tokens = {}
    for model in models:
        mine = [r for r in records if r["model"] == model and r["path"] in GEN_PATHS and r["kind"] not in
                ("malformed_json", "oversize_body", "wrong_key", "unknown_model")]
        told = sum(r.get("tokens") or 0 for r in mine if r["outcome"] == "2xx" and not r.get("cancelled"))
        missing_usage = sum(1 for r in mine if r["outcome"] == "2xx" and not r.get("cancelled") and r.get("tokens") is None)
        lo = told + sum(r.get("chunks", 0) for r in mine if r.get("cancelled"))
        unknown = [r for r in mine if r.get("cancelled") or r["outcome"].startswith(("client_", "5xx"))
                   or (r["outcome"] == "2xx" and r.get("tokens") is None)]
        hi = told + sum(r.get("max_tokens") or 48 for r in unknown)
        server = int(summed(parsed, "edgequant_generated_tokens_total", model=model))
        tokens[model] = {"client_usage_tokens": told, "server": server, "allowed": [lo, hi], "ok": lo <= server <= hi,
                         "answered_without_usage": missing_usage}
    all_ok = ok and cancelled["ok"] and all(t["ok"] for t in tokens.values())
    return {"requests_total": rows, "requests_total_ok": ok, "cancelled_requests_total": cancelled,
            "generated_tokens_total": tokens, "consistent": all_ok}


def server_log_excerpt(log_path: Path) -> dict:
    lines = log_path.read_text(errors="replace").splitlines()
    flagged = [ln for ln in lines if re.search(r"error|exception|traceback|warning|killed", ln, re.I)]
    return {"lines": len(lines), "head": lines[:10], "flagged": flagged[:80], "tail": lines[-20:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=27)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "soak.json")
    args = parser.parse_args()

    import edgequant
    from edgequant.measurement.evaluation import machine_info

    machine = machine_info()
    machine["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    artifacts = [edgequant.convert(None, "gguf:q4_k_m").path, edgequant.convert(None, "openvino:int8").path]
    recorder = Recorder()
    final_rec, final = None, None
    t_setup = time.monotonic()
    log_path = Path(tempfile.mkdtemp(prefix="edgequant-soak-")) / "server.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(artifacts, port, log_path, recorder, t_setup)
    startup_s = round(time.monotonic() - t_setup, 1)
    print(f"soak: server pid {proc.pid} up in {startup_s} s, log {log_path}", flush=True)
    samples: list[dict] = []
    bursts: list[dict] = []
    stop = threading.Event()
    try:
        models_response = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        recorder.add({"kind": "models", "model": None, "client": "httpx", "path": "/v1/models", "status": models_response.status_code,
                      "outcome": outcome_of(models_response.status_code), "latency_s": 0.0, "t": -1})
        models = sorted(m["id"] for m in models_response.json()["data"])
        t0 = time.monotonic()
        deadline = t0 + args.minutes * 60
        threads = [threading.Thread(target=client_thread, args=(i, base, models, args.seed, deadline, recorder, t0), daemon=True)
                   for i in range(args.clients)]
        threads.append(threading.Thread(target=burst_thread, args=(base, models, args.seed, deadline, recorder, t0, bursts), daemon=True))
        sampler = threading.Thread(target=sampler_thread, args=(base, proc.pid, recorder, t0, deadline, samples, stop), daemon=True)
        sampler.start()
        for thread in threads:
            thread.start()
        join_by = deadline + CLIENT_TIMEOUT + 60
        for thread in threads:
            thread.join(timeout=max(0.0, join_by - time.monotonic()))
        hung_threads = sum(t.is_alive() for t in threads)
        traffic_s = round(time.monotonic() - t0, 1)
        stop.set()
        sampler.join(timeout=60)

        # Drain: nothing in flight, and the generated-token count settled, so every worker has noticed every drop.
        drain_started, last_tokens, settled = time.monotonic(), None, False
        for _ in range(120):
            _, parsed = scrape(base, recorder, t0)
            if parsed is not None:
                tokens_now = summed(parsed, "edgequant_generated_tokens_total")
                if summed(parsed, "edgequant_in_flight_requests") == 0 and tokens_now == last_tokens:
                    settled = True
                    break
                last_tokens = tokens_now
            time.sleep(1.0)
        drain_s = round(time.monotonic() - drain_started, 1)
        before_final = recorder.snapshot()
        rss_end, nproc_end = tree_rss_mb(proc.pid)
        final_rec, final = scrape(base, recorder, t0, record=False)
        samples.append({"minute": "end", "t_s": round(time.monotonic() - t0, 1), "rss_mb": rss_end, "processes": nproc_end,
                        "load_avg": [round(x, 2) for x in os.getloadavg()],
                        **({"requests_total": summed(final, "edgequant_requests_total"),
                            "generated_tokens": summed(final, "edgequant_generated_tokens_total"),
                            "cancelled": summed(final, "edgequant_cancelled_requests_total")} if final else {})})
    finally:
        stop.set()
        stopped, killed = time.monotonic(), False
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                killed = True
                proc.kill()
                proc.wait(timeout=30)
        exit_s = round(time.monotonic() - stopped, 1)
    if final_rec is not None:
        recorder.add(final_rec)

    traffic = [r for r in before_final if r["kind"] not in ("metrics_scrape", "health", "models")]
    by_kind_outcome: dict = defaultdict(Counter)
    for r in traffic:
        by_kind_outcome[r["kind"]][r["outcome"]] += 1
    by_outcome = Counter(r["outcome"] for r in traffic)
    by_client = Counter(f"{r['kind']}/{r['client']}" for r in traffic)
    by_model = Counter(f"{r['kind']}/{r['model']}" for r in traffic)
    comparison = compare(before_final, final or {}, models)

    all_records = recorder.snapshot()
    fivexx = [r for r in all_records if r["outcome"].startswith("5xx")]
    unexpected = [r for r in all_records if r["outcome"] not in EXPECTED.get(r["kind"], set())]
    client_timeouts = [r for r in all_records if r["outcome"] == "client_timeout"]
    minute_samples = [s for s in samples if isinstance(s["minute"], int)]
    rss_min2 = next((s["rss_mb"] for s in minute_samples if s["minute"] == 2), None)
    growth = round((rss_end - rss_min2) / rss_min2, 4) if rss_min2 else None
    verdicts = {
        "zero_5xx": {"ok": not fivexx, "count": len(fivexx)},
        "every_request_answered_or_429": {
            "ok": not unexpected and not hung_threads, "unexpected": len(unexpected), "client_timeouts": len(client_timeouts),
            "client_threads_still_running": hung_threads},
        "rss_growth_under_10pct_minute2_to_end": {"ok": growth is not None and growth < 0.10, "rss_minute2_mb": rss_min2,
                                                  "rss_end_mb": rss_end, "growth": growth,
                                                  "note": None if rss_min2 else "the run is shorter than 2 minutes"},
        "metrics_consistent": {"ok": comparison["consistent"] and settled, "drain_settled": settled},
    }
    # uvicorn re-raises the signal it caught once its graceful shutdown is done, and edgequant's own
    # handler turns it into exit 143 (128 + SIGTERM) once every `finally` has run: both are clean.
    clean = proc.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    sigterm = {"ok": clean and not killed, "returncode": proc.returncode, "exit_s": exit_s,
               "killed_after_60_s": killed}
    report = {
        "date": now_iso(),
        "edgequant_version": edgequant.__version__,
        "machine": machine,
        "load_avg_per_minute": [{"minute": s["minute"], "load_avg": s["load_avg"]} for s in samples],
        "settings": {"minutes": args.minutes, "client_threads": args.clients, "seed": args.seed, "mix_weights": MIX,
                     "burst": {"size": BURST_SIZE, "every_s": BURST_EVERY_S, "first_at_s": BURST_FIRST_S},
                     "client_timeout_s": CLIENT_TIMEOUT, "artifacts": [str(a) for a in artifacts], "models": models,
                     "server": f"edgequant serve GGUF OPENVINO --batch {BATCH} --max-queue {MAX_QUEUE} --api-key KEY "
                               f"--max-body-bytes {MAX_BODY} --request-timeout {REQUEST_TIMEOUT} (127.0.0.1)",
                     "max_tokens": "8-48 (dropped streams: 48, closed after 1-3 content chunks)",
                     "sampled_share": 0.4},
        "timing": {"server_startup_s": startup_s, "traffic_s": traffic_s, "drain_s": drain_s},
        "requests": {"total": len(traffic), "by_outcome": dict(by_outcome),
                     "by_kind": {k: dict(v) for k, v in sorted(by_kind_outcome.items())},
                     "by_kind_and_client": dict(sorted(by_client.items())), "by_kind_and_model": dict(sorted(by_model.items())),
                     "dropped_streams": sum(1 for r in traffic if r.get("cancelled")),
                     "metrics_scrapes": sum(1 for r in before_final if r["kind"] == "metrics_scrape")},
        "latency_s": latency_table(traffic),
        "bursts": bursts,
        "rss_mb_per_minute": [{"minute": s["minute"], "rss_mb": s["rss_mb"], "processes": s["processes"]} for s in samples],
        "metric_samples": samples,
        "metrics_vs_client": comparison,
        "verdicts": verdicts,
        "all_targets_met": all(v["ok"] for v in verdicts.values()),
        "sigterm_stop": sigterm,
        "failures": {"5xx": fivexx[:50], "unexpected": unexpected[:50], "client_timeouts": client_timeouts[:50]},
        "server_log": server_log_excerpt(log_path),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"requests": report["requests"]["by_outcome"], "verdicts": verdicts, "sigterm_stop": sigterm,
                      "rss": report["rss_mb_per_minute"]}, indent=1), flush=True)
    return 0 if report["all_targets_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
