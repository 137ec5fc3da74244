"""The 4-bit study's update-sign agreement (benchmarks/study_4bit.py): shadow optimizers fed one
recorded gradient sequence count the update signs equal to fp32 Lion's, as
tests/test_sign_agreement.py measures it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from study_4bit_formats import FormatLion, random_bits
from study_4bit_training import BETAS, FP32, _mlp_problem, example_argv, make_format, train

import lion8bit
from lion8bit import quant

# -- update-sign agreement ----------------------------------------------------------------------

# Shadows from the lion8bit package itself, for scale: what tests/test_sign_agreement.py measures.
PACKAGE_SHADOWS = {"lion8bit 8bit": "8bit", "lion8bit bf16": "bf16"}
# The gradient sequences: the char-LM example's, the test's small MLP, and the same MLP sequence
# with each format's momentum re-synced to fp32 Lion's before every step (a diagnostic).
SEQUENCES = ("char-lm", "mlp", "mlp-resync")


class SignAgreement:
    """Shadow optimizers fed one gradient sequence; counts update signs equal to fp32 Lion's.

    As tests/test_sign_agreement.py: before each step every shadow's params are set to zero and
    given the step's gradients; with lr 1 and no weight decay the param is then -sign(c). Every
    tensor is stored in the format (min_size 0) and each shadow keeps its own momentum.

    With ``resync`` (a diagnostic, not the measure), each format's momentum is instead replaced
    before every step by fp32 Lion's momentum encoded in the format: what one rounding costs,
    without the error that the format's own trajectory accumulates.
    """

    def __init__(self, shapes, names: list[str], resync: bool = False):
        self.names = names
        self.resync = resync
        self.steps = 0
        self.shadows, self.optimizers = {}, {}
        for name in [FP32, *names]:
            params = [torch.zeros(shape, requires_grad=True) for shape in shapes]
            if name in PACKAGE_SHADOWS:
                optimizer = lion8bit.Lion(
                    params, lr=1.0, betas=BETAS, state=PACKAGE_SHADOWS[name], min_8bit_size=0
                )
            else:
                optimizer = FormatLion(params, lr=1.0, betas=BETAS, fmt=make_format(name), min_size=0)
            self.shadows[name], self.optimizers[name] = params, optimizer
        self.agree = dict.fromkeys(names, 0)
        self.total = 0

    @torch.no_grad()
    def feed(self, grads: list[torch.Tensor]) -> None:
        self.steps += 1
        if self.resync and self.steps > 1:
            self._resync()
        updates = {}
        for name, params in self.shadows.items():
            for shadow, grad in zip(params, grads, strict=True):
                shadow.zero_()
                shadow.grad = grad.clone()
            self.optimizers[name].step()
            updates[name] = torch.cat([-p.flatten() for p in params])
        for name in self.names:
            self.agree[name] += (updates[name] == updates[FP32]).sum().item()
        self.total += updates[FP32].numel()

    def _resync(self) -> None:
        reference = self.optimizers[FP32]
        for name in self.names:
            optimizer = self.optimizers[name]
            for index, (shadow, twin) in enumerate(zip(self.shadows[name], self.shadows[FP32], strict=True)):
                entry, momentum = optimizer.state[shadow], reference.state[twin]["momentum"]
                bits = random_bits(
                    quant.rounding_key(index, self.steps, quant.STREAM_MOMENTUM), momentum.numel()
                )
                entry["codes"], entry["absmax"] = optimizer.fmt.encode(momentum, bits)

    def result(self) -> dict[str, float]:
        return {name: count / self.total for name, count in self.agree.items()}


class _Recording(FormatLion):
    """fp32 Lion that hands each step's gradients (after clipping) to a callback first."""

    def __init__(self, params, callback, **kwargs):
        super().__init__(params, fmt=None, **kwargs)
        self.callback = callback

    def step(self, closure=None):
        self.callback([p.grad for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def sign_agreement_job(sequence: str, names: list[str], quick: bool, progress=None) -> dict[str, float]:
    """Agreement of each format in ``names`` with fp32 Lion on one gradient sequence.

    ``progress`` (a queue) receives ``len(names)`` after every step, for the progress bar.
    """
    torch.set_num_threads(1)
    counter = None

    def feed(grads):
        counter.feed(grads)
        if progress is not None:
            progress.put(len(names))

    if sequence in ("mlp", "mlp-resync"):
        model, x, y, generator = _mlp_problem()
        counter = SignAgreement([p.shape for p in model.parameters()], names, resync=sequence == "mlp-resync")
        driver = _Recording(model.parameters(), feed, lr=3e-4, betas=BETAS, weight_decay=0.1)
        for _ in range(20 if quick else 200):  # the test's 200 steps
            batch = torch.randint(len(x), (128,), generator=generator)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            driver.zero_grad()
            loss.backward()
            driver.step()
        return counter.result()

    def recording(groups, lr, betas):
        nonlocal counter
        params = [p for group in groups for p in group["params"]]
        counter = SignAgreement([p.shape for p in params], names)
        return _Recording(groups, feed, lr=lr, betas=betas)

    train(sequence, recording, seed=0, argv=example_argv(quick))
    return counter.result()
