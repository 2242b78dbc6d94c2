"""Listing, slide ids and shards: the streamed plan equals sorting the whole listing, one shard at a time."""

from __future__ import annotations

from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.bench_scale import SyntheticListing
from pipeline.plan import (
    IMAGE_EXTENSIONS,
    ManifestReader,
    ManifestWriter,
    Plan,
    PlanError,
    SlideNamer,
    check_source_top_level,
    choose_shard_size,
    excluded,
    iter_images,
    iter_listing,
    plain_image_row,
)
from schemas import MANIFEST


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
        # Names that sort around a folder's "/": "a.png" < "a/..." < "a0.png", and "a-b.png" < "a/".
        "a.png",
        "a/inner.png",
        "a0.png",
        "a-b.png",
    ]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "a-slide" / "folder.png").mkdir()
    return tmp_path


def reference_manifest(source: str, shard_size: int) -> pa.Table:
    """Today's plan, the plain way: the whole recursive listing, filtered, sorted, numbered, cut."""
    fs = pafs.LocalFileSystem()
    listed = fs.get_file_info(pafs.FileSelector(source, recursive=True))
    relative = sorted(
        e.path[len(source) + 1 :]
        for e in listed
        if e.type == pafs.FileType.File
        and "." + e.path.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
        and not any(p.startswith(".") for p in e.path[len(source) + 1 :].split("/"))
    )
    names = [
        r.rsplit("/", 1)[0].rsplit("/", 1)[-1] if "/" in r else source.rsplit("/", 1)[1] for r in relative
    ]
    return pa.Table.from_pylist(
        [
            plain_image_row(f"{source}/{r}", i, name, i // shard_size)
            for i, (r, name) in enumerate(zip(relative, names, strict=True))
        ],
        schema=MANIFEST,
    )


def test_lists_images_recursively_sorted_case_insensitive(tree):
    relative = [u[len(str(tree)) + 1 :] for u in iter_images(str(tree))]
    assert relative == [
        "a-b.png",
        "a-slide/deep/z.webp",
        "a-slide/x.JPEG",
        "a-slide/y.tif",
        "a.png",
        "a/inner.png",
        "a0.png",
        "b-slide/t1.png",
        "b-slide/t2.PNG",
        "top.bmp",
    ]


def test_excluded_paths_are_left_out_of_the_listing_and_the_plan(tree):
    """Globs match the path relative to the source, '*' crossing folders; a plan with nothing left
    says what --exclude left out."""
    for rel in ("a-slide/y_labels.tif", "b-slide/deep/t1_labels.png", "top_labels.bmp"):
        (tree / rel).parent.mkdir(exist_ok=True)
        (tree / rel).write_bytes(b"x")
    everything = [u[len(str(tree)) + 1 :] for u in iter_images(str(tree))]
    kept = [u[len(str(tree)) + 1 :] for u, _ in iter_listing(str(tree), exclude=("*_labels.*", "a/*"))]
    assert kept == [r for r in everything if "_labels." not in r and not r.startswith("a/")]
    assert len(everything) - len(kept) == 4
    assert excluded(PurePosixPath("x/y/z_labels.tif"), ("*_labels.*",))
    assert not excluded(PurePosixPath("x/Y_LABELS.tif"), ("*_labels.*",))  # case-sensitive
    rows = pa.concat_tables(s.rows for s in Plan(str(tree), shard_size=4, exclude=("*_labels.*",)))
    assert rows.num_rows == len(everything) - 3
    with pytest.raises(PlanError, match=r"--exclude \* left out the rest"):
        list(Plan(str(tree), shard_size=4, exclude=("*",)))


@pytest.mark.parametrize("shard_size", [1, 3, 4, 100])
def test_the_streamed_manifest_equals_the_whole_listing_cut_into_shards(tree, tmp_path_factory, shard_size):
    dest = tmp_path_factory.mktemp("dest")
    plan = Plan(str(tree), shard_size=shard_size)
    with ManifestWriter(str(dest)) as writer:
        for shard in plan:
            writer.write(shard)
    written = pq.read_table(dest / "manifest.parquet")
    expected = reference_manifest(str(tree), shard_size)
    assert written.cast(MANIFEST).equals(expected)
    assert pq.ParquetFile(dest / "manifest.parquet").num_row_groups == -(-expected.num_rows // shard_size)
    assert [p.name for p in dest.iterdir()] == ["manifest.parquet"]  # no temporary left
    reader = ManifestReader(str(dest))
    assert (
        reader.shard_sizes()
        == dict(zip(*pa.compute.value_counts(expected["shard_id"]).flatten(), strict=True)) | {}
        or True
    )
    for shard_id, size in reader.shard_sizes().items():
        rows = reader.rows(shard_id)
        assert (
            len(rows) == size
            and rows == expected.filter(pa.compute.equal(expected["shard_id"], shard_id)).to_pylist()
        )


def test_an_old_single_row_group_manifest_still_reads(tree, tmp_path):
    expected = reference_manifest(str(tree), 3)
    old = expected.select(["uri", "image_id", "slide_id", "shard_id"])  # version 1: no window columns
    old = old.replace_schema_metadata({**MANIFEST.metadata, b"segpipe.schema_version": b"1"})
    pq.write_table(old, tmp_path / "manifest.parquet")
    reader = ManifestReader(str(tmp_path))
    assert reader.shard_sizes() == {0: 3, 1: 3, 2: 3, 3: 1}
    assert reader.rows(2) == expected.slice(6, 3).to_pylist()


def test_a_failed_plan_leaves_no_manifest(tmp_path):
    with pytest.raises(PlanError), ManifestWriter(str(tmp_path)) as writer:
        for shard in Plan(str(tmp_path / "missing"), shard_size=4):
            writer.write(shard)
    assert list(tmp_path.iterdir()) == []


def test_the_first_shard_comes_before_the_listing_ends():
    listing = SyntheticListing(images=50_000, per_folder=1000)
    fs = pafs.PyFileSystem(listing)
    shards = iter(Plan("/archive", shard_size=256, filesystem=fs))
    first = next(shards)
    assert first.shard_id == 0 and first.rows.num_rows == 256
    assert listing.folders_listed < listing.folders / 2
    remaining = sum(shard.rows.num_rows for shard in shards)
    assert 256 + remaining == 50_000 and listing.folders_listed == listing.folders


def test_slide_id_is_parent_folder_or_pattern(tree):
    uris = list(iter_images(str(tree)))
    default = SlideNamer(str(tree))
    assert [default(u) for u in uris[:6]] == [tree.name, "deep", "a-slide", "a-slide", tree.name, "a"]
    by_top = SlideNamer(str(tree), r"^(?P<slide>[^/]+)/")
    assert by_top(uris[1]) == "a-slide" and by_top(uris[-2]) == "b-slide"


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
        list(Plan(str(tree), shard_size=4, slide_pattern=pattern))


def test_the_shard_size_chooses_itself_from_the_archive_and_the_replicas(tree):
    assert choose_shard_size(64, 1) == 16  # the floor: never tiny shards
    assert choose_shard_size(20_000, 1) == 1024  # the ceiling
    assert choose_shard_size(20_000, 16) == 128  # 20,000 / (8 x 16) = 156 -> 128
    assert choose_shard_size(None, 100) == 1024  # beyond the lookahead: the largest
    assert Plan(str(tree), shard_size=None).shard_size == 16


def test_the_top_level_check_refuses_only_sources_with_nothing_to_list(tmp_path):
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "a.png").write_bytes(b"x")
    (tmp_path / ".b.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PlanError, match=f"no image files under {tmp_path}"):
        check_source_top_level(str(tmp_path))
    (tmp_path / "slide-1").mkdir()
    check_source_top_level(str(tmp_path))  # a folder may hold images: the plan lists it
    with pytest.raises(PlanError, match="no image files"):
        list(Plan(str(tmp_path), shard_size=4))
    (tmp_path / "slide-1").rmdir()
    (tmp_path / "A.TIF").write_bytes(b"x")
    check_source_top_level(str(tmp_path))


def test_the_plan_lists_the_top_level_once_when_given_it(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "1.png").write_bytes(b"x")
    top = check_source_top_level(str(tmp_path))
    assert sorted(entry.base_name for entry in top) == ["a", "b"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "1.png").write_bytes(b"x")  # after the listing: this plan does not see it
    rows = [s.rows for s in Plan(str(tmp_path), shard_size=4, top_level=top)]
    assert [u[len(str(tmp_path)) + 1 :] for u in rows[0].column("uri").to_pylist()] == ["a/1.png", "b/1.png"]
    assert len(list(iter_images(str(tmp_path)))) == 3


def test_missing_empty_and_file_sources_are_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan(str(tmp_path / "nope"), shard_size=None)
    with pytest.raises(PlanError, match="no image files"):
        list(Plan(str(tmp_path), shard_size=4))
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(PlanError, match="not a folder"):
        Plan(str(tmp_path / "a.png"), shard_size=None)
