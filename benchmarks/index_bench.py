"""Benchmark of clipsearch's FAISS index: recall, latency and size for image-like, text-like and filtered queries.

    python benchmarks/index_bench.py --n 1000000 --dim 512 --queries 1000 --out benchmarks/results/index_1e6.json
    python benchmarks/index_bench.py --n 1000000 --dim 512 --memory-budget-mb 256 --out ...  # bounded build

The index is built through `clipsearch.index.BuildJob` exactly as the library builds it (vectors in a
temporary `VectorStore`, ids 1..N); ground truth comes from an exhaustive `faiss.IndexFlatIP`.

Generated data (when --vectors is not given), seedable with --seed:
* image-like vectors: a mixture of many Gaussian clusters on the sphere. Each vector is
  ``normalise(0.55 * mean + 0.55 * centre_c + 0.45 * B_c z / sqrt(r) + 0.2 * e / sqrt(dim))`` where ``mean`` is a
  direction every image shares (CLIP embeddings sit in a narrow cone: random pairs have cosine ~0.33 here),
  ``centre_c`` one of ``2 sqrt(N)`` random cluster centres with log-normal popularity, ``B_c`` a random
  r = 16-dimensional orthonormal basis per cluster (so each cluster has low-dimensional structure, like real
  embeddings, and nearest neighbours are meaningful: the nearest neighbour sits at cosine ~0.87, the 10th at
  ~0.82) and ``e`` isotropic noise. Image-like queries are fresh draws that are not in the index.
* text-like queries (`clipsearch.index.text_like_queries`): ``normalise(0.85 * g + 0.38 * x + 0.45 * u)`` with
  ``g`` one shared offset direction (the modality gap), ``x`` a fresh image-like point and ``u`` a random unit
  direction; the true top-10 then sits at cosine ~0.3, like CLIP text queries. A separate draw of 390 such
  queries (the size of the built-in caption list) plays the role of the caption embeddings that the library
  passes to `BuildJob` for tuning; the evaluated text queries are never seen by the tuning.

--vectors FILE.npy (float32 N x dim unit rows) replaces the generated vectors: the last --queries rows become
the image-like queries and the rest the library. --text-queries FILE.npy (float32 unit rows from outside the
library) replaces the generated text queries: the first min(390, rows / 2) are passed to the build for
tuning, the rest are evaluated.

Filtered queries: random id subsets keeping 0.1%, 1% and 10% of the library (like a folder or date filter that
is unrelated to content), evaluated against exact search over the subset. recall_at_10_filtered is the worst
of the three for image-like queries (p50_ms_filtered their median latency over all three), the *_filtered_text
fields the same for text-like queries. `results_short` counts queries of either kind that returned fewer than
k results although k photos pass the filter. --switch timing (skip with --no-switch): for subsets of 256 ..
65,536 random ids, the median latency of exact subset scoring and of the id-selector path, and the selector's
recall@10 against the exact answer.

Memory (--memory-budget-mb, in MiB; default: the library's default budget, half the machine's memory): the
build gets that budget and goes on disk, in shards, when the index does not fit it (`on_disk`, `ivfdata_bytes`,
the lists file written to the run's temporary folder). While `BuildJob.run` runs, a background thread reads
/proc/self/status every 10 ms: `peak_anon_mb` is the largest RssAnon seen (the memory the build allocated; the
memory-mapped vectors, training sample and lists are file-backed pages the kernel can drop), `peak_rss_mb` the
kernel's own high-water mark VmHWM, reset just before the build (it also counts those file pages while they are
cached). `rss_before_build_mb` and `anon_before_build_mb` are the process (interpreter, numpy, faiss, the
queries) just before the build. MB in these fields means MiB.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipsearch.index import BuildJob, VectorIndex, text_like_queries  # noqa: E402
from clipsearch.vectors import VectorStore  # noqa: E402

K = 10
CAPTION_QUERIES = 390
SELECTIVITIES = (0.001, 0.01, 0.1)
SWITCH_ROWS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
CHUNK = 65536
SWITCH_QUERIES = 200


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class ClusteredSphere:
    """The generator described in the module docstring."""

    def __init__(self, dim: int, clusters: int, seed: int, rank: int = 16) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.clusters, self.rank = dim, clusters, rank
        self.mean = unit_rows(rng.standard_normal((1, dim)))[0]
        self.gap = unit_rows(rng.standard_normal((1, dim)))[0]
        self.centres = unit_rows(rng.standard_normal((clusters, dim)))
        self.bases = np.linalg.qr(rng.standard_normal((clusters, dim, rank)))[0].astype(np.float32)
        popularity = rng.lognormal(0.0, 0.7, clusters)
        self.popularity = popularity / popularity.sum()

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        labels = rng.choice(self.clusters, n, p=self.popularity)
        z = rng.standard_normal((n, self.rank)).astype(np.float32) / np.sqrt(self.rank)
        local = np.empty((n, self.dim), dtype=np.float32)
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        for group in np.split(order, bounds):  # one matrix product per cluster
            local[group] = z[group] @ self.bases[labels[group[0]]].T
        noise = rng.standard_normal((n, self.dim)).astype(np.float32) / np.sqrt(self.dim)
        return unit_rows(0.55 * self.mean + 0.55 * self.centres[labels] + 0.45 * local + 0.2 * noise)

    def text(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return text_like_queries(self.sample(n, rng), rng, offset=self.gap)


def write_generated(store: VectorStore, args: argparse.Namespace) -> dict[str, np.ndarray]:
    clusters = args.clusters or max(16, int(2 * np.sqrt(args.n)))
    generator = ClusteredSphere(args.dim, clusters, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    for start in range(0, args.n, CHUNK):
        count = min(CHUNK, args.n - start)
        store.write(np.arange(start + 1, start + 1 + count), generator.sample(count, rng))
    queries = {"image": generator.sample(args.queries, rng), "text": generator.text(args.queries, rng),
               "captions": generator.text(CAPTION_QUERIES, rng)}
    if args.text_queries:
        queries.update(split_text_file(args.text_queries, args.seed))
    return queries


def write_given(store: VectorStore, args: argparse.Namespace) -> dict[str, np.ndarray]:
    vectors = np.load(args.vectors, mmap_mode="r")
    args.n = len(vectors) - args.queries
    for start in range(0, args.n, CHUNK):
        stop = min(start + CHUNK, args.n)
        store.write(np.arange(start + 1, stop + 1), np.asarray(vectors[start:stop], dtype=np.float32))
    queries = {"image": np.asarray(vectors[args.n :], dtype=np.float32)}
    if args.text_queries:
        queries.update(split_text_file(args.text_queries, args.seed))
    else:  # no text embeddings at hand: synthesise them from the file's own held-out rows
        rng = np.random.default_rng(args.seed)
        queries["text"] = text_like_queries(queries["image"], rng)
        queries["captions"] = text_like_queries(queries["image"][: CAPTION_QUERIES], rng)
    return queries


def split_text_file(path: str, seed: int) -> dict[str, np.ndarray]:
    rows = np.load(path).astype(np.float32)
    np.random.default_rng(seed).shuffle(rows)
    tuning = min(CAPTION_QUERIES, len(rows) // 2)
    return {"captions": rows[:tuning], "text": rows[tuning:]}


def flat_ground_truth(store: VectorStore, n: int) -> object:
    import faiss

    flat = faiss.IndexFlatIP(store.dim)
    for _, vectors in store.iter_chunks(np.arange(1, n + 1), CHUNK):
        flat.add(vectors)
    return flat


def exact_top_k(flat: object, queries: np.ndarray) -> np.ndarray:
    _, rows = flat.search(queries, K)  # type: ignore[attr-defined]
    return np.where(rows >= 0, rows + 1, -1)  # flat rows are 0-based, ids start at 1


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    pairs = zip(found, truth, strict=True)
    hits = [len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in pairs]
    return float(np.mean(hits))


def timed_single_queries(run, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run each query alone; returns (ids per query, latency ms per query)."""
    found, latency = [], []
    for query in queries:
        start = time.perf_counter()
        _, ids = run(query[None, :])
        latency.append((time.perf_counter() - start) * 1000)
        found.append(ids[0])
    return np.array(found), np.array(latency)


