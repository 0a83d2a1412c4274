"""Load and soak runs against `fusion-export serve`, from outside: a real server process on loopback, driven over
HTTP by the official `openai` client, one JSON report.

    python -m benchmarks.serve_load FOLDER --out load.json [--clients 1,4] [--requests 8] [--new-tokens 32]
    python -m benchmarks.serve_load FOLDER --soak --out soak.json [--soak-requests 300] [--soak-clients 8]

`FOLDER` is what `serve` opens (an artifact: ONNX Runtime). Without one, `--preset small` writes a random `small`
checkpoint and exports it once under --cache-dir. Load: for each client count, every client sends its requests one
after another (greedy, fixed new tokens, different questions); the report gives total generated tokens per second
and per-request latency, and the ratio to one client. Soak: a mix of good requests and bad ones (oversized image,
bad base64, an unknown field, a client that disconnects mid-stream): status counts, good requests' p50/p99
latency, the server's resident memory (idle) after the first 20 requests and at the end.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUESTIONS = ["What is in front of the house?", "Count the boxes, then name their colours.", "Describe the sky.",
             "What colour is the door?", "Is there anyone in the picture?", "Where could this be?",
             "What is on the left?", "Name three objects you see."]  # fmt: skip


def _image_url() -> str:
    from fusion_export.bundled import DEMO_IMAGE

    return "data:image/png;base64," + base64.b64encode(Path(DEMO_IMAGE).read_bytes()).decode()


def _messages(question: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]  # fmt: skip


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class Server:
    """`fusion-export serve FOLDER` in its own process, on a free loopback port."""

    def __init__(self, folder: Path, threads: int, extra: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", "fusion_export_cli", "serve", str(folder), "--port", str(self.port),
                   "--model-id", "fusion", "--max-queue", "64", *extra]  # fmt: skip
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def client(self, timeout: float = 600):
        import openai

        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=timeout)

    def wait_ready(self) -> None:
        import openai

        client = self.client(5)
        for _ in range(1200):
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()}")
            try:
                client.models.list()
                return
            except openai.APIConnectionError:
                time.sleep(0.1)
        raise RuntimeError("the server did not come up in 120 s")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


def _metrics(server: Server) -> dict[str, float]:
    """The server's counters (Prometheus text format), by sample name."""
    import urllib.request

    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/metrics") as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def load(server: Server, clients: list[int], requests: int, new_tokens: int) -> dict:
    url, runs = _image_url(), {}

    def one_client(index: int) -> list[tuple[float, int]]:
        client, done = server.client(), []
        for r in range(requests):
            started = time.perf_counter()
            reply = client.chat.completions.create(model="fusion", messages=_messages(QUESTIONS[(index + r) % 8], url),
                                                   max_tokens=new_tokens, temperature=0)  # fmt: skip
            done.append((time.perf_counter() - started, reply.usage.completion_tokens))
        return done

    one_client(0)  # warm-up: the first request pays for lazy initialisation
    for n in clients:
        before = _metrics(server)
        started = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            results = [x for per_client in pool.map(one_client, range(n)) for x in per_client]
        seconds = time.perf_counter() - started
        after = _metrics(server)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        tokens = sum(t for _, t in results)
        median = statistics.median(s for s, _ in results)
        runs[n] = {"clients": n, "requests": len(results), "seconds": seconds, "generated_tokens": tokens,
                   "tokens_per_s": tokens / seconds, "latency_s_median": median,
                   # decode steps alone (the server's counters): what batching shares
                   "decode_tokens_per_s": delta["fusion_decode_tokens_total"] / delta["fusion_decode_seconds_total"],
                   "batches": delta.setdefault("batches", delta["fusion_batch_rows_count"]),
                   "mean_rows_per_batch": delta["fusion_batch_rows_sum"] / delta["batches"]}  # fmt: skip
    base, decode_base = runs[clients[0]]["tokens_per_s"], runs[clients[0]]["decode_tokens_per_s"]
    for run in runs.values():
        run["ratio_to_first"] = run["tokens_per_s"] / base
        run["decode_ratio_to_first"] = run["decode_tokens_per_s"] / decode_base
    return {"runs": list(runs.values())}


