"""The segment job: plan once, execute shards on Ray model replicas, commit, report.

Engine: Ray Core actors, one model replica each (``num_gpus`` per replica,
fractions allowed; CPU when no GPU). The driver hands each replica up to two
shards at a time, so a replica decodes the next shard while it finishes the
current one; inside a replica, decode, inference and encode overlap through
bounded thread pools (:mod:`pipeline.worker`). We chose actors over Ray Data's
``map_batches`` because the shard is our unit of commit, retry and resume: a
replica writes a shard's files and its commit marker itself, a dead replica's
shards are retried on a fresh one, and no stage or object-store queue holds
more than two shards per replica.

A new run (:func:`new_run`) plans while it executes: the sorted listing is
cut into shards as it arrives (:mod:`pipeline.plan`), each shard is written
to the manifest and handed to the scheduler (:mod:`pipeline.schedule`), so
the first shard runs before the listing ends; ``run.json`` is written when
the plan is complete. :func:`resume` reads the manifest's footer and one
listing of ``_commits/`` and redoes what is not committed.

The driver never imports torch: a Ray task on its node loads the model and
returns the card (to the driver) and the weights (an object the replicas
share). The replica actors are started before that task ends, so their own
imports of torch and torchvision overlap it; each gets the model when it is
known (:class:`_Replicas`).

Exit codes (:attr:`RunReport.exit_code`): 0 every shard committed; 3 some
shards failed (the resume command is printed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import socket
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from pipeline import commit, storage
from pipeline.card import InferenceSettings, ModelCard, ModelLoadError, check_model_file
from pipeline.decode import RawImage, read_and_decode
from pipeline.plan import ManifestReader, ManifestWriter, Plan, check_source_top_level, write_slides
from pipeline.preprocess import with_channel
from pipeline.schedule import SHARDS_IN_FLIGHT, Scheduler
from pipeline.slides import SlideSettings
from schemas import SCHEMA_VERSION

EXIT_OK = 0
EXIT_SHARDS_FAILED = 3
RUN_FORMAT = "segpipe-run"
DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's own default limit (about 9459 x 9459 px)."""

DEFAULT_OVERLAP_THRESHOLD = 0.7
"""Mask-overlap suppression (intersection over the smaller mask); chosen on held-out tiles (README)."""
DEFAULT_EXCLUSIVE_PIXELS = False
"""Exclusive pixel ownership off by default; chosen on held-out tiles (README)."""
DEFAULT_TILE_SIZE = 1024
"""Window side on whole slides, px."""
DEFAULT_BATCH_SIZE = 4
"""Images per forward pass of a new run. Batch size changes boxes and scores in their last float
bits (batched convolutions sum in another order), so run.json records it and resumes reuse it."""

_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
log = logging.getLogger("segpipe")


class RunError(ValueError):
    """A run that cannot start or resume as asked (bad settings, DEST mismatch); exit code 2."""


