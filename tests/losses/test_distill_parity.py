"""flaxalign's generalized JSD (`flaxalign.losses.distill`) against TRL 1.16 itself.

`GKDTrainer.generalized_jsd_loss` (trl/experimental/gkd/gkd_trainer.py) is a static method, called directly on
float64 torch logits. Its `reduction="none"` returns the element-wise `[B, T, V]` terms of `F.kl_div` (not per
position), so the per-position value is their sum over V. Its "batchmean" divides the (masked) sum by:
  * with `labels`: the number of unmasked positions, `(labels != -100).sum().clamp_min(1)` — a per-token mean, which
    is flaxalign's (masked sum, count) divided once; `GKDTrainer.compute_loss` always passes labels;
  * without `labels`: `jsd.size(0)`, the batch size B — a per-sequence sum averaged over sequences, not a per-token
    mean (pinned below so a TRL change shows up here);
  * with `num_items_in_batch` (gradient accumulation): that number, whatever `reduction` says.

TRL's `DistillationTrainer` (trl/trainer/distillation_trainer.py) computes the same divergence from hidden states
and `lm_head` weights in chunks (`_chunked_divergence_loss`, student and teacher of different widths, soft cap then
temperature); on CPU it runs in float32, so it is compared at float32 tolerance with `chunked_generalized_jsd`.

torch and trl are imported inside the fixture, not at collection time: importing trl changes the global state of the
test process.
"""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign.losses.distill import chunked_generalized_jsd, generalized_jsd
from flaxalign.models.lm_head import LMHead

pytestmark = pytest.mark.parity

B, T, V = 3, 6, 17
BETAS = [0.0, 0.25, 0.5, 1.0]
TEMPERATURES = [1.0, 0.9]
RTOL, ATOL = 1e-9, 1e-12


@pytest.fixture(scope="module")
def trl():
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKD lives in trl.experimental
    from trl.experimental.gkd import GKDTrainer
    from trl.trainer import distillation_trainer

    return types.SimpleNamespace(torch=torch, jsd=GKDTrainer.generalized_jsd_loss,
                                 chunked=distillation_trainer._chunked_divergence_loss)


def _logits(seed):
    return np.random.default_rng(seed).normal(scale=2.0, size=(B, T, V))


def _labels(seed=2):
    """Token ids with -100 at about a third of the positions, one row fully masked and one fully kept."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, V, size=(B, T))
    labels[rng.random((B, T)) < 0.35] = -100
    labels[0] = -100
    labels[1] = rng.integers(0, V, size=T)
    return labels


def _t(trl, values):
    return trl.torch.tensor(np.asarray(values))


def _ours64(student_logits, teacher_logits, beta, temperature):
    with jax.enable_x64(True):
        return np.asarray(generalized_jsd(jnp.asarray(student_logits), jnp.asarray(teacher_logits), beta=beta,
                                          temperature=temperature))


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_per_position_values_match_trl(trl, beta, temperature):
    zs, zt = _logits(0), _logits(1)
    elementwise = trl.jsd(_t(trl, zs), _t(trl, zt), labels=None, beta=beta, temperature=temperature,
                          reduction="none")
    assert tuple(elementwise.shape) == (B, T, V) and elementwise.dtype == trl.torch.float64
    expected = elementwise.sum(-1).numpy()
    assert np.all(expected > 1e-3)
    np.testing.assert_allclose(_ours64(zs, zt, beta, temperature), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_masked_batchmean_matches_our_masked_sum_over_count(trl, beta, temperature):
    """TRL's batchmean with labels = Σ over unmasked positions / their number: our (Σ m·JSD, Σ m) divided once. And
    with `num_items_in_batch` (a global token count, here larger than the local one) = Σ m·JSD / that count."""
    zs, zt, labels = _logits(3), _logits(4), _labels()
    mask = labels != -100
    assert 0 < mask.sum() < B * T
    ours = _ours64(zs, zt, beta, temperature)
    loss_sum, count = np.sum(np.where(mask, ours, 0.0)), mask.sum()
    batchmean = trl.jsd(_t(trl, zs), _t(trl, zt), labels=_t(trl, labels), beta=beta, temperature=temperature)
    np.testing.assert_allclose(loss_sum / count, batchmean.item(), rtol=RTOL, atol=ATOL)
    global_count = count + 7
    accumulated = trl.jsd(_t(trl, zs), _t(trl, zt), labels=_t(trl, labels), beta=beta, temperature=temperature,
                          num_items_in_batch=trl.torch.tensor(global_count))
    np.testing.assert_allclose(loss_sum / global_count, accumulated.item(), rtol=RTOL, atol=ATOL)


def test_batchmean_divisors(trl):
    """What TRL's batchmean divides by: B without labels (not B·T); 1 when every position is masked (a 0 loss)."""
    zs, zt = _logits(5), _logits(6)
    ours = _ours64(zs, zt, 0.5, 1.0)
    no_labels = trl.jsd(_t(trl, zs), _t(trl, zt), beta=0.5, temperature=1.0).item()
    np.testing.assert_allclose(no_labels, ours.sum() / B, rtol=RTOL)
    assert abs(no_labels - ours.mean()) > 1e-3
    all_masked = trl.jsd(_t(trl, zs), _t(trl, zt), labels=_t(trl, np.full((B, T), -100)), beta=0.5).item()
    assert all_masked == 0.0


