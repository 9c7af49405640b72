"""Reading the latent cache during training: batches of fresh latents from memory-mapped shards.

`LatentReader` serves the entries of a training run (located once, at start) from shards mapped
on first use; `step_generator` seeds the latent noise of a training step the same on every rank,
and `flip_from_seed` tells which orientation a sample's augment seed asks for.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from training.latent_cache.locate import EntryKeys, Locations, locate
from training.latent_cache.shards import map_shard
from training.latent_cache.store import Store


def step_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for the latent noise of one training (micro-)step, the same on every rank:
    `LatentReader.batch` draws from it for the global batch (reproducible)."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def flip_from_seed(augment_seed: int) -> bool:
    """The flip a sample's augment seed asks for (the rule `PixelDataset` uses)."""
    return bool(np.random.default_rng(augment_seed).integers(2))


class LatentReader:
    """Serves training batches from memory-mapped shards.

    `entries` says which entries to serve: the `Locations` a build found
    (`CacheSummary.locations`), or their keys, uint8 (N, O, 32) digests (`keys_from_hex`
    converts hex keys), which are then located in the index (or its manifest). Entry (i, 0) is
    the plain crop of sample i, (i, 1) the mirrored one when O = 2. Each shard is mapped on
    first use (at most `max_open` stay open, least recently used closed first); the reader
    holds one packed location per entry (4 bytes). Holds the cache's shared lock until
    `close`, so a prune cannot pull shards away underneath it; given locations, it first
    checks that their shards are all still in the cache.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], entries: Locations | np.ndarray,
                 affine: tuple[Sequence[float], Sequence[float]] | None = None,
                 max_open: int = 256) -> None:
        keys = None if isinstance(entries, Locations) else EntryKeys.from_array(entries)
        self.store = Store(cache_dir)
        self.store.lock(exclusive=False)
        # normalisation (latent - shift) * scale, per channel: `VAEConfig.latent_affine`
        shift, scale = affine if affine is not None else ([0.0], [1.0])
        self.shift = np.asarray(shift, dtype=np.float32).reshape(-1, 1, 1)  # (C or 1, 1, 1)
        self.scale = np.asarray(scale, dtype=np.float32).reshape(-1, 1, 1)  # (C or 1, 1, 1)
        self.max_open = max_open
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        try:
            conn = self.store.connect()
            try:
                if keys is not None:
                    entries = locate(conn, keys)[0]
                gone = sorted(set(entries.names) - set(self.store.shard_info(conn,
                                                                             entries.names)))
            finally:
                conn.close()
            self._names, self._starts, self._where = entries.names, entries.starts, entries.where
            missing = np.argwhere(self._where < 0)  # (M, 2) (sample, orientation)
            if len(missing):
                example = (f"e.g. {bytes(keys.rows([missing[0][0]])[0, missing[0][1]]).hex()}"
                           if keys is not None else f"e.g. sample {missing[0][0]}")
                raise KeyError(f"{len(missing)} of {self._where.size} entries are missing from "
                               f"{cache_dir} ({example}); build the cache first")
            if gone:
                raise KeyError(f"{cache_dir}: shard {gone[0]} of these entries is no longer in "
                               "the cache (pruned or dropped since they were located); build "
                               "the cache again")
        except BaseException:
            self.close()  # release the lock, so this process can still prune or rebuild
            raise

    def __len__(self) -> int:
        return len(self._where)

    def _arrays(self, shard: int) -> dict[str, np.ndarray]:
        arrays = self._open.get(shard)
        if arrays is None:
            arrays = map_shard(self.store.shard_path(self._names[shard]))
            self._open[shard] = arrays
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(shard)
        return arrays

    def _gather(self, indices: Sequence[int], flip_flags: Sequence[bool] | None
                ) -> tuple[np.ndarray, np.ndarray]:
        """float32 (mean, logvar) arrays (B, C, h, w) of samples `indices`."""
        flips = np.zeros(len(indices), np.int64) if flip_flags is None else \
            np.asarray(flip_flags, dtype=np.int64)
        if flips.any() and self._where.shape[1] < 2:
            raise ValueError("a mirrored latent was asked for, but the cache was built "
                             "without flip")
        positions = self._where[np.asarray(indices, dtype=np.int64), flips]  # (B,)
        shards = np.searchsorted(self._starts, positions, side="right") - 1  # (B,)
        rows = positions - self._starts[shards]
        means, logvars = [], []
        for shard, row in zip(shards.tolist(), rows.tolist()):
            arrays = self._arrays(shard)
            means.append(arrays["mean"][row])
            logvars.append(arrays["logvar"][row])
        if len({m.shape for m in means}) > 1:
            raise ValueError("samples of one batch must share a bucket; got latent shapes "
                             f"{sorted({m.shape for m in means})}")
        return np.stack(means).astype(np.float32), np.stack(logvars).astype(np.float32)

    def moments(self, indices: Sequence[int], flip_flags: Sequence[bool] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored (mean, logvar) of samples `indices`, float32 (B, C, h, w) each."""
        mean, logvar = self._gather(indices, flip_flags)
        return torch.from_numpy(mean), torch.from_numpy(logvar)

    def batch(self, indices: Sequence[int], generator: torch.Generator,
              flip_flags: Sequence[bool] | None = None,
              part: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Fresh normalised latents (B, C, h, w) float32: ((mean + exp(logvar / 2)·ε) − shift)
        × scale (per channel, see `affine`), with ε drawn from `generator` (`step_generator`).

        `indices` are one rank's share of a global batch, `part` = (rank, world size): ε is
        drawn for the whole global batch (world size × B samples) and this rank keeps rows
        rank·B to (rank + 1)·B, so a run does not depend on how its batch is split across
        processes. The extra draws cost little next to reading the batch.
        """
        mean, logvar = self._gather(indices, flip_flags)
        (rank, world), B = part, len(indices)
        noise = torch.randn((world * B, *mean.shape[1:]), generator=generator)  # (W·B, C, h, w)
        noise = noise[rank * B:(rank + 1) * B].numpy()  # (B, C, h, w)
        # NumPy for the arithmetic: single-threaded, so no thread-pool wake-ups per batch
        latent = mean + np.exp(0.5 * logvar) * noise
        latent -= self.shift
        latent *= self.scale
        return torch.from_numpy(latent)

    def close(self) -> None:
        """Unmap the shards and release the lock."""
        self._open = OrderedDict()
        self.store.unlock()

    def __enter__(self) -> LatentReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

