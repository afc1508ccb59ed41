"""lpt: long-tailed image classification by prompt tuning (LPT, Dong et al., ICLR 2023).

The library is pure and typed; orchestration lives in ``pipelines/``. Heavy modules (torch, timm) are
imported lazily by the stages that need them, so ``lpt.runtime`` works in a torch-free install.
"""

__version__ = "0.1.0"
