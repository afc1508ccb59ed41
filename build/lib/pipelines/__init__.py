"""Prefect orchestration of the DVC pipeline: flow ``lpt`` (one task per ``dvc.yaml`` stage, from DVC's own
stage graph), deployment ``lpt/full``, ``lpt-serve``, the multi-process launcher (``pipelines.launch``), the
``dvc.lock`` check (``pipelines.lock_check``) and output restore (``pipelines.restore``). Runs DVC stages and
reads their JSON outputs; never imports torch."""
