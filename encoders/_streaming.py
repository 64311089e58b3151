"""Streaming encode: read and preprocess in workers while the device computes.

:func:`stream_encode` runs three overlapped stages:

1. reading, in ``num_workers`` worker processes (a torch ``DataLoader`` over single series,
   in input order): each loads a series (by default an OME-Zarr image path, read with
   :func:`storage.images.open_image`) and, in ``workers`` mode, preprocesses it on the CPU.
   Processes, not threads: Zarr decoding holds the GIL in places and does not scale in
   threads (measured: 16 threads read no faster than one);
2. staging, in ``device_threads`` threads of the calling process: pin the tensor and, on cuda,
   copy it to the device on the thread's own CUDA stream (``non_blocking``); in ``device``
   mode also run the MONAI preprocessing there, on the GPU;
3. compute, in the calling thread: series gathered in input order into batches of
   ``batch_size``; each batch is queued on the device before the previous batch's results are
   read back, so the device never waits for the host between batches.

``preprocess_on``: ``"workers"`` (CPU, in the reading processes), ``"device"`` (cuda and
encoders with ``preprocess_on_device``, i.e. Merlin: raw volumes go to the GPU and are
preprocessed there; on the CPU the same code path runs on CPU tensors) or ``"auto"``
(``"device"`` on cuda where supported). At most ``prefetch`` series per worker wait in each
stage, which bounds memory.

A series that fails to load or preprocess does not stop the stream: its result carries the
error and no embeddings.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from medflow.encoders._base import Encoder
from medflow.storage.images import ImageMeta, open_image

__all__ = ["EncodedSeries", "load_series", "stream_encode"]

Loader = Callable[[Any], tuple[ImageMeta, Any]]
Mode = Literal["workers", "device"]
_FORKSERVER_PRELOAD = ("torch", "monai.data", "monai.transforms", "encoders")


@dataclass(frozen=True, slots=True)
class EncodedSeries:
    """The result for one input item: embeddings by name (float32 arrays), or the error.

    ``n_samples``: model inputs the series gave (1 for a volume or an image, the sampled
    frames for a video).
    """

    item: Any
    embeddings: dict[str, np.ndarray] | None
    error: str | None = None
    n_samples: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


def load_series(item: Any, ras_spacing: Sequence[float] | None = None) -> tuple[ImageMeta, Any]:
    """Default loader: an OME-Zarr image path, or an ``(ImageMeta, array)`` pair as it is.

    Level 0 is read whole, except for video (first axis ``t``), which stays a lazy zarr array
    so that only the sampled frames are read. With ``ras_spacing`` (the voxel size an encoder
    resamples a volume to, mm along R, A, S), a volume is read from the coarsest pyramid level
    no coarser than that (see :meth:`~storage.images.OpenedImage.coarsest_level_within`).
    """
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], ImageMeta):
        return item[0], item[1]
    if not isinstance(item, str | os.PathLike):
        raise TypeError(f"Expected an image path or (ImageMeta, array), got {type(item).__name__}.")
    opened = open_image(os.fspath(item))
    if opened.meta.axes[0] == "t":
        return opened.meta, opened.levels[0]
    level = 0
    if ras_spacing is not None and opened.meta.axes == ("z", "y", "x"):
        level = opened.coarsest_level_within(ras_spacing)
    return opened.level_meta(level), opened.read(level)


@dataclass(frozen=True, slots=True)
class _Loaded:
    """One series after the reading stage: CPU tensor (raw volume or inputs), or its error."""

    index: int
    meta: ImageMeta | None
    data: torch.Tensor | None
    error: str | None


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One series ready to batch: its inputs ``[n, ...]`` (CPU or device), or its error."""

    index: int
    inputs: torch.Tensor | None
    ready: torch.cuda.Event | None  # on cuda: inputs are complete once this fires
    error: str | None


def _parse_mode(encoder: Encoder, preprocess_on: str) -> Mode:
    if preprocess_on not in ("auto", "workers", "device"):
        raise ValueError(f"Expected preprocess_on auto, workers or device, got {preprocess_on!r}.")
    on_device = hasattr(encoder, "preprocess_on_device")
    if preprocess_on == "device":
        if not on_device:
            raise ValueError(f"Encoder {encoder.name!r} cannot preprocess on the device.")
        return "device"
    if preprocess_on == "auto" and on_device and encoder.device.type == "cuda":
        return "device"
    return "workers"


