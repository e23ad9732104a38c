"""Load test of ``mmllm serve``: N chat requests from C concurrent clients, batching on and off.

The model is loaded once; for each ``--batch-sizes`` value a server with that
``--max-batch-size`` runs on loopback (uvicorn in a thread) and C client threads send the
requests with the official ``openai`` client. Every request must come back with a choice;
the script reports lost and failed requests, throughput and p50 / p95 latency, and exits 1 if
any request was lost or failed.

    python -m benchmarks.serve_load --model tiny --requests 64 --clients 16 --batch-sizes 8 1
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import socket
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass

API_KEY = "load-test"


@dataclass
class LoadResult:
    max_batch_size: int
    requests: int
    clients: int
    answered: int
    failed: int
    lost: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    p50_s: float
    p95_s: float
    mean_batch_rows: float | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A uvicorn server for ``app`` on a free loopback port, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_load(base_url: str, model: str, requests: int = 64, clients: int = 16, max_tokens: int = 8,
             api_key: str = API_KEY, timeout: float = 600.0) -> dict:
    """Send ``requests`` chats from ``clients`` threads; -> counts and latencies."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=timeout)
    latencies, tokens, failures = [], [], []

    def one(i: int):
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Request {i}: say something about the number {i}."}],
            max_tokens=max_tokens, temperature=1.0)
        assert len(reply.choices) == 1 and reply.choices[0].message.role == "assistant"
        return time.perf_counter() - start, reply.usage.completion_tokens

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one, i) for i in range(requests)]
        for fut in cf.as_completed(futures):
            try:
                latency, n = fut.result()
                latencies.append(latency)
                tokens.append(n)
            except Exception as err:  # counted, and the first few reported
                failures.append(f"{type(err).__name__}: {err}")
    seconds = time.perf_counter() - start
    answered = len(latencies)
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19 or [float("nan")] * 19
    return dict(requests=requests, clients=clients, answered=answered, failed=len(failures),
                lost=requests - answered - len(failures), seconds=seconds, requests_per_s=answered / seconds,
                tokens_per_s=sum(tokens) / seconds, p50_s=statistics.median(latencies) if latencies else float("nan"),
                p95_s=q[18], errors=failures[:3])


def bench(model, name: str, batch_sizes=(8, 1), requests: int = 64, clients: int = 16, max_tokens: int = 8,
          batch_wait_ms: float = 5.0) -> list[LoadResult]:
    from mmllm.serve import ServeSettings, create_app

    rows = []
    for size in batch_sizes:
        settings = ServeSettings(model_name=name, api_key=API_KEY, max_batch_size=size,
                                 batch_wait_s=batch_wait_ms / 1000, max_queue=max(requests, 1))
        app = create_app(model, settings)
        with LocalServer(app) as server:
            stats = run_load(server.url, name, requests, clients, max_tokens)
            hist = app.state.metrics.batch_rows
            count = sum(s.value for s in hist.collect()[0].samples if s.name.endswith("_count"))
            total = sum(s.value for s in hist.collect()[0].samples if s.name.endswith("_sum"))
        for err in stats.pop("errors"):
            print(f"  error: {err}", file=sys.stderr)
        rows.append(LoadResult(max_batch_size=size, mean_batch_rows=total / count if count else None, **stats))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="preset, shipped model or directory")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1], help="--max-batch-size values; 1 = off")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    import torch

    import mmllm

    if args.threads:
        torch.set_num_threads(args.threads)
    model = mmllm.load(args.model)
    model.generate("warm up", max_new_tokens=2)
    rows = bench(model, args.model, args.batch_sizes, args.requests, args.clients, args.max_tokens, args.batch_wait_ms)
    print("| max batch | requests | clients | answered | lost | failed | req/s | tok/s | p50 s | p95 s | mean rows/call |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.max_batch_size} | {r.requests} | {r.clients} | {r.answered} | {r.lost} | {r.failed} | "
              f"{r.requests_per_s:.2f} | {r.tokens_per_s:.1f} | {r.p50_s:.2f} | {r.p95_s:.2f} | "
              f"{r.mean_batch_rows or 0:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0 if all(r.lost == 0 and r.failed == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
