"""Load benchmark of ``medlens serve``: concurrent clients against real server processes.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/serve.py --run2d RUN2D --run3d RUN3D [--threads 2]
    .venv/bin/python benchmarks/serve.py                     # trains both configs first (epochs: --epochs)
    .venv/bin/python benchmarks/serve.py --quick             # smoke run: tiny runs, 4 clients, 5 s

For each server configuration it starts ``medlens serve`` as a separate process (uvicorn, localhost, no API
key), warms it up for ``--warmup`` seconds under the same load, reads its RSS, then runs ``--clients``
concurrent closed-loop clients (each one keep-alive HTTP/1.1 connection on asyncio streams: POST one real test
image as a multipart upload, read the whole answer, check it is a 200 with a prediction, repeat; no think time)
for ``--duration`` seconds. The requests are encoded once, before the clock starts: the clients share the 2 cores
with the server, and an httpx client spent more CPU per request than the server itself, which made the figures
about the client. The table prints both processes' CPU time per request, so the load generator's share shows. Inputs are the PneumoniaMNIST test images as PNG (28 px) and AdrenalMNIST3D test
volumes as NIfTI (28^3), cycled. Requests ask for probabilities and the decision only (``heatmap=false``);
a last row times the 2D model with Grad-CAM heatmaps on.

Configurations, all measured in this run: 2D ONNX Runtime batched (the target row), 2D ONNX Runtime unbatched
(``--max-batch 1``), 2D PyTorch batched, 3D ONNX Runtime batched, 3D PyTorch batched, 2D with heatmaps. Ratios
are computed from these rows. RSS is the server process's resident memory (``/proc/PID/status``): after
warm-up, the peak sampled every 0.25 s during the run, and at the end.

The clients run on the same machine as the server and share its cores; every figure is what this run measured.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import REPO, add_common_args, for_benchmark, quick_banner, run_provenance

TARGET_P99_MS = 100.0   # issue 14's targets (not measurements): 28 px p99 at 16 clients, zero errors, RSS
TARGET_RSS = 0.10


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    name: str
    run: str
    backend: str
    batching: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    rss_warm: float = 0.0
    rss_peak: float = 0.0
    rss_end: float = 0.0
    batches: str = ""
    server_cpu_ms: float = float("nan")   # server process CPU time (user + system) per answered request
    client_cpu_ms: float = float("nan")   # this (client) process's CPU time per answered request

    def q(self, p: float) -> float:
        import numpy as np

        return float(np.percentile(self.latencies, p)) if self.latencies else float("nan")

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


class ServerProcess:
    def __init__(self, run: Path, *args: str, threads: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "medlens.cli.main", "serve", str(run), "--port",
                                      str(self.port), "--threads", str(threads), "--max-queue", "1024", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={k: v for k, v in os.environ.items() if k != "MEDLENS_API_KEYS"})
        import httpx

        t0 = time.time()
        while time.time() - t0 < 300:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise SystemExit("server not ready after 300 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def _request_bytes(port: int, model: str, name: str, body: bytes, heatmap: bool) -> bytes:
    """One complete HTTP/1.1 request: ``POST .../predict`` with the image as the multipart ``file`` part."""
    b = "medlens-bench-" + os.urandom(8).hex()
    part = (f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + body + f"\r\n--{b}--\r\n".encode()
    head = (f"POST /v1/models/{model}/predict?heatmap={'true' if heatmap else 'false'} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary={b}\r\n"
            f"Content-Length: {len(part)}\r\n\r\n")
    return head.encode() + part


async def _exchange(reader, writer, request: bytes) -> bool:
    """Send one request on a keep-alive connection, read the whole response; True for a 200 with a prediction."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length"),
                  None)
    if length is None:
        raise ConnectionError("response without Content-Length")
    payload = await reader.readexactly(length)
    return status == 200 and b'"prediction"' in payload


async def _load(url: str, model: str, bodies: list[tuple[str, bytes]], clients: int, seconds: float,
                heatmap: bool, pid: int | None = None, res: Result | None = None) -> None:
    """``clients`` closed-loop clients (send, wait for the whole answer, repeat; no think time).

    Each client is one keep-alive HTTP/1.1 connection (asyncio streams) sending pre-encoded multipart requests:
    the load generator shares the 2 cores with the server, and httpx spent more CPU per request than the server
    did, so a lean client keeps the figures about the server."""
    port = int(url.rsplit(":", 1)[1])
    requests = [_request_bytes(port, model, n, b, heatmap) for n, b in bodies]
    stop_at = time.perf_counter() + seconds

    async def client(i: int) -> None:
        k = i
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop_at:
                req = requests[k % len(requests)]
                k += clients
                t0 = time.perf_counter()
                try:
                    ok = await _exchange(reader, writer, req)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    ok = False
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if res is not None:
                    if ok:
                        res.latencies.append((time.perf_counter() - t0) * 1000.0)
                    else:
                        res.errors += 1
        finally:
            writer.close()

    async def sample_rss() -> None:
        while time.perf_counter() < stop_at:
            res.rss_peak = max(res.rss_peak, _rss_mb(pid))
            await asyncio.sleep(0.25)

    tasks = [client(i) for i in range(clients)]
    if res is not None and pid is not None:
        tasks.append(sample_rss())
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    if res is not None:
        res.seconds = time.perf_counter() - t0