def _parse_count(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected {what} as an integer >= {minimum}, got {value!r}.")
    return value


class _ReadDataset(torch.utils.data.Dataset[_Loaded]):
    """Stage 1 (in worker processes): load, and in workers mode preprocess, one series."""

    def __init__(
        self,
        items: Sequence[Any],
        loader: Loader,
        preprocess: Callable[[ImageMeta, Any], torch.Tensor] | None,
        dtype: torch.dtype,
    ) -> None:
        self.items = items
        self.loader = loader
        self.preprocess = preprocess
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _Loaded:
        try:
            meta, array = self.loader(self.items[index])
            if self.preprocess is None:
                return _Loaded(index, meta, torch.from_numpy(np.ascontiguousarray(array)), None)
            return _Loaded(index, meta, self.preprocess(meta, array).to(self.dtype), None)
        except Exception as e:  # one bad series must not stop the stream
            return _Loaded(index, None, None, f"{type(e).__name__}: {e}")


def _keep(sample: Any) -> Any:
    """DataLoader collate for single samples: leave them as they are."""
    return sample


class _Stager:
    """Stage 2 (threads of this process): pin, copy to the device, preprocess there."""

    def __init__(self, encoder: Encoder, mode: Mode) -> None:
        self.encoder = encoder
        self.mode = mode
        self.cuda = encoder.device.type == "cuda"
        self._local = threading.local()

    def _stream(self) -> torch.cuda.Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.encoder.device)  # type: ignore[no-untyped-call]
        return stream

    def __call__(self, loaded: _Loaded) -> _Prepared:
        if loaded.data is None or loaded.meta is None:
            return _Prepared(loaded.index, None, None, loaded.error or "nothing loaded")
        try:
            dtype = self.encoder.input_dtype
            if not self.cuda:
                x = loaded.data
                if self.mode == "device":
                    on_device = self.encoder.preprocess_on_device  # type: ignore[attr-defined]
                    x = on_device(loaded.meta, x).to(dtype)
                return _Prepared(loaded.index, x, None, None)
            stream = self._stream()
            with torch.cuda.stream(stream):
                x = loaded.data.pin_memory().to(self.encoder.device, non_blocking=True)
                if self.mode == "device":
                    on_device = self.encoder.preprocess_on_device  # type: ignore[attr-defined]
                    x = on_device(loaded.meta, x).to(dtype)
                ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
                ready.record(stream)
            return _Prepared(loaded.index, x, ready, None)
        except Exception as e:  # e.g. a volume the device preprocessing cannot take
            return _Prepared(loaded.index, None, None, f"{type(e).__name__}: {e}")


def stream_encode(
    encoder: Encoder,
    items: Iterable[Any],
    batch_size: int = 4,
    num_workers: int = 4,
    *,
    loader: Loader = load_series,
    preprocess_on: str = "auto",
    device_threads: int = 4,
    prefetch: int = 2,
    start_method: str | None = "forkserver",
) -> Iterator[EncodedSeries]:
    """Encode ``items`` (image paths, or whatever ``loader`` reads), yielding results in order.

    ``batch_size``: series per device batch (a video's frames are encoded in chunks of this
    size); ``num_workers``: reading processes (0: read in the calling process);
    ``device_threads``: staging threads (0: stage in the calling thread); ``preprocess_on``:
    see the module docstring; ``prefetch``: series each worker prepares ahead;
    ``start_method``: how worker processes start (``"forkserver"``, ``"spawn"``, ``"fork"``;
    ``None``: the platform default). ``forkserver`` costs a second or two per call but is safe
    in multi-threaded hosts (task runners), where forking can deadlock; ``loader`` and ``items``
    must then be picklable (module-level functions, paths).
    """
    batch_size = _parse_count(batch_size, "batch_size", 1)
    num_workers = _parse_count(num_workers, "num_workers", 0)
    device_threads = _parse_count(device_threads, "device_threads", 0)
    prefetch = _parse_count(prefetch, "prefetch", 1)
    mode = _parse_mode(encoder, preprocess_on)
    seq = items if isinstance(items, Sequence) else list(items)
    input_spacing = getattr(encoder, "input_spacing", None)
    if loader is load_series and input_spacing is not None:
        loader = functools.partial(load_series, ras_spacing=tuple(input_spacing))
    if num_workers > 0 and start_method == "forkserver":
        # the fork server imports these once; each worker then starts by a cheap fork of it
        multiprocessing.set_forkserver_preload(list(_FORKSERVER_PRELOAD))
    dataset = _ReadDataset(
        seq, loader, None if mode == "device" else encoder.preprocessor(), encoder.input_dtype
    )
    reader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_keep,
        prefetch_factor=prefetch if num_workers > 0 else None,
        multiprocessing_context=start_method if num_workers > 0 else None,
    )
    stager = _Stager(encoder, mode)
    if device_threads == 0:
        yield from _batches_encoded(encoder, seq, map(stager, reader), batch_size)
        return
    with ThreadPoolExecutor(device_threads, thread_name_prefix="encode-stage") as pool:
        ahead = device_threads * prefetch + batch_size
        yield from _batches_encoded(
            encoder, seq, _in_order(pool, stager, iter(reader), ahead), batch_size
        )


