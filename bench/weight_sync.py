"""Weight sync cost: publish + fetch + load of a snapshot through the ``redis`` and ``object_store``
transports at 10 MB, 100 MB and 1 GB, against raw Redis SET/GET of the same bytes on the same server.

A private redis-server (no persistence) and a local Ray instance. The learner side publishes from the
driver; the generator side runs in a separate Ray actor process, as in a run: ``fetch`` is
``fetch_payload`` (payload reassembled and its sha256 verified), ``load`` is unpacking it into tensors
and copying them into a resident state dict of the same shapes (what ``load_state_dict`` does; the vLLM
reload adds its own in-place copy on top). Raw Redis moves the same bytes in the same chunk size with
plain SET then GET from the actor, with no hashing: the ceiling of the ``redis`` transport.

    python bench/weight_sync.py [--sizes-mb 10 100 1000] [--repeats 3]

writes ``bench/results/weight_sync.json`` (medians of ``--repeats``) and ``weight_sync.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import RESULTS, write_result

CHUNK_MB = 64


def _state(size_mb: int):
    """fp32 tensors totalling ``size_mb`` MB, in model-like pieces (one large, the rest 4 MB each)."""
    import torch

    total = size_mb * 2**20 // 4
    piece = 2**20  # 4 MB of fp32
    sizes = [piece] * max(0, (total // 2) // piece)
    sizes.append(total - sum(sizes))
    gen = torch.Generator().manual_seed(size_mb)
    return {f"layer.{i}.weight": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray
    import torch

    from services.common.redis_server import EmbeddedRedis, redis_client
    from services.common.weights import ObjectStoreWeightTransport, RedisWeightTransport, pack, unpack

    @ray.remote(num_cpus=1)
    class Generator:
        """The generator side, in its own process."""

        def __init__(self, url: str) -> None:
            self.url = url
            self.redis = RedisWeightTransport(url, "wsync", chunk_mb=CHUNK_MB)
            self.objects = ObjectStoreWeightTransport(url, "wsync")
            self.raw = redis_client(url, socket_timeout_s=600)
            self.resident: dict = {}

        def fetch_and_load(self, transport: str) -> tuple[float, float]:
            t = self.redis if transport == "redis" else self.objects
            snapshot = t.latest()
            started = time.perf_counter()
            payload = t.fetch_payload(snapshot)
            fetched = time.perf_counter()
            tensors = unpack(payload, snapshot.manifest)
            if set(self.resident) != set(tensors):
                self.resident = {k: torch.empty_like(v) for k, v in tensors.items()}
            for k, v in tensors.items():
                self.resident[k].copy_(v)
            return fetched - started, time.perf_counter() - fetched

        def raw_get(self, n_chunks: int) -> float:
            started = time.perf_counter()
            for i in range(n_chunks):
                self.raw.get(f"raw:{i}")
            return time.perf_counter() - started

    server = EmbeddedRedis().start()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        gen = Generator.remote(server.url)
        publishers = {
            "redis": RedisWeightTransport(server.url, "wsync", chunk_mb=CHUNK_MB, keep_versions=1),
            "object_store": ObjectStoreWeightTransport(server.url, "wsync", keep_versions=1),
        }
        raw = redis_client(server.url, socket_timeout_s=600)
        rows = []
        version = 0
        for size in args.sizes_mb:
            state = _state(size)
            payload, _ = pack(state)
            nbytes = len(payload)
            chunk = CHUNK_MB * 2**20
            n_chunks = -(-nbytes // chunk)
            samples: dict[str, list[tuple[float, float, float]]] = {}
            for _ in range(args.repeats):
                for name, transport in publishers.items():
                    version += 1
                    started = time.perf_counter()
                    transport.publish(version, state)
                    publish_s = time.perf_counter() - started
                    fetch_s, load_s = ray.get(gen.fetch_and_load.remote(name))
                    samples.setdefault(name, []).append((publish_s, fetch_s, load_s))
                view = memoryview(payload)
                started = time.perf_counter()
                for i in range(n_chunks):
                    raw.set(f"raw:{i}", view[i * chunk : (i + 1) * chunk])
                set_s = time.perf_counter() - started
                get_s = ray.get(gen.raw_get.remote(n_chunks))
                samples.setdefault("raw_redis", []).append((set_s, get_s, 0.0))
                raw.delete(*[f"raw:{i}" for i in range(n_chunks)])
            mb = nbytes / 1e6
            raw_total = statistics.median(s + g for s, g, _ in samples["raw_redis"])
            for name, vals in samples.items():
                publish_s = statistics.median(v[0] for v in vals)
                fetch_s = statistics.median(v[1] for v in vals)
                load_s = statistics.median(v[2] for v in vals)
                total = statistics.median(sum(v) for v in vals)
                rows.append(
                    {
                        "size_mb": round(mb, 1),
                        "path": name,
                        "publish_s": round(publish_s, 4),
                        "fetch_s": round(fetch_s, 4),
                        "load_s": round(load_s, 4),
                        "total_s": round(total, 4),
                        "mb_per_s": round(mb / total, 1),
                        "time_vs_raw_redis": round(total / raw_total, 2),
                    }
                )
                print(rows[-1])
            del state, payload
            for transport in publishers.values():
                transport.gc(keep=1)
    finally:
        ray.shutdown()
        server.stop()
    out = write_result(
        "weight_sync",
        {"chunk_mb": CHUNK_MB, "repeats": args.repeats, "device": "cpu, loopback Redis", "rows": rows},
    )
    _plot(rows)
    print(f"wrote {out}")


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for path in ("raw_redis", "redis", "object_store"):
        pts = [r for r in rows if r["path"] == path]
        ax.plot([r["size_mb"] for r in pts], [r["mb_per_s"] for r in pts], marker="o", label=path)
    ax.set_xscale("log")
    ax.set_xlabel("snapshot size (MB)")
    ax.set_ylabel("MB/s, publish + fetch + load")
    ax.set_title("weight sync throughput (loopback, 2 cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "weight_sync.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
