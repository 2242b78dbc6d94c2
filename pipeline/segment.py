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

Exit codes (:func:`run`): 0 every shard committed; 3 some shards failed (the
resume command is printed).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import pyarrow.parquet as pq

from pipeline import commit, storage
from pipeline.decode import RawImage, one_line, read_and_decode
from pipeline.model import LoadedModel, ModelCard, resolve_model
from pipeline.plan import plan
from pipeline.preprocess import with_channel
from pipeline.worker import InferenceSettings, ShardProcessor
from schemas import MANIFEST, SCHEMA_VERSION, check_version

EXIT_OK = 0
EXIT_SHARDS_FAILED = 3
RUN_FORMAT = "segpipe-run"
DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's own default limit (about 9459 x 9459 px)."""

RETRY_DELAY_S = 1.0
"""A failed shard attempt is retried after 1 s, then 2 s, 4 s...: a storage outage gets time to pass."""
SHARDS_IN_FLIGHT = 2
"""Shards a replica holds at once: one decodes/encodes while the other infers; 3 measured no faster."""
DEFAULT_OVERLAP_THRESHOLD = 0.7
"""Mask-overlap suppression (intersection over the smaller mask); chosen on held-out tiles (README)."""
DEFAULT_EXCLUSIVE_PIXELS = False
"""Exclusive pixel ownership off by default; chosen on held-out tiles (README)."""
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
    shard_size: int = 256
    slide_pattern: str | None = None
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


def _resolved_thresholds(pinned: PinnedSettings, card: ModelCard) -> PinnedSettings:
    return PinnedSettings(
        **{
            **asdict(pinned),
            "score_threshold": card.score_threshold
            if pinned.score_threshold is None
            else pinned.score_threshold,
            "mask_threshold": card.mask_threshold if pinned.mask_threshold is None else pinned.mask_threshold,
            "max_detections": card.max_detections if pinned.max_detections is None else pinned.max_detections,
        }
    )


def _run_json_uri(dest: str) -> str:
    return storage.join(dest, "run.json")


def _manifest_uri(dest: str) -> str:
    return storage.join(dest, "manifest.parquet")


def start(
    dest: str, pinned: PinnedSettings, *, batch_size: int | None = None
) -> tuple[PinnedSettings, LoadedModel]:
    """Create a new run at ``dest``: resolve the model, plan, write manifest.parquet and run.json.

    ``batch_size`` (None: ``DEFAULT_BATCH_SIZE``) is recorded in run.json as the run's default for resumes.

    Raises:
        RunError: ``dest`` already holds a run, or settings are invalid.
        PlanError, ModelLoadError: the source or model cannot be used.
    """
    if storage.exists(_run_json_uri(dest)):
        raise RunError(
            f"{storage.redact(dest)} already holds a run; use --resume {storage.redact(dest)} "
            "to finish it, or choose a new --output"
        )
    loaded = resolve_model(pinned.model, weights=pinned.weights)
    pinned = _resolved_thresholds(pinned, loaded.card)
    manifest = plan(pinned.source, shard_size=pinned.shard_size, slide_pattern=pinned.slide_pattern)
    storage.write_bytes_atomic(_manifest_uri(dest), commit.parquet_bytes(manifest))
    run_json = {
        "format": RUN_FORMAT,
        "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {**asdict(pinned), "source": storage.redact(pinned.source)},
        "model": {"card": loaded.card.to_dict(), "fingerprint": loaded.fingerprint},
        "preprocessing": with_channel(loaded.card.preprocessing, pinned.channel).to_dict(),
        "images": manifest.num_rows,
        "shards": int(manifest["shard_id"][-1].as_py()) + 1,
        "batch_size": batch_size or DEFAULT_BATCH_SIZE,
        "schema_version": SCHEMA_VERSION,
        "channels": _first_image_channels(manifest),
        "versions": _versions(),
    }
    commit.write_json(_run_json_uri(dest), run_json)
    return pinned, loaded


