"""The ``lpt`` command line: each command parses, calls one library function and prints where outputs went.

Heavy imports (torch, timm, great_expectations, prefect) happen inside the commands, so ``lpt predict``
works in a torch-free install (``pip install 'lpt[ort]'``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lpt.exitcodes import BAD_PARAMS, ERROR, GATE_FAILED, GATE_NOT_PASSED, PARITY_FAILED, VALIDATION_FAILED

app = typer.Typer(help="LPT: long-tailed prompt tuning — ingest, validate, train, evaluate, export, predict.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        import lpt

        typer.echo(f"lpt {lpt.__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", help="print the version and exit", is_eager=True,
                                                callback=_version)] = False) -> None:
    """LPT: long-tailed prompt tuning — ingest, validate, train, evaluate, export, predict."""
    _ignore_file_size_signal()
    record_stage_time()


STAGE_TIMES_DIR = Path(".lpt/runs")
"""Under the pipeline root: ``<stage>.json`` with the wall time of the stage's last command (read by
``python -m pipelines.summary``); not a pipeline output, so no timing enters a tracked file."""


def record_stage_time(environ: dict[str, str] | None = None) -> Path | None:
    """When this command runs as a pipeline stage, record its wall time at exit (rank 0 only).

    A DVC stage's command gets ``DVC_STAGE`` (the stage's name) and ``DVC_ROOT`` in its environment; anywhere
    else this does nothing. The record is ``{"stage", "seconds", "finished"}`` (``finished`` in seconds since
    the epoch), written whole or not at all.

    Returns:
        The record's path, or ``None`` when this is not a stage's command.
    """
    import atexit
    import os
    import re
    import time

    env = os.environ if environ is None else environ
    stage, root = env.get("DVC_STAGE"), env.get("DVC_ROOT")
    if not stage or not root or env.get("RANK", "0") != "0":
        return None
    path = Path(root) / STAGE_TIMES_DIR / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stage)}.json"
    started = time.perf_counter()

    def _write() -> None:
        from lpt.utils import write_json_atomic

        with contextlib.suppress(OSError):  # a timing is never worth failing the stage for
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"stage": stage, "seconds": round(time.perf_counter() - started, 3),
                                     "finished": time.time()})

    atexit.register(_write)
    return path


def _ignore_file_size_signal() -> None:
    """A file over the size limit (``ulimit -f``) must fail the write with EFBIG, one `error:` line naming the
    output, not kill the process with SIGXFSZ. CPython ignores the signal at startup; an embedding host may not."""
    import signal

    if hasattr(signal, "SIGXFSZ"):
        with contextlib.suppress(ValueError):  # not the main thread: leave the host's setting alone
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


params_app = typer.Typer(help="Inspect and check params.yaml.", no_args_is_help=True)
app.add_typer(params_app, name="params")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-S", help="override KEY.PATH=VALUE (repeatable)")]


def _load(params: Path, overrides: list[str] | None = None):
    """Load params strictly; a bad file exits 2 with the message, before any compute."""
    from lpt.config import ParamsError, load_params, parse_override

    try:
        ov = dict(parse_override(o) for o in overrides or [])
        return load_params(params, ov)
    except ParamsError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(BAD_PARAMS) from None


def _fail(message: str, code: int = ERROR) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The library's expected failure types: each becomes one `error:` line (missing or damaged inputs,
    bad checkpoints, refused files), never a traceback."""
    from lpt.compare import CompareError
    from lpt.data.reader import ShardError
    from lpt.data.sources.base import IngestError
    from lpt.model.backbone import BackboneError
    from lpt.model.lpt import CheckpointError
    from lpt.train import TrainError
    from lpt.utils import JsonFileError

    return (TrainError, CheckpointError, BackboneError, IngestError, ShardError, JsonFileError, FileNotFoundError,
            CompareError, OSError)


@contextlib.contextmanager
def _library_errors() -> Iterator[None]:
    """Turn the library's expected failures into one `error:` line: exit 2 for an output folder that may not be
    written (a choice of path), 1 for the rest, filesystem faults included (no space, file size limit,
    permission denied, name too long: the message names the path)."""
    from lpt.utils import OutputDirError

    expected = _expected_errors()
    try:
        yield
    except OutputDirError as err:
        _fail(str(err), BAD_PARAMS)
    except expected as err:
        if isinstance(err, OSError):  # a flaky disk is worth a retry, a full one is not (by errno)
            from lpt.verdict import is_transient_error, record

            record(transient=is_transient_error(err))
        message = str(err)
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep the error, not the trace
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        _fail(message)


