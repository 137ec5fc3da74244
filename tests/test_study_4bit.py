"""The 4-bit study (benchmarks/study_4bit.py, docs/4bit-study.md): its formats and its --quick run.

The formats are the study's own simulation, not part of the package; these tests pin the
definitions the study's verdict rests on (the maps, the rounding rules, the random bits) and check
that the whole study runs end to end (its report lists further checks: the DE map against
bitsandbytes', the simulated Lion against lion_pytorch.Lion and lion8bit.Lion, its training loop
against the example scripts').
"""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lion8bit import Lion, quant
from lion8bit import momentum as mom

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import study_4bit_formats as formats  # noqa: E402  (a benchmark module, not an installed package)


@pytest.mark.parametrize("name", list(formats.MAPS))
def test_maps_are_sorted_within_one_and_fit_4_bits(name):
    levels = formats.MAPS[name]
    assert levels.dtype == torch.float32
    assert len(levels) <= 16 and torch.all(levels[1:] > levels[:-1])
    assert levels.abs().max() == 1.0


def test_random_bits_are_lion8bit_bits():
    key = quant.rounding_key(7, 3, quant.STREAM_MOMENTUM)
    assert torch.equal(formats.random_bits(key, 70_001), quant.random_bits(key, 70_001, "cpu"))


def test_nearest_with_the_8bit_codebook_is_lion8bit_nearest():
    # Every decision threshold, its fp32 neighbours on both sides, 0, tiny values and random ones.
    thresholds = quant.decision_thresholds().float()
    values = torch.cat(
        [
            thresholds,
            thresholds.nextafter(torch.tensor(2.0)),
            thresholds.nextafter(torch.tensor(-2.0)),
            torch.tensor([0.0, 1e-9, -1e-9, 1.0, -1.0]),
            torch.rand(10_000) * 2 - 1,
        ]
    )
    assert torch.equal(formats.nearest_codes(values, quant.codebook()), quant.nearest_codes(values).long())


def test_nearest_never_erases_a_sign():
    levels = formats.MAPS["de"]
    values = torch.tensor([1e-6, -1e-6, 0.0])
    assert levels[formats.nearest_codes(values, levels)].tolist() == [levels[8].item(), levels[6].item(), 0.0]


# Stochastic rounding is unbiased: over N draws the mean decoded value is x up to the sampling
# error of a two-point distribution, at most 0.5 * spacing / sqrt(N); 5 such errors allow for the
# worst of the 64 values.
SR_DRAWS = 4096
SR_TOLERANCE_IN_SAMPLING_ERRORS = 5.0


@pytest.mark.parametrize("name", ["de", "sqrt", "linear"])
def test_stochastic_rounding_is_unbiased(name):
    levels = formats.MAPS[name]
    x = torch.linspace(-0.85, 0.85, 64)
    bits = formats.random_bits(quant.rounding_key(1, 1, quant.STREAM_MOMENTUM), SR_DRAWS * 64)
    draws = levels[formats.stochastic_codes(x.repeat(SR_DRAWS), levels, bits)].view(SR_DRAWS, 64)
    spacing = (levels[1:] - levels[:-1]).max()
    bound = SR_TOLERANCE_IN_SAMPLING_ERRORS * 0.5 * spacing / SR_DRAWS**0.5
    assert (draws.mean(0) - x).abs().max() <= bound


def test_bf16_absmax_is_rounded_up_to_a_bf16():
    values = torch.rand(10_000) * 10.0 ** torch.randint(-30, 30, (10_000,)).float()
    rounded = formats.round_up_to_bf16(values)
    assert torch.all(rounded >= values)
    assert torch.equal(rounded, rounded.bfloat16().float())
    # the smallest such bf16: one bf16 step below is under the value
    below = rounded.view(torch.int32) - 0x10000
    assert torch.all((below.view(torch.float32) < values) | (rounded == values))


# bf16 keeps 7 explicit mantissa bits: rounding up adds less than one ulp, at most 2**-7 relative.
BF16_ROUND_UP_RTOL = 2**-7


def test_format_round_trip_keeps_the_block_maximum_and_the_budget():
    fmt = formats.Format("de-sym", 64, "bf16", "nearest")
    values = torch.randn(1000)
    codes, absmax = fmt.encode(values)
    decoded = fmt.decode(codes, absmax)
    blocks = torch.nn.functional.pad(values, (0, 24)).view(-1, 64)
    maxima = blocks.abs().argmax(1) + torch.arange(len(blocks)) * 64
    # the largest element of each block decodes to +-absmax, the absmax rounded up to bf16
    assert torch.all(torch.sign(decoded[maxima]) == torch.sign(values[maxima]))
    assert torch.all((decoded[maxima] - values[maxima]).abs() <= BF16_ROUND_UP_RTOL * values[maxima].abs())
    assert fmt.nbytes(1000) == 500 + 2 * 16
    assert fmt.bytes_per_param == 0.5 + 2 / 64


def test_shipped_4bit_state_is_the_gated_format_bit_for_bit():
    """lion8bit's state="4bit" (the spec, backend "torch") steps exactly as the study's
    FormatLion with linear-32-bf16-srgrid, the format that passed the gate: params, codes and absmax
    agree after several steps, with partial blocks (the fused backends are tied to the spec by
    tests/test_backends.py). No tensor under min_8bit_size: FormatLion updates fp32 momentum as
    lion-pytorch does (add_ with alpha, one rounding), the spec with two roundings."""
    shapes = [(100, 51), (4096,), (70, 70), (4097,)]
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    theirs = [torch.nn.Parameter(x.clone()) for x in start]
    ours_opt = Lion(ours, lr=1e-3, weight_decay=0.1, state="4bit", backend="torch")
    gated = formats.Format.parse("linear-32-bf16-srgrid")
    theirs_opt = formats.FormatLion(theirs, lr=1e-3, weight_decay=0.1, fmt=gated, min_size=4096)
    assert torch.equal(quant.levels_4bit(), gated.levels)
    for _ in range(4):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        ours_opt.step()
        theirs_opt.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
        entry, expected = ours_opt.state[a], theirs_opt.state[b]
        assert torch.equal(quant.unpack_nibbles(entry[mom.MOMENTUM_CODES], a.numel()), expected["codes"])
        assert torch.equal(entry[mom.MOMENTUM_ABSMAX].float(), expected["absmax"])


@pytest.mark.slow
def test_quick_study_runs_end_to_end(tmp_path):
    prefix = tmp_path / "study"
    result = subprocess.run(
        [sys.executable, "benchmarks/study_4bit.py", "--quick", "--out", str(prefix)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = prefix.with_suffix(".md").read_text()
    assert "SMOKE TEST" in report
    assert "- holds:" in report and "FAILS" not in report
    assert prefix.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    with open(tmp_path / "study_sign.csv", newline="") as f:
        sign = list(csv.DictReader(f))
    assert {row["sequence"] for row in sign} == {"mlp", "char-lm", "mlp-resync"}  # resync: the diagnostic
    assert all(0.0 <= float(row["agreement"]) <= 1.0 for row in sign)
    with open(tmp_path / "study_runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert {row["task"] for row in runs} == {"char-lm", "fashion"}
    formats_run = {row["format"] for row in runs}
    assert {"fp32", "8bit-256-fp32-nearest", "de-128-fp32-nearest"} <= formats_run
