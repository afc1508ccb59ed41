"""Prefect orchestration of the DVC pipeline: flow ``lpt`` (one task per ``dvc.yaml`` stage), deployment
``lpt/full`` and ``lpt serve``. Runs DVC stages and reads their JSON outputs; no tensors here."""