def latency_fields(latency: np.ndarray, suffix: str = "") -> dict[str, float]:
    return {f"p50_ms{suffix}": round(float(np.percentile(latency, 50)), 3),
            f"p99_ms{suffix}": round(float(np.percentile(latency, 99)), 3)}


def measure_kind(index: VectorIndex, flat: object, queries: np.ndarray, kind: str) -> dict:
    truth = exact_top_k(flat, queries)
    found, latency = timed_single_queries(lambda q: index.search(q, K, kind=kind), queries)
    suffix = "" if kind == "image" else "_text"
    return {f"recall_at_10{suffix}": round(recall(found, truth), 4), **latency_fields(latency, suffix)}


def measure_flat_baseline(flat: object, queries: np.ndarray) -> dict[str, float]:
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # faster than 2 threads for one query on this machine
    _, latency = timed_single_queries(lambda q: flat.search(q, K), queries)  # type: ignore[attr-defined]
    faiss.omp_set_num_threads(threads)
    return {"flat_p50_ms": round(float(np.percentile(latency, 50)), 3)}


def measure_filtered(index: VectorIndex, store: VectorStore, queries: dict[str, np.ndarray], n: int,
                     seed: int) -> dict:
    """Image-like queries give recall_at_10_filtered and p50_ms_filtered; text-like ones the *_text fields."""
    rng = np.random.default_rng(seed + 7)
    detail: dict[str, dict] = {}
    worst = {"image": 1.0, "text": 1.0}
    latencies: dict[str, list[np.ndarray]] = {"image": [], "text": []}
    short = 0
    for selectivity in SELECTIVITIES:
        allowed = np.sort(rng.choice(np.arange(1, n + 1), max(1, int(n * selectivity)), replace=False))
        detail[str(selectivity)] = {"allowed": len(allowed)}
        for kind in ("image", "text"):
            row = measure_subset(index, store, queries[kind], allowed, kind)
            detail[str(selectivity)][kind] = row
            worst[kind] = min(worst[kind], row["recall_at_10"])
            latencies[kind].append(row.pop("_latency"))
            short += row["results_short"]
    result: dict = {}
    for kind, suffix in (("image", ""), ("text", "_text")):
        latency = np.concatenate(latencies[kind])
        result[f"recall_at_10_filtered{suffix}"] = worst[kind]
        result[f"p50_ms_filtered{suffix}"] = round(float(np.percentile(latency, 50)), 3)
        result[f"p99_ms_filtered{suffix}"] = round(float(np.percentile(latency, 99)), 3)
    return {**result, "results_short": short, "filtered": detail}