STAMP_TEXT = "params.yaml passed `lpt params check`\n"
"""The stamp's bytes never depend on the params, so stages downstream of the check re-run for their own keys only."""


@params_app.command("check")
def params_check(path: Annotated[Path, typer.Argument(help="params file")] = Path("params.yaml"),
                 set_: SetOpt = None,
                 stamp: Annotated[Optional[Path], typer.Option(
                     help="write this constant file when valid (the dvc.yaml `params` stage's output)")] = None) -> None:
    """Validate a params file (and overrides) against the strict schema."""
    from lpt.utils import atomic_path

    _load(path, set_)
    if stamp is not None:
        with atomic_path(stamp) as tmp:
            tmp.write_text(STAMP_TEXT)
    typer.echo(f"{path}: ok")


@params_app.command("show")
def params_show(path: Annotated[Path, typer.Argument(help="params file")] = Path("params.yaml"),
                set_: SetOpt = None) -> None:
    """Print the fully resolved params (defaults filled in) as YAML."""
    import yaml

    typer.echo(yaml.safe_dump(_load(path, set_).to_dict(), sort_keys=False))


@params_app.command("preset")
def params_preset(name: Annotated[str, typer.Argument(help="preset name under configs/ (without .yaml)")],
                  path: ParamsOpt = Path("params.yaml")) -> None:
    """Apply a preset from configs/ onto params.yaml (validated, written atomically)."""
    from lpt.config import ParamsError
    from lpt.presets import apply_preset

    try:
        changed = apply_preset(name, path)
    except (ParamsError, FileNotFoundError) as err:
        _fail(str(err), BAD_PARAMS)
    typer.echo(f"{path}: applied preset {name!r} ({len(changed)} keys)")


