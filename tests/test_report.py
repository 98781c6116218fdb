import json

import pytest
from PIL import Image

from bridgevlm.report import Report, Section, markdown_table, plot_curves


def test_markdown_table_formats_floats_to_three_places():
    table = markdown_table(["name", "value", "n"], [["acc", 0.123456, 7], ["loss", 2.0, "x"], ["flag", True, None]])
    assert table.splitlines() == [
        "| name | value | n |",
        "|---|---|---|",
        "| acc | 0.123 | 7 |",
        "| loss | 2.000 | x |",
        "| flag | True | None |",
    ]


def test_markdown_table_without_rows():
    assert markdown_table(["a"], []) == "| a |\n|---|"


def test_report_writes_json_and_markdown(tmp_path):
    report = Report(tmp_path / "out", "A run")
    report.add_metrics("clip", {"recall_at_1": 0.5})
    report.add_metrics("clip", {"zeroshot_accuracy": 0.25})  # groups accumulate
    report.add_metrics("lm", {"perplexity": 3.0})
    report.add_timing("train", 1.23456)
    report.add_timing("eval", 2.0)
    report.set("world", {"train": 48})
    report.add_section(Section("First", "Some text.", [markdown_table(["k", "v"], [["a", 1]])],
                               ["figures/loss.png", "figures/acc.png"]))
    report.add_section(Section("Second"))
    json_path, md_path = report.write()
    assert (json_path, md_path) == (tmp_path / "out" / "report.json", tmp_path / "out" / "report.md")

    assert json.loads(json_path.read_text()) == {
        "metrics": {"clip": {"recall_at_1": 0.5, "zeroshot_accuracy": 0.25}, "lm": {"perplexity": 3.0}},
        "timings_s": {"train": 1.23, "eval": 2.0},
        "world": {"train": 48},
    }
    assert md_path.read_text() == "\n".join([
        "# A run", "",
        "## First", "", "Some text.", "", "| k | v |\n|---|---|\n| a | 1 |", "",
        "![loss](figures/loss.png)", "![acc](figures/acc.png)", "",
        "## Second", "",
        "## Wall time", "", "| step | seconds |\n|---|---|\n| train | 1.230 |\n| eval | 2.000 |",
    ]) + "\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]  # no temp files


def test_report_without_timings_has_no_wall_time_section(tmp_path):
    report = Report(tmp_path, "Empty")
    report.write()
    assert (tmp_path / "report.md").read_text() == "# Empty\n\n"
    assert json.loads((tmp_path / "report.json").read_text()) == {"metrics": {}, "timings_s": {}}


def test_rewriting_replaces_the_report(tmp_path):
    report = Report(tmp_path, "R")
    report.add_metrics("a", {"x": 1.0})
    report.write()
    report.add_metrics("a", {"x": 2.0})
    report.write()
    assert json.loads((tmp_path / "report.json").read_text())["metrics"] == {"a": {"x": 2.0}}


@pytest.mark.parametrize("log_y", [False, True])
def test_plot_curves_writes_a_png(tmp_path, log_y):
    path = plot_curves(tmp_path / "sub" / "loss.png",
                       {"clip": ([1, 2, 3], [3.0, 2.0, 1.5]), "lm": ([1, 2, 3], [5.0, 4.0, 3.5])},
                       "step", "loss", "training loss", log_y=log_y)
    assert path == tmp_path / "sub" / "loss.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (600, 360)  # figsize 6 x 3.6 inches at 100 dpi
        image.verify()
