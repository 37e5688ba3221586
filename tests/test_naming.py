"""Templates, fields, sub-folders, explicit names, and paths that must stay inside root."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from asyncdump import AsyncImageSink, _naming
from asyncdump._jobs import BatchRecord

IMG = np.zeros((2, 1, 4, 4), np.uint8)


def test_template_fields_and_subfolders(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    template = "r{rank}/step{step:04d}/{tag}_{batch}_{index}"
    with AsyncImageSink(root, name=template) as sink:
        first = sink.submit(IMG, step=7, tag="fake").result(timeout=30)
        second = sink.submit(IMG, step=8, tag="real").result(timeout=30)
    rel = [str(p.relative_to(root)) for p in first + second]
    assert rel == ["r3/step0007/fake_0_0.png", "r3/step0007/fake_1_1.png",
                   "r3/step0008/real_0_2.png", "r3/step0008/real_1_3.png"]
    assert all(p.exists() for p in first + second)


def test_explicit_names(root: Path) -> None:
    with AsyncImageSink(root, format="jpg") as sink:
        paths = sink.submit(IMG, names=["a/cat", "dog"]).result(timeout=30)
    assert paths == [root / "a" / "cat.jpg", root / "dog.jpg"]
    assert all(p.exists() for p in paths)


def test_step_none_with_step_template_is_an_error(root: Path) -> None:
    with AsyncImageSink(root, name="{step}_{batch}") as sink, \
            pytest.raises(ValueError, match="step=None"):
        sink.submit(IMG)


def test_symlinked_subfolder_pointing_outside_is_rejected(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    root.mkdir()
    os.symlink(outside, root / "link")
    with AsyncImageSink(root) as sink:
        with pytest.raises(ValueError, match="outside root"):
            sink.submit(IMG, names=["link/a", "b"])
        assert sink.stats.submitted == 0
    assert not list(outside.iterdir())


def test_same_path_twice_is_rejected_unless_overwrite(root: Path) -> None:
    with AsyncImageSink(root, name="latest_{batch}") as sink:
        sink.submit(IMG).result(timeout=30)
        with pytest.raises(ValueError, match="already submitted"):
            sink.submit(IMG)
    with AsyncImageSink(root, name="latest_{batch}", overwrite=True) as sink:
        sink.submit(IMG).result(timeout=30)
        sink.submit(np.full((2, 1, 4, 4), 9, np.uint8)).result(timeout=30)
    assert sorted(p.name for p in root.iterdir()) == ["latest_0.png", "latest_1.png"]


def test_custom_extension(root: Path) -> None:
    with AsyncImageSink(root, format="tiff", extension=".TIF") as sink:
        paths = sink.submit(IMG).result(timeout=30)
    assert [p.name for p in paths] == ["00000000.TIF", "00000001.TIF"]
    with pytest.raises(ValueError, match="extension"):
        AsyncImageSink(root, extension="png")


def test_collision_window_is_bounded_and_detects_recent_reuse(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_naming, "RECENT_PATHS", 8)
    with AsyncImageSink(root, name="{step}_{batch}") as sink:
        for step in range(5):  # 10 paths: the first two have left the window of 8
            sink.submit(IMG, step=step)
        with pytest.raises(ValueError, match="already submitted"):
            sink.submit(IMG, step=1)  # within the window: refused, nothing staged
        assert sink.stats.submitted == 10
        sink.submit(IMG, step=0).result(timeout=30)  # older than the window: not detected
        assert sink.stats.submitted == 12


def test_namer_memory_does_not_grow_with_run_length(root: Path) -> None:
    """A new 150-character name and a new folder per step: after one window of warm-up,
    two more windows add (almost) nothing. Unbounded, they would add about 3 MB."""
    namer = _naming.Namer(root, "{step:07d}/{batch:04d}_" + "x" * 150, ".png")

    def name_steps(steps: range) -> None:
        for step in steps:
            namer.record(namer.paths(2, start_index=2 * step, step=step, names=None, fields={}),
                         None)

    window = _naming.RECENT_PATHS
    tracemalloc.start()
    try:
        name_steps(range(window))
        warm = tracemalloc.get_traced_memory()[0]
        name_steps(range(window, 3 * window))
        grown = tracemalloc.get_traced_memory()[0] - warm
    finally:
        tracemalloc.stop()
    assert grown < 100_000, f"the namer grew by {grown} bytes over {4 * window} more paths"


@pytest.mark.parametrize(("template", "plain"), [
    ("{index:08d}", True), ("img_{index}", True), ("run/{step:04d}_{index:06x}", True),
    ("r{rank}/{batch}_{index:b}", True), ("{index:5}", True),
    ("{index:08d}/img", False),  # the folder changes with the index: each one is checked
    ("{step}_{batch}", False),  # no {index}: names may repeat, the collision check runs
    ("{tag}_{index}", False),  # a keyword field: rendered and checked per image
    ("{index:c}", False), ("{index!s}", False), ("{index:>{width}}", False),
    ("{index:/>8}", False), ("{index:,}", False), ("{index.real}", False),
])
def test_plain_templates_are_the_ones_whose_names_cannot_fail(template: str, plain: bool) -> None:
    assert _naming.is_plain_template(template) is plain


@pytest.mark.parametrize("template", ["{index:08d}", "sub/dir/{step}-{index:x}", "r{rank}_{batch}_{index}"])
def test_plain_paths_are_the_paths_the_full_check_gives(root: Path, template: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "2")
    root.mkdir()
    namer = _naming.Namer(root, template, ".png")
    for start, step, count in [(0, 0, 1), (7, -3, 16), (99_999_990, 12, 20)]:
        render = namer.plain_paths(count, start_index=start, step=step, names=None)
        assert render is not None
        assert render() == namer.paths(count, start_index=start, step=step, names=None, fields={})
    assert namer.plain_paths(2, start_index=0, step=0, names=["a", "b"]) is None


def test_plain_template_errors_still_come_from_submit(root: Path, tmp_path: Path) -> None:
    """Only the first name of a plain-template batch is checked at the call; that check
    raises what the full one did, and nothing is staged."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    root.mkdir()
    os.symlink(outside, root / "link")
    for template, step, error in [("link/{index}", 0, "outside root"),
                                  ("../{index}", 0, "outside root"),
                                  ("{step}_{index}", None, "step=None")]:
        with AsyncImageSink(root, name=template) as sink:
            with pytest.raises(ValueError, match=error):
                sink.submit(IMG, step=step)
            assert sink.stats.submitted == 0
    assert not list(outside.iterdir())