@pytest.mark.parametrize("beta", BETAS)
def test_gradient_wrt_student_logits_matches_trl(trl, beta):
    zs, zt, labels = _logits(7), _logits(8), _labels(seed=9)
    mask = labels != -100
    student = _t(trl, zs).requires_grad_(True)
    trl.jsd(student, _t(trl, zt), labels=_t(trl, labels), beta=beta, temperature=0.9).backward()
    expected = student.grad.numpy()
    with jax.enable_x64(True):
        def loss(s):
            jsd = generalized_jsd(s, jnp.asarray(zt), beta=beta, temperature=0.9)
            return jnp.sum(jnp.where(mask, jsd, 0.0)) / mask.sum()

        got = np.asarray(jax.grad(loss)(jnp.asarray(zs)))
    assert np.max(np.abs(expected)) > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12)


# --- TRL's DistillationTrainer: the chunked form from hidden states (float32) -----------------------------------------

CT, DS, DT, SOFTCAP = 11, 8, 12, 5.0


@pytest.mark.parametrize("beta", BETAS)
def test_chunked_matches_trl_distillation_trainer(trl, beta):
    """Student width 8, teacher width 12 with a soft-capped head, τ = 0.9, a mask, chunk 4 ∤ 11; loss = Σ m·JSD / Σ m
    (TRL's `num_items_in_batch=None` reduction) and its gradient w.r.t. the student's hidden states."""
    rng = np.random.default_rng(10)
    hs = rng.normal(size=(B, CT, DS)).astype(np.float32)
    ht = rng.normal(size=(B, CT, DT)).astype(np.float32)
    ws = (rng.normal(size=(DS, V)) / np.sqrt(DS) * 2).astype(np.float32)
    wt = (rng.normal(size=(DT, V)) / np.sqrt(DT) * 2).astype(np.float32)
    mask = rng.random((B, CT)) < 0.7
    torch = trl.torch
    student = torch.tensor(hs, requires_grad=True)
    loss, _, n_valid = trl.chunked(student, torch.tensor(ht), torch.tensor(ws.T.copy()), torch.tensor(wt.T.copy()),
                                   torch.tensor(mask.astype(np.int64)), beta, temperature=0.9,
                                   teacher_final_logit_softcapping=SOFTCAP)
    loss.backward()
    assert n_valid.item() == mask.sum()

    def ours(h):
        jsd = chunked_generalized_jsd(h, ws, ht, LMHead(jnp.asarray(wt), softcap=SOFTCAP), beta=beta,
                                      temperature=0.9, chunk_size=4)
        return jnp.sum(jnp.where(mask, jsd, 0.0)) / mask.sum()

    value, grad = jax.value_and_grad(ours)(hs)
    np.testing.assert_allclose(float(value), loss.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, student.grad.numpy(), rtol=1e-4, atol=1e-6)
