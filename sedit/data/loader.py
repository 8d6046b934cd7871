"""Training loader: deterministic, resumable streams of prepared shards.

    loader = LatentLoader("data/coco", resolution=256, batch_size=256, caption_dropout=0.1)
    for batch in loader:  # batch["latents"] (N, C, H, W), batch["captions"] (N, L, W), batch["pooled"] (N, E)
        ...
    checkpoint["data"] = loader.state_dict()  # per rank
    loader.load_state_dict(checkpoint["data"])  # later, in a fresh process: continues where it left off

Order. Readers are the DataLoader workers of all ranks: reader g = rank * num_workers + worker, out of
R = world_size * num_workers. In epoch e the shards are permuted with a generator seeded by (seed, e)
and reader g takes permuted shards g, g + R, g + 2R, ..., so in one epoch the readers together read
every shard exactly once and no sample reaches two ranks or two workers. (With ``resample=True`` reader g
instead draws len(shards) // R shards with replacement, seeded by (seed, e, g): an endless stream with no
exactly-once guarantee, like webdataset's resampled shards.) Each reader shuffles its samples through a
buffer of ``shuffle_buffer`` samples whose random picks are seeded by (seed, e, g). Because that order
depends only on the seeds and the per-shard sample counts in the manifest, it is known before any shard
is read. Each reader batches its own samples; with ``epochs=None`` it moves on to epoch e + 1 without a
break, so the stream is endless. DataLoader returns batches from workers in turn (0, 1, ..., 0, 1, ...).

Resume. ``state_dict()`` records, for each reader of this rank, its epoch and the number of samples of
that epoch's order it has delivered in batches that this loader has *returned* (batches prefetched by
workers but not yet returned are not counted), the number of batches it returned, and which worker is
next in turn. After ``load_state_dict`` a loader with the same data, seed, rank, world size, worker count,
buffer size and resampling mode yields exactly the batches the original would have yielded next: the same
samples in the same order with the same caption dropout. Workers are relabelled so that the worker next
in turn delivers first. To continue, a reader re-reads from the earliest shard that still holds an
undelivered sample (at most the shards its shuffle buffer spanned) and drops samples delivered before.

Failures. A shard that cannot be opened or fails mid-read is logged and counted (``loader.skipped``);
the samples it could not deliver are skipped and counted as missing, and the stream goes on (a
worker that cannot read one sample in a whole epoch raises rather than spin through empty epochs).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from sedit.data import shards as fmt
from sedit.data.topology import rank_and_world
from sedit.edm import drop_captions
from sedit.preemption import STOP_SIGNALS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


@dataclass
class ReaderState:
    """Where one reader stands: ``position`` samples of epoch ``epoch``'s order delivered, ``batches`` batches."""

    epoch: int = 0
    position: int = 0
    batches: int = 0


def list_shards(data: str | Path) -> tuple[list[Shard], dict]:
    """Non-empty shards of a prepared folder, in manifest order, and the manifest."""
    manifest = fmt.read_manifest(data)
    folder = Path(data) if Path(data).is_dir() else Path(data).parent
    found = [Shard(str(folder / s["name"]), int(s["samples"])) for s in manifest["shards"] if s["samples"] > 0]
    return found, manifest


