"""Progress bars for `clipsearch index`, on stderr (stdout is kept for results and --json)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

# tqdm's own layout, with the time left labelled: "encoding  42%|████   | 420/1000 [00:31, 13.5 img/s, ETA 00:43]"
ENCODING_BAR = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}, ETA {remaining}{postfix}]"


class IndexProgress:
    """Receives the pipeline's progress events and draws: files found, then images encoded with rate and ETA."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None
        self._crawl: tqdm | None = None

    def __enter__(self) -> IndexProgress:
        return self

    def __exit__(self, *_exc: object) -> None:
        for bar in (self._crawl, self._bar):
            if bar is not None:
                bar.close()

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{event}", None)
        if handler is not None:
            handler(info)

    def _on_crawling(self, info: dict[str, Any]) -> None:
        if self._crawl is None:
            self._crawl = tqdm(desc="finding files", unit=" files", file=sys.stderr, leave=False)
        self._crawl.update(info["found"] - self._crawl.n)

    def _on_planned(self, info: dict[str, Any]) -> None:
        if self._crawl is not None:
            self._crawl.close()
            self._crawl = None
        plan = info["plan"]
        tqdm.write(
            f"Found {plan.found} images: {plan.new} new, {plan.changed} changed, {len(plan.moved)} moved, "
            f"{len(plan.deleted)} removed, {plan.unchanged} unchanged.",
            file=sys.stderr,
        )

    def _on_model(self, info: dict[str, Any]) -> None:
        tqdm.write(info["message"], file=sys.stderr)  # the export and the probe: once per machine and model

    def _on_encoding(self, info: dict[str, Any]) -> None:
        self._bar = tqdm(
            total=info["total"],
            desc="encoding",
            unit=" img",
            file=sys.stderr,
            dynamic_ncols=True,
            bar_format=ENCODING_BAR,
        )

    def _on_batch(self, info: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(info["size"])
            self._bar.set_postfix(errors=info["errors"], refresh=False)

    def _on_index(self, info: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        tqdm.write(info["message"], file=sys.stderr)
