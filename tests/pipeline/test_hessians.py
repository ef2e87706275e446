"""Layer-input Hessians from forward pre-hooks, against X^T X / N of the captured inputs."""

import pytest
import torch

from caldera.io.model_folder import load_model
from caldera.pipeline.hessians import PROJ_GROUP, PROJ_PATH, InputStats, decoder_layers
from caldera.testing.model_hessians import collect_hessians

SAMPLES, SEQ_LEN = 4, 24


@pytest.fixture(scope="module")
def model(llama_dir):
    return load_model(llama_dir)


@pytest.fixture(scope="module")
def input_ids(model):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (SAMPLES, SEQ_LEN), generator=g)


def _captured_inputs(model, input_ids) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, projection) -> the inputs X (N, n) it saw in one forward, float64, by independent hooks."""
    seen, handles = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        for proj, path in PROJ_PATH.items():

            def hook(_m, args, key=(i, proj)):
                seen[key] = args[0].detach().reshape(-1, args[0].shape[-1]).double()

            handles.append(layer.get_submodule(path).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids)
    for h in handles:
        h.remove()
    return seen


def _assert_tight(actual, expected):
    # float64 sums of the same float32 inputs: only the summation order differs
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14 * float(expected.abs().max()))


def test_hessians_equal_xtx_over_n_of_the_captured_inputs(model, input_ids):
    hessians = collect_hessians(model, input_ids, batch_size=SAMPLES)  # one batch: the very same activations
    captured = _captured_inputs(model, input_ids)
    assert set(hessians.stats) == {(i, g) for i in range(2) for g in ("attn", "o", "mlp", "down")}
    for (layer, proj), x in captured.items():
        h = hessians.of(layer, proj)
        assert h.dtype == torch.float64 and h.shape == (x.shape[1], x.shape[1])
        assert hessians.stats[layer, PROJ_GROUP[proj]].tokens == SAMPLES * SEQ_LEN == x.shape[0]
        _assert_tight(h, x.T @ x / x.shape[0])  # also checks the grouping: q/k/v and gate/up share inputs


def test_incremental_accumulation_equals_one_batch():
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(1))  # (N, n) float32, as activations are
    whole, parts = InputStats.zeros(40), InputStats.zeros(40)
    whole.add(x)
    for chunk in x.split(37):  # ragged chunks, one row shorter at the end
        parts.add(chunk.reshape(1, -1, 40))  # leading dims are tokens
    assert parts.tokens == whole.tokens == 300
    _assert_tight(parts.hessian(), whole.hessian())
    _assert_tight(whole.hessian(), x.double().T @ x.double() / 300)


def test_batch_size_does_not_change_the_hessians(model, input_ids):
    one = collect_hessians(model, input_ids, batch_size=SAMPLES)
    many = collect_hessians(model, input_ids, batch_size=3)  # batches of 3 and 1
    for key in one.stats:
        assert many.stats[key].tokens == one.stats[key].tokens
        # the float32 forward may round differently per batch shape: close, not bit-equal
        torch.testing.assert_close(many[key], one[key], rtol=1e-5, atol=1e-7)


def test_forward_stops_after_the_last_requested_layer(model, input_ids):
    calls = []
    handle = decoder_layers(model)[1].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        hessians = collect_hessians(model, input_ids, [0], batch_size=2)
    finally:
        handle.remove()
    assert calls == [] and hessians.layers == [0]
    for layer in decoder_layers(model):
        assert not layer._forward_hooks, "collect_hessians left its stop hook behind"
        for path in PROJ_PATH.values():
            assert not layer.get_submodule(path)._forward_pre_hooks, "collect_hessians left a hook behind"


def test_hessians_are_symmetric_positive_semidefinite(model, input_ids):
    hessians = collect_hessians(model, input_ids)
    for key in hessians.stats:
        h = hessians[key]
        _assert_tight(h, h.T)
        assert torch.linalg.eigvalsh(h).min() > -1e-10 * float(h.diagonal().max())


def test_empty_inputs_are_an_error():
    with pytest.raises(ValueError, match="no inputs"):
        InputStats.zeros(4).hessian()
