"""fit --optimizer signum-sf: SignSGD in a schedule-free average (sparsify's), the average saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cache.reader import ActivationCache
from pipeline.fit import stage as fit_module
from pipeline.fit.config import FitConfig, Training
from pipeline.fit.optim import SF_MOMENTUM, averaged, make_optimizer
from pipeline.fit.plan import plan_run
from pipeline.fit.train import Member, make_member
from pipeline.infra.errors import UserError
from tests.support.caches import synthetic_cache
from tests.test_fit import interrupted, run_cfg, weights

CPU = torch.device("cpu")


def test_a_wrapped_step_is_schedule_free_signsgd_by_hand() -> None:
    """Three steps at lr 0.1, 0.2, 0.2 (a warmup) from p0, by the schedule-free rules with SignSGD as the base:
    z_t = z_{t-1} - lr_t sign(g_t); x_t = x_{t-1} + c_t (z_t - x_{t-1}), c_t = lr_max^2 / sum of lr_max^2 so
    far; y_t = b x_t + (1 - b) z_t at b = 0.95, where the gradients are taken. The parameter holds y; inside
    ``averaged`` it holds x, and after it y again, bit for bit. The gradients flip sign so that a momentum
    on the base (Signum's) would step otherwise: its buffer 0.09 g1 + 0.1 g2 has the sign of g1."""
    p0 = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    grads = [torch.tensor(g, dtype=torch.float64) for g in ([1, -1, 2, -3], [-0.5, 0.5, 1, 1], [2, 0.2, -1, 1])]
    lrs = [0.1, 0.2, 0.2]
    p = torch.nn.Parameter(p0.clone())
    opt = make_optimizer("signum-sf", [{"params": [p], "lr": lrs[0]}], (0.9, 0.999), CPU)
    x, z, weight_sum, lr_max, b = p0.clone(), p0.clone(), 0.0, 0.0, SF_MOMENTUM
    for lr, g in zip(lrs, grads):
        opt.param_groups[0]["lr"] = lr
        p.grad = g.clone()
        opt.step()
        z = z - lr * g.sign()
        lr_max = max(lr_max, lr)
        weight_sum += lr_max**2
        x = x + lr_max**2 / weight_sum * (z - x)
    y = b * x + (1 - b) * z
    torch.testing.assert_close(p.detach(), y, rtol=0, atol=1e-12)
    before = p.detach().clone()
    with averaged(opt):
        torch.testing.assert_close(p.detach(), x, rtol=0, atol=1e-12)
    assert torch.equal(p.detach(), before)
    assert "y" in opt.state_dict()["state"][0]
    assert set(opt.state[p]) == {"z"}  # SignSGD keeps no momentum buffer; y goes to the state_dict only


def test_signum_sf_trains_at_a_constant_rate_after_the_warmup() -> None:
    """The average replaces the lr's decay: warmup-decay (the default) becomes constant; a decaying schedule is
    refused rather than ignored."""
    assert Training.of(FitConfig(optimizer="signum-sf")).schedule == "constant"
    assert Training.of(FitConfig(optimizer="adam")).schedule == "warmup-decay"
    with pytest.raises(UserError, match="signum-sf"):
        Training.of(FitConfig(optimizer="signum-sf", schedule="reference"))


@pytest.fixture()
def cache(tmp_path: Path) -> str:
    return synthetic_cache(tmp_path, [3000, 2500, 2800]).url


def test_fit_saves_the_average_not_the_training_point(
    cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sae.safetensors holds the wrapper's average x of each parameter (y.lerp(z, 1 - 1 / b)), not the point y
    the gradients were taken at, which the parameters hold while training."""
    real_finish, points = fit_module._finish, {}

    def finish(plan: object, member: Member, steps: int, spent: object) -> None:
        state = member.optimizer.state
        points.update(
            {name: (p.detach().clone(), state[p]["z"].clone()) for name, p in member.model.named_parameters()}
        )
        real_finish(plan, member, steps, spent)  # type: ignore[arg-type]

    monkeypatch.setattr(fit_module, "_finish", finish)
    (run,) = fit_module.run(run_cfg(cache, tmp_path, max_tokens=4096, optimizer="signum-sf", lr=1e-2)).runs
    saved = weights(run)
    for name, (y, z) in points.items():
        assert not torch.equal(saved[name], y), name
        torch.testing.assert_close(saved[name], y.lerp(z, 1 - 1 / SF_MOMENTUM), rtol=0, atol=0)


def test_a_checkpoint_holds_the_average_and_resumes_at_the_training_point(
    cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint's weights are the average x; its optimizer state holds z and y, and loading it puts the
    parameters back at y (x is y.lerp(z, 1 - 1 / b) of what was loaded)."""
    cfg = run_cfg(cache, tmp_path, max_tokens=8192, optimizer="signum-sf", lr=1e-2)
    interrupted(cfg, monkeypatch)  # the state of step 20
    plan = plan_run(cfg, ActivationCache.open(cache))
    member = make_member(plan.folder, plan.sae, plan.training, False, [0], CPU)
    assert member.step == 20
    state = load_file(str(next(plan.folder.local().glob("state-*")) / "state.safetensors"))
    at_y = {name: p.detach().clone() for name, p in member.model.named_parameters()}
    with averaged(member.optimizer):
        for name, p in member.model.named_parameters():
            assert not torch.equal(p, at_y[name]), name
            torch.testing.assert_close(state[f"model.{name}"], p.detach(), rtol=0, atol=0)