def test_a_batch_record_renders_deferred_paths_once_on_first_use() -> None:
    calls = []

    def render() -> list[str]:
        calls.append(1)
        return ["/r/a.png", "/r/b.png"]

    record = BatchRecord(render, 2)
    assert calls == [] and record.count == record.remaining == 2
    assert record.paths == ["/r/a.png", "/r/b.png"] and record.paths is record.paths
    assert calls == [1]


# ------------------------------------------------------------------ issue 19: item 5
def test_template_paths_and_explicit_names_are_checked_against_each_other(root: Path) -> None:
    with AsyncImageSink(root, workers=1) as sink:
        sink.submit(IMG).result(timeout=30)  # 00000000.png, 00000001.png by the template
        with pytest.raises(ValueError, match="already submitted"):
            sink.submit(IMG[:1], names=["00000001"])
        sink.submit(IMG[:1], names=["00000004"]).result(timeout=30)  # index 2: a free name
        sink.submit(IMG[:1]).result(timeout=30)  # index 3: 00000003
        with pytest.raises(ValueError, match="already submitted"):
            sink.submit(IMG)  # indices 4 and 5: 00000004 was given by names=
        assert sink.stats.submitted == 4
    assert sorted(p.name for p in root.iterdir()) == [f"0000000{i}.png" for i in (0, 1, 3, 4)]


def test_truncating_format_specs_are_not_unique_by_construction(root: Path) -> None:
    with AsyncImageSink(root, workers=1, name="{index!s:.1}") as sink:
        with pytest.raises(ValueError, match="two images of this batch"):
            sink.submit(np.zeros((12, 1, 4, 4), np.uint8))  # 10 and 11 both give "1"
        sink.submit(np.zeros((10, 1, 4, 4), np.uint8)).result(timeout=30)  # 0..9
        with pytest.raises(ValueError, match="already submitted"):
            sink.submit(IMG[:1])  # index 10 gives "1" again
    assert len(list(root.iterdir())) == 10


def test_adjacent_fields_are_not_unique_by_construction(root: Path) -> None:
    """"{index}{step}": index 1 at step 11 and index 11 at step 1 are both "111"."""
    assert not _naming.is_plain_template("{index}{step}")
    with AsyncImageSink(root, workers=1, name="{index}{step}") as sink:
        sink.submit(IMG[:1], step=0)
        sink.submit(IMG[:1], step=11)  # index 1: "111"
        for _ in range(9):
            sink.submit(IMG[:1], step=5)  # indices 2..10
        with pytest.raises(ValueError, match="already submitted"):
            sink.submit(IMG[:1], step=1)  # index 11: "111"


