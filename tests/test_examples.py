"""The example scripts run as the README says: --quick end to end, clear errors, quickstart == README.

Each --quick run takes the Debian data when installed and the synthetic smoke-test data otherwise,
as in CI (which has no Debian data sets).
"""

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
pytest.importorskip("tqdm")  # the examples' progress bar: without it, skip rather than fail collection
sys.path.insert(0, str(EXAMPLES))
import _common as common  # noqa: E402  (the examples' shared module, not an installed package)

pytestmark = [pytest.mark.examples, pytest.mark.slow]  # each runs a script in a new process

# script -> (the real data's --data name, is it installed, the CSV's metric column)
SCRIPTS = {
    "train_char_lm.py": ("kjv", common.kjv_available(), "val_loss"),
    "train_fashion_mnist.py": ("fashion-mnist", common.fashion_available(), "test_accuracy"),
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )


def quick_cases() -> list:
    return [
        pytest.param(script, real if installed else "synthetic", id=script)
        for script, (real, installed, _) in SCRIPTS.items()
    ]


@pytest.mark.parametrize("script, data", quick_cases())
def test_quick_run_writes_csv_png_and_table(tmp_path, script, data):
    optimizers = list(common.OPTIMIZERS)
    prefix = tmp_path / "run"
    result = run(EXAMPLES / script, "--quick", "--out", prefix)
    assert result.returncode == 0, result.stderr[-3000:]

    metric = SCRIPTS[script][2]
    with open(prefix.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["data"] for row in rows} == {data}
    assert list(dict.fromkeys(row["optimizer"] for row in rows)) == optimizers
    for name in optimizers:
        steps = [int(row["step"]) for row in rows if row["optimizer"] == name]
        assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 3, (name, steps)
        values = [float(row[metric]) for row in rows if row["optimizer"] == name]
        assert all(math.isfinite(v) for v in values), (name, values)

    png = prefix.with_suffix(".png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000

    report = prefix.with_suffix(".md").read_text()
    table_rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| optimizer")]
    assert [line.split("|")[1].strip() for line in table_rows[1:]] == optimizers
    assert (common.SMOKE_LABEL in report) == (data == "synthetic")
    assert report in result.stdout


@pytest.mark.parametrize(
    "script, args, hint",
    [
        # No `bible` on PATH: what a machine without bible-kjv sees.
        ("train_char_lm.py", ["--data", "kjv"], "apt-get install bible-kjv bible-kjv-text"),
        (
            "train_fashion_mnist.py",
            ["--data", "fashion-mnist", "--data-dir", "{tmp}"],
            "apt-get install dataset-fashion-mnist",
        ),
    ],
)
def test_missing_data_fails_with_one_line_that_says_how_to_get_it(tmp_path, script, args, hint):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))
    result = run(EXAMPLES / script, *[a.format(tmp=tmp_path / "none") for a in args], "--out", tmp_path / "x", env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and hint in lines[0], result.stderr
    assert not list(tmp_path.glob("x.*"))


def test_quickstart_is_the_readme_usage_example_and_runs():
    readme = (ROOT / "README.md").read_text()
    usage = readme.split("\n## Usage\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    source = (EXAMPLES / "quickstart.py").read_text()
    code = source.split('"""', 2)[2].lstrip("\n")  # the file minus its docstring
    assert code == block

    result = run(EXAMPLES / "quickstart.py")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    assert len(losses) >= 2 and losses[-1] < 0.25 * losses[0], result.stdout
