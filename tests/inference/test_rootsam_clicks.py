"""Corrective clicks and NoC with a decoder trained in the test (no stubs, no mocks).

The decoder (``micro`` variant: random-init frozen encoder, a width-64 prompt encoder and mask
decoder) is trained once per module by RootSAM's own training step (``interactive_rounds`` +
``episode_loss``: prompts from the one ``PromptPolicy``, SAM2's simulated clicker
``next_click``, each click written into the round's mask prompt by ``paint_clicks``) on toy
views (``stub_pair``) whose short root pieces the image cannot classify: each is annotated as
root or not at random, so only a click can settle it. It is then used through the deployed
``RootSAMPredictor.predict`` / ``refine`` and the clicker of ``rootflow evaluate rootsam``.

Scenario of the click tests, on held-out views: the previous mask is the truth with one error
made on purpose, a true root piece left out (missed root) or a false piece added (false root);
the simulated clicker then clicks in that piece. The click's effect is the piece's predicted
root fraction after ``refine`` with that click *minus* the same after a control click (a
correct negative click on soil far from everything), so what the decoder does anyway with the
previous mask and the policy prompts is subtracted out.
"""

from __future__ import annotations

import numpy as np
import pytest

from rootflow.evaluation.rootsam import MAX_CLICKS, click_trace
from rootflow.inference.prompts import PromptPolicy, edt, next_click
from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor
from tests.training._rootsam_helpers import stub_pair, train_small_decoder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]

POLICY = PromptPolicy(lattice_per_side=2, n_pos=2, n_neg=2)
CFG = RootSAMInferenceConfig(variant="micro", device="cpu", lattice_points_per_side=2,
                             auto_n_pos=2, auto_n_neg=2, tile_batch_size=2)
STEPS, LR = 250, 3e-3
N_CASES = 8
HELD_OUT_SEED = 500  # training views use seeds 1000+


@pytest.fixture(scope="module")
def trained() -> RootSAMPredictor:
    return RootSAMPredictor(CFG, model=train_small_decoder(POLICY, steps=STEPS, lr=LR, stubs=2))


@pytest.fixture(scope="module")
def untrained() -> RootSAMPredictor:
    from rootflow.models.rootsam import build_rootsam

    return RootSAMPredictor(CFG, model=build_rootsam("micro").eval())


def _cases(is_root: bool) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``N_CASES`` held-out (image, truth, piece) with a piece annotated ``is_root``."""
    out = []
    seed = HELD_OUT_SEED
    while len(out) < N_CASES:
        img, gt, stubs = stub_pair(seed)
        out += [(img, gt, s) for s, r in stubs if r == is_root]
        seed += 1
    return out[:N_CASES]


def _click_effect(predictor: RootSAMPredictor, is_root: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per case: the piece's root fraction after the clicker's click, and after a control."""
    after, control = [], []
    for img, gt, piece in _cases(is_root):
        prev = (gt & ~piece) if is_root else (gt | piece)
        x, y, lab = next_click(prev, gt)
        assert lab == int(is_root) and piece[int(y), int(x)]  # the clicker clicks the piece
        d = edt(~(gt | piece))
        cy, cx = np.unravel_index(int(np.argmax(d)), d.shape)  # soil farthest from all
        for (px, py, pl), sink in (((x, y, lab), after), ((cx + 0.5, cy + 0.5, 0), control)):
            res, _ = predictor.refine(img, points=np.array([[px, py]], np.float32),
                                      labels=np.array([pl]), previous=prev)
            sink.append(float(res.mask[piece].mean()))
    return np.array(after), np.array(control)


def test_positive_click_on_missed_root_adds_root_there(trained, untrained):
    """Guards against corrective clicks that training does not teach (the state before the
    clicker, loss and mask-prompt fixes: the mask moved by < 1 % of the clicked region). On
    held-out views with a true root piece left out of the previous mask, a positive click in
    it must raise the piece's predicted root fraction by >= 0.25 over a control click on
    average and leave >= 0.3 of it root (measured: +0.41, 0.42 after vs 0.01 after the
    control; a piece is 14-21 px long and one click reaches about one 16 px embedding cell,
    so 1.0 is not expected); the untrained decoder's clicks do nothing (measured -0.00,
    bound 0.1)."""
    after, control = _click_effect(trained, True)
    assert (after - control).mean() >= 0.25 and after.mean() >= 0.3, (after.round(2),
                                                                        control.round(2))
    u_after, u_control = _click_effect(untrained, True)
    assert (u_after - u_control).mean() < 0.1, (u_after.round(2), u_control.round(2))


def test_negative_click_on_false_root_removes_root_there(trained, untrained):
    """Guards against negative clicks that training does not teach. On held-out views with a
    false root piece added to the previous mask, a negative click in it must lower the piece's
    predicted root fraction by >= 0.12 below a control click on average (measured 0.19: 0.56
    after the click vs 0.75; one click removes part of a piece, not all of it, see
    docs/rootsam.md); the untrained decoder's fall stays under 0.08 (measured 0.03)."""
    after, control = _click_effect(trained, False)
    assert (control - after).mean() >= 0.12, (after.round(2), control.round(2))
    u_after, u_control = _click_effect(untrained, False)
    assert (u_control - u_after).mean() < 0.08, (u_after.round(2), u_control.round(2))


def test_trained_decoder_reaches_noc85_where_untrained_does_not(trained, untrained):
    """Guards against a training step that does not teach the deployed path (policy prompts
    labelled by the model's own first pass, then clicks through ``refine``): the trained
    decoder reaches 85 % IoU within 20 clicks on held-out views, on at least one of them
    *because of* clicks (not already at 0 clicks); the untrained one never does (measured:
    trained [1, 20, 20], untrained [20, 20, 20])."""
    views = [stub_pair(HELD_OUT_SEED + 100 + s)[:2] for s in range(3)]
    noc_t = [click_trace(trained, img, gt, stop_at=0.85).noc(0.85) for img, gt in views]
    noc_u = [click_trace(untrained, img, gt, stop_at=0.85).noc(0.85) for img, gt in views]
    assert np.mean(noc_t) < MAX_CLICKS, noc_t
    assert any(0 < n < MAX_CLICKS for n in noc_t), noc_t
    assert noc_u == [MAX_CLICKS] * len(views), noc_u
