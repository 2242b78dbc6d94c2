"""Listing, slide ids and shards (the plan is the run's stable identity)."""

from __future__ import annotations

import pytest

from pipeline.plan import PlanError, list_images, make_manifest, plan, slide_ids


@pytest.fixture
def tree(tmp_path):
    for rel in [
        "b-slide/t2.PNG",
        "b-slide/t1.png",
        "a-slide/x.JPEG",
        "a-slide/y.tif",
        "a-slide/deep/z.webp",
        "a-slide/notes.txt",
        "a-slide/.hidden.png",
        ".cache/c.png",
        "top.bmp",
    ]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "a-slide" / "folder.png").mkdir()
    return tmp_path


def test_lists_images_recursively_sorted_case_insensitive(tree):
    uris = list_images(str(tree))
    relative = [u[len(str(tree)) + 1 :] for u in uris]
    assert relative == [
        "a-slide/deep/z.webp",
        "a-slide/x.JPEG",
        "a-slide/y.tif",
        "b-slide/t1.png",
        "b-slide/t2.PNG",
        "top.bmp",
    ]


def test_slide_id_is_parent_folder_or_pattern(tree):
    uris = list_images(str(tree))
    assert slide_ids(uris, str(tree)) == ["deep", "a-slide", "a-slide", "b-slide", "b-slide", tree.name]
    by_top = slide_ids(uris[:5], str(tree), r"^(?P<slide>[^/]+)/")
    assert by_top == ["a-slide", "a-slide", "a-slide", "b-slide", "b-slide"]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(", "not a valid regular expression"),
        ("([a-z]+)/", "named group 'slide'"),
        ("(?P<slide>zzz)", "matched no"),
    ],
)
def test_bad_slide_patterns_are_clear_errors(tree, pattern, message):
    with pytest.raises(PlanError, match=message):
        slide_ids(list_images(str(tree)), str(tree), pattern)


def test_shards_are_fixed_size_in_listing_order():
    manifest = make_manifest([f"/s/{i:03d}.png" for i in range(7)], ["s"] * 7, shard_size=3)
    assert manifest["shard_id"].to_pylist() == [0, 0, 0, 1, 1, 1, 2]
    assert manifest["image_id"].to_pylist() == list(range(7))
    assert manifest.schema.metadata[b"segpipe.schema"] == b"manifest"


def test_missing_empty_and_file_sources_are_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        plan(str(tmp_path / "nope"), shard_size=4)
    with pytest.raises(PlanError, match="no image files"):
        plan(str(tmp_path), shard_size=4)
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(PlanError, match="not a folder"):
        plan(str(tmp_path / "a.png"), shard_size=4)
