"""The parts of the training engine (:mod:`components.engine` is the loop and the public names).

* :mod:`.runtime`: device, seeds, ``torch.distributed`` helpers, threads, progress lines;
* :mod:`.optim`: optimiser and per-step learning-rate schedule;
* :mod:`.checkpoint`: checkpoint I/O (atomic, byte-stable saves; safe loads; stale temp files);
* :mod:`.stage_files`: a stage's state file (the sidecar outside DVC) and its out folder;
* :mod:`.state`: :class:`~.state.TrainingState`, everything a resume needs, as ``state_dict``;
* :mod:`.callbacks`: early stopping and checkpointing, called after each epoch.

Nothing here imports a stage, MLflow or Prefect.
"""
