"""Hostile class names (issue 25): a newline, a terminal escape, Markdown or a spreadsheet formula in a class
name stays inert in every text, Markdown and CSV output (:mod:`lpt.escaping`); JSON keeps names exact.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import make_tiny_params
from test_runtime import NUM_CLASSES, make_toy_onnx, random_image, toy_metadata
from test_untrusted_input import _png, _tiny

from lpt.escaping import csv_cell, markdown_cell, text_line

HOSTILE = ['=HYPERLINK("http://evil.example/?x")', "a\nb|c", "\x1b[31mred", "+cmd|' /C calc'!A0", "@SUM(1+1)"]
"""NUM_CLASSES hostile class names: a formula, a newline and a table pipe, a terminal escape, two more
formula starts."""
assert len(HOSTILE) == NUM_CLASSES


# ------------------------------------------------------------------------------------------ helpers
@pytest.mark.parametrize("value,text,markdown,cell", [
    ("a\nb|c", "a\\nb|c", "a\\\\nb\\|c", "a\\nb|c"),
    ("\x1b[31mred", "\\x1b[31mred", "\\\\x1b\\[31mred", "\\x1b[31mred"),
    ('=HYPERLINK("x")', '=HYPERLINK("x")', '=HYPERLINK("x")', '\'=HYPERLINK("x")'),
    ("-1", "-1", "-1", "'-1"),
    ("@a", "@a", "@a", "'@a"),
    ("+a\r\n", "+a\\r\\n", "+a\\\\r\\\\n", "'+a\\r\\n"),
    ("\t=1", "\\t=1", "\\\\t=1", "\\t=1"),
    ("x\u202eevil", "x\\u202eevil", "x\\\\u202eevil", "x\\u202eevil"),
    ("<img src=x>[a](b)*_`", "<img src=x>[a](b)*_`", "\\<img src=x\\>\\[a\\](b)\\*\\_\\`", "<img src=x>[a](b)*_`"),
    ("plain name_1 é 中", "plain name_1 é 中", "plain name\\_1 é 中", "plain name_1 é 中"),
])
def test_escaping_helpers_hand_computed(value: str, text: str, markdown: str, cell: str) -> None:
    assert (text_line(value), markdown_cell(value), csv_cell(value)) == (text, markdown, cell)


# ------------------------------------------------------------------------------------------ lpt predict
@pytest.fixture
def hostile_model(tmp_path: Path) -> Path:
    return make_toy_onnx(tmp_path / "hostile.onnx", toy_metadata(class_names=json.dumps(HOSTILE)))


def _images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        random_image(20 + i, 18, seed=i).save(folder / f"{i}.png")
    (folder / "=1+2.png").write_bytes((folder / "0.png").read_bytes())  # a file name is data too
    return folder


def test_lpt_predict_text_and_csv_escape_class_names(tmp_path: Path, hostile_model: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from lpt.cli import app

    folder = _images(tmp_path / "images")
    runner = CliRunner()
    text = runner.invoke(app, ["predict", str(hostile_model), str(folder), "--top-k", str(NUM_CLASSES)])
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert len(lines) == 4  # one line per image, whatever the names hold
    assert "\x1b" not in text.stdout and "\r" not in text.stdout
    for line in lines:
        assert all(text_line(name) in line for name in HOSTILE)

    out = runner.invoke(app, ["predict", str(hostile_model), str(folder), "--top-k", str(NUM_CLASSES), "--csv"])
    assert out.exit_code == 0, out.output
    (tmp_path / "predictions.csv").write_text(out.stdout)
    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", "rank", "label", "class", "score"] and len(rows) == 1 + 4 * NUM_CLASSES
    cells = [cell for row in rows[1:] for cell in (row[0], row[3])]
    assert not [c for c in cells if c[:1] in "=+-@" or "\n" in c or "\x1b" in c]
    assert {row[3] for row in rows[1:]} == {"'=HYPERLINK(\"http://evil.example/?x\")", "a\\nb|c", "\\x1b[31mred",
                                            "'+cmd|' /C calc'!A0", "'@SUM(1+1)"}
    assert {row[0] for row in rows[1:]} == {str(folder / f"{i}.png") for i in range(3)} | {str(folder / "=1+2.png")}

    raw = runner.invoke(app, ["predict", str(hostile_model), str(folder), "--top-k", str(NUM_CLASSES), "--json"])
    assert {n for line in raw.stdout.splitlines() for n in json.loads(line)["classes"]} == set(HOSTILE)  # exact

    monkeypatch.chdir(folder)  # a relative path that starts with "=" is a formula too
    relative = runner.invoke(app, ["predict", str(hostile_model), "=1+2.png", "--csv"])
    assert [row[0] for row in csv.reader(io.StringIO(relative.stdout))][1:] == ["'=1+2.png"]


# ------------------------------------------------------------------------------------------ evaluate
def test_evaluate_report_escapes_class_names(tiny_shards, tmp_path: Path) -> None:
    """The summarised report's worst-classes table: one row per class, the right number of cells, no raw
    control characters or HTML, whatever the manifest's class names say."""
    torch = pytest.importorskip("torch")
    from test_evaluate import _save_untrained

    from lpt.evaluate import run_evaluate

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards.data.out_dir, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    names = [*HOSTILE, "<script>alert(1)</script>", "x|y|z", "[link](http://evil)", "ok", "tab\there"]
    assert len(names) == manifest["num_classes"]
    manifest["class_names"] = names
    (shards / "manifest.json").write_text(json.dumps(manifest))
    torch.set_num_threads(1)
    params = _save_untrained(make_tiny_params(tmp_path, data__out_dir=str(shards), evaluate__max_plot_classes=4))
    report = run_evaluate(params).report_path.read_text()

    assert "\x1b" not in report and "\t" not in report and "<script>" not in report and "[link](" not in report
    header = "| class | training images | test images | accuracy (%) | most often taken for | share (%) |"
    start = report.splitlines().index(header)
    rows = []
    for line in report.splitlines()[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    assert len(rows) == len(names)  # every tested class, one line each
    for row in rows:
        cells = [c for c in _unescaped_split(row) if c is not None]
        assert len(cells) == 6, row
    assert {_unescaped_split(row)[0].strip() for row in rows} == {markdown_cell(n) for n in names}


def _unescaped_split(row: str) -> list[str]:
    """Cells of a Markdown table row (``\\|`` is not a separator)."""
    cells, cell, escaped = [], "", False
    for ch in row.strip()[1:-1]:
        if ch == "|" and not escaped:
            cells.append(cell)
            cell = ""
            continue
        escaped = ch == "\\" and not escaped
        cell += ch
    return [*cells, cell]


# ------------------------------------------------------------------------------------------ ingest
def test_ingest_error_naming_a_class_is_one_plain_line(tmp_path: Path) -> None:
    """A class whose every train image is skipped: the empty-class error names it, escaped."""
    from lpt.data.ingest import IngestError, run_ingest

    root = tmp_path / "imf"
    hostile = "a\nb|c\x1b[31m"
    for c in ("=cmd", hostile, "ok"):
        for i in range(2):
            _png(root / "test" / c / f"{i}.png")
            if c != hostile:
                _png(root / "train" / c / f"{i}.png")
    (root / "train" / hostile).mkdir(parents=True)
    (root / "train" / hostile / "broken.png").write_bytes(b"not an image")
    params = _tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root)},
                   data__skip_bad=True)
    with pytest.raises(IngestError) as info:
        run_ingest(params)
    text = str(info.value)
    assert "\n" not in text and "\x1b" not in text
    assert "have no train image: 1 (a\\nb|c\\x1b[31m)" in text, text