def measure_subset(index: VectorIndex, store: VectorStore, queries: np.ndarray, allowed: np.ndarray,
                   kind: str) -> dict:
    vectors = store.get(allowed)
    scores = queries @ vectors.T
    best = np.argpartition(-scores, min(K, len(allowed)) - 1, axis=1)[:, :K]
    order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1)
    truth = allowed[np.take_along_axis(best, order, axis=1)]
    found, latency = timed_single_queries(
        lambda q: index.search(q, K, kind=kind, allowed_ids=allowed), queries)
    short = int(np.sum((found >= 0).sum(axis=1) < min(K, len(allowed))))
    return {"recall_at_10": round(recall(found, truth), 4), **latency_fields(latency),
            "results_short": short, "_latency": latency}


def measure_switch_point(index: VectorIndex, queries: np.ndarray, n: int, seed: int) -> list[dict]:
    """Latency of exact subset scoring vs the FAISS id-selector path for several subset sizes."""
    rng = np.random.default_rng(seed + 11)
    saved, rows = index.params.exact_subset_max, []
    for size in (s for s in SWITCH_ROWS if s < n):
        allowed = np.sort(rng.choice(np.arange(1, n + 1), size, replace=False))
        row: dict[str, float] = {"rows": size}
        found = {}
        for path, limit in (("exact", n + 1), ("selector", 0)):
            index.params.exact_subset_max = limit
            found[path], latency = timed_single_queries(
                lambda q, a=allowed: index.search(q, K, allowed_ids=a), queries[:SWITCH_QUERIES])
            row[f"{path}_ms"] = round(float(np.median(latency)), 3)
        row["selector_recall_at_10"] = round(recall(found["selector"], found["exact"]), 4)
        rows.append(row)
    index.params.exact_subset_max = saved
    return rows