@dataclass(frozen=True)
class PinnedSettings:
    """Settings that define a run's results; stored in run.json, fixed across resumes.

    Thresholds left as None take the model card's defaults when the run starts.
    """

    source: str
    model: str | None = None
    weights: str | None = None
    shard_size: int | None = None
    """Images per shard; None: chosen from the archive's size and the replicas (recorded when planned)."""
    slide_pattern: str | None = None
    exclude: tuple[str, ...] = ()
    """Globs of paths relative to the source left out of the plan (label images kept beside their images,
    thumbnails); runs made before it had none."""
    score_threshold: float | None = None
    mask_threshold: float | None = None
    max_detections: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    overlap_threshold: float = DEFAULT_OVERLAP_THRESHOLD
    exclusive_pixels: bool = DEFAULT_EXCLUSIVE_PIXELS
    channel: str | int | None = None
    """The input channel the model sees (index or name); None: the model card's."""
    pixel_size_um: float | None = None
    """µm per pixel of every image; None: each file's own (OME-TIFF, TIFF resolution), else unknown."""
    scale: float | str = "auto"
    """Factor plain images are resampled by before the model, or ``auto`` (per image, from the model
    card's object diameters); runs made before it had none and resume at 1."""
    tile_size: int | None = DEFAULT_TILE_SIZE
    """Window side (px the model sees) on whole slides and on plain images larger than it; None (runs
    made before whole-slide support): plain images whole."""
    tile_overlap: int | None = None
    """Window pixels shared by neighbouring windows; None: the model card's largest object."""
    mpp: float | None = None
    """µm per pixel the model sees on slides; None: the model card's for slides that state theirs."""
    mpp_override: float | None = None
    """µm per level-0 pixel of every slide, replacing the slides' own."""
    tissue: str = "auto"
    """Where windows are laid on slides: ``auto`` (found tissue) or ``all``."""
    tta: str = "none"
    """Test-time augmentation (:mod:`pipeline.tta`): ``none``, ``flips`` (4 views) or ``dihedral`` (8);
    runs made before it had none."""

    def slide_settings(self) -> SlideSettings:
        """How the plan lays windows on slides (``tile_overlap`` must be resolved)."""
        return SlideSettings(
            tile_size=self.tile_size,
            tile_overlap=self.tile_overlap,
            mpp=self.mpp,
            mpp_override=self.mpp_override,
            tissue=self.tissue,
            max_pixels=self.max_pixels,
        )


@dataclass(frozen=True)
class ExecutionSettings:
    """How to execute; may change between attempts of the same run."""

    address: str | None = None
    replicas: int | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float | None = None
    batch_size: int | None = None
    """None: the batch size the run started with (run.json), so redone shards match the rest bit for bit."""
    max_attempts: int = 3
    progress: bool | None = None


@dataclass
class RunReport:
    """What happened: shard ids by outcome, image and instance counts, wall time."""

    dest: str
    committed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    images_ok: int = 0
    images_error: int = 0
    instances: int = 0
    instances_cut: int = 0
    """Instances kept that touch an inner window edge (objects larger than the tile overlap)."""
    slides: int = 0
    slides_error: int = 0
    """Slide files planned, and those that got no windows because they could not be read."""
    retries: int = 0
    wall_s: float = 0.0
    replicas_ready_s: float = 0.0
    """Seconds from the start of execution until every replica had loaded its model."""
    stage_s: Counter[str] = field(default_factory=Counter)
    """Seconds summed over committed shards per stage (decode_s, infer_s, encode_s, write_s, total_s)."""

    @property
    def exit_code(self) -> int:
        return EXIT_SHARDS_FAILED if self.failed else EXIT_OK

    @property
    def resume_command(self) -> str:
        return f"python -m jobs.segment --resume {storage.redact(self.dest)}"


def _versions() -> dict[str, str]:
    names = (
        "segpipe",
        "torch",
        "torchvision",
        "ray",
        "pyarrow",
        "pycocotools",
        "shapely",
        "opencv-python-headless",
    )
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass(frozen=True)
class ResolvedModel:
    """A model as the driver knows it: its card, its fingerprint and its weights in Ray's object store."""

    card: ModelCard
    fingerprint: str
    weights: Any
    """ObjectRef of the state dict (name -> NumPy array): a return value of the loading task, so the
    driver owns it and it outlives the task's worker process."""


def resolve_on_this_node(spec: str | None, weights: str | None) -> ResolvedModel:
    """Load the model in a Ray task on the driver's node and keep the weights in the object store.

    The driver itself never imports torch; the task reads the same files the
    driver would (checkpoint paths, torchvision's local cache) because it
    runs on the same node.

    Raises:
        ModelLoadError: the spec cannot be resolved or the checkpoint is unsafe.
    """
    import ray
    from ray.exceptions import RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    # max_calls=1: the worker exits after loading, so its torch (about 0.7 GB) does not stay resident.
    task = ray.remote(max_calls=1)(_load_model).options(
        num_cpus=0, num_returns=2, scheduling_strategy=here, max_retries=0
    )
    description_ref, weights_ref = task.remote(spec, weights)
    try:
        card, fingerprint = ray.get(description_ref)
    except RayTaskError as exc:
        with contextlib.suppress(RayTaskError):
            ray.get(weights_ref)  # the same error: read it so Ray does not log it as unhandled at exit
        if isinstance(exc.cause, ModelLoadError):
            raise ModelLoadError(str(exc.cause)) from None
        raise
    return ResolvedModel(ModelCard.from_dict(card), fingerprint, weights_ref)