@app.command()
def backbones(
    name: Annotated[Optional[str], typer.Argument(help="a timm model name (omit: list the supported families)")] = None,
    timm_kwargs: Annotated[Optional[str], typer.Option(
        "--timm-kwargs", help="YAML mapping of create_model kwargs, as backbone.timm_kwargs (e.g. '{img_size: 32}')")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """The timm ViT families LPT supports; for NAME: prefix tokens, feature, RoPE, S, parameter counts, weights."""
    from lpt.config import ParamsError, load_yaml
    from lpt.model.families import backbone_report, format_backbone_report, format_family_table

    if name is None:
        typer.echo(format_family_table())
        return

    try:
        kwargs = load_yaml(timm_kwargs, f"--timm-kwargs {timm_kwargs!r}") if timm_kwargs else {}
    except ParamsError as err:
        _fail(str(err), BAD_PARAMS)
    if not isinstance(kwargs, dict):
        _fail(f"--timm-kwargs {timm_kwargs!r}: expected a YAML mapping like '{{img_size: 32}}'", BAD_PARAMS)
    model = _load(params).model if params.is_file() else None  # T and P as the project sets them
    with _library_errors():
        report = backbone_report(name, kwargs, prompt_length=model.prompt_length if model else 10,
                                 pool_size=model.pool_size if model else 20)
    typer.echo(format_backbone_report(report))


@app.command()
def ingest(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Turn the configured source into WebDataset shards + manifest (data.out_dir)."""
    from lpt.data.ingest import run_ingest, untracked_inputs

    p = _load(params, set_)
    with _library_errors():
        result = run_ingest(p)
    typer.echo(f"images: {result.summary()}")
    typer.echo(f"shards: {p.data.out_dir}  manifest: {result.manifest_path}")
    for key, path in untracked_inputs(p).items():
        typer.echo(f"note: {key} ({path}) is outside data.source_dir ({p.data.source_dir}), so DVC does not see it "
                   f"change and `dvc repro` will not re-ingest when it does: copy, `dvc add` or `dvc import` it "
                   f"under {p.data.source_dir} (docs/data.md, \"Tracked source files\")")


@app.command()
def validate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Great Expectations checks over the shards; exits non-zero listing every failed expectation."""
    from lpt.data.validate import run_validation

    p = _load(params, set_)
    with _library_errors():
        result = run_validation(p)
    typer.echo(f"report: {result.report_path}  summary: {result.summary_path}")
    if not result.success:
        _fail("data validation failed:\n" + "\n".join(f"  - {f}" for f in result.failures), VALIDATION_FAILED)


@app.command()
def pretrain(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Supervised pretraining of the small embedded backbone on the synthetic source split."""
    from lpt.pretrain import pretrain_backbone

    p = _load(params, set_)
    with _library_errors():
        result = pretrain_backbone(p)
    typer.echo(f"backbone: {result['path']}")


@app.command()
def train(phase: Annotated[int, typer.Option(help="1: shared prompt + head; 2: group prompt pool")] = 1,
          params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Train one LPT phase (resumes from the last checkpoint in its output folder)."""
    from lpt.train import run_phase

    if phase not in (1, 2):
        _fail(f"--phase must be 1 or 2, got {phase}", BAD_PARAMS)
    p = _load(params, set_)
    with _library_errors():
        result = run_phase(p, phase)
    typer.echo(f"checkpoint: {result['checkpoint']}  best val acc: {result.get('best_val_acc')}")


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Test-split metrics, plots and report; exits non-zero when the quality gate fails."""
    from lpt.evaluate import run_evaluate

    p = _load(params, set_)
    with _library_errors():
        result = run_evaluate(p)
    typer.echo(f"metrics: {result.metrics_path}  report: {result.report_path}")
    for note in result.gate_notes:
        typer.echo(f"note: {note}")
    if not result.gate_passed:
        _fail("quality gate failed:\n" + "\n".join(f"  - {f}" for f in result.gate_failures), GATE_FAILED)


@app.command()
def compare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
            methods: Annotated[Optional[str], typer.Option(
                help="comma-separated rows (default: every method and pixel baseline; see lpt/methods.py, "
                     "lpt/baselines.py)")] = None,
            seeds: Annotated[Optional[str], typer.Option(
                help="comma-separated training seeds, e.g. 0,1,2 (default: params seed); mean ± std per cell")] = None,
            out: Annotated[Optional[Path], typer.Option(help="Markdown table path")] = None,
            sources: Annotated[Optional[str], typer.Option(
                help="comma-separated data.source values: one table each, all in --out (e.g. docs/results.md)")] = None,
            readme: Annotated[Optional[Path], typer.Option(
                help="with --sources: also refresh the results block of this file (README.md)")] = None,
            ) -> None:
    """Train and evaluate each method with the same backbone, data and budget over seeds; write Markdown tables."""
    from lpt.compare import ALL_ROWS, run_compare, run_results

    p = _load(params, set_)
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else list(ALL_ROWS)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()] if seeds else None
    except ValueError:
        _fail(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 0,1,2", BAD_PARAMS)
    if readme is not None and not sources:
        _fail("--readme needs --sources (the README table spans the sources of one results page)", BAD_PARAMS)
    with _library_errors():
        if sources:
            path = run_results(p, method_list, [s.strip() for s in sources.split(",") if s.strip()],
                               out or Path("docs/results.md"), seed_list, readme)
        else:
            path = run_compare(p, method_list, out, seed_list)
    typer.echo(f"table: {path}")


def _ship(run: Callable[[Any], Any], summary: Callable[[Any], str], params: Path, set_: list[str] | None) -> None:
    """Run ``lpt export`` / ``lpt pack``: gate not passed, parity failed and other refusals as exit codes."""
    from lpt.export import ExportError, GateNotPassed, ParityFailed

    p = _load(params, set_)
    try:
        with _library_errors():
            result = run(p)
    except GateNotPassed as err:
        _fail(str(err), GATE_NOT_PASSED)
    except ParityFailed as err:
        _fail(str(err), PARITY_FAILED)
    except ExportError as err:  # PackError included
        _fail(str(err))
    typer.echo(summary(result))


@app.command()
def export(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Export the whole LPT inference to one ONNX graph and gate it on ORT-vs-torch parity."""
    from lpt.export import result_summary, run_export

    _ship(run_export, result_summary, params, set_)


@app.command()
def pack(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Write the final model's task pack and the backbone graph it runs on, gated on parity with torch."""
    from lpt.pack import result_summary, run_pack

    _ship(run_pack, result_summary, params, set_)


@app.command()
def predict(paths: Annotated[list[Path], typer.Argument(
                help="MODEL.onnx (an `lpt export`) then image files or folders; with --pack: images only",
                show_default=False)],
            pack: Annotated[Optional[list[Path]], typer.Option(
                "--pack", help="a task pack (repeatable): every image is classified for every task on one "
                "backbone")] = None,
            backbone: Annotated[Optional[Path], typer.Option(
                help="the backbone graph for --pack (default: the backbone.onnx `lpt pack` wrote beside the "
                "first pack)")] = None,
            top_k: Annotated[int, typer.Option("--top-k", help="classes per image")] = 1,
            json_: Annotated[bool, typer.Option("--json", help="JSON lines output")] = False,
            csv: Annotated[bool, typer.Option("--csv", help="CSV output")] = False,
            batch_size: Annotated[int, typer.Option(help="images per ORT call")] = 32) -> None:
    """Classify images with an exported model, or for several tasks with packs on one backbone (torch-free).

    `lpt predict MODEL.onnx IMAGES...` or `lpt predict --pack A.pack --pack B.pack IMAGES...` (numpy +
    onnxruntime + Pillow; packs are read with safetensors' numpy API).
    """
    from lpt.runtime import ModelFileError, PredictError, Predictor, PredictRefused, format_predictions, read_pack

    try:
        if pack:
            if backbone is None:
                backbone = read_pack(pack[0]).backbone_graph_path()
            predictor, images = Predictor(backbone, packs=pack), paths
        else:
            if backbone is not None:
                _fail("--backbone is for --pack: a single-task MODEL.onnx holds its own backbone", BAD_PARAMS)
            if len(paths) < 2:
                _fail("give MODEL.onnx and at least one image file or folder (or --pack TASK.pack and images)",
                      BAD_PARAMS)
            predictor, images = Predictor(paths[0]), paths[1:]
        rows = predictor.predict_paths(images, top_k=top_k, batch_size=batch_size)
    except (ModelFileError, PredictRefused) as err:  # no runnable ONNX graph, or an input refused by policy
        _fail(str(err), BAD_PARAMS)  # (image format, size, a FIFO): a bad argument, exit 2
    except PredictError as err:
        _fail(str(err))
    typer.echo(format_predictions(rows, fmt="json" if json_ else "csv" if csv else "text"))


@app.command()
def score(inputs: Annotated[Optional[list[Path]], typer.Argument(
              help="image files, folders (recursive) and list files (.txt / .lst: one image path per line)",
              show_default=False)] = None,
          split: Annotated[Optional[str], typer.Option(help="score a split of the shards instead (test, val, train)")] = None,
          out: Annotated[Path, typer.Option(help="predictions CSV (the summary: <out>.summary.json)")] = Path(
              "reports/score/predictions.csv"),
          top_k: Annotated[int, typer.Option("--top-k", help="classes per image")] = 3,
          model: Annotated[Optional[Path], typer.Option(
              help="the export (default: <export.out_dir>/model.onnx; it must have passed the gate)")] = None,
          params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Score a batch of images with the gated export: predictions CSV + summary with the predicted-class
    histogram beside the training prior. An unreadable image is reported and skipped; the batch goes on."""
    from lpt.score import ScoreError, ScoreRefused, score_images, summary_lines

    if (split is None) == (not inputs):
        _fail("give image files / folders / list files, or --split (one of the two)", BAD_PARAMS)
    cfg = _load(params, set_)

    def progress(done: int, total: int) -> None:
        typer.echo(f"[score] {done}/{total} images", err=True)

    try:
        result = score_images(cfg, inputs, split=split, out=out, top_k=top_k, model=model, on_progress=progress)
    except ScoreRefused as err:
        _fail(str(err), GATE_NOT_PASSED)
    except ScoreError as err:
        _fail(str(err), BAD_PARAMS)
    for line in summary_lines(result):
        typer.echo(line, err=line.startswith("skipped"))
    if not result.scored:
        _fail("no image could be read: nothing scored")


def main() -> None:  # pragma: no cover - console entry (tested through the installed `lpt` command)
    """The ``lpt`` command: the app, its outcome recorded where a caller asked for it (:mod:`lpt.verdict`:
    started, exit code, transient), so the pipeline reads numbers instead of the messages around them."""
    from lpt.verdict import recorded

    with recorded(" ".join(sys.argv[1:3]) or "lpt"):
        app()


if __name__ == "__main__":  # pragma: no cover
    main()