class MemorySampler:
    """Largest RssAnon and VmRSS of this process while the block runs, plus the kernel's VmHWM (reset first)."""

    FIELDS = ("VmRSS", "RssAnon", "VmHWM")

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.before: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self.before = read_status()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.peak = dict(self.before)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        for key, value in read_status().items():
            self.peak[key] = max(self.peak.get(key, 0.0), value)

    def fields(self) -> dict[str, float]:
        return {"peak_rss_mb": round(max(self.peak["VmHWM"], self.peak["VmRSS"]), 1),
                "peak_anon_mb": round(self.peak["RssAnon"], 1),
                "rss_before_build_mb": round(self.before["VmRSS"], 1),
                "anon_before_build_mb": round(self.before["RssAnon"], 1)}


def read_status() -> dict[str, float]:
    """VmRSS, RssAnon and VmHWM of this process in MiB, from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in MemorySampler.FIELDS:
            values[key] = int(rest.split()[0]) / 1024  # the file says kB, meaning KiB
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clusters", type=int, default=0, help="default: 2 * sqrt(N)")
    parser.add_argument("--vectors", help="float32 .npy of unit rows to use instead of generated data")
    parser.add_argument("--text-queries", help="float32 .npy of text-like unit rows from outside the library")
    parser.add_argument("--no-switch", action="store_true", help="skip the exact/selector switch-point timing")
    parser.add_argument("--memory-budget-mb", type=float,
                        help="memory budget of the build in MiB (default: half the machine's memory)")
    args = parser.parse_args()
    print(json.dumps(run(args), indent=2))


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-") as folder:
        if args.vectors:
            args.dim = np.load(args.vectors, mmap_mode="r").shape[1]
        store = VectorStore(Path(folder) / "vectors", args.dim)
        queries = write_given(store, args) if args.vectors else write_generated(store, args)
        ids = np.arange(1, args.n + 1)
        budget = int(args.memory_budget_mb * 2**20) if args.memory_budget_mb else None
        start = time.perf_counter()
        with MemorySampler() as memory:
            index = BuildJob(store, ids, text_queries=queries["captions"], seed=args.seed,
                             progress=lambda message: print(message, file=sys.stderr, flush=True),
                             memory_budget_bytes=budget, folder=Path(folder) / "index").run()
        result = {"n": args.n, "dim": args.dim, "queries": args.queries, "seed": args.seed,
                  "index": index.params.factory, "build_s": round(time.perf_counter() - start, 1),
                  "memory_budget_mb": args.memory_budget_mb, **memory.fields(),
                  "on_disk": index.on_disk, "ivfdata_bytes": index.ivfdata_bytes()}
        result.update(measure_all(index, store, queries, args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def measure_all(index: VectorIndex, store: VectorStore, queries: dict[str, np.ndarray],
                args: argparse.Namespace) -> dict:
    print("measuring", file=sys.stderr, flush=True)
    flat = flat_ground_truth(store, args.n)
    result = measure_kind(index, flat, queries["image"], "image")
    start = time.perf_counter()
    index.search(queries["image"], K, kind="image")
    result["qps_batch"] = round(len(queries["image"]) / (time.perf_counter() - start), 1)
    result["bytes_per_vector"] = round((index.serialized_bytes() + index.ivfdata_bytes()) / args.n, 1)
    result.update(measure_flat_baseline(flat, queries["image"][:200]))
    result.update(measure_kind(index, flat, queries["text"], "text"))
    del flat  # free the 4 bytes x dim x N ground-truth copy before the filtered runs
    result.update(measure_filtered(index, store, queries, args.n, args.seed))
    if index.params.kind != "flat" and not args.no_switch:
        result["switch_point"] = measure_switch_point(index, queries["image"], args.n, args.seed)
    result["params"] = index.describe()
    result["machine"] = {"cpus": len(__import__("os").sched_getaffinity(0)), "python": platform.python_version()}
    return result


if __name__ == "__main__":
    main()
