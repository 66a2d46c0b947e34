"""Walking the user's folders: which files are images, each with the one stat it costs.

`crawl()` yields a `FoundFile` for every image file and a `CrawlProblem` for anything that should have
been indexed but cannot be (a broken link, a loop, an unreadable folder, a name that is not UTF-8 ...), and
goes on.
It never opens a file: re-crawling an unchanged tree of 100,000 files costs 100,000 `stat` calls and nothing
more, which is what keeps a second `clipsearch index` fast.

Order is deterministic: each folder's entries are visited sorted by name (its files, then its subfolders).
Folders reached through a symbolic link are walked last, after every real folder of every root, so a photo
that is reachable both directly and through a link (a "Favourites" link farm) keeps its real path.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from clipsearch.decode import heif_available  # noqa: F401  (re-exported: what decodes HEIF)
from clipsearch.raw import RAW_EXTENSIONS

BASE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# .hif: what Canon and Sony cameras call their HEIF files.
HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif", ".avif"})
# Every kind the decoder knows, whatever is installed: a HEIC file on a machine without pillow-heif (or a RAW
# without rawpy) is recorded with the reason and what to install, never skipped in silence.
IMAGE_EXTENSIONS: frozenset[str] = BASE_EXTENSIONS | HEIF_EXTENSIONS | RAW_EXTENSIONS

NON_UTF8_FILE = "the name is not valid UTF-8; rename it to index it"
NON_UTF8_FOLDER = "the folder name is not valid UTF-8; rename it to index the images inside"


@dataclass(frozen=True)
class FoundFile:
    """An image file to index; `path` is absolute and keeps the user's symlinks (its identity)."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class CrawlProblem:
    """Something that looks like an image but cannot be indexed; `path` is always printable UTF-8."""

    path: str
    reason: str


CrawlResult = FoundFile | CrawlProblem


def crawl(
    roots: Iterable[str | os.PathLike[str]],
    *,
    exclude: Sequence[str] = (),
    include_hidden: bool = False,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
) -> Iterator[CrawlResult]:
    """Yield every image file under `roots` (folders or single files) and every problem met on the way.

    `exclude` holds fnmatch globs matched against both an entry's name and its full path ("@eaDir",
    "*.tmp.jpg", "*/thumbnails/*"); a matching folder is not entered. Hidden names (starting with ".") are
    skipped unless `include_hidden`. Extensions are compared case-insensitively.
    """
    paths = [_normalise(root) for root in roots]
    walker = _Walker(
        extensions=frozenset(extension.lower() for extension in extensions),
        include_hidden=include_hidden,
        excluded=_compile_globs(exclude),
        root_files={path for path in paths if os.path.isfile(path)},
    )
    for path in paths:
        yield from walker.walk_root(path)
    yield from walker.walk_linked_folders()