def _in_order(
    pool: ThreadPoolExecutor,
    stage: Callable[[_Loaded], _Prepared],
    loaded: Iterator[_Loaded],
    ahead: int,
) -> Iterator[_Prepared]:
    """``stage`` applied to ``loaded`` in the pool, results in order, ``ahead`` at most queued."""
    pending: deque[Future[_Prepared]] = deque()
    exhausted = False
    try:
        while not exhausted or pending:
            while not exhausted and len(pending) < ahead:
                nxt = next(loaded, None)
                if nxt is None:
                    exhausted = True
                else:
                    pending.append(pool.submit(stage, nxt))
            if pending:
                yield pending.popleft().result()
    finally:
        for future in pending:  # the caller stopped early: drop what has not started
            future.cancel()


def _batches_encoded(
    encoder: Encoder,
    items: Sequence[Any],
    prepared: Iterator[_Prepared],
    batch_size: int,
) -> Iterator[EncodedSeries]:
    """Batch in order; each batch is queued on the device before the previous one is read back."""
    previous: _Launched | None = None
    batch: list[_Prepared] = []
    for p in prepared:
        batch.append(p)
        if len(batch) == batch_size:
            launched = _launch(encoder, batch, batch_size)
            if previous is not None:
                yield from _results(encoder, items, previous)
            previous, batch = launched, []
    if batch:
        launched = _launch(encoder, batch, batch_size)
        if previous is not None:
            yield from _results(encoder, items, previous)
        previous = launched
    if previous is not None:
        yield from _results(encoder, items, previous)


@dataclass(slots=True)
class _Launched:
    """A batch whose compute is queued: outputs on their way to the host, or the error."""

    batch: list[_Prepared]
    outputs: dict[str, torch.Tensor]
    done: torch.cuda.Event | None
    error: str | None


def _launch(encoder: Encoder, batch: list[_Prepared], chunk: int) -> _Launched:
    parts = [p.inputs for p in batch if p.inputs is not None]
    if not parts:
        return _Launched(batch, {}, None, None)
    cuda = encoder.device.type == "cuda"
    try:
        if cuda:  # inputs were made on the staging threads' streams
            current = torch.cuda.current_stream(encoder.device)
            for p in batch:
                if p.ready is not None and p.inputs is not None:
                    current.wait_event(p.ready)
                    p.inputs.record_stream(current)  # keep its memory until this stream is done
        inputs = torch.cat(parts)
        pieces = [
            encoder.encode_images_on_device(inputs[i : i + chunk])
            for i in range(0, len(inputs), chunk)
        ]
        on_device = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
        # read back without waiting, so the next batch can be queued behind this one
        outputs = {k: v.to("cpu", non_blocking=cuda) for k, v in on_device.items()}
        done = None
        if cuda:
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(torch.cuda.current_stream(encoder.device))
        return _Launched(batch, outputs, done, None)
    except Exception as e:  # the whole batch failed in compute: report it on each series
        return _Launched(batch, {}, None, f"{type(e).__name__}: {e}")


def _results(
    encoder: Encoder, items: Sequence[Any], launched: _Launched
) -> Iterator[EncodedSeries]:
    if launched.done is not None:
        launched.done.synchronize()
    start = 0
    for p in launched.batch:
        item = items[p.index]
        if p.inputs is None:
            yield EncodedSeries(item, None, p.error or "no inputs", 0)
            continue
        count = int(p.inputs.shape[0])
        if launched.error is not None:
            yield EncodedSeries(item, None, launched.error, count)
            continue
        rows = {k: v[start : start + count] for k, v in launched.outputs.items()}
        start += count
        pooled = encoder.pool_series(rows)
        embeddings = {k: v.numpy().astype(np.float32, copy=False) for k, v in pooled.items()}
        yield EncodedSeries(item, embeddings, None, count)