def _load_model(spec: str | None, weights: str | None):
    """Ray task body: ((card dict, fingerprint), state dict of NumPy arrays), two return objects."""
    from pipeline.model import resolve_model

    loaded = resolve_model(spec, weights=weights)
    state = {k: v.detach().cpu().numpy() for k, v in loaded.module.state_dict().items()}
    return (loaded.card.to_dict(), loaded.fingerprint), state


def pinned_from_run_json(settings: dict[str, Any]) -> PinnedSettings:
    """The settings a run.json pins. A setting added since the run was made takes the value that
    reproduces it: runs made before whole-slide support segmented plain images whole (no
    ``tile_size``), runs made before ``--scale`` at native size (1)."""
    pinned = {"tile_size": None, "scale": 1.0, **settings}
    pinned["exclude"] = tuple(pinned.get("exclude", ()))  # a JSON list
    return PinnedSettings(**pinned)


def _resolved_thresholds(pinned: PinnedSettings, card: ModelCard) -> PinnedSettings:
    return PinnedSettings(
        **{
            **asdict(pinned),
            "score_threshold": card.default_score_threshold(pinned.tta)
            if pinned.score_threshold is None
            else pinned.score_threshold,
            "mask_threshold": card.mask_threshold if pinned.mask_threshold is None else pinned.mask_threshold,
            "max_detections": card.max_detections if pinned.max_detections is None else pinned.max_detections,
            "tile_overlap": default_tile_overlap(card)
            if pinned.tile_overlap is None
            else pinned.tile_overlap,
        }
    )


def default_tile_overlap(card: ModelCard) -> int:
    """The model card's largest object (px), rounded up to even: such an object is seen whole by the
    window that owns it."""
    return card.largest_object_px + card.largest_object_px % 2


def _run_json_uri(dest: str) -> str:
    return storage.join(dest, "run.json")


def _first_image_channels(uris: list[str]) -> dict[str, Any]:
    """The channel names of the run's first decodable image, with how to read the intensity lists."""
    for uri in uris[:16]:
        raw = read_and_decode(uri, max_pixels=DEFAULT_MAX_PIXELS)
        if isinstance(raw, RawImage):
            return {
                "first_image": list(raw.channel_names),
                "note": "intensity_* lists follow each image's own channels (images.channels)",
            }
    return {"first_image": None, "note": "no image among the first 16 could be decoded"}


def _check_new_dest(dest: str) -> None:
    """Refuse a DEST that holds a run, or shards of a run whose plan never finished."""
    if storage.exists(_run_json_uri(dest)):
        raise RunError(
            f"{storage.redact(dest)} already holds a run; use --resume {storage.redact(dest)} "
            "to finish it, or choose a new --output"
        )
    states = commit.shard_states(dest)
    if states.committed or states.failed:
        raise RunError(
            f"{storage.redact(dest)} holds shards of a run whose plan never finished (its driver stopped "
            "while listing the source, before run.json was written): remove it or choose another --output"
        )


def reopen(dest: str, overrides: dict[str, Any]) -> tuple[PinnedSettings, dict[str, Any]]:
    """The pinned settings and run.json of the run at ``dest``, for resume or rerun.

    ``overrides`` are pinned settings the user passed again; any that differ
    from the run's are refused.

    Raises:
        RunError: no run at ``dest``, or a setting differs.
    """
    if not storage.exists(_run_json_uri(dest)):
        raise RunError(f"no run to resume at {storage.redact(dest)} (run.json not found)")
    run_json = commit.read_json(_run_json_uri(dest))
    pinned = pinned_from_run_json(run_json["settings"])
    different = {
        k: (getattr(pinned, k), v) for k, v in overrides.items() if v is not None and getattr(pinned, k) != v
    }
    if different:
        described = ", ".join(f"{k}: run has {old!r}, asked {new!r}" for k, (old, new) in different.items())
        raise RunError(
            f"cannot resume {storage.redact(dest)} with different settings ({described}); "
            "a new --output starts a new run"
        )
    return pinned, run_json


