"""The Lightning side: :mod:`.module` (the LightningModule: network + process, steps, sample grids), :mod:`.optim`
(optimizer, learning-rate schedule) and one module per callback: :mod:`.ema`, :mod:`.checkpointing`
(``ModelCheckpoint``, ``AtomicCheckpointIO``), :mod:`.finite_loss`, :mod:`.resumable` (SIGTERM, SLURM requeue) and
:mod:`.probe` (a DDP diagnostic). A new callback is one module here plus one yaml in ``conf/callbacks/``.
"""
