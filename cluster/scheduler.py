"""Ray at the edges: connect, start workers that each hold a model, and feed them a job's images.

Two modes over one denoise loop (`tiling.render.denoise_request`):
  bulk           each worker owns whole images (groups of one prompt's seeds, stepped together); every
                 worker is kept busy with two groups in flight.
  tile_parallel  the driver runs the loop for one image at a time and fans each step's tile batches
                 out to all workers; the decode's tiles are spread over all workers too (`decode_across`),
                 and a worker writes the image while the next one denoises. What one worker runs alone (the
                 stages' round trips, a decode of one tile) gets the other CPU workers' threads (`lent`).
Dead workers are handled in one place, `_rows`: the image becomes a `failed` row and the job goes on
(each actor restarts once, reloading its model, before Ray gives up on it).
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import ray

from jobs import ImageRequest
from jobs.spec import TesseraConfig, TesseraError
from tiling import assemble, merged, to_uint8
from tiling.render import denoise_request, iter_groups, stages_of, tile_steps

from .progress import Progress
from .renderer import Renderer, failed_row, now

READY_TIMEOUT_S = 900  # model load on every worker


class ClusterError(TesseraError):
    """The cluster cannot run the job as configured (too few resources, workers failing to load)."""


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` ("auto", "host:port"), or start an embedded local one."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, dashboard_host="127.0.0.1",
                 logging_level="WARNING")


@ray.remote(num_cpus=0)
class Counter:
    """Tile-steps done by workers in bulk mode, read by the driver's progress bar."""

    def __init__(self):
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def value(self) -> int:
        return self.n