# ----------------------------------------------------------------------------------------------
# The deterministic order
# ----------------------------------------------------------------------------------------------


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (stable across runs, processes and platforms)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def epoch_shards(num_shards: int, epoch: int, seed: int, reader: int, readers: int, resample: bool) -> list[int]:
    """Shard indices reader ``reader`` of ``readers`` reads in ``epoch``, in reading order."""
    if resample:
        rng = np.random.default_rng(mix_seed(seed, epoch, reader, 1))
        return rng.integers(0, num_shards, size=max(1, num_shards // readers)).tolist()
    perm = np.random.default_rng(mix_seed(seed, epoch, 0)).permutation(num_shards)
    return perm[reader::readers].tolist()


def buffer_shuffle(total: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of ``total`` samples read in order 0..total-1 through a shuffle buffer: (total,).

    The buffer fills with the first ``buffer`` samples; then each read sample replaces a uniformly
    picked buffered one, which is emitted; at the end the rest is emitted in random order.
    """
    if buffer <= 1 or total <= 1:
        return np.arange(total)
    size = min(buffer, total)
    held = list(range(size))
    picks = rng.integers(0, size, size=total - size).tolist()
    order = np.empty(total, dtype=np.int64)
    for t, p in enumerate(picks):
        order[t] = held[p]
        held[p] = size + t
    order[total - size :] = rng.permutation(held)
    return order


def read_tar(url: str, wanted: set[str]) -> Iterator[dict]:
    """Samples of one webdataset tar in stored order, with only the ``wanted`` members read."""
    stream = [{"url": url, "stream": wds.gopen(url, "rb")}]
    try:
        files = tar_file_expander(stream, select_files=lambda name: name.partition(".")[2].lower() in wanted)
        yield from group_by_keys(files)
    finally:
        stream[0]["stream"].close()


# ----------------------------------------------------------------------------------------------
# Dataset (runs in each DataLoader worker)
# ----------------------------------------------------------------------------------------------


class LatentStream(IterableDataset):
    """The batches of this rank's readers; see the module docstring. Use through ``LatentLoader``."""

    def __init__(
        self,
        shard_list: Sequence[Shard],
        latent_field: str,
        batch_size: int,
        *,
        seed: int,
        shuffle_buffer: int,
        resample: bool,
        epochs: int | None,
        caption_dropout: float,
        rank: int,
        world_size: int,
        dtype: torch.dtype,
        drop_last: bool,
    ):
        self.shards = list(shard_list)
        self.latent_field = latent_field
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.resample = resample
        self.epochs = epochs
        self.caption_dropout = caption_dropout
        self.rank = rank
        self.world_size = world_size
        self.dtype = dtype
        self.drop_last = drop_last
        self.start_states: dict[int, ReaderState] = {}  # worker -> state to start from
        self.worker_offset = 0  # DataLoader worker w plays worker (w + offset) % num_workers
        self.failed_shards = 0
        self.missing_samples = 0

    def check_split(self, num_workers: int) -> None:
        readers = self.world_size * max(1, num_workers)
        if not self.resample and len(self.shards) < readers:
            raise ValueError(
                f"{len(self.shards)} non-empty shards cannot be split over {readers} readers "
                f"({self.world_size} ranks x {max(1, num_workers)} workers): prepare with a smaller "
                "--shard-size, use fewer workers, or resample=True"
            )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info else (1, 0)
        self.check_split(num_workers)
        worker = (worker_id + self.worker_offset) % num_workers
        state = self.start_states.get(worker, ReaderState())
        reader, readers = self.rank * num_workers + worker, self.world_size * num_workers
        samples: list[dict] = []
        batches = state.batches
        for (epoch, position), sample in self._samples(reader, readers, state):
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield self._collate(samples, reader, ReaderState(epoch, position, batches), worker)
                samples, batches = [], batches + 1
        if samples and not self.drop_last:
            yield self._collate(samples, reader, ReaderState(epoch, position, batches), worker)

    def _samples(self, reader: int, readers: int, state: ReaderState) -> Iterator[tuple[tuple[int, int], dict]]:
        """((epoch, position after this sample), sample) from ``state`` on, across epochs."""
        epoch, start = state.epoch, state.position
        while self.epochs is None or epoch < self.epochs:
            chosen = epoch_shards(len(self.shards), epoch, self.seed, reader, readers, self.resample)
            counts = np.array([self.shards[i].samples for i in chosen])
            rng = np.random.default_rng(mix_seed(self.seed, epoch, reader, 2))
            order = buffer_shuffle(int(counts.sum()), self.shuffle_buffer, rng)  # (M,) read indices
            delivered = 0
            if start < len(order):
                for k, sample in self._emit([self.shards[i] for i in chosen], counts, order, start):
                    delivered += 1
                    yield (epoch, k + 1), sample
            if start == 0 and len(order) and not delivered:  # an endless stream would spin forever
                raise RuntimeError(f"reader {reader}: no shard of epoch {epoch} could be read (see warnings)")
            epoch, start = epoch + 1, 0

    def _emit(self, chosen: list[Shard], counts: np.ndarray, order: np.ndarray, start: int) -> Iterator:
        """(k, sample) for k >= start in emission order, reading shards sequentially.

        Read index r = starts[slot] + (index of the sample in its shard). Samples read before their turn
        wait in ``held``; those whose turn came before ``start`` (delivered before a resume) are dropped.
        """
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        turn = np.empty_like(order)
        turn[order] = np.arange(len(order))  # read index -> emission index
        first_slot = int(np.searchsorted(starts, order[start:].min(), side="right") - 1)
        reads = self._read_from(chosen, counts, starts, first_slot)
        held: dict[int, dict] = {}
        read_through = first_slot - 1  # every shard slot <= this has been read to its end
        for k in range(start, len(order)):
            r = int(order[k])
            slot = int(np.searchsorted(starts, r, side="right") - 1)
            while r not in held and read_through < slot:
                s, index, raw = next(reads)
                if raw is None:
                    read_through = s
                elif turn[starts[s] + index] >= start:
                    held[int(starts[s] + index)] = raw
            raw = held.pop(r, None)
            sample = self._decode(raw, chosen[slot].url) if raw is not None else None
            if sample is None:
                self.missing_samples += 1
                continue
            yield k, sample

    def _read_from(self, chosen: list[Shard], counts: np.ndarray, starts: np.ndarray, first: int) -> Iterator:
        """(slot, index, raw sample) for shards ``first``..; (slot, -1, None) when a shard ends or fails."""
        wanted = {"txt", self.latent_field, fmt.TOKENS_FIELD, fmt.POOLED_FIELD}
        for slot in range(first, len(chosen)):
            index, error = 0, ""
            try:
                for raw in read_tar(chosen[slot].url, wanted):
                    if index < counts[slot]:
                        yield slot, index, raw
                    index += 1
            except Exception as err:  # a corrupt or vanished shard must not stop training
                error = f"{type(err).__name__}: {err}"
            if not error and index < counts[slot]:
                error = "the tar ended early"  # e.g. truncated at a member boundary
            if error:
                self.failed_shards += 1
                log.warning("shard %s failed after %d of %d samples (%s); skipping the rest of it",
                            chosen[slot].url, index, counts[slot], error)  # fmt: skip
            yield slot, -1, None

    def _decode(self, raw: dict, url: str) -> dict | None:
        try:
            return {
                "key": raw["__key__"],
                "text": raw["txt"].decode("utf-8"),
                "latent": fmt.npy_load(raw[self.latent_field]),
                "tokens": fmt.npy_load(raw[fmt.TOKENS_FIELD]),
                "pooled": fmt.npy_load(raw[fmt.POOLED_FIELD]),
            }
        except Exception as err:
            log.warning("sample %s in %s unreadable (%r); skipped", raw.get("__key__"), url, err)
            return None

    def _collate(self, samples: list[dict], reader: int, state: ReaderState, worker: int) -> dict:
        latents = torch.from_numpy(np.stack([s["latent"] for s in samples])).to(self.dtype)  # (N, C, H, W)
        tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples])).to(self.dtype)  # (N, L, W)
        pooled = torch.from_numpy(np.stack([s["pooled"] for s in samples])).to(self.dtype)  # (N, E)
        gen = torch.Generator().manual_seed(mix_seed(self.seed, reader, state.batches, 3))
        keep = drop_captions(torch.ones(len(samples), 1, 1), self.caption_dropout, gen)[:, 0, 0]  # (N,) 1 = kept
        return {
            "latents": latents,
            "captions": tokens * keep[:, None, None].to(self.dtype),
            "pooled": pooled * keep[:, None].to(self.dtype),
            "dropped": keep == 0,
            "keys": [s["key"] for s in samples],
            "texts": [s["text"] for s in samples],
            "_state": {
                "worker": worker,
                **asdict(ReaderState(state.epoch, state.position, state.batches + 1)),
                "failed_shards": self.failed_shards,
                "missing_samples": self.missing_samples,
            },
        }