def _first_image_channels(manifest) -> dict[str, Any]:
    """The channel names of the run's first decodable image, with how to read the intensity lists."""
    for uri in manifest.column("uri").to_pylist()[:16]:
        raw = read_and_decode(uri, max_pixels=DEFAULT_MAX_PIXELS)
        if isinstance(raw, RawImage):
            return {
                "first_image": list(raw.channel_names),
                "note": "intensity_* lists follow each image's own channels (images.channels)",
            }
    return {"first_image": None, "note": "no image among the first 16 could be decoded"}


def reopen(dest: str, overrides: dict[str, Any]) -> tuple[PinnedSettings, LoadedModel]:
    """Reopen the run at ``dest`` for resume or rerun.

    ``overrides`` are pinned settings the user passed again; any that differ
    from the run's are refused. The model must still have the same fingerprint.

    Raises:
        RunError: no run at ``dest``, or a setting or the model differs.
    """
    if not storage.exists(_run_json_uri(dest)):
        raise RunError(f"no run to resume at {storage.redact(dest)} (run.json not found)")
    run_json = commit.read_json(_run_json_uri(dest))
    written = run_json.get("schema_version", "1")
    if written != SCHEMA_VERSION:
        raise RunError(
            f"{storage.redact(dest)} was written with table schema version {written} and this segpipe "
            f"writes version {SCHEMA_VERSION}: new shards would not match the old ones; finish it with "
            "the segpipe that started it, or start a new run (--output)"
        )
    pinned = PinnedSettings(**run_json["settings"])
    different = {
        k: (getattr(pinned, k), v) for k, v in overrides.items() if v is not None and getattr(pinned, k) != v
    }
    if different:
        described = ", ".join(f"{k}: run has {old!r}, asked {new!r}" for k, (old, new) in different.items())
        raise RunError(
            f"cannot resume {storage.redact(dest)} with different settings ({described}); "
            "a new --output starts a new run"
        )
    loaded = resolve_model(pinned.model, weights=pinned.weights)
    if loaded.fingerprint != run_json["model"]["fingerprint"]:
        raise RunError(
            f"the model changed since the run started (fingerprint {loaded.fingerprint[:19]}..., "
            f"run has {run_json['model']['fingerprint'][:19]}...); a new --output starts a new run"
        )
    return pinned, loaded


def read_manifest(dest: str):
    """The run's manifest table (schema checked)."""
    fs, path = storage.resolve(_manifest_uri(dest))
    table = pq.read_table(path, filesystem=fs)
    check_version(table.schema, "manifest")
    return table.cast(MANIFEST)


class ShardWorker:
    """Ray actor body: one model replica that processes and commits shards."""

    def __init__(self, card: dict, weights: dict, settings: InferenceSettings, dest: str, threads: int):
        import ray
        import torch

        gpu_ids = ray.get_gpu_ids()
        self.note = None
        device = "cpu"
        if gpu_ids and torch.cuda.is_available():
            device = "cuda"
        elif gpu_ids:
            self.note = (
                f"replica placed on GPU resource {gpu_ids} but CUDA is not available "
                f"(torch {torch.__version__}); running on the CPU"
            )
        self.dest = dest
        self.processor = ShardProcessor(
            ModelCard.from_dict(card), weights, settings, device=device, threads=threads
        )

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

    def run_shard(self, shard_id: int, rows: list[dict], attempt: int) -> dict[str, Any]:
        import ray

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


def _batch_size(dest: str, asked: int | None) -> int:
    """The batch size to run with: ``asked``, else the one run.json records (warns when they differ)."""
    recorded = commit.read_json(_run_json_uri(dest)).get("batch_size", DEFAULT_BATCH_SIZE)
    if asked is not None and asked != recorded:
        log.warning(
            "batch size %d differs from the run's %d: boxes and scores of the shards done now may "
            "differ from the others in their last float bits",
            asked,
            recorded,
        )
    return recorded if asked is None else asked


