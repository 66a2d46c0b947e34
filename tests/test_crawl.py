"""crawl(): which files are found, which are reported, and that odd file systems never stop or loop it."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pytest
from clipsearch.indexer.crawl import (
    BASE_EXTENSIONS,
    IMAGE_EXTENSIONS,
    CrawlProblem,
    FoundFile,
    crawl,
)
from hostile import (
    OK,
    PATH_MAX,
    SKIPPED,
    call_unprivileged,
    jpeg_bytes,
    make_deep_file,
    make_hostile_corpus,
    make_non_utf8_file,
    one_by_one_png_bytes,
    restore_permissions,
    traversable_tmpdir,
    write,
)

JPEG = jpeg_bytes()


def found(results: Iterable[FoundFile | CrawlProblem], root: Path) -> list[str]:
    """Relative paths of the files found, in crawl order."""
    return [os.path.relpath(item.path, root) for item in results if isinstance(item, FoundFile)]


def problems(results: Iterable[FoundFile | CrawlProblem], root: Path) -> dict[str, str]:
    return {
        os.path.relpath(item.path, root): item.reason for item in results if isinstance(item, CrawlProblem)
    }


def touch_all(root: Path, names: Iterable[str]) -> None:
    for name in names:
        write(root / name, JPEG)


# --- what counts as an image --------------------------------------------------------------------------------


def test_finds_images_recursively_with_any_case_of_extension(tmp_path: Path) -> None:
    touch_all(tmp_path, ["a.jpg", "b.JPEG", "c.Png", "sub/d.webp", "sub/deeper/e.TIFF", "f.jpe", "g.gif"])
    touch_all(tmp_path, ["notes.txt", "movie.mp4", "sub/raw.cr2", "h.HIF", "no_extension"])
    results = list(crawl([tmp_path]))
    assert sorted(found(results, tmp_path)) == sorted(
        ["a.jpg", "b.JPEG", "c.Png", "f.jpe", "g.gif", "h.HIF", "sub/d.webp", "sub/deeper/e.TIFF", "sub/raw.cr2"]
    )
    assert problems(results, tmp_path) == {}


def test_found_file_has_absolute_path_size_and_mtime(tmp_path: Path) -> None:
    photo = write(tmp_path / "photo.jpg", JPEG)
    os.utime(photo, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    (item,) = crawl([str(tmp_path)])
    assert item == FoundFile(str(photo), len(JPEG), 1_600_000_000_123_456_789)
    assert os.path.isabs(item.path)


def test_heif_and_raw_files_are_always_crawled() -> None:
    # Whatever is installed: a file the decoder cannot read is recorded with the reason, never skipped silently.
    assert BASE_EXTENSIONS <= IMAGE_EXTENSIONS
    assert all(extension == extension.lower() and extension.startswith(".") for extension in IMAGE_EXTENSIONS)
    assert {".heic", ".heif", ".hif", ".avif", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf"} <= IMAGE_EXTENSIONS


def test_custom_extensions_are_case_insensitive_too(tmp_path: Path) -> None:
    touch_all(tmp_path, ["a.jpg", "b.PNG"])
    assert found(crawl([tmp_path], extensions=frozenset({".PNG"})), tmp_path) == ["b.PNG"]


def test_order_is_sorted_per_folder_files_first(tmp_path: Path) -> None:
    touch_all(tmp_path, ["b.jpg", "a.jpg", "z/y.jpg", "m/x.jpg", "m/a.jpg", "c.jpg"])
    expected = ["a.jpg", "b.jpg", "c.jpg", "m/a.jpg", "m/x.jpg", "z/y.jpg"]
    assert found(crawl([tmp_path]), tmp_path) == expected
    assert found(crawl([tmp_path]), tmp_path) == expected  # and the same again


def test_spaces_and_non_ascii_names(tmp_path: Path) -> None:
    names = ["my holiday/beach at dusk.jpg", "Ünïcödé/café ☕.png", "日本/写真 1.jpeg", "emoji 📷.webp"]
    touch_all(tmp_path, names)
    assert sorted(found(crawl([tmp_path]), tmp_path)) == sorted(names)


# --- hidden files and excludes ------------------------------------------------------------------------------


def test_hidden_files_and_folders_are_skipped_by_default(tmp_path: Path) -> None:
    touch_all(tmp_path, ["shown.jpg", ".hidden.jpg", ".cache/inside.jpg", "sub/.thumb.jpg"])
    assert found(crawl([tmp_path]), tmp_path) == ["shown.jpg"]


def test_hidden_files_and_folders_are_included_with_the_flag(tmp_path: Path) -> None:
    touch_all(tmp_path, ["shown.jpg", ".hidden.jpg", ".cache/inside.jpg", "sub/.thumb.jpg"])
    assert sorted(found(crawl([tmp_path], include_hidden=True), tmp_path)) == sorted(
        [".cache/inside.jpg", ".hidden.jpg", "shown.jpg", "sub/.thumb.jpg"]
    )


def test_a_hidden_root_given_explicitly_is_crawled(tmp_path: Path) -> None:
    touch_all(tmp_path, [".photos/a.jpg"])
    assert found(crawl([tmp_path / ".photos"]), tmp_path) == [".photos/a.jpg"]


def test_excludes_match_names_and_full_paths(tmp_path: Path) -> None:
    touch_all(
        tmp_path,
        ["keep.jpg", "draft.tmp.jpg", "@eaDir/x.jpg", "a/@eaDir/y.jpg", "a/thumbnails/t.jpg", "a/keep.png"],
    )
    results = crawl([tmp_path], exclude=["*.tmp.jpg", "@eaDir", "*/thumbnails/*"])
    assert sorted(found(results, tmp_path)) == ["a/keep.png", "keep.jpg"]


def test_an_excluded_folder_is_not_entered(tmp_path: Path) -> None:
    # Were it entered, its broken link would be reported.
    os.makedirs(tmp_path / "cache")
    os.symlink("missing.jpg", tmp_path / "cache" / "broken.jpg")
    assert list(crawl([tmp_path], exclude=["cache"])) == []
    assert list(crawl([tmp_path], exclude=[f"{tmp_path}/cache"])) == []


# --- roots --------------------------------------------------------------------------------------------------


def test_a_root_that_is_an_image_file_is_yielded(tmp_path: Path) -> None:
    photo = write(tmp_path / "one.jpg", JPEG)
    assert [item.path for item in crawl([photo])] == [str(photo)]


def test_a_root_file_that_is_not_an_image_is_reported(tmp_path: Path) -> None:
    notes = write(tmp_path / "notes.txt", b"hello")
    (problem,) = crawl([notes])
    assert isinstance(problem, CrawlProblem) and "not an image" in problem.reason


def test_a_missing_root_is_reported_and_the_others_still_crawled(tmp_path: Path) -> None:
    touch_all(tmp_path, ["real/a.jpg"])
    results = list(crawl([tmp_path / "gone", tmp_path / "real"]))
    assert problems(results, tmp_path) == {"gone": "the path does not exist"}
    assert found(results, tmp_path) == ["real/a.jpg"]


def test_overlapping_and_repeated_roots_yield_each_file_once(tmp_path: Path) -> None:
    touch_all(tmp_path, ["top.jpg", "inner/a.jpg", "inner/b.jpg"])
    roots = [
        tmp_path / "inner",
        tmp_path,
        tmp_path / "inner" / "a.jpg",
        tmp_path,
        tmp_path / "inner" / "a.jpg",
    ]
    assert sorted(found(crawl(roots), tmp_path)) == ["inner/a.jpg", "inner/b.jpg", "top.jpg"]


def test_relative_roots_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch_all(tmp_path, ["sub/a.jpg"])
    monkeypatch.chdir(tmp_path)
    assert [item.path for item in crawl(["sub"])] == [str(tmp_path / "sub" / "a.jpg")]


# --- symbolic links -----------------------------------------------------------------------------------------


def test_links_to_files_are_followed_and_keep_the_link_path(tmp_path: Path) -> None:
    target = write(tmp_path / "elsewhere" / "real.jpg", JPEG)
    os.makedirs(tmp_path / "album")
    os.symlink(target, tmp_path / "album" / "alias.jpg")
    (item,) = crawl([tmp_path / "album"])
    assert item == FoundFile(str(tmp_path / "album" / "alias.jpg"), len(JPEG), target.stat().st_mtime_ns)


def test_a_linked_folder_outside_the_root_is_followed(tmp_path: Path) -> None:
    touch_all(tmp_path, ["external/x.jpg", "library/own.jpg"])
    os.symlink(tmp_path / "external", tmp_path / "library" / "linked")
    assert found(crawl([tmp_path / "library"]), tmp_path) == ["library/own.jpg", "library/linked/x.jpg"]


def test_a_folder_reachable_twice_is_walked_once_under_its_real_path(tmp_path: Path) -> None:
    # "a_favourites" sorts before "photos", yet the real path wins: links are walked after real folders.
    touch_all(tmp_path, ["photos/2019/x.jpg"])
    os.symlink(tmp_path / "photos" / "2019", tmp_path / "a_favourites")
    results = list(crawl([tmp_path]))
    assert found(results, tmp_path) == ["photos/2019/x.jpg"]
    assert problems(results, tmp_path) == {}


def test_broken_links_with_image_extensions_are_reported(tmp_path: Path) -> None:
    os.symlink("nowhere.jpg", tmp_path / "broken.jpg")
    os.symlink("nowhere.txt", tmp_path / "broken.txt")  # not an image name: nobody expects it indexed
    reasons = problems(crawl([tmp_path]), tmp_path)
    assert list(reasons) == ["broken.jpg"] and "broken symbolic link" in reasons["broken.jpg"]


def test_link_loops_are_reported_and_the_crawl_ends(tmp_path: Path) -> None:
    touch_all(tmp_path, ["a/photo.jpg"])
    os.symlink("self.jpg", tmp_path / "self.jpg")
    os.symlink("ping", tmp_path / "pong")
    os.symlink("pong", tmp_path / "ping")
    os.symlink("..", tmp_path / "a" / "up")
    os.symlink(tmp_path, tmp_path / "a" / "root")
    results = list(crawl([tmp_path]))
    assert found(results, tmp_path) == ["a/photo.jpg"]
    reasons = problems(results, tmp_path)
    assert set(reasons) == {"self.jpg", "ping", "pong", "a/up", "a/root"}
    assert all("loop" in reason for reason in reasons.values())


def test_a_folder_named_like_an_image_is_walked_into(tmp_path: Path) -> None:
    touch_all(tmp_path, ["album.jpg/inside.png"])
    results = list(crawl([tmp_path]))
    assert found(results, tmp_path) == ["album.jpg/inside.png"]
    assert problems(results, tmp_path) == {}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX thing")
def test_a_named_pipe_with_an_image_name_is_reported_without_opening_it(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    assert "named pipe" in problems(crawl([tmp_path]), tmp_path)["pipe.jpg"]


# --- names and paths the rest of the system cannot store ----------------------------------------------------


def test_non_utf8_file_names_are_reported_printably(tmp_path: Path) -> None:
    printed = make_non_utf8_file(tmp_path, JPEG)
    write(tmp_path / "fine.jpg", JPEG)
    results = list(crawl([tmp_path]))
    assert found(results, tmp_path) == ["fine.jpg"]
    (problem,) = [item for item in results if isinstance(item, CrawlProblem)]
    assert problem.path == f"{tmp_path}/{printed}"
    problem.path.encode("utf-8")  # printable: storable as SQLite text
    assert "not valid UTF-8" in problem.reason and "rename" in problem.reason


def test_a_non_utf8_folder_is_reported_once_not_entered(tmp_path: Path) -> None:
    bad_folder = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(bad_folder)
    for name in (b"/a.jpg", b"/b.jpg"):
        with open(bad_folder + name, "wb") as stream:
            stream.write(JPEG)
    assert problems(crawl([tmp_path]), tmp_path) == {
        "caf\\xe9": "the folder name is not valid UTF-8; rename it to index the images inside"
    }


def test_paths_at_and_past_the_length_limit(tmp_path: Path) -> None:
    longest = make_deep_file(tmp_path / "ok", PATH_MAX - 1, "last.png", one_by_one_png_bytes())
    too_long = make_deep_file(tmp_path / "long", PATH_MAX + 20, "x" * 80 + ".png", one_by_one_png_bytes())
    results = list(crawl([tmp_path]))
    assert found(results, tmp_path) == [f"ok/{longest}"]
    (longest_found,) = [item for item in results if isinstance(item, FoundFile)]
    assert len(os.fsencode(longest_found.path)) == PATH_MAX - 1
    reasons = problems(results, tmp_path)
    assert list(reasons) == [f"long/{too_long}"] and "too long" in reasons[f"long/{too_long}"]


def test_a_folder_past_the_length_limit_is_reported(tmp_path: Path) -> None:
    make_deep_file(tmp_path, PATH_MAX + 300, "deepest.jpg", JPEG)
    reasons = list(problems(crawl([tmp_path]), tmp_path).values())
    assert len(reasons) == 1 and "too long" in reasons[0]


# --- permissions --------------------------------------------------------------------------------------------


def _crawl_list(root: str) -> list[FoundFile | CrawlProblem]:
    return list(crawl([root]))


def test_an_unreadable_folder_is_reported_and_the_rest_crawled() -> None:
    with traversable_tmpdir() as root:
        touch_all(root, ["open/a.jpg", "sealed/b.jpg"])
        (root / "sealed").chmod(0o000)
        results = call_unprivileged(_crawl_list, str(root))
    assert found(results, root) == ["open/a.jpg"]
    assert problems(results, root) == {"sealed": "permission denied: the folder cannot be read"}


def test_an_unreadable_file_is_still_found(tmp_path: Path) -> None:
    # Reading needs permission, stat does not: the decoder is the one that reports it (see test_decode).
    photo = write(tmp_path / "locked.jpg", JPEG)
    photo.chmod(0o000)
    assert found(crawl([tmp_path]), tmp_path) == ["locked.jpg"]


# --- the shared hostile corpus ------------------------------------------------------------------------------


def test_the_hostile_corpus_crawls_without_surprises(tmp_path: Path) -> None:
    expected = make_hostile_corpus(tmp_path / "corpus")
    try:
        results = list(crawl([tmp_path / "corpus"]))
    finally:
        restore_permissions(tmp_path / "corpus")
    paths = set(found(results, tmp_path / "corpus"))
    reasons = problems(results, tmp_path / "corpus")
    assert paths.isdisjoint(reasons)
    for relative, keyword in expected.items():
        if keyword == SKIPPED:
            assert relative not in paths and relative not in reasons, relative
        elif relative in reasons:
            assert keyword != OK and keyword.lower() in reasons[relative].lower(), (
                relative,
                reasons[relative],
            )
        else:
            assert relative in paths, relative  # found; decoding decides (test_decode checks the reason)
    assert set(reasons) <= set(expected), set(reasons) - set(expected)
