"""Executors: where a suite's tasks run. Results always land in one results store, committed by the driver.

- :class:`InProcess` (default): one :class:`~cloakbench.bench.runner.CellWorker` in this process.
- :class:`RayExecutor`: one worker actor per GPU of a Ray cluster (without GPUs: one per as many CPUs as this
  process runs threads; ``workers`` overrides), started
  with ``ray.init(address=...)``; cloak tasks run first (every evaluate task reads the cloaks), then the
  evaluate and service tasks, spread over the actors as they free up. Workers read and write the artifact
  cache at the path the driver gives them: on one machine, or a cluster with a shared filesystem, a cloak is
  made once; elsewhere each worker remakes it (the same pixels: every task is seeded).

:func:`run_into_store` is the runner the CLI uses: it binds the results folder to the suite, skips every
task the store already holds ``ok`` (a killed run resumes where it stopped), records an ``attempts`` row
with the run metadata, and commits each task the moment it finishes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from cloakbench.bench import metadata
from cloakbench.bench.cache import ArtifactCache
from cloakbench.bench.export import ordered_rows
from cloakbench.bench.plan import DataShape, Task, TaskKind, plan_tasks
from cloakbench.bench.runner import (
    CellWorker,
    RunResult,
    TaskResult,
    load_suite_data,
    resolve_device,
    seed_timings,
    split_layout,
)
from cloakbench.bench.store import ResultsStore
from cloakbench.bench.suite import Suite
from cloakbench.cache import ENV_CACHE, cache_root
from cloakbench.config import stable_hash
from cloakbench.datasets import Manifest, Split, read_identity_names, split_per_identity
from cloakbench.devices import gpu_actor_cpus
from cloakbench.errors import ConfigError

log = logging.getLogger(__name__)

OnResult = Callable[[TaskResult], None]


class Executor(Protocol):
    name: str

    def run(
        self, suite: Suite, tasks: Sequence[Task], *, cache: ArtifactCache, on_result: OnResult, progress: bool
    ) -> None: ...


class InProcess:
    """Every task in this process, in plan order."""

    name = "in-process"

    def __init__(self) -> None:
        self.worker: CellWorker | None = None

    def run(
        self, suite: Suite, tasks: Sequence[Task], *, cache: ArtifactCache, on_result: OnResult, progress: bool
    ) -> None:
        if not tasks:
            return
        self.worker = CellWorker(suite, cache=cache, progress=progress)
        for task in tasks:
            on_result(self.worker.run(task))


class _RayWorker:
    """The body of a Ray actor: a CellWorker built in the worker process (models load there, once)."""

    def __init__(self, suite: Suite, cache_dir: str, cache_enabled: bool, threads: int) -> None:
        import torch

        # Ray gives an actor one intra-op thread per CPU it reserved; the driver's count makes CPU reductions
        # (conv, matmul) sum in the same order as an in-process run, so the rows are the same to the bit
        torch.set_num_threads(threads)
        if suite.plugins:  # a suite's plug-ins register names in this process too (installed ones load on their own)
            from cloakbench.plugins import load_plugins

            load_plugins(list(suite.plugins))
        self.worker = CellWorker(suite, cache=ArtifactCache(Path(cache_dir), enabled=cache_enabled))

    def run(self, task: Task) -> TaskResult:
        return self.worker.run(task)


class RayExecutor:
    """Spread tasks over a Ray cluster (``address``: ``"auto"``, ``"HOST:PORT"`` or None for a local one)."""

    name = "ray"

    def __init__(self, address: str | None = None, *, workers: int | None = None) -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        self.address = address
        self.workers = workers

    def run(
        self, suite: Suite, tasks: Sequence[Task], *, cache: ArtifactCache, on_result: OnResult, progress: bool
    ) -> None:
        if not tasks:
            return
        try:
            import ray as ray_module
            from ray.util import ActorPool
        except ImportError as exc:
            raise ConfigError("--executor ray needs Ray: pip install 'cloakbench[ray]'") from exc
        ray: Any = ray_module  # untyped API
        started_here = not ray.is_initialized()
        if started_here:
            env = {ENV_CACHE: str(cache_root())}  # workers fetch and read model weights where the driver does
            ray.init(address=self.address, runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)
        try:
            resources = ray.cluster_resources()
            gpus = int(resources.get("GPU", 0))
            wants_gpu = suite.device != "cpu" and gpus > 0
            if suite.device == "cuda" and not gpus:
                raise ConfigError(f"device: 'cuda', but the Ray cluster has no GPU ({resources})")
            threads = torch.get_num_threads()
            # one actor per GPU; without GPUs, as many as the cluster's CPUs hold at the driver's thread count
            # (more would oversubscribe the cores: OpenMP threads spinning against each other)
            slots = gpus if wants_gpu else max(1, int(resources.get("CPU", 1)) // threads)
            n = max(1, min(self.workers or slots, len(tasks)))
            # a GPU actor still works on the CPU (PNG codecs, input countermeasures, feeding the GPU): it reserves
            # its node's CPUs per GPU, at most the threads it runs (devices.gpu_actor_cpus says why)
            cpus = 1.0
            if wants_gpu:
                nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive") and node.get("Resources")]
                cpus = gpu_actor_cpus(nodes or [resources], threads)
            actor_cls = ray.remote(num_gpus=1 if wants_gpu else 0, num_cpus=cpus)(_RayWorker)
            log.info(
                "ray: %d worker(s), %d threads and %g reserved CPU(s) each%s, over %s",
                n, threads, cpus, " and one GPU" if wants_gpu else "", resources,
            )  # fmt: skip
            actors = [actor_cls.remote(suite, str(cache.root), cache.enabled, threads) for _ in range(n)]
            try:
                cloak = [t for t in tasks if t.kind is TaskKind.CLOAK]
                rest = [t for t in tasks if t.kind is not TaskKind.CLOAK]
                for phase in (cloak, rest):
                    if not phase:
                        continue
                    pool = ActorPool(actors)
                    for result in pool.map_unordered(lambda a, t: a.run.remote(t), phase):
                        on_result(result)
            finally:
                for a in actors:
                    ray.kill(a)
        finally:
            if started_here:
                ray.shutdown()


def suite_digest(suite: Suite) -> str:
    """What a results store is bound to: the resolved suite and, with ``dataset.names``, the names that file
    gives (it is named by path: rows made under other names must not be resumed into). A suite without
    ``dataset.names`` and with every ``cloak_fraction`` at 1 keeps the digest it had before those keys existed,
    so its earlier runs still resume."""
    plain = suite.to_dict()
    for defense in plain["defenses"]:  # keys added later with their old behaviour as default: old digests hold
        if defense.get("cloak_fraction") == 1.0:
            del defense["cloak_fraction"]
    names_file = plain["dataset"].pop("names", None)
    if names_file is None or suite.dataset.names is None or suite.dataset.path is None:
        return stable_hash(plain, length=24)
    names = read_identity_names(suite.dataset.names, suite.dataset.path)
    return stable_hash(plain, {"names": names_file, "mapping": sorted(names.items())}, length=24)


@dataclass
class Layout:
    """The dataset as the driver sees it: manifest, split and protected identities (no pixels loaded)."""

    manifest: Manifest
    splits: dict[str, Split]
    alignment: dict[str, Any] | None
    shape: DataShape


def load_layout(suite: Suite) -> Layout:
    manifest, alignment = load_suite_data(suite)
    splits = split_per_identity(manifest, train_fraction=suite.dataset.train_fraction, seed=suite.dataset.split_seed)
    train, query, protected = split_layout(suite, manifest, splits)
    shape = DataShape(
        identities=len(train), images=len(manifest.records), protected=protected,
        train_photos={k: len(v) for k, v in train.items()}, query_photos={k: len(v) for k, v in query.items()},
    )  # fmt: skip
    return Layout(manifest=manifest, splits=splits, alignment=alignment, shape=shape)


@dataclass
class RunOutcome:
    result: RunResult
    store_path: Path
    resumed: bool
    tasks_total: int
    tasks_skipped: int  # already in the store from an earlier attempt
    tasks_run: int
    tasks_failed: int
    seconds: float
    attempt: int
    stage_seconds: dict[str, float] = field(default_factory=dict)  # this attempt's tasks, summed per stage
    warnings: list[str] = field(default_factory=list)


def _code_changes(attempts: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """A warning when the store's earlier attempts ran another cloakbench (git commit, dirty tree or version):
    the suite digest pins the config, not the code, and a resume would mix rows of two code versions."""

    def version(m: dict[str, Any]) -> tuple[Any, Any, Any]:
        git = m.get("git") or {}
        return git.get("commit"), git.get("dirty"), (m.get("packages") or {}).get("cloakbench")

    now = version(meta)
    before = {version(a["metadata"]) for a in attempts}
    others = sorted(str(v) for v in before if v != now)
    if not others:
        return []
    return [
        f"earlier attempts at this run used another cloakbench (commit, dirty, version: {'; '.join(others)}; now "
        f"{now}); the rows already stored are kept, so the results mix two code versions (--fresh starts over)"
    ]


def run_into_store(
    suite: Suite, out_dir: Path, *, executor: Executor | None = None, cache: ArtifactCache | None = None,
    progress: bool = False, on_task: Callable[[TaskResult, int, int], None] | None = None,
) -> RunOutcome:  # fmt: skip
    """Run (or resume) ``suite`` into the results store of ``out_dir``; see the module docstring.

    ``on_task(result, done, total)`` is called after each task is committed (for progress reporting)."""
    executor = executor if executor is not None else InProcess()
    cache = cache if cache is not None else ArtifactCache()
    start = time.perf_counter()
    layout = load_layout(suite)  # before the store: a dataset error leaves no half-made results folder
    store = ResultsStore.in_folder(out_dir)
    try:
        resumed = not store.bind_suite(suite.to_dict(), suite_digest(suite))
        store.put("alignment", layout.alignment)
        tasks = plan_tasks(suite)
        store.put("plan", [t.key for t in tasks])  # the row order of exports (no need to re-read the suite)
        states = store.task_states()
        todo = [t for t in tasks if states.get(t.key) != "ok"]
        if resumed:
            log.info("%s: resuming, %d of %d tasks already done", out_dir, len(tasks) - len(todo), len(tasks))
        device = resolve_device(suite.device)
        meta = metadata.collect(device, onnx_providers={})
        meta["executor"] = executor.name
        warnings = _code_changes(store.attempts(), meta) if resumed else []
        for w in warnings:
            log.warning("%s: %s", out_dir, w)
        attempt = store.start_attempt(executor=executor.name, metadata=meta)
        done = len(tasks) - len(todo)
        stats = {"run": 0, "failed": 0}
        stages: dict[str, float] = {}
        providers: dict[str, list[str]] = {}
        bar = _bar(progress, total=len(tasks), initial=done, desc=suite.name)

        def on_result(result: TaskResult) -> None:
            nonlocal done
            written = store.commit(result, attempt=attempt)
            if not written:
                log.warning("task %s was committed by another process first; its rows were kept", result.task.key)
            done += 1
            stats["run"] += 1
            stats["failed"] += result.status != "ok"
            providers.update(result.onnx_providers)
            for k, v in result.stages.items():
                stages[k] = stages.get(k, 0.0) + v
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(result.task.key, refresh=False)
            if on_task is not None:
                on_task(result, done, len(tasks))

        try:
            inner = progress and executor.name == InProcess.name
            executor.run(suite, todo, cache=cache, on_result=on_result, progress=inner)
        except BaseException:
            meta["onnxruntime_providers_used"] = providers
            store.finish_attempt(attempt, status="interrupted", metadata=meta)
            raise
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        refused = {key: n for key, n in store.refused_requests().items() if n}
        for key, n in refused.items():  # someone else found a service's port: say so (the requests changed nothing)
            warnings.append(f"task {key}: its service's HTTP server refused {n} request(s) from outside the run")
            log.warning("%s: %s", out_dir, warnings[-1])
        meta.update(
            onnxruntime_providers_used=providers, attempt_seconds=seconds, stage_seconds=stages,
            refused_requests=refused,
        )  # fmt: skip
        store.finish_attempt(attempt, status="finished", metadata=meta)
        result = result_from_store(store, suite, layout)
        result.timings.update(total_s=seconds)
        return RunOutcome(
            result=result, store_path=store.path, resumed=resumed, tasks_total=len(tasks),
            tasks_skipped=len(tasks) - len(todo), tasks_run=stats["run"], tasks_failed=stats["failed"],
            seconds=seconds, attempt=attempt, stage_seconds=stages, warnings=warnings,
        )  # fmt: skip
    finally:
        store.close()


def _bar(enabled: bool, *, total: int, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="task", dynamic_ncols=True)


def result_from_store(store: ResultsStore, suite: Suite, layout: Layout) -> RunResult:
    """The whole run as a :class:`RunResult`, read back from the store in plan order."""

    def ordered(table: str) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "task_key"} for r in ordered_rows(store, table, suite)]

    tasks = store.rows("tasks")
    timings = seed_timings((t["kind"], int(t["seed"]), float(t["seconds"])) for t in tasks)
    by_key = {t["task_key"]: t for t in tasks}
    usage = {
        f"{by_key[k]['subject']}/{by_key[k]['countermeasure']}/seed{by_key[k]['seed']}": v
        for k, v in store.service_usage().items()
        if k in by_key
    }
    providers: dict[str, list[str]] = {}
    for a in store.attempts():
        providers.update(a["metadata"].get("onnxruntime_providers_used") or {})
    return RunResult(
        suite=suite, summary=ordered("cells"), queries=ordered("queries"), cloaks=ordered("cloaks"),
        manifest=layout.manifest, splits=layout.splits, onnx_providers=providers, timings=timings,
        alignment=layout.alignment, service_usage=usage, grids=store.grids(), adaptations=ordered("adaptations"),
    )  # fmt: skip
