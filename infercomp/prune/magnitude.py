"""Unstructured masks: keep the largest scores, with exact counts."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from infercomp.formats.base import count_nonzero

T = TypeVar("T")


def keep_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of a 1-D ``scores`` (ties broken by position, so
    exactly ``k`` are kept)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        # A stable sort breaks ties by position; topk's choice among equal values is unspecified.
        mask[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return mask


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks removing the smallest |w|: exactly ``round(sparsity * n)`` per tensor (``layer``)
    or over all tensors together (``global``)."""
    return score_masks({n: w.abs() for n, w in weights.items()}, sparsity, scope)


def score_masks(scores: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks removing the lowest scores, per tensor (``layer``), per output row (``row``:
    every row loses ``round(sparsity * cols)``) or over all tensors together (``global``)."""
    if scope == "layer":
        return {n: Selection.of(lambda s=s: [s], kept_count(s.numel(), sparsity)).mask(s) for n, s in scores.items()}
    if scope == "row":
        out = {}
        for n, s in scores.items():
            rows = s.reshape(s.shape[0], -1)  # (out, in·kh·kw)
            k = rows.shape[1] - round(sparsity * rows.shape[1])
            mask = torch.zeros_like(rows, dtype=torch.bool)
            step = max(1, ROW_SORT_VALUES // max(rows.shape[1], 1))  # rows sorted together: bounded temporaries
            for i in range(0, rows.shape[0] if k > 0 else 0, step):
                order = torch.sort(rows[i : i + step], dim=1, descending=True, stable=True).indices[:, :k]
                mask[i : i + step].scatter_(1, order, True)
            out[n] = mask.view_as(s)
        return out
    # One threshold over all tensors, as if they were concatenated in this order (ties: by position).
    values = list(scores.values())
    k = kept_count(sum(s.numel() for s in values), sparsity)
    selection = Selection.of(lambda: values, k, window=near(values, k))
    return dict(zip(scores, selection.masks(values)))


def kept_count(total: int, sparsity: float) -> int:
    """Scores kept when removing ``sparsity`` of ``total``: ``total - round(sparsity * total)``."""
    return total - round(sparsity * total)


# Row-wise selection sorts this many scores at a time (values and int64 indices: 48 MiB), not a
# whole lm_head's (32000 x 4096: 1 GB of int64 indices).
ROW_SORT_VALUES = 1 << 22
_INF_KEY = 0x7F800000
_NAN_KEY = 0x7FC00000  # every NaN ranks as one value above +inf, as torch.sort ranks NaNs
_SIGN = 0x7FFFFFFF
# Keys are made and counted in blocks of BLOCK values (1 MiB of keys: smaller blocks measured slower,
# the threads' hand-offs outweighing the cache; larger ones no faster), on up to WORKERS threads:
# histograms are integer counts and masks are comparisons, the same whatever the block or thread count.
BLOCK = 1 << 18
WORKERS = 4


def _keys(s: torch.Tensor, magnitudes: bool = False) -> torch.Tensor:
    """int32 keys ordered like the non-negative scores ``s`` as float32 (their bit patterns; a view,
    no copy, for float32 scores). ``magnitudes``: the scores are ``|s|`` (the sign bit cleared:
    the bits of ``s.abs().float()``)."""
    keys = s.float().view(torch.int32)
    if magnitudes:
        keys = keys & _SIGN
    if int(keys.max()) > _INF_KEY:  # NaN bit patterns lie above +inf's
        keys = torch.where(keys > _INF_KEY, _NAN_KEY, keys)
    return keys


def _flat_blocks(s: torch.Tensor) -> tuple[torch.Tensor, list[slice]]:
    flat = s.reshape(-1)
    return flat, [slice(i, min(i + BLOCK, flat.numel())) for i in range(0, flat.numel(), BLOCK)]


def _each(fn: Callable[[slice], T], blocks: list[slice]) -> list[T]:
    """``[fn(b) for b in blocks]``, on up to ``WORKERS`` threads (torch releases the GIL)."""
    workers = min(WORKERS, os.cpu_count() or 1, len(blocks))
    if workers <= 1:
        return [fn(b) for b in blocks]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, blocks))


# A guess of where the threshold lies (``near``) comes from SAMPLE_RUNS evenly spaced runs of
# SAMPLE_RUN values of each tensor (a few pages of each: cheap on a memory-mapped file); the first
# pass then also counts the low 16 bits of the values in the WINDOW_BINS high bins around it (256 KiB
# of counts a bin), and the second pass is needed only when the threshold fell outside them.
SAMPLE_RUNS, SAMPLE_RUN = 8, 2048
SAMPLE_BAND = 0.02  # the guess spans the sampled ranks k -/+ 2 % of all the values
WINDOW_BINS = 32
_INT32_MAX = (1 << 31) - 1


@dataclass(frozen=True)
class Selection:
    """The exact k largest of scores spread over several tensors, read in order: every score above
    ``key`` (a float32 bit pattern) and the first ``ties`` scores equal to it. The same mask as a
    stable descending sort of the concatenation (ties broken by position), found with 16-bit
    histograms instead: no concatenation, no sort, one tensor in memory at a time, so it works on
    checkpoints streamed from disk (``infercomp.stream``). One pass over the scores when the
    threshold lies inside the ``window`` that ``near`` guessed, two otherwise: the result is the
    same either way. Scores are non-negative (|w|, |w|·||x||); with ``magnitudes`` the tensors
    given are weights and their |w| are the scores (no |w| tensor is made).

    Attributes:
        key, ties: the selection.
        passes: how many passes over the scores finding it took (1 or 2; 0 when k <= 0).
    """

    key: int
    ties: int
    passes: int = field(default=0, compare=False)

    @classmethod
    def of(
        cls, scores: Callable[[], Iterable[torch.Tensor]], k: int, *, magnitudes: bool = False, window: tuple[int, int] | None = None
    ) -> Selection:
        """Where the ``k`` largest end; ``scores()`` yields the tensors in order (called once, or
        twice when the threshold is not inside ``window``: keys (lowest, highest), see ``near``)."""
        if k <= 0:
            return cls(key=_NAN_KEY + 1, ties=0)  # above every key: nothing kept
        first, last = 0, -1  # no window: two passes
        if window is not None:  # clamped to the keys there are, and to WINDOW_BINS bins
            lowest, highest = max(window[0], 0) >> 16, min(window[1], _NAN_KEY) >> 16
            if lowest <= highest:
                first, last = lowest, min(highest, lowest + WINDOW_BINS - 1)
        start, stop = first << 16, (last + 1) << 16
        high = torch.zeros(1 << 16, dtype=torch.int64)
        # Low-16-bit counts of the window's bins: int32 (half the memory) until the values counted
        # there could overflow it. Added with index_add_: no temporary the window's size.
        inside = torch.zeros(stop - start, dtype=torch.int32)
        ones = torch.ones(BLOCK if stop > start else 0, dtype=torch.int32)
        counted = 0

        def count(flat: torch.Tensor, b: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
            keys = _keys(flat[b], magnitudes)
            h = torch.bincount(keys >> 16, minlength=1 << 16)
            if stop <= start:
                return h, None
            arr = keys.numpy()  # numpy's compare and compress: half the time of torch's masked select here
            return h, torch.from_numpy(np.compress((arr >= start) & (arr < stop), arr) - start)

        for s in scores():
            flat, blocks = _flat_blocks(s)
            for h, keys in _each(lambda b, flat=flat: count(flat, b), blocks):
                high += h
                if keys is not None and keys.numel():
                    counted += keys.numel()
                    inside, ones = _wide_enough(inside, ones, counted)
                    inside.index_add_(0, keys, ones[: keys.numel()])
        bin_, above = _bin_of(high, k)
        if first <= bin_ <= last:
            low, passes = inside[(bin_ - first) << 16 : (bin_ - first + 1) << 16], 1
        else:
            low, passes = cls._lows(scores, bin_, magnitudes), 2
        lo, above_low = _bin_of(low, k - above)
        return cls(key=(bin_ << 16) | lo, ties=k - above - above_low, passes=passes)

    @staticmethod
    def _lows(scores: Callable[[], Iterable[torch.Tensor]], bin_: int, magnitudes: bool) -> torch.Tensor:
        """The second pass: counts of the low 16 bits of the keys in high bin ``bin_``."""
        low = torch.zeros(1 << 16, dtype=torch.int64)

        def lows(flat: torch.Tensor, b: slice) -> torch.Tensor:
            keys = _keys(flat[b], magnitudes)
            return torch.bincount(keys[(keys >> 16) == bin_] & 0xFFFF, minlength=1 << 16)

        for s in scores():
            flat, blocks = _flat_blocks(s)
            for h in _each(lambda b, flat=flat: lows(flat, b), blocks):
                low += h
        return low

    def masks(self, scores: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Keep-masks (shaped like each tensor) for the tensors in the order ``of`` read them."""
        left = self.ties
        for s in scores:
            mask, left = self.cut(s, left)
            yield mask

    def cut(self, s: torch.Tensor, left: int, *, magnitudes: bool = False) -> tuple[torch.Tensor, int]:
        """The keep-mask of the next tensor ``s`` (scores, or weights with ``magnitudes``), when
        ``left`` ties remain to be kept (``ties`` before the first): (mask, ties left after it)."""
        flat, blocks = _flat_blocks(s)
        mask = torch.empty(flat.shape, dtype=torch.bool)

        def block(b: slice) -> int:
            keys = _keys(flat[b], magnitudes)
            torch.gt(keys, self.key, out=mask[b])
            return count_nonzero(keys == self.key) if left > 0 else 0

        tied = _each(block, blocks)
        for b, n in zip(blocks, tied):  # the first ``left`` ties, in order
            if left <= 0:
                break
            if n:
                at = (_keys(flat[b], magnitudes) == self.key).nonzero().flatten()[:left]
                mask[b][at] = True
                left -= at.numel()
        return mask.view(s.shape), left

    def mask(self, s: torch.Tensor) -> torch.Tensor:
        """The keep-mask of a single tensor (the selection was made over it alone)."""
        return next(iter(self.masks([s])))


def _wide_enough(counts: torch.Tensor, ones: torch.Tensor, counted: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``counts`` and the ``ones`` added to them, as int64 once ``counted`` values (a bound on
    any one count) could overflow int32."""
    if counted > _INT32_MAX and counts.dtype == torch.int32:
        return counts.long(), ones.long()
    return counts, ones


def _bin_of(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(the bin holding the ``k``-th largest value, how many values lie in higher bins)."""
    above = hist.flip(0).cumsum(0).flip(0) - hist  # values in bins higher than each bin
    b = int(((above < k) & (above + hist >= k)).nonzero().max())
    return b, int(above[b])


def near(tensors: Iterable[torch.Tensor], k: int, *, magnitudes: bool = False) -> tuple[int, int] | None:
    """A guess of the keys (lowest, highest) between which the ``k``-th largest score of
    ``tensors`` (all of them together) lies, for ``Selection.of``'s ``window``: the sampled ranks
    ``k -/+ SAMPLE_BAND`` of all the values, from ``SAMPLE_RUNS`` evenly spaced runs of each tensor
    weighted by its size. Only a guess: a wrong one costs a second pass, never a different result.
    None when there is nothing to sample."""
    keys, weights, total = [], [], 0
    for s in tensors:
        flat = s.reshape(-1)
        n = flat.numel()
        total += n
        if n > SAMPLE_RUNS * SAMPLE_RUN:
            step = n // SAMPLE_RUNS
            flat = torch.cat([flat[i * step : i * step + SAMPLE_RUN] for i in range(SAMPLE_RUNS)])
        if flat.numel():
            keys.append(_keys(flat, magnitudes))
            weights.append(torch.full((flat.numel(),), n / flat.numel(), dtype=torch.float64))
    if not keys or k <= 0:
        return None
    order = torch.sort(torch.cat(keys), descending=True)
    ranks = torch.cat(weights)[order.indices].cumsum(0)  # estimated values at or above each sampled key
    band = SAMPLE_BAND * total

    def at(rank: float) -> int:
        i = int(torch.searchsorted(ranks, torch.tensor([rank], dtype=torch.float64)).clamp(max=ranks.numel() - 1))
        return int(order.values[i])

    lowest, guess, highest = at(k + band) >> 16, at(k) >> 16, at(max(k - band, 0.0)) >> 16
    # At most WINDOW_BINS bins, centred on the guess (the band spans many more near zero).
    first = max(lowest, min(guess - WINDOW_BINS // 2, highest - WINDOW_BINS + 1))
    last = min(highest, first + WINDOW_BINS - 1)
    return first << 16, (last << 16) | 0xFFFF