def _batch_stats(url: str, model: str) -> tuple[float, float]:
    import re

    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    c = re.search(rf'medlens_batch_size_count\{{model="{model}"\}} (\S+)', text)
    s = re.search(rf'medlens_batch_size_sum\{{model="{model}"\}} (\S+)', text)
    return (float(c.group(1)) if c else 0.0), (float(s.group(1)) if s else 0.0)


def measure(name: str, run: Path, backend: str, batching: str, bodies, args, extra: list[str],
            heatmap: bool = False) -> Result:
    srv = ServerProcess(run, "--backend", backend, *extra, threads=args.threads)
    try:
        model = run.name
        asyncio.run(_load(srv.url, model, bodies, args.clients, args.warmup, heatmap))
        res = Result(name, model, {"onnx": "ONNX Runtime", "torch": "PyTorch"}[backend], batching)
        res.rss_warm = res.rss_peak = _rss_mb(srv.proc.pid)
        b0 = _batch_stats(srv.url, model)
        c0, m0 = _cpu_s(srv.proc.pid), time.process_time()
        asyncio.run(_load(srv.url, model, bodies, args.clients, args.duration, heatmap, srv.proc.pid, res))
        c1, m1 = _cpu_s(srv.proc.pid), time.process_time()
        b1 = _batch_stats(srv.url, model)
        if res.latencies:
            res.server_cpu_ms = 1000 * (c1 - c0) / len(res.latencies)
            res.client_cpu_ms = 1000 * (m1 - m0) / len(res.latencies)
        res.rss_end = _rss_mb(srv.proc.pid)
        n = b1[0] - b0[0]
        res.batches = f"{(b1[1] - b0[1]) / n:.1f}" if n else "-"
    finally:
        srv.stop()
    print(f"  measured {name}: {len(res.latencies)} requests, {res.errors} errors", flush=True)
    return res


def _bodies(kind: str, n: int) -> list[tuple[str, bytes]]:
    """Real test inputs as the bytes a client uploads: PNG (2D) or gzipped NIfTI (3D)."""
    import gzip

    import numpy as np

    from medlens.utils import data_dir

    if kind == "2d":
        from PIL import Image

        imgs = np.load(data_dir() / "medmnist" / "pneumoniamnist.npz")["test_images"][:n]
        out = []
        for i, a in enumerate(imgs):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            out.append((f"test{i}.png", buf.getvalue()))
        return out
    import nibabel as nib

    vols = np.load(data_dir() / "medmnist" / "adrenalmnist3d.npz")["test_images"][:n]
    return [(f"test{i}.nii.gz", gzip.compress(nib.Nifti1Image(v.astype(np.uint8), np.eye(4)).to_bytes()))
            for i, v in enumerate(vols)]