def soak(server: Server, total: int, clients: int, new_tokens: int, seed: int = 0) -> dict:
    import openai

    url = _image_url()
    big = "data:image/png;base64," + base64.b64encode(os.urandom(2_000_000)).decode()  # over --max-image-bytes
    kinds = ["good"] * 6 + ["oversized", "bad_base64", "unknown_field", "disconnect"]
    plan = [random.Random(seed + i).choice(kinds) for i in range(total)]

    def send(i: int) -> tuple[str, int, float]:
        kind, client = plan[i], server.client()
        image = {"oversized": big, "bad_base64": "data:image/png;base64,@@"}.get(kind, url)
        messages = _messages(QUESTIONS[i % 8], image)
        extra = {"extra_body": {"frequency_penalty": 1}} if kind == "unknown_field" else {}
        started = time.perf_counter()
        try:
            if kind == "disconnect":
                stream = client.chat.completions.create(model="fusion", messages=messages, max_tokens=new_tokens,
                                                        temperature=0, stream=True)  # fmt: skip
                next(iter(stream))
                stream.close()  # gone mid-stream
                status = 200
            else:
                client.chat.completions.create(model="fusion", messages=messages, max_tokens=new_tokens,
                                               temperature=0, **extra)  # fmt: skip
                status = 200
        except openai.APIStatusError as e:
            status = e.status_code
        except openai.APIConnectionError:
            status = -1
        return kind, status, time.perf_counter() - started

    # resident memory sampled with the server idle (no request queued or running), after the first 20 requests and
    # at the end: sampled mid-batch it swings by the batch's KV cache and activations (1.1 to 2.3 GB measured)
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(send, range(min(20, total))))
        rss_after_20, kept_after_20 = _idle_rss(server), _metrics(server).get("fusion_conversation_cache_bytes")
        results += list(pool.map(send, range(20, total)))
    end_rss, kept_end = _idle_rss(server), _metrics(server).get("fusion_conversation_cache_bytes")
    good = sorted(s for kind, status, s in results if kind == "good" and status == 200)
    counts: dict[str, dict[str, int]] = {}
    for kind, status, _ in results:
        counts.setdefault(kind, {}).setdefault(str(status), 0)
        counts[kind][str(status)] += 1
    return {
        "requests": total, "clients": clients, "statuses": counts,
        "good_5xx": sum(1 for kind, status, _ in results if kind == "good" and (status >= 500 or status < 0)),
        "bad_not_4xx": sum(1 for kind, status, _ in results
                           if kind in ("oversized", "bad_base64", "unknown_field") and not 400 <= status < 500),
        "latency_s_p50": good[len(good) // 2] if good else None,
        "latency_s_p99": good[min(len(good) - 1, int(len(good) * 0.99))] if good else None,
        "rss_after_20": rss_after_20, "rss_end": end_rss, "rss_end_ratio": end_rss / rss_after_20,
        # turn states kept for conversations (within --conversation-cache-mb): memory that grows by design
        "conversation_cache_bytes_after_20": kept_after_20, "conversation_cache_bytes_end": kept_end,
    }  # fmt: skip


def _idle_rss(server: Server, timeout: float = 120.0) -> int:
    """The server's resident bytes once nothing is queued or running (its /metrics), clients' disconnects settled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = _metrics(server)
        if metrics.get("fusion_queue_depth", 1.0) == 0 and metrics.get("fusion_busy", 1.0) == 0:
            time.sleep(0.5)  # the event loop's side of the last responses
            return _rss(server.process.pid)
        time.sleep(0.2)
    raise RuntimeError(f"the server stayed busy for {timeout} s")


def preset_artifact(cache: Path) -> Path:
    """The `small` preset's checkpoint written and exported for trt-10.3 once under `cache` (the tools' default)."""
    from fusion_export.export import ExportOptions, export_artifact
    from reference_model.synthetic import write_random_checkpoint

    checkpoint, artifact = cache / "small-seed0", cache / "small-seed0-trt-10.3-q64"
    if not checkpoint.exists():
        write_random_checkpoint(checkpoint, "small", seed=0)
    if not artifact.exists():
        export_artifact(checkpoint, artifact, ExportOptions(query_len=64), verbose=False)
    return artifact


def main(argv: list[str] | None = None) -> int:
    from .report import write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", type=Path, help="what `serve` opens (default: the small preset, exported)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "fusion-export" / "serve-load")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--clients", default="1,4")
    p.add_argument("--requests", type=int, default=4, help="per client, one after another")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--soak", action="store_true")
    p.add_argument("--soak-requests", type=int, default=300)
    p.add_argument("--soak-clients", type=int, default=8)
    args = p.parse_args(argv)
    folder = args.folder or preset_artifact(args.cache_dir)
    server = Server(
        folder, args.threads, ["--max-tokens", str(max(64, args.new_tokens)), "--max-image-bytes", "1000000"]
    )
    try:
        server.wait_ready()
        if args.soak:
            report = {"soak": soak(server, args.soak_requests, args.soak_clients, args.new_tokens)}
        else:
            report = load(server, [int(c) for c in args.clients.split(",")], args.requests, args.new_tokens)
    finally:
        code = server.stop()
    report.update(folder=str(folder), new_tokens=args.new_tokens, threads=args.threads, server_exit=code)
    print(write_json(args.out, report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
