"""One module per data source; each exposes ``load(cfg, seed, bad) -> SourceData``."""

SOURCES = ("synthetic", "fashion_mnist", "cifar100", "list", "imagefolder", "inat")
"""Values of ``data.source``; module ``lpt.data.sources.<name>`` (``list`` -> ``listfile``)."""

MODULES = {name: ("listfile" if name == "list" else name) for name in SOURCES}