def _train(config: str, args) -> Path:
    from medlens.config import load_config
    from medlens.workflow.train import train

    cfg = for_benchmark(load_config(REPO / config), args.threads, args.quick)
    if args.epochs:
        cfg.train.epochs = min(cfg.train.epochs, args.epochs)
        cfg.train.warmup_epochs = min(getattr(cfg.train, "warmup_epochs", 0) or 0, args.epochs - 1)
    out = REPO / "runs" / "benchmarks-serve"
    return train(cfg, run_dir=out / (cfg.name + ("-quick" if args.quick else "")), overwrite=True,
                 progress_bar=False, log=lambda s: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run2d", type=Path, help="a finished run of configs/pneumoniamnist_cnn.yaml")
    ap.add_argument("--run3d", type=Path, help="a finished run of configs/adrenalmnist3d_cnn.yaml")
    ap.add_argument("--epochs", type=int, default=None, help="cap the epochs of the runs trained here")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds measured per configuration")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    add_common_args(ap, trains=True)
    args = ap.parse_args()
    if args.quick:
        args.clients, args.duration, args.warmup = min(args.clients, 4), min(args.duration, 5.0), 1.0
    quick_banner(args.quick, "tiny runs, 4 clients, 5 s per configuration")

    from medlens.workflow.export import export_run, onnx_path

    runs, origin = {}, {}
    for kind, given, config in (("2d", args.run2d, "configs/pneumoniamnist_cnn.yaml"),
                                ("3d", args.run3d, "configs/adrenalmnist3d_cnn.yaml")):
        if given:
            runs[kind], origin[kind] = given, f"read from {run_provenance(given)}"
        else:
            runs[kind] = _train(config, args)
            ep = f", epochs capped at {args.epochs}" if args.epochs else ""
            origin[kind] = f"trained in this run from {config}{ep} ({runs[kind]})"
        if not onnx_path(runs[kind]).is_file():
            export_run(runs[kind], "onnx", n_parity=50)
    bodies = {"2d": _bodies("2d", 256), "3d": _bodies("3d", 64)}
    load0 = os.getloadavg()
    print(f"2D run: {origin['2d']}\n3D run: {origin['3d']}")
    print(f"{args.clients} concurrent clients, {args.duration:g} s per configuration after {args.warmup:g} s of "
          f"warm-up; server --threads {args.threads}; {os.cpu_count()} CPUs; load average before "
          f"{load0[0]:.2f}\n", flush=True)
    t_all = time.time()
    batched = ["--max-batch", "32", "--max-wait-ms", "2"]
    rows = [measure("28 px, ONNX Runtime, batched", runs["2d"], "onnx", "32 / 2 ms", bodies["2d"], args, batched),
            measure("28 px, ONNX Runtime, unbatched", runs["2d"], "onnx", "off", bodies["2d"], args,
                    ["--max-batch", "1"]),
            measure("28 px, PyTorch, batched", runs["2d"], "torch", "32 / 2 ms", bodies["2d"], args, batched),
            measure("28^3, ONNX Runtime, batched", runs["3d"], "onnx", "32 / 2 ms", bodies["3d"], args, batched),
            measure("28^3, PyTorch, batched", runs["3d"], "torch", "32 / 2 ms", bodies["3d"], args, batched),
            measure("28 px, ONNX Runtime, batched, + Grad-CAM heatmap", runs["2d"], "onnx", "32 / 2 ms",
                    bodies["2d"], args, batched, heatmap=True)]
    load1 = os.getloadavg()
    print("\n| configuration | requests | throughput (req/s) | p50 ms | p95 ms | p99 ms | errors | mean batch | "
          "RSS warm / peak / end MB | end vs warm | CPU ms/request server / clients |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {len(r.latencies)} | {r.throughput:.1f} | {r.q(50):.1f} | {r.q(95):.1f} | {r.q(99):.1f} "
              f"| {r.errors} | {r.batches} | {r.rss_warm:.0f} / {r.rss_peak:.0f} / {r.rss_end:.0f} | "
              f"{100 * (r.rss_end / r.rss_warm - 1):+.1f}% | {r.server_cpu_ms:.2f} / {r.client_cpu_ms:.2f} |")
    b, u, pt, o3, p3 = rows[0], rows[1], rows[2], rows[3], rows[4]
    print("\n| ratio (same run) | throughput | p99 latency |")
    print("|---|---|---|")
    print(f"| 28 px batched / unbatched (ONNX Runtime) | {b.throughput / u.throughput:.2f}x | {b.q(99) / u.q(99):.2f}x |")
    print(f"| 28 px ONNX Runtime / PyTorch (batched) | {b.throughput / pt.throughput:.2f}x | {b.q(99) / pt.q(99):.2f}x |")
    print(f"| 28^3 ONNX Runtime / PyTorch (batched) | {o3.throughput / p3.throughput:.2f}x | {o3.q(99) / p3.q(99):.2f}x |")
    errors = sum(r.errors for r in rows)
    worst_rss = max(abs(r.rss_end / r.rss_warm - 1) for r in rows)
    print(f"\ntargets (issue 14): 28 px p99 < {TARGET_P99_MS:.0f} ms at {args.clients} clients: {b.q(99):.1f} ms "
          f"({'met' if b.q(99) < TARGET_P99_MS else 'NOT met'}); errors: {errors} "
          f"({'met' if errors == 0 else 'NOT met'}); RSS end within {100 * TARGET_RSS:.0f}% of warm-up: worst "
          f"{100 * worst_rss:.1f}% ({'met' if worst_rss <= TARGET_RSS else 'NOT met'})")
    print(f"wall {time.time() - t_all:.0f} s; load average before {load0[0]:.2f}, after {load1[0]:.2f} (1 min); "
          f"clients and server shared the {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