# ----------------------------------------------------------------------------------------------
# Loader (main process)
# ----------------------------------------------------------------------------------------------


def leave_stop_signals_to_the_trainer(_worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGUSR1. A scheduler or ``timeout`` signals the whole process group;
    a worker that died of it would abort the training process mid-step, before its checkpoint. The
    training process handles the signal (``sedit.preemption``) and shuts its workers down itself."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class LatentLoader:
    """Iterable of training batches from a prepared folder, with a checkpointable position.

    Each batch is a dict: ``latents`` (N, C, H, W), ``captions`` (N, L, W) text tokens, ``pooled``
    (N, E), all ``dtype``; ``dropped`` (N,) bool, True where caption dropout zeroed both caption
    tensors (probability ``caption_dropout``, the unconditional input of classifier-free guidance);
    ``keys`` and ``texts``, lists of sample keys and captions. Each ``iter(loader)`` starts where the
    batches returned so far leave off. See the module docstring for the order and for what
    ``state_dict`` / ``load_state_dict`` guarantee.
    """

    def __init__(
        self,
        data: str | Path,
        resolution: int,
        batch_size: int,
        *,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        resample: bool = False,
        epochs: int | None = None,
        caption_dropout: float = 0.0,
        rank: int | None = None,
        world_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        drop_last: bool = False,
        pin_memory: bool = False,
    ):
        shard_list, self.manifest = list_shards(data)
        latents = self.manifest["latents"]
        if str(resolution) not in latents:
            raise ValueError(f"{data}: no latents at {resolution}px (prepared: {', '.join(latents)})")
        rank, world_size = rank_and_world(rank, world_size)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.dataset = LatentStream(
            shard_list,
            latents[str(resolution)]["field"],
            batch_size,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            resample=resample,
            epochs=epochs,
            caption_dropout=caption_dropout,
            rank=rank,
            world_size=world_size,
            dtype=dtype,
            drop_last=drop_last,
        )
        self.dataset.check_split(num_workers)
        self._workers: dict[int, ReaderState] = {}
        self._next_worker = 0
        self._counters: dict[int, tuple[int, int]] = {}

    def __iter__(self) -> Iterator[dict]:
        self.dataset.start_states = dict(self._workers)
        self.dataset.worker_offset = self._next_worker
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=leave_stop_signals_to_the_trainer,
        )
        for batch in loader:
            meta = batch.pop("_state")
            worker = int(meta["worker"])
            self._workers[worker] = ReaderState(int(meta["epoch"]), int(meta["position"]), int(meta["batches"]))
            self._counters[worker] = (int(meta["failed_shards"]), int(meta["missing_samples"]))
            self._next_worker = (worker + 1) % max(1, self.num_workers)
            yield batch

    @property
    def skipped(self) -> dict[str, int]:
        """Failures seen by this loader's workers so far: shards that failed to read, samples lost."""
        return {
            "failed_shards": sum(c[0] for c in self._counters.values()),
            "missing_samples": sum(c[1] for c in self._counters.values()),
        }

    def _identity(self) -> dict:
        d = self.dataset
        return {
            "seed": d.seed,
            "rank": d.rank,
            "world_size": d.world_size,
            "num_workers": self.num_workers,
            "shuffle_buffer": d.shuffle_buffer,
            "resample": d.resample,
            "shards": [Path(s.url).name for s in d.shards],
        }

    def state_dict(self) -> dict:
        """This rank's position (plain Python types; store one per rank in the checkpoint)."""
        return {
            "version": 1,
            **self._identity(),
            "next_worker": self._next_worker,
            "workers": {str(w): asdict(s) for w, s in sorted(self._workers.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses a state taken with a different order (see module docstring)."""
        mine = self._identity()
        diff = [k for k in mine if state.get(k) != mine[k]]
        if state.get("version") != 1 or diff:
            details = ", ".join(f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in diff if k != "shards")
            raise ValueError(f"data loader state does not match this loader ({details or 'shard list differs'})")
        self._workers = {int(w): ReaderState(**s) for w, s in state["workers"].items()}
        self._next_worker = int(state["next_worker"])