def printable(path: str) -> str:
    """`path` as valid UTF-8 text: undecodable bytes (kept by Python as surrogates) become `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _normalise(root: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.path.expanduser(os.fsdecode(root)))


def _compile_globs(globs: Sequence[str]) -> re.Pattern[str] | None:
    # One regular expression for all globs: three matches per entry instead of 3 × len(globs).
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in globs))


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.scandir keeps undecodable bytes as lone surrogates
        return False
    return True


@dataclass
class _Walker:
    extensions: frozenset[str]
    include_hidden: bool
    excluded: re.Pattern[str] | None
    root_files: set[str]
    visited_folders: set[tuple[int, int]] = field(default_factory=set)
    yielded_root_files: set[str] = field(default_factory=set)
    linked_folders: deque[str] = field(default_factory=deque)

    def walk_root(self, path: str) -> Iterator[CrawlResult]:
        if not _is_utf8(path):
            yield CrawlProblem(printable(path), "the path is not valid UTF-8; rename it to index it")
            return
        try:
            info = os.stat(path)
        except OSError as error:
            yield CrawlProblem(printable(path), _root_reason(error))
            return
        if stat.S_ISDIR(info.st_mode):
            yield from self._walk_tree(path, info)
        elif path not in self.yielded_root_files:
            self.yielded_root_files.add(path)
            yield from self._root_file(path, info)

    def walk_linked_folders(self) -> Iterator[CrawlResult]:
        """Walk the folders reached through symbolic links, once each; links found meanwhile queue up too."""
        while self.linked_folders:
            link = self.linked_folders.popleft()
            try:
                info = os.stat(link)
            except OSError as error:
                yield CrawlProblem(printable(link), _entry_reason(error, "folder"))
                continue
            if (info.st_dev, info.st_ino) in self.visited_folders:
                yield from _loop_problem(link)
            else:
                yield from self._walk_tree(link, info)

    def _root_file(self, path: str, info: os.stat_result) -> Iterator[CrawlResult]:
        if not self._has_image_extension(path):
            yield CrawlProblem(printable(path), "not an image file: clipsearch does not index this extension")
        elif not stat.S_ISREG(info.st_mode):
            yield CrawlProblem(printable(path), _not_regular_reason(info.st_mode))
        else:
            yield FoundFile(path, info.st_size, info.st_mtime_ns)

    def _walk_tree(self, top: str, info: os.stat_result) -> Iterator[CrawlResult]:
        # An explicit stack, not recursion: a tree nested 2,000 deep must not hit the recursion limit.
        if not self._first_visit(info):
            return
        stack = [top]
        while stack:
            subfolders = yield from self._scan_folder(stack.pop())
            stack.extend(reversed(subfolders))

    def _first_visit(self, info: os.stat_result) -> bool:
        key = (info.st_dev, info.st_ino)
        if key in self.visited_folders:
            return False
        self.visited_folders.add(key)
        return True

    def _scan_folder(self, folder: str) -> Generator[CrawlResult, None, list[str]]:
        """Yield the folder's files and problems; return its subfolders still to walk, sorted."""
        try:
            with os.scandir(folder) as scanner:
                entries = sorted(scanner, key=lambda entry: entry.name)
        except OSError as error:
            yield CrawlProblem(printable(folder), _entry_reason(error, "folder"))
            return []
        subfolders: list[str] = []
        for entry in entries:
            if self._skipped(entry):
                continue
            result = self._visit(entry, subfolders)
            if result is not None:
                yield result
        return subfolders

    def _skipped(self, entry: os.DirEntry[str]) -> bool:
        if entry.name.startswith(".") and not self.include_hidden:
            return True
        if entry.path in self.root_files:  # yielded once, when its own root comes
            return True
        if self.excluded is None:
            return False
        # The trailing separator lets "*/thumbs/*" prune the folder itself, not just every file inside.
        candidates = (entry.name, entry.path, entry.path + os.sep)
        return any(self.excluded.match(candidate) for candidate in candidates)

    def _visit(self, entry: os.DirEntry[str], subfolders: list[str]) -> CrawlResult | None:
        try:
            is_folder = entry.is_dir()  # follows symbolic links; free (d_type) for everything else
        except OSError as error:  # a link loop, a path too long to stat
            if error.errno == errno.ELOOP or self._has_image_extension(entry.name):
                return CrawlProblem(printable(entry.path), _entry_reason(error, "file"))
            return None
        if is_folder:
            return self._enter_folder(entry, subfolders)
        return self._check_file(entry)

    def _enter_folder(self, entry: os.DirEntry[str], subfolders: list[str]) -> CrawlProblem | None:
        if not _is_utf8(entry.name):
            return CrawlProblem(printable(entry.path), NON_UTF8_FOLDER)
        if entry.is_symlink():
            self.linked_folders.append(entry.path)
            return None
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError as error:
            return CrawlProblem(printable(entry.path), _entry_reason(error, "folder"))
        if self._first_visit(info):
            subfolders.append(entry.path)
        return None

    def _check_file(self, entry: os.DirEntry[str]) -> CrawlResult | None:
        if not self._has_image_extension(entry.name):
            return None
        if not _is_utf8(entry.name):
            return CrawlProblem(printable(entry.path), NON_UTF8_FILE)
        try:
            info = entry.stat()
        except FileNotFoundError:
            if entry.is_symlink():
                return CrawlProblem(printable(entry.path), "broken symbolic link: its target does not exist")
            return None  # deleted while we were looking: nothing to index, nothing to report
        except OSError as error:
            return CrawlProblem(printable(entry.path), _entry_reason(error, "file"))
        if not stat.S_ISREG(info.st_mode):
            return CrawlProblem(printable(entry.path), _not_regular_reason(info.st_mode))
        return FoundFile(entry.path, info.st_size, info.st_mtime_ns)

    def _has_image_extension(self, name: str) -> bool:
        return os.path.splitext(name)[1].lower() in self.extensions


def _loop_problem(link: str) -> Iterator[CrawlProblem]:
    """A linked folder seen before is a loop when it is one of the link's own ancestors, else a duplicate."""
    target = os.path.realpath(link)
    parent = os.path.realpath(os.path.dirname(link))
    if os.path.commonpath([target, parent]) == target:
        yield CrawlProblem(
            printable(link), "symbolic link loop: the link points back to a folder that contains it"
        )


def _root_reason(error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return "the path does not exist"
    return _entry_reason(error, "path")


def _entry_reason(error: OSError, what: str) -> str:
    if isinstance(error, PermissionError):
        return f"permission denied: the {what} cannot be read"
    if error.errno == errno.ELOOP:
        return "symbolic link loop: the link leads back to itself"
    if error.errno == errno.ENAMETOOLONG:
        length = len(os.fsencode(error.filename or ""))
        return f"the path is too long for the operating system ({length} bytes); move it to a shorter path"
    if isinstance(error, FileNotFoundError):
        return f"the {what} vanished while the folder was being read"
    return f"the {what} cannot be read ({error.strerror or error})"


_FILE_KINDS = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _not_regular_reason(mode: int) -> str:
    kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a plain file")
    return f"not a regular file (it is {kind}); only regular files are indexed"