def execute(
    dest: str,
    pinned: PinnedSettings,
    loaded: LoadedModel,
    execution: ExecutionSettings,
    *,
    shards: list[int] | None = None,
) -> RunReport:
    """Process the run's shards on Ray and commit them.

    Without ``shards``, every shard lacking a committed marker is processed;
    with ``shards``, exactly those (their files are replaced). A shard whose
    replica dies or raises is retried (on a fresh replica if it died) up to
    ``execution.max_attempts`` times, then marked failed.
    """
    import ray
    from ray.exceptions import RayActorError, RayError, WorkerCrashedError

    started = time.monotonic()
    report = RunReport(dest=dest)
    manifest = read_manifest(dest)
    rows_by_shard: dict[int, list[dict]] = {}
    for row in manifest.to_pylist():
        rows_by_shard.setdefault(row["shard_id"], []).append(row)
    if shards is None:
        done = commit.committed_shards(dest)
        todo = [s for s in sorted(rows_by_shard) if s not in done]
        report.skipped = sorted(done & set(rows_by_shard))
    else:
        unknown = sorted(set(shards) - set(rows_by_shard))
        if unknown:
            raise RunError(
                f"--shards names shards not in the manifest: {unknown} (run has {len(rows_by_shard)})"
            )
        todo = sorted(set(shards))
    if not todo:
        report.wall_s = time.monotonic() - started
        return report

    batch_size = _batch_size(dest, execution.batch_size)
    connect_ray(execution.address)
    replicas, gpus_per, cpus_per = replica_layout(execution)
    replicas = min(replicas, len(todo))
    settings = InferenceSettings(
        score_threshold=pinned.score_threshold,
        mask_threshold=pinned.mask_threshold,
        max_detections=pinned.max_detections,
        batch_size=batch_size,
        max_pixels=pinned.max_pixels,
        preprocessing=with_channel(loaded.card.preprocessing, pinned.channel),
        overlap_threshold=pinned.overlap_threshold,
        exclusive_pixels=pinned.exclusive_pixels,
        pixel_size_um=pinned.pixel_size_um,
    )
    weights_ref = ray.put({k: v.detach().cpu().numpy() for k, v in loaded.module.state_dict().items()})
    env = {k: os.environ[k] for k in _ENDPOINT_VARIABLES if k in os.environ}
    actor_cls = ray.remote(ShardWorker).options(
        num_cpus=cpus_per,
        num_gpus=gpus_per,
        max_concurrency=SHARDS_IN_FLIGHT,
        max_restarts=0,
        runtime_env={"env_vars": env} if env else None,
    )

    def new_replica():
        return actor_cls.remote(loaded.card.to_dict(), weights_ref, settings, dest, max(1, int(cpus_per)))

    actors = [new_replica() for _ in range(replicas)]
    notes = set()
    for info in ray.get([a.describe.remote() for a in actors]):
        if info["note"] and info["note"] not in notes:
            notes.add(info["note"])
            log.warning(info["note"])
    report.replicas_ready_s = time.monotonic() - started

    total_images = sum(len(rows_by_shard[s]) for s in todo)
    bar = _progress_bar(total_images, execution.progress)
    pending = deque(todo)
    not_before: dict[int, float] = {}
    attempts: Counter[int] = Counter()
    load = [0] * replicas
    in_flight: dict[Any, tuple[int, int, Any]] = {}

    def next_ready_shard() -> int | None:
        now = time.monotonic()
        for shard_id in pending:
            if not_before.get(shard_id, 0.0) <= now:
                pending.remove(shard_id)
                return shard_id
        return None

    while pending or in_flight:
        for index in range(replicas):
            while load[index] < SHARDS_IN_FLIGHT and (shard_id := next_ready_shard()) is not None:
                attempts[shard_id] += 1
                ref = actors[index].run_shard.remote(shard_id, rows_by_shard[shard_id], attempts[shard_id])
                in_flight[ref] = (shard_id, index, actors[index])
                load[index] += 1
        timeout = backoff_timeout(pending, not_before, time.monotonic())
        if not in_flight:
            time.sleep(timeout or 0.0)
            continue
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout)
        for ref in ready:
            shard_id, index, actor = in_flight.pop(ref)
            load[index] -= 1
            try:
                summary = ray.get(ref)
            except (RayActorError, WorkerCrashedError) as exc:
                if actors[index] is actor:
                    actors[index] = new_replica()
                error = f"replica died: {one_line(exc, 200)}"
            except RayError as exc:
                error = one_line(getattr(exc, "cause", None) or exc, 300)
            else:
                report.committed.append(shard_id)
                report.images_ok += summary["images_ok"]
                report.images_error += summary["images"] - summary["images_ok"]
                report.instances += summary["instances"]
                report.stage_s.update(summary["timings_s"])
                _shard_line(bar, shard_id, summary)
                bar.update(summary["images"])
                bar.set_postfix(committed=len(report.committed), failed=len(report.failed))
                continue
            if attempts[shard_id] < execution.max_attempts:
                report.retries += 1
                _log_line(
                    bar,
                    f"{commit.shard_name(shard_id)} attempt {attempts[shard_id]} failed: {error}; retrying",
                )
                not_before[shard_id] = time.monotonic() + RETRY_DELAY_S * 2 ** (attempts[shard_id] - 1)
                pending.appendleft(shard_id)
            else:
                report.failed[shard_id] = error
                try:
                    commit.mark_failed(dest, shard_id, {"attempts": attempts[shard_id], "error": error})
                except OSError as exc:
                    # No marker at all is also redone by --resume; losing this write loses nothing.
                    _log_line(
                        bar, f"could not write the failed marker of {commit.shard_name(shard_id)}: {exc}"
                    )
                _log_line(
                    bar, f"{commit.shard_name(shard_id)} failed after {attempts[shard_id]} attempts: {error}"
                )
                bar.update(len(rows_by_shard[shard_id]))
                bar.set_postfix(committed=len(report.committed), failed=len(report.failed))
    bar.close()
    for actor in actors:
        ray.kill(actor)
    report.committed.sort()
    report.wall_s = time.monotonic() - started
    return report


