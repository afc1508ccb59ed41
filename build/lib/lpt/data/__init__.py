"""Data layer: sources -> long-tail subsampling -> WebDataset shards + manifest -> validation -> reader.

Modules:
    sources/    one module per source; each returns labelled items per split (nothing else).
    longtail    the exponential imbalance profile, pool splitting and many/medium/few groups.
    shards      image encoding and WebDataset shard writing (temp + rename), manifest.
    ingest      ``run_ingest(params)``: the ``lpt ingest`` stage.
    validate    ``run_validation(params)``: Great Expectations checks over the shards.
    reader      random access, streaming and transforms used by training and evaluation.
    sampling    class-aware and instance-balanced samplers with exact resume.
"""