@pytest.mark.parametrize(("template", "plain"), [
    ("{step}{index}", False), ("{index:x}a{step}", False),  # "a" is a hex digit
    ("{index:x}g{step}", True), ("{index:5}-{step}", False),  # spaces then a sign: "-" is ambiguous
    ("{step}-{index}", True), ("{step:05d}-{index}", True),  # a sign comes first, or not at all
])
def test_plain_templates_split_back_into_their_fields(template: str, plain: bool) -> None:
    assert _naming.is_plain_template(template) is plain


PLAIN_TEMPLATES = ["{index:08d}", "{index}", "run/{step}_{index:x}", "{step}-{batch}-{index:b}",
                   "r{rank}/{index:5}_{step:03d}"]


@pytest.mark.parametrize("template", [*PLAIN_TEMPLATES, "{step}_{batch}", "{index}{step}",
                                      "{index!s:.1}", "{tag}{index}"])
def test_every_mix_of_template_and_names_is_checked_within_the_window(
        root: Path, template: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A random mix of template batches and names= batches (names taken from what the
    template gives, so clashes are frequent): a path equal to one of the last RECENT_PATHS
    accepted images is always refused; a path never accepted before is never refused."""
    window = 24
    monkeypatch.setattr(_naming, "RECENT_PATHS", window)
    rng = np.random.default_rng(abs(hash(template)) % 2**32)
    namer = _naming.Namer(root, template, ".png")
    root.mkdir()
    accepted: list[str] = []  # one per image, in index order
    render = _naming.Namer(root, template, ".png", overwrite=True)
    next_index = refused = 0
    for _ in range(400):
        count = int(rng.integers(1, 5))
        step, tag = int(rng.integers(-3, 13)), str(rng.integers(0, 3))
        names = None
        if rng.random() < 0.4:  # names the template gives for nearby indices and steps
            names = [os.path.relpath(render.paths(1, start_index=int(rng.integers(
                max(0, next_index - 30), next_index + 30)), step=int(rng.integers(-3, 13)),
                names=None, fields={"tag": tag})[0], root)[:-4] for _ in range(count)]
        expected = render.paths(count, start_index=next_index, step=step, names=names,
                                fields={"tag": tag})
        recent = set(accepted[-window:])
        clash_recent = bool(recent & set(expected)) or len(set(expected)) < count
        clash_ever = bool(set(accepted) & set(expected)) or len(set(expected)) < count
        try:
            plain = namer.plain_paths(count, start_index=next_index, step=step, names=names) \
                if template in PLAIN_TEMPLATES else None
            paths = plain if plain is not None else namer.paths(
                count, start_index=next_index, step=step, names=names, fields={"tag": tag})
        except ValueError:
            assert clash_ever, (template, next_index, step, names, expected)
            refused += 1
            continue
        assert not clash_recent, (template, next_index, step, names, expected)
        namer.record(paths, names)
        assert (paths() if callable(paths) else paths) == expected
        accepted += expected
        next_index += count
    assert refused >= 5  # the mix did clash within the window


# ------------------------------------------------------------------ issue 19: item 9
def test_names_are_budgeted_in_bytes(root: Path) -> None:
    """80 CJK characters are 240 bytes: a legal name, whose temp name must fit 255 bytes."""
    cjk = "\u4e2d" * 80
    undecodable = os.fsdecode(b"raw\xff")  # a Linux name that is not UTF-8: still writable
    with AsyncImageSink(root, workers=1) as sink:
        paths = sink.submit(IMG, names=[cjk, undecodable]).result(timeout=30)
        assert [p.name for p in paths] == [cjk + ".png", undecodable + ".png"]
        assert all(p.is_file() for p in paths)
        for bad, why in [("a\ud800", "lone surrogate"), ("x" * 252, "256 bytes"),
                         ("ok/" + "\u4e2d" * 84, "256 bytes")]:
            with pytest.raises(ValueError, match=why):
                sink.submit(IMG[:1], names=[bad])
        assert sink.stats.submitted == 2
    with AsyncImageSink(root / "t", workers=1, name="{tag}_{index}") as sink, \
            pytest.raises(ValueError, match="bytes"):
        sink.submit(IMG[:1], tag="\u4e2d" * 85)
    namer = _naming.Namer(root, "x" * 200 + "{index:b}", ".png")
    assert namer.plain_paths(4, start_index=0, step=None, names=None) is not None
    with pytest.raises(ValueError, match="264 bytes"):  # only the batch's last name is too long
        namer.plain_paths(2**60, start_index=0, step=None, names=None)
