"""Make the library folders under tests/data/old-libraries/, which tests/test_old_libraries.py opens and searches.

They were made once, by the clipsearch of the commit named in tests/data/README.md, and are kept as they were
written: they stand for libraries people already have on disk. Do not regenerate them with newer code (that would
defeat their purpose); add a new folder instead when the format changes.

    python tests/data/make_old_libraries.py tests/data/old-libraries

* ``photos``: the 71 sample photos of data/photos indexed from /tmp/clipsearch-old/photos with the tiny trained
  model (copied to /tmp/clipsearch-old/tiny-clip), as `clipsearch index` does: a flat index.
* ``ondisk``: 3,000 clustered 32-d vectors committed the way the indexer commits them, with an index built under a
  small memory budget: IVF-PQ with its lists in an .ivfdata file.

Each folder has ``queries.npy`` (the query vectors) and ``expected.json`` (what searching them returned).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
STAGE = Path("/tmp/clipsearch-old")
DIM = 32
N = 3000
BUDGET = 300_000  # bytes: too small for these lists in RAM, so they go to an .ivfdata file


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, seed: int) -> np.ndarray:
    centres = unit_rows(np.random.default_rng(42).standard_normal((64, DIM)) * np.r_[np.ones(DIM - 2), 0, 0])
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, DIM)) * np.r_[np.ones(DIM - 2), 0, 0]
    return unit_rows(centres[rng.integers(len(centres), size=n)] + 0.5 * unit_rows(noise))


def text_like(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gap = np.eye(DIM, dtype=np.float32)[-1]
    return unit_rows(0.85 * gap + 0.38 * clustered(n, seed) + 0.45 * unit_rows(rng.standard_normal((n, DIM))))


def results(found: list) -> list[dict]:
    return [{"id": r.id, "path": r.path, "score": r.score} for r in found]


def make_photos(out: Path) -> None:
    from clipsearch import Library, Searcher, index_folders
    from clipsearch.model import ClipModel, ModelSpec
    from clipsearch.store import Filters

    shutil.rmtree(STAGE, ignore_errors=True)
    shutil.copytree(REPO / "data" / "photos", STAGE / "photos")
    shutil.copytree(REPO / "data" / "tiny-clip", STAGE / "tiny-clip")
    spec = ModelSpec.parse(f"local-dir:{STAGE / 'tiny-clip'}")
    library = Library.create(out)
    index_folders(library, [STAGE / "photos"], model=spec)
    library.close()
    texts = ["a red circle", "a blue square", "a green triangle", "a yellow star", "something purple"]
    queries = ClipModel.load(spec, "cpu").encode_texts(texts)
    np.save(out / "queries.npy", queries)
    searcher = Searcher(out)
    expected = {
        "texts": texts,
        "text": [results(searcher.search_vector(q, 5, kind="text")) for q in queries],
        "red_folder": [results(searcher.search_vector(q, 5, kind="text",
                                                      filters=Filters(folder=str(STAGE / "photos" / "red"))))
                       for q in queries],
        "similar": {str(i): results(searcher.similar(i, k=5)) for i in (1, 20, 40)},
        "index": json.loads((out / "index" / "index.json").read_text()),
    }
    searcher.close()
    (out / "expected.json").write_text(json.dumps(expected, indent=1))


def make_ondisk(out: Path) -> None:
    from clipsearch import Library, Searcher
    from clipsearch.model import ModelSpec
    from clipsearch.sync import refresh_index

    library = Library.create(out)
    library.bind_model(ModelSpec.parse("local-dir:/models/test"), DIM)
    vectors = clustered(N, seed=0)
    with library.store.transaction() as conn:
        ids = library.store.reserve_ids(len(vectors), conn)
        library.vectors().write(np.array(ids), vectors)
        rows = [{"id": i, "path": f"/photos/{i % 7}/{i}.jpg", "size": 1, "mtime_ns": 1, "content_hash": str(i)}
                for i in ids]
        library.store.insert_images(rows, conn)
    index = refresh_index(library, lambda captions: text_like(len(captions), seed=len(captions)),
                          memory_budget_bytes=BUDGET)
    assert index is not None and index.on_disk and index.params.kind == "ivfpq", index and index.describe()
    library.close()
    queries = np.concatenate([clustered(20, seed=1), text_like(20, seed=2)])
    np.save(out / "queries.npy", queries)
    searcher = Searcher(out)
    from clipsearch.store import Filters

    expected = {
        "image": [results(searcher.search_vector(q, 10, kind="image")) for q in queries[:20]],
        "text": [results(searcher.search_vector(q, 10, kind="text")) for q in queries[20:]],
        "folder_3": [results(searcher.search_vector(q, 10, kind="text", filters=Filters(folder="/photos/3")))
                     for q in queries[20:]],
        "index": json.loads((out / "index" / "index.json").read_text()),
    }
    searcher.close()
    (out / "expected.json").write_text(json.dumps(expected, indent=1))


def main() -> None:
    target = Path(sys.argv[1])
    for name, make in (("photos", make_photos), ("ondisk", make_ondisk)):
        if (target / name).exists():
            raise SystemExit(f"{target / name} exists; these libraries are made once (see the docstring).")
        make(target / name)
        for leftover in ("writer.lock", "library.db-wal", "library.db-shm"):
            (target / name / leftover).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