def backoff_timeout(pending, not_before: dict[int, float], now: float) -> float | None:
    """Seconds until the earliest pending shard's retry delay ends; None if none is waiting.

    None makes the driver block until a shard finishes; a shard that may go
    now but has no free replica slot must not turn the wait into a busy loop.
    """
    waiting = [not_before[s] for s in pending if not_before.get(s, 0.0) > now]
    return min(waiting) - now if waiting else None


def _progress_bar(total: int, enabled: bool | None):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="img",
        desc="segment",
        disable=(None if enabled is None else not enabled),
        file=sys.stderr,
        smoothing=0.1,
    )


def _log_line(bar, text: str) -> None:
    bar.write(text, file=sys.stderr)


def _shard_line(bar, shard_id: int, summary: dict[str, Any]) -> None:
    errors = summary["images"] - summary["images_ok"]
    _log_line(
        bar,
        f"{commit.shard_name(shard_id)} committed: {summary['images']} images ({errors} errors), "
        f"{summary['instances']} instances, {summary['timings_s']['total_s']:.1f} s",
    )


def format_report(report: RunReport) -> str:
    """The final summary printed by the job (several lines)."""
    lines = [
        f"images ok {report.images_ok}, in error {report.images_error}; instances {report.instances}",
        f"shards committed {len(report.committed)}, failed {len(report.failed)}, "
        f"already done {len(report.skipped)}, retries {report.retries}; wall time {report.wall_s:.1f} s",
        f"output: {storage.redact(report.dest)}",
    ]
    if report.failed:
        ids = ",".join(str(s) for s in sorted(report.failed))
        lines.append(f"failed shards: {ids}")
        lines.append(f"to redo them: {report.resume_command}")
    return "\n".join(lines)