def start_workers(cfg: TesseraConfig) -> List[ray.actor.ActorHandle]:
    """`cluster.workers` actors, each with the model loaded: one GPU each, or `cpus_per_worker` CPU threads.

    CPU results depend on the BLAS thread count, so CPU workers get a fixed count (default 1) and the
    default is one worker per CPU (at most 8): the picture then never depends on the worker count.
    """
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    threads = cfg.cluster.cpus_per_worker or 1
    n = cfg.cluster.workers or (gpus if gpus else max(1, min(8, cpus // threads)))
    if gpus:
        if n > gpus:
            raise ClusterError(f"cluster.workers={n}: the cluster has {gpus} GPUs")
        opts = {"num_gpus": 1, "num_cpus": 1}
    else:
        if n * threads > cpus:
            raise ClusterError(f"cluster.workers={n}: {n} x {threads} CPUs asked, the cluster has {cpus}")
        opts = {"num_cpus": threads}
    # Two calls at once: the Renderer serialises device work itself and writes files outside that lock.
    actor = ray.remote(Renderer).options(max_restarts=1, max_task_retries=1, max_concurrency=2, **opts)
    workers = [actor.remote(cfg.model, cfg.output, threads) for _ in range(n)]
    try:
        ray.get([w.info.remote() for w in workers], timeout=READY_TIMEOUT_S)
    except ray.exceptions.RayActorError as e:  # the worker's own error is the last line of Ray's report
        cause = [line for line in str(e).splitlines() if line.strip()][-1].strip()
        raise ClusterError(f"a worker failed to load model={cfg.model.name}: {cause}") from e
    return workers


RAY_FAULTS = (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.ObjectLostError)


def fault(e: BaseException) -> str:
    """A failed row's error for a Ray fault: a task that raised (a bug or a fault in the worker's code: its own
    exception, first line) is told from a worker that died or an object that was lost."""
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = getattr(e, "cause", None) or e
        lines = [line for line in str(cause).splitlines() if line.strip()] or [""]
        return f"worker error: {type(cause).__name__}: {lines[0].strip()}"
    return f"worker lost: {type(e).__name__}: {e}"


def _rows(ref, reqs: Sequence[ImageRequest], started) -> List[dict]:
    """The rows of a finished render task (one row or a group's list); a dead worker, a lost object or a task
    that raised makes a `failed` row of each of its images."""
    try:
        rows = ray.get(ref)
        return rows if isinstance(rows, list) else [rows]
    except RAY_FAULTS as e:
        return [failed_row(req, started, fault(e)) for req in reqs]


def run_bulk(workers, requests: Iterable[ImageRequest], cfg: TesseraConfig, on_row: Callable[[dict], None],
             progress: Progress) -> None:
    """Each worker renders groups of images (`cluster.group` seeds of one prompt stepped together), two
    groups in flight each: it never waits on the driver, and writes one group's files while the next
    denoises. `requests` is read as groups are submitted (a streamed plan stays streamed)."""
    counter = Counter.remote()
    todo = iter_groups(requests, cfg.cluster.group)
    info = ray.get(workers[0].info.remote())
    pending = {}

    def submit(w):
        group = next(todo, None)
        if group is not None:
            progress.expect_tiles(sum(tile_steps(r, info) for r in group))
            pending[w.render_group.remote(group, counter)] = (w, group, now())

    for _ in range(2):  # round by round: a job of as many images as workers gives each worker one
        for w in workers:
            submit(w)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        progress.tiles_to(ray.get(counter.value.remote()))
        for ref in done:
            w, group, started = pending.pop(ref)
            for row in _rows(ref, group, started):
                on_row(row)
            submit(w)


def decode_across(workers, req: ImageRequest, z, factor: int, refined: bool = False):
    """One canvas's tiled VAE decode spread over `workers`: each runs the latent-resolution stage and sweeps
    every len(workers)-th tile; between sweeps the tiles' GroupNorm moments are merged here in tile order, so
    the picture is the one a single worker decodes, with the VAE tile worker 0 picks for all (`tiling.vae_tile=0`),
    by the VAE of the model that ran the last stage (`refined`: the hires checkpoint's, `Renderer.final_model`).
    A canvas of one tile is decoded by worker 0 alone, on the threads of all (CPU workers: `Renderer._set_threads`).
    (uint8 pixels, seconds, that tile side); a Ray fault ends the decode on every worker and is raised."""
    t0 = time.perf_counter()
    tile = ray.get(workers[0].vae_tile.remote(req, *z.shape[-2:]))  # one for all
    lent = len(workers) if tile >= max(z.shape[-2:]) else 1
    workers = workers[:1] if lent > 1 else workers
    try:
        canvas = ray.put(z)  # stored once, read by every worker
        spans = ray.get([w.decode_begin.remote(req, canvas, tile, refined, lent) for w in workers])[0]
        shares = [range(k, len(spans), len(workers)) for k in range(len(workers))]
        applied, passes = None, 1 if len(spans) == 1 else req.vae_passes  # as tiling.vae.run_sweeps
        for number in range(1, passes + 1):
            last = number == passes
            parts = {}
            for out in ray.get([w.decode_sweep.remote(req.image_id, list(share), applied, last, number, lent)
                                for w, share in zip(workers, shares)]):
                parts.update(out)
            if not last:
                applied = merged([parts[i] for i in range(len(spans))])
        img = assemble(spans, parts, tuple(z.shape[-2:]), factor, req.vae_overlap)
        return to_uint8(img, req.width, req.height), time.perf_counter() - t0, tile
    except RAY_FAULTS:
        for w in workers:
            w.decode_end.remote(req.image_id)
        raise


def run_tile_parallel(workers, requests: Iterable[ImageRequest], cfg: TesseraConfig,
                      on_row: Callable[[dict], None], progress: Progress) -> None:
    """One image at a time, each step's tile batches and then its decode's tiles spread over every worker; a
    worker writes the image while the next one denoises."""
    info = ray.get(workers[0].info.remote())
    writing = None  # (ref, [req], started) of the image a worker is writing
    for i, req in enumerate(requests):
        started = now()
        progress.expect_tiles(tile_steps(req, info))

        def predict_of(refine: bool):  # refine: the stages that refine a reference (model.stage_path's weights)
            def predict(batches, t):
                pairs = req.prompt_pairs()  # the image's prompt, then its regions' (TileBatch.prompt)
                refs = [workers[k % len(workers)].predict.remote(b, t, *pairs[b.prompt], req.guidance,
                                                                 max(len(c.tiles) for c in batches), refine)
                        for k, b in enumerate(batches)]
                return ray.get(refs)
            return predict

        try:
            batch = ray.get(workers[0].batch_size.remote(req))  # the worker's, measured once per tile size
            t0 = time.perf_counter()
            z = denoise_request(predict_of(False), info, req, lambda step, n: progress.tiles(n), batch,
                                reference=lambda k, zs, stage, bases: ray.get(workers[0].reference.remote(
                                    [req], k, zs, stage, bases, lent=len(workers))),
                                stage_predict=predict_of(True) if cfg.model.stage_path else None)
            seconds = time.perf_counter() - t0
            decoded = decode_across(workers, req, z, info.vae_scale_factor,
                                    stages_of(req, info)[-1].refine)
        except RAY_FAULTS as e:
            on_row(failed_row(req, started, fault(e)))
            continue
        if writing is not None:
            on_row(_rows(*writing)[0])
        writing = (workers[i % len(workers)].write.remote(req, decoded, started, seconds), [req], started)
    if writing is not None:
        on_row(_rows(*writing)[0])


def run_job(cfg: TesseraConfig, requests: Iterable[ImageRequest], on_row: Callable[[dict], None],
            show_progress: bool = True, progress: Optional[Progress] = None) -> dict:
    """Render `requests` (a list, or a stream read as work is handed out) on the cluster; every finished image goes
    to `on_row` as it lands. Nothing starts when there is nothing to render ({} is returned)."""
    stream = iter(requests)
    first = list(itertools.islice(stream, 1))
    if not first:
        return {}
    connect(cfg.cluster.address)
    workers = start_workers(cfg)
    try:
        info = ray.get(workers[0].info.remote())
        mode, tail = cfg.cluster.mode, []
        head = first + list(itertools.islice(stream, len(workers) - 1))
        if mode == "auto":  # DeepCache's features stay on the worker that renders the whole image
            mode = "bulk" if len(head) >= len(workers) or cfg.model.deep_cache > 1 else "tile_parallel"
            if mode == "bulk" and cfg.model.deep_cache <= 1 and cfg.cluster.group == 1:
                stream = whole_rounds(stream, len(workers), tail)  # `head` is a whole round
        requests = itertools.chain(head, stream)
        own = progress is None
        progress = progress or Progress(len(head), enabled=show_progress, total_known=False)
        try:
            def record(row):
                progress.image(row["status"] == "ok")
                on_row(row)

            (run_bulk if mode == "bulk" else run_tile_parallel)(workers, requests, cfg, record, progress)
            if tail:
                run_tile_parallel(workers, tail, cfg, record, progress)
        finally:
            if own:
                progress.close()
    finally:
        for w in workers:
            ray.kill(w)
    return {"mode": mode, "workers": len(workers), "device": info.device, "tile_parallel_tail": len(tail)}


def whole_rounds(requests: Iterator[ImageRequest], workers: int, tail: list) -> Iterator[ImageRequest]:
    """`requests`, read a round of `workers` images ahead; a last round of at most half the workers goes to `tail`
    instead: bulk mode would give those workers one image each and leave the others idle, tile-parallel mode renders
    each on all of them after the rounds (one image on two CPU workers ~1.8x sooner, on two GPUs 1.67x), with the
    same bytes (bulk renders them one by one too: `cluster.group=1`)."""
    while True:
        chunk = list(itertools.islice(requests, workers))
        if len(chunk) <= workers // 2:
            tail.extend(chunk)
            return
        yield from chunk
        if len(chunk) < workers:
            return