def _resolve_the_runs_model(pinned: PinnedSettings, run_json: dict[str, Any]) -> ResolvedModel:
    """The run's model, loaded again; refused if its fingerprint is not the one run.json records.

    Raises:
        RunError: the model changed since the run started.
        ModelLoadError: it cannot be loaded any more.
    """
    loaded = resolve_on_this_node(pinned.model, pinned.weights)
    if loaded.fingerprint != run_json["model"]["fingerprint"]:
        raise RunError(
            f"the model changed since the run started (fingerprint {loaded.fingerprint[:19]}..., "
            f"run has {run_json['model']['fingerprint'][:19]}...); a new --output starts a new run"
        )
    return loaded


class ShardWorker:
    """Ray actor body: one model replica that processes and commits shards.

    It is created before the model is known, so that its process start and
    imports (torch, torchvision: seconds) overlap the driver's loading task;
    :meth:`load` then builds the model. Every other method waits for it.
    """

    def __init__(self, dest: str, threads: int):
        import ray
        import torch

        import pipeline.worker  # noqa: F401 - the slow imports, done while the model is being loaded
        from pipeline.masks import compile_kernels

        compile_kernels()  # also while the model is being loaded

        gpu_ids = ray.get_gpu_ids()
        self.note = None
        self.device = "cpu"
        if gpu_ids and torch.cuda.is_available():
            self.device = "cuda"
        elif gpu_ids:
            self.note = (
                f"replica placed on GPU resource {gpu_ids} but CUDA is not available "
                f"(torch {torch.__version__}); running on the CPU"
            )
        self.dest = dest
        self.threads = threads
        self._loaded = threading.Event()
        self._processor = None
        self._load_error: str | None = None
        self._manifest: ManifestReader | None = None

    def load(self, card: dict, weights: dict, settings: InferenceSettings) -> None:
        """Build the model replica. A failure is kept and raised by every later call (nobody reads
        this call's result), so a replica that cannot load fails its shards, which are retried."""
        from pipeline.worker import ShardProcessor

        try:
            self._processor = ShardProcessor(
                ModelCard.from_dict(card), weights, settings, device=self.device, threads=self.threads
            )
        except Exception as exc:  # kept, and raised by describe / run_shard
            self._load_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._loaded.set()

    @property
    def processor(self):
        """The replica's :class:`pipeline.worker.ShardProcessor`, once :meth:`load` has run."""
        self._loaded.wait()
        if self._load_error is not None:
            raise RuntimeError(f"this replica could not build its model: {self._load_error}")
        return self._processor

    def describe(self) -> dict[str, Any]:
        import ray

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": str(self.processor.device),
            "note": self.note,
        }

    def run_shard(self, shard_id: int, rows: list[dict] | None, attempt: int) -> dict[str, Any]:
        """Process and commit one shard; its rows come from the manifest unless given."""
        import ray

        if rows is None:
            if self._manifest is None:
                self._manifest = storage.retry_transient(lambda: ManifestReader(self.dest))
            rows = storage.retry_transient(lambda: self._manifest.rows(shard_id))
        output = self.processor.process(rows)
        summary = {
            **output.summary,
            "attempt": attempt,
            "worker": {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            },
        }
        started = time.perf_counter()
        commit.commit_shard(self.dest, shard_id, output.instances, output.images, summary)
        summary["timings_s"]["write_s"] = round(time.perf_counter() - started, 3)
        return summary


