"""A training DataLoader whose place within an epoch is part of the checkpoint, so that a run resumed from a checkpoint
saved in the middle of an epoch (a preempted job's last.ckpt) trains on exactly the batches the uninterrupted run
would have trained on.

Lightning 2.6 restarts mid-epoch by counting: it skips nothing itself, it only starts its batch counter at the saved
batch and draws the rest of the epoch from a fresh iterator, so the resumed epoch would repeat its first batches and
never see its last ones ("You're resuming from a checkpoint that ended before the epoch ended and your dataloader is
not resumable"). A loader with ``state_dict``/``load_state_dict`` is saved into the checkpoint by the fit loop
(``loops.fit_loop.combined_loader``) and given its state back before the epoch's iterator is created; this one then
fast-forwards the epoch's *indices* (no image is loaded for the skipped batches).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import BatchSampler, DataLoader, SequentialSampler


class FastForwardBatchSampler(BatchSampler):
    """Torch's ``BatchSampler`` whose next iteration can start ``skip`` batches in: it draws and drops the first
    ``skip`` index lists (the sampler's permutation is computed anyway; no data is read).

    Lightning re-creates a ``BatchSampler`` subclass with its ``DistributedSampler`` in place of ``sampler`` under DDP
    (it records the arguments of every ``BatchSampler`` built inside ``train_dataloader()``), so the skip works on each
    rank's shard as well.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool):
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = super().__iter__()  # a generator: the sampler's order is drawn at the first next(), i.e. below
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            if next(batches, None) is None:
                return
        yield from batches


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` (same arguments) that can continue an epoch where a checkpoint left it.

    ``state_dict()`` is ``{"epoch": e, "batches": n}``: ``n`` batches of epoch ``e`` (the sampler's ``epoch``, which
    Lightning sets with ``set_epoch``) have been handed out. After ``load_state_dict``, the next iteration skips those
    ``n`` batches if it is an iteration of epoch ``e`` (a mid-epoch resume); any other epoch, or a checkpoint written
    at the epoch's end, starts from its first batch. A checkpoint without this state (older runs) resumes as before.

    Each iteration starts (draws the epoch's order, starts the workers) at its first ``next()``, not at ``iter()``:
    Lightning creates a resumed run's first iterator before it calls ``set_epoch`` for that epoch, and with
    ``num_workers > 0`` torch's iterator would otherwise draw the order of the wrong epoch while prefetching.
    The batches counted are the ones handed to the training loop, not the ones the workers prefetched.
    """

    def __init__(self, dataset, batch_size: int | None = 1, sampler=None, drop_last: bool = False, batch_sampler=None,
                 **kwargs):
        if batch_sampler is None:
            sampler = sampler if sampler is not None else SequentialSampler(dataset)
            batch_sampler = FastForwardBatchSampler(sampler, batch_size, drop_last)
        elif not isinstance(batch_sampler, FastForwardBatchSampler):
            raise TypeError(f"ResumableDataLoader needs a FastForwardBatchSampler, not {type(batch_sampler).__name__}")
        kwargs.pop("shuffle", None)  # Lightning passes shuffle=False with the batch sampler it re-creates
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._iteration: _Iteration | None = None
        self._to_resume: dict | None = None

    @property
    def epoch(self) -> int | None:
        """The epoch the sampler was last set to (``set_epoch``), or None for a sampler without epochs."""
        return getattr(self.batch_sampler.sampler, "epoch", None)

    def __iter__(self) -> Iterator:
        self._iteration = _Iteration(self)
        return self._iteration

    def _start(self, iteration: _Iteration) -> Iterator:
        """Start ``iteration``: decide how many batches it skips, then create torch's own iterator."""
        epoch, state, self._to_resume = self.epoch, self._to_resume, None
        skip = 0
        if state is not None and state.get("epoch") == epoch and 0 < int(state.get("batches", 0)) < len(self):
            skip = int(state["batches"])
        self.batch_sampler.skip = skip
        iteration.epoch, iteration.skipped = epoch, skip
        return super().__iter__()

    def state_dict(self) -> dict:
        it = self._iteration
        if it is None or not it.started:  # nothing handed out since the state was loaded (or ever)
            return dict(self._to_resume) if self._to_resume else {"epoch": self.epoch, "batches": 0}
        return {"epoch": it.epoch, "batches": it.skipped + it.yielded}

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_resume = dict(state_dict)


class _Iteration:
    """One pass over a ResumableDataLoader: started lazily, counting the batches it yields."""

    def __init__(self, loader: ResumableDataLoader):
        self._loader, self._it = loader, None
        self.epoch, self.skipped, self.yielded = None, 0, 0

    @property
    def started(self) -> bool:
        return self._it is not None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = self._loader._start(self)
        batch = next(self._it)
        self.yielded += 1
        return batch
