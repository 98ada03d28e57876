"""Extraction images/s from an object store with latency, against the same images on local disk.

A real S3-compatible server (moto, started here on 127.0.0.1) sits behind a small TCP proxy that
delays every request by `--latency-ms`, as a distant bucket would. The same `uwe extract
classification` job (a tiny CNN, so reading dominates) runs on the local folder and on the bucket
with several `--io-concurrency` values; the proxy counts GET requests per image to show that no
image is downloaded twice.

    python benchmarks/bench_remote_read.py [--images 400] [--latency-ms 50]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import socketserver
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "examples")]


class DelayProxy(socketserver.ThreadingTCPServer):
    """Forwards TCP to `upstream`, waiting `delay` seconds before passing on each client request."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream, self.delay = upstream, delay
        self.gets: Counter[str] = Counter()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: DelayProxy = self.server  # type: ignore[assignment]
        up = socket.create_connection(server.upstream)

        def pump_back() -> None:
            try:
                while data := up.recv(1 << 16):
                    self.request.sendall(data)
            except OSError:
                pass
            finally:
                self.request.close()

        threading.Thread(target=pump_back, daemon=True).start()
        try:
            while data := self.request.recv(1 << 16):
                for match in re.finditer(rb"^GET (\S+)", data, re.MULTILINE):
                    time.sleep(server.delay)
                    server.gets[match.group(1).split(b"?")[0].decode()] += 1
                up.sendall(data)
        except OSError:
            pass
        finally:
            up.close()


def run(data: str, out: Path, ckpt: Path, concurrency: int) -> float:
    from uwe_cli.extract.classification import ClassificationConfig, extract_classification

    cfg = ClassificationConfig(
        data=data, out=out, model="tiny_net:tiny_cnn", checkpoint=ckpt, image_size=32, batch_size=64,
        device="cpu", io_concurrency=concurrency,
    )  # fmt: skip
    result = extract_classification(cfg)
    out.unlink()
    return result.images_per_second


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()

    import s3fs
    import torch
    from _images import write_images
    from s3_server import start_s3_server
    from tiny_net import tiny_cnn

    work = Path(tempfile.mkdtemp(prefix="uwe-bench-remote-"))
    images = work / "imgs"
    write_images(images, n=args.images, size=64)
    ckpt = work / "tiny.pth"
    torch.manual_seed(0)
    torch.save(tiny_cnn(10).state_dict(), ckpt)

    server = start_s3_server(work)
    proxy = DelayProxy(("127.0.0.1", server.port), args.latency_ms / 1000)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    os.environ.update(server.env)
    bucket = server.make_bucket("bench")
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(images), f"{bucket}/imgs", recursive=True)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.server_address[1]}"
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        rows = [("local folder", "-", run(str(images), work / "pool.parquet", ckpt, 1))]
        for c in args.concurrency:
            proxy.gets.clear()
            rate = run(f"s3://{bucket}/imgs/", work / "pool.parquet", ckpt, c)
            image_gets = [n for key, n in proxy.gets.items() if key.startswith(f"/{bucket}/imgs/")]
            repeats = (
                "no" if image_gets and max(image_gets) == 1 and len(image_gets) == args.images else "YES"
            )
            rows.append((f"s3 + {args.latency_ms:g} ms/request", str(c), rate, repeats))  # type: ignore[arg-type]
    finally:
        proxy.shutdown()
        server.stop()
    local = rows[0][2]
    print(f"\n{args.images} images, 64x64 PNG, tiny CNN at 32 px, batch 64, CPU")
    print(
        f"{'source':<26} {'--io-concurrency':>16} {'images/s':>9} {'vs local':>9} {'any image read twice':>21}"
    )
    for row in rows:
        name, conc, rate = row[:3]
        twice = row[3] if len(row) > 3 else "-"
        print(f"{name:<26} {conc:>16} {rate:>9.1f} {rate / local:>8.2f}x {twice:>21}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
