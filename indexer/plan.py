"""Comparing what the crawl found with what the library holds: new, changed, moved, deleted, unchanged.

Only a stat is needed for an unchanged file (same size and mtime). A file that appeared while another of the
same size vanished is hashed; if the contents match it is a move or rename, and keeps its vector.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from clipsearch.indexer.crawl import CrawlProblem, FoundFile

from clipsearch.decode import content_hash
from clipsearch.store import FileState


@dataclass
class Plan:
    """The work one `index` run has to do."""

    encode: list[FoundFile] = field(default_factory=list)  # new or changed files
    replaced: dict[str, int] = field(default_factory=dict)  # path of a changed file -> its old id
    moved: list[tuple[int, FoundFile]] = field(default_factory=list)  # (existing id, the file at its new path)
    deleted: list[int] = field(default_factory=list)  # ids whose files are gone from the crawled roots
    unchanged: int = 0
    known_errors: int = 0  # files recorded as bad before and not modified since
    problems: list[CrawlProblem] = field(default_factory=list)
    vanished_errors: list[str] = field(default_factory=list)  # recorded bad files that no longer exist

    @property
    def found(self) -> int:
        return len(self.encode) + len(self.moved) + self.unchanged + self.known_errors

    @property
    def new(self) -> int:
        return len(self.encode) - len(self.replaced)

    @property
    def changed(self) -> int:
        return len(self.replaced)


def make_plan(
    crawled: Iterable[FoundFile | CrawlProblem],
    states: dict[str, FileState],
    error_states: dict[str, tuple[int | None, int | None]],
    roots: list[str],
    hash_file: Callable[[str], str] = content_hash,
) -> Plan:
    """Classify every crawled file against the library's records for the crawled ``roots``."""
    plan = Plan()
    appeared: list[FoundFile] = []
    seen: set[str] = set()
    for item in crawled:
        if isinstance(item, CrawlProblem):
            plan.problems.append(item)
            continue
        seen.add(item.path)
        _classify(item, states, error_states, plan, appeared)
    gone = {p: s for p, s in states.items() if p not in seen and _under(p, roots)}
    _match_moves(appeared, gone, plan, hash_file)
    plan.deleted = sorted(state.id for state in gone.values())
    plan.vanished_errors = [p for p in error_states if p not in seen and _under(p, roots)]
    return plan


def _classify(
    item: FoundFile,
    states: dict[str, FileState],
    error_states: dict[str, tuple[int | None, int | None]],
    plan: Plan,
    appeared: list[FoundFile],
) -> None:
    known = states.get(item.path)
    if known is None:
        if error_states.get(item.path) == (item.size, item.mtime_ns):
            plan.known_errors += 1
        else:
            appeared.append(item)
    elif (known.size, known.mtime_ns) == (item.size, item.mtime_ns):
        plan.unchanged += 1
    else:
        plan.encode.append(item)
        plan.replaced[item.path] = known.id


def _match_moves(
    appeared: list[FoundFile], gone: dict[str, FileState], plan: Plan, hash_file: Callable[[str], str]
) -> None:
    """Pair appeared files with vanished ones of the same size and content; the rest are new."""
    by_size: dict[int, list[str]] = defaultdict(list)
    for path, state in gone.items():
        by_size[state.size].append(path)
    for item in appeared:
        match = _find_same_content(item, by_size.get(item.size, []), gone, hash_file)
        if match is None:
            plan.encode.append(item)
            continue
        by_size[item.size].remove(match)
        plan.moved.append((gone.pop(match).id, item))


def _find_same_content(
    item: FoundFile, candidates: list[str], gone: dict[str, FileState], hash_file: Callable[[str], str]
) -> str | None:
    if not candidates:
        return None
    try:
        digest = hash_file(item.path)
    except OSError:
        return None
    return next((p for p in candidates if gone[p].content_hash == digest), None)


def _under(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)