def connect_ray(address: str | None) -> None:
    """Join ``address`` or ``RAY_ADDRESS``, else start an embedded local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address == "local":
        kwargs["include_dashboard"] = False
        # Ray enables token auth for a new local instance (good) and says so at
        # WARNING level on every start; that notice is noise for an embedded run.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=address, **kwargs)


def replica_layout(execution: ExecutionSettings) -> tuple[int, float, float]:
    """(replicas, gpus per replica, cpus per replica) from the settings and the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    gpus_per = (
        execution.gpus_per_replica if execution.gpus_per_replica is not None else (1.0 if gpus else 0.0)
    )
    if execution.replicas is not None:
        replicas = execution.replicas
    elif gpus_per > 0:
        replicas = max(int(gpus // gpus_per), 1)
    else:
        replicas = 1
    if gpus_per > 0 and replicas * gpus_per > gpus + 1e-9:
        raise RunError(
            f"{replicas} replicas x {gpus_per} GPU need {replicas * gpus_per} GPUs; cluster has {gpus:g}"
        )
    cpus_per = execution.cpus_per_replica or max(
        1.0, min(8.0, math.floor(cpus / replicas), _node_cpus(gpus_per))
    )
    return replicas, gpus_per, cpus_per


def _node_cpus(gpus_per_replica: float) -> float:
    """CPUs one replica can have on the best node (a replica cannot span nodes).

    With GPUs: a node's CPUs shared by the replicas its GPUs hold; without:
    the largest node's CPUs.
    """
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if gpus_per_replica > 0:
        shares = [
            n.get("CPU", 0.0) / max(1, math.floor(n["GPU"] / gpus_per_replica + 1e-9))
            for n in nodes
            if n.get("GPU", 0.0) >= gpus_per_replica
        ]
    else:
        shares = [n.get("CPU", 0.0) for n in nodes]
    return math.floor(max(shares, default=1.0))


def _batch_size(run_json: dict[str, Any], asked: int | None) -> int:
    """The batch size to run with: ``asked``, else the one run.json records (warns when they differ)."""
    recorded = run_json.get("batch_size", DEFAULT_BATCH_SIZE)
    if asked is not None and asked != recorded:
        log.warning(
            "batch size %d differs from the run's %d: boxes and scores of the shards done now may "
            "differ from the others in their last float bits",
            asked,
            recorded,
        )
    return recorded if asked is None else asked


class _Replicas:
    """The run's replica actors, started before the model is loaded and given it once it is.

    Starting them first lets their process start and imports overlap the
    loading task (both take seconds). ``count`` is how many the cluster fits
    (and no more than ``at_most``).
    """

    def __init__(self, dest: str, execution: ExecutionSettings, *, at_most: int | None = None):
        import ray

        replicas, gpus_per, cpus_per = replica_layout(execution)
        self.count = replicas if at_most is None else max(1, min(replicas, at_most))
        env = {k: os.environ[k] for k in _ENDPOINT_VARIABLES if k in os.environ}
        # `load` has a thread of its own: the shards given to a replica wait for its model, and
        # must not hold every thread while `load` still waits for its weights to arrive.
        self._actor_cls = ray.remote(concurrency_groups={"load": 1})(ShardWorker).options(
            num_cpus=cpus_per,
            num_gpus=gpus_per,
            max_concurrency=SHARDS_IN_FLIGHT,
            max_restarts=0,
            runtime_env={"env_vars": env} if env else None,
        )
        self._args = (dest, max(1, int(cpus_per)))
        self._model: tuple | None = None
        self._waiting = [self._actor_cls.remote(*self._args) for _ in range(self.count)]

    def load(self, loaded: ResolvedModel, settings: InferenceSettings) -> None:
        """Give the model to the replicas started so far and to every later one."""
        self._model = (loaded.card.to_dict(), loaded.weights, settings)
        for actor in self._waiting:
            self._load(actor)

    def new_replica(self):
        """A replica with the model: one started in advance while any is left, else a new one."""
        if self._waiting:
            return self._waiting.pop(0)
        actor = self._actor_cls.remote(*self._args)
        self._load(actor)
        return actor

    def _load(self, actor) -> None:
        actor.load.options(concurrency_group="load").remote(*self._model)

    def discard(self) -> None:
        """Stop the replicas started in advance (the run stopped before they were used)."""
        import ray

        for actor in self._waiting:
            ray.kill(actor)
        self._waiting = []


def _inference_settings(pinned: PinnedSettings, loaded: ResolvedModel, batch_size: int, schema_version: str):
    return InferenceSettings(
        score_threshold=pinned.score_threshold,
        mask_threshold=pinned.mask_threshold,
        max_detections=pinned.max_detections,
        batch_size=batch_size,
        max_pixels=pinned.max_pixels,
        preprocessing=with_channel(loaded.card.preprocessing, pinned.channel),
        overlap_threshold=pinned.overlap_threshold,
        exclusive_pixels=pinned.exclusive_pixels,
        pixel_size_um=pinned.pixel_size_um,
        scale=pinned.scale,
        slide_mpp_override=pinned.mpp_override,
        tile_size=pinned.tile_size,
        tile_overlap=pinned.tile_overlap or 0,
        tta=pinned.tta,
        mask_paste=loaded.card.mask_paste,
        schema_version=schema_version,
    )


def _start_scheduler(dest, replicas: _Replicas, execution, report, *, manifest_ready: bool):
    scheduler = Scheduler(
        dest,
        replicas.new_replica,
        replicas.count,
        max_attempts=execution.max_attempts,
        report=report,
        progress=execution.progress,
        manifest_ready=manifest_ready,
    )
    notes = set()
    for info in scheduler.describe_replicas():
        if info["note"] and info["note"] not in notes:
            notes.add(info["note"])
            log.warning(info["note"])
    return scheduler


def new_run(dest: str, pinned: PinnedSettings, execution: ExecutionSettings) -> RunReport:
    """Plan ``pinned.source`` into ``dest`` while executing it; write run.json when the plan is complete.

    Shards are handed to replicas as the listing arrives (with their rows
    while the manifest is still being written); the rest are read from the
    manifest by the replicas once it is published.

    Raises:
        RunError: ``dest`` already holds a run, or settings are invalid.
        PlanError, ModelLoadError: the source or model cannot be used.
    """
    started = time.monotonic()
    _check_new_dest(dest)
    top_level = check_source_top_level(pinned.source)
    check_model_file(pinned.model)
    connect_ray(execution.address)
    replicas = _Replicas(dest, execution)
    try:
        loaded = resolve_on_this_node(pinned.model, pinned.weights)
        pinned = _resolved_thresholds(pinned, loaded.card)
        if pinned.tile_size is not None and not 0 <= pinned.tile_overlap < pinned.tile_size:
            raise RunError(
                f"--tile-overlap {pinned.tile_overlap} must be smaller than --tile-size {pinned.tile_size}"
            )
        batch_size = execution.batch_size or DEFAULT_BATCH_SIZE
        settings = _inference_settings(pinned, loaded, batch_size, SCHEMA_VERSION)
        replicas.load(loaded, settings)
        plan = Plan(
            pinned.source,
            shard_size=pinned.shard_size,
            replicas=replicas.count,
            slide_pattern=pinned.slide_pattern,
            exclude=pinned.exclude,
            slide_settings=replace(
                pinned.slide_settings(), preprocessing=settings.preprocessing, default_mpp=loaded.card.mpp
            ),
            top_level=top_level,
        )
    except BaseException:
        replicas.discard()
        raise
    pinned = replace(pinned, shard_size=plan.shard_size)
    report = RunReport(dest=dest)
    scheduler = _start_scheduler(dest, replicas, execution, report, manifest_ready=False)
    report.replicas_ready_s = time.monotonic() - started
    first_uris: list[str] = []
    with ManifestWriter(dest) as manifest:
        for shard in plan:
            manifest.write(shard)
            rows = shard.rows.to_pylist() if scheduler.free_slots() else None
            first_uris = first_uris or shard.rows.column("uri").to_pylist()[:16]
            scheduler.add(shard.shard_id, shard.rows.num_rows, rows)
            scheduler.step(block=False)
    write_slides(dest, plan.slides)
    report.slides = len(plan.slides)
    report.slides_error = sum(row["status"] != "ok" for row in plan.slides)
    scheduler.publish_manifest()
    run_json = {
        "format": RUN_FORMAT,
        "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {**asdict(pinned), "source": storage.redact(pinned.source)},
        "model": {"card": loaded.card.to_dict(), "fingerprint": loaded.fingerprint},
        "preprocessing": settings.preprocessing.to_dict(),
        "images": manifest.images,
        "slides": len(plan.slides),
        "shards": manifest.shards,
        "batch_size": batch_size,
        "schema_version": SCHEMA_VERSION,
        "channels": _first_image_channels(first_uris),
        "versions": _versions(),
    }
    commit.write_json(_run_json_uri(dest), run_json)
    scheduler.run()
    report.committed.sort()
    report.wall_s = time.monotonic() - started
    return report


def resume(
    dest: str, overrides: dict[str, Any], execution: ExecutionSettings, *, shards: list[int] | None = None
) -> RunReport:
    """Finish the run at ``dest``: redo every shard without a committed marker, or exactly ``shards``.

    The driver reads the manifest's footer (shard sizes) and lists
    ``_commits/`` once; replicas read their shards' rows from the manifest.
    Redone shards' files are replaced, never appended to.

    Raises:
        RunError: no run, different settings or model, or unknown shard ids.
    """
    started = time.monotonic()
    pinned, run_json = reopen(dest, overrides)
    report = RunReport(dest=dest)
    reader = ManifestReader(dest)
    sizes = reader.shard_sizes()
    reader.close()
    if shards is None:
        done = commit.committed_shards(dest)
        todo = [s for s in sorted(sizes) if s not in done]
        report.skipped = sorted(done & set(sizes))
    else:
        unknown = sorted(set(shards) - set(sizes))
        if unknown:
            raise RunError(f"--shards names shards not in the manifest: {unknown} (run has {len(sizes)})")
        todo = sorted(set(shards))
    if not todo:
        report.wall_s = time.monotonic() - started
        return report
    check_model_file(pinned.model)
    connect_ray(execution.address)
    replicas = _Replicas(dest, execution, at_most=len(todo))
    try:
        loaded = _resolve_the_runs_model(pinned, run_json)
        batch_size = _batch_size(run_json, execution.batch_size)
        settings = _inference_settings(pinned, loaded, batch_size, run_json.get("schema_version", "1"))
        replicas.load(loaded, settings)
    except BaseException:
        replicas.discard()
        raise
    scheduler = _start_scheduler(dest, replicas, execution, report, manifest_ready=True)
    report.replicas_ready_s = time.monotonic() - started
    for shard_id in todo:
        scheduler.add(shard_id, sizes[shard_id])
    scheduler.run()
    report.committed.sort()
    report.wall_s = time.monotonic() - started
    return report


def format_report(report: RunReport) -> str:
    """The final summary printed by the job (several lines)."""
    lines = [
        f"images ok {report.images_ok}, in error {report.images_error}; instances {report.instances}",
        *(
            [
                f"slides {report.slides}, in error {report.slides_error} (slides.parquet); instances cut by "
                f"a window edge {report.instances_cut} (larger than --tile-overlap)"
            ]
            if report.slides
            else []
        ),
        f"shards committed {len(report.committed)}, failed {len(report.failed)}, "
        f"already done {len(report.skipped)}, retries {report.retries}; wall time {report.wall_s:.1f} s",
        f"output: {storage.redact(report.dest)}",
    ]
    if report.failed:
        ids = ",".join(str(s) for s in sorted(report.failed))
        lines.append(f"failed shards: {ids}")
        lines.append(f"to redo them: {report.resume_command}")
    return "\n".join(lines)
