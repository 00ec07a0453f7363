"""The interactive path with a decoder trained in the test: NoC of the deployed policy.

The decoder (``micro`` variant: random-init frozen encoder, a width-64 prompt encoder and mask
decoder) is trained by RootSAM's own training step (``interactive_rounds`` + ``episode_loss``,
prompts from the one ``PromptPolicy``) on toy views, then used through the deployed
``RootSAMPredictor.predict`` / ``refine`` and the simulated clicker of ``rootflow evaluate
rootsam``. No stub stands in for any of it.

Not here (see docs/rootsam.md, "Honest limits"): tests that a single positive/negative click
adds/removes the root it lands on. With this small trained decoder clicks barely move the
mask (measured, 150-300 training steps), so such tests would fail; they wait for a decoder
that is really click-trained.
"""

from __future__ import annotations

import numpy as np
import pytest

from rootflow.evaluation.rootsam import MAX_CLICKS, click_trace
from rootflow.inference.prompts import PromptPolicy
from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor
from tests.training._rootsam_helpers import thick_pair, train_small_decoder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]

POLICY = PromptPolicy(lattice_per_side=2, n_pos=2, n_neg=2)
CFG = RootSAMInferenceConfig(variant="micro", device="cpu", lattice_points_per_side=2,
                             auto_n_pos=2, auto_n_neg=2, tile_batch_size=2)
HELD_OUT = [thick_pair(50 + s) for s in range(3)]  # seeds training never used




@pytest.fixture(scope="module")
def trained() -> RootSAMPredictor:
    return RootSAMPredictor(CFG, model=train_small_decoder(POLICY, steps=150))


@pytest.fixture(scope="module")
def untrained() -> RootSAMPredictor:
    from rootflow.models.rootsam import build_rootsam

    return RootSAMPredictor(CFG, model=build_rootsam("micro").eval())


def test_trained_decoder_reaches_noc85_where_untrained_does_not(trained, untrained):
    """Guards against a training step that does not teach the deployed path (policy prompts
    labelled by the model's own first pass, then clicks through ``refine``): the trained
    decoder reaches 85 % IoU within 20 clicks on held-out views; the untrained one never does."""
    noc_t = [click_trace(trained, img, gt, stop_at=0.85).noc(0.85) for img, gt in HELD_OUT]
    noc_u = [click_trace(untrained, img, gt, stop_at=0.85).noc(0.85) for img, gt in HELD_OUT]
    assert np.mean(noc_t) < MAX_CLICKS, noc_t
    assert noc_u == [MAX_CLICKS] * len(HELD_OUT), noc_u
