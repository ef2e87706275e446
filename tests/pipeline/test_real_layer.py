"""CALDERA on real weights: a projection of the default model (SmolLM2-135M) with H from real activations.

The errors are measured on held-out evaluation text (a Hessian from other articles than calibration),
so the ordering shows generalisation, not only a better fit to the calibration set.
"""

import pytest

from caldera.config import DecomposeConfig
from caldera.core.decompose import decompose
from caldera.core.metrics import act_err
from caldera.io.calibration import calibration_windows
from caldera.io.corpus import default_split
from caldera.io.default_model import default_model_dir
from caldera.io.model_folder import load_model, load_tokenizer
from caldera.pipeline.hessians import PROJ_PATH, decoder_layers
from caldera.testing.model_hessians import collect_hessians

LAYER = 3
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_layer():
    """(model, calibration Hessians from 64 × 128 tokens, evaluation Hessians from 16 × 128) for layer LAYER.

    Far fewer calibration tokens than ~5 × the input width overfit LDLQ: with 16 × 128 tokens GPTQ's
    held-out error on down_proj (n = 1536) is 0.43 against 0.22 on the calibration set.
    """
    folder = default_model_dir()
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    split = default_split()
    calib = calibration_windows(tokenizer, [a.text for a in split.calibration], samples=64, seq_len=128)
    held_out = calibration_windows(tokenizer, [a.text for a in split.evaluation], samples=16, seq_len=128)
    return model, collect_hessians(model, calib, [LAYER]), collect_hessians(model, held_out, [LAYER])


@pytest.mark.parametrize("proj", ["q_proj", "down_proj"])
def test_caldera_beats_ldlq_on_a_real_matrix(real_layer, proj):
    model, h_cal, h_eval = real_layer
    w = decoder_layers(model)[LAYER].get_submodule(PROJ_PATH[proj]).weight.detach().float()  # (m, n)
    errs = {}
    for method, kw in (
        ("gptq", {}),
        ("ldlq-had", {}),
        ("caldera", {"rank": 64, "bl": 4, "br": 4, "iters": 3}),
    ):
        dec = decompose(w, h_cal.of(LAYER, proj), DecomposeConfig.for_method(method, bq=2, **kw))
        errs[method] = act_err(w, dec.dense(), h_eval.of(LAYER, proj))
    # held-out output error: CALDERA (Q + 4-bit rank-64 L·R) < QuIP-style LDLQ < GPTQ, all at BQ=2
    # (seen: down_proj 0.26 < 0.33 < 0.35; RTN with clip search is 0.34 there, so it is not ordered)
    assert errs["caldera"] < errs["ldlq-had"] < errs["gptq"], errs
    assert errs["caldera"] < 0.9 * errs["ldlq-had"], errs
