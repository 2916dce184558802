"""Many removal states evaluated through one trie of shared blocks: equal to one gated forward per state, on every
family; fewer blocks run; the fallback where the replay is not exact."""

import pytest
import torch

from hf_blockcbo.data import CalibrationSet
from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.evaluation import many_states
from hf_blockcbo.evaluation.likelihood import perplexity
from hf_blockcbo.evaluation.many_states import perplexities
from hf_blockcbo.hessian.measured import FastPaths
from hf_blockcbo.hessian.replay import skipped_blocks, stream_until
from hf_blockcbo.surgery.architectures import get_layers
from hf_blockcbo.surgery.gates import BlockGates

from .conftest import make_model
from .test_architectures import FAMILIES, _config
from .test_curvature import _samples


STATES = [(), (1,), (1, 3), (1, 3, 4), (0, 1), (2, 5), (1, 3), (5,), (0, 1, 2, 3, 4, 5)]


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexities_equal_one_gated_forward_per_state(family):
    model = make_model(_config(family))
    # tiny DeepSeek-V3 (MLA, sdpa) fails on any padded batch in transformers itself, gated or not
    data = _samples(pad=family != "deepseek_v3")
    together = perplexities(model, data, STATES, batch_size=2)
    alone = [perplexity(model, data, list(s), batch_size=2) for s in STATES]
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), rtol=1e-5, atol=0)
    assert together[2] == together[6]  # a duplicate state scores the same


def test_the_trie_runs_each_shared_stretch_once(tiny_llama, monkeypatch):
    monkeypatch.setattr(many_states, "perplexity", lambda *a, **k: pytest.fail("fell back to one state at a time"))
    runs = []
    layers = get_layers(tiny_llama)
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: runs.append(i)) for i, layer in enumerate(layers)]
    data = _samples(m=2)
    try:
        perplexities(tiny_llama, data, [(1, 3), (1, 3, 4), (1, 4)], batch_size=2)
    finally:
        for handle in handles:
            handle.remove()
    # after the one-sample checks of fast_paths: blocks 0, 2 once for all three; 4, 5 for (1, 3); 5 for (1, 3, 4);
    # 3, 5 for (1, 4). Three gated forwards would run 18 blocks, three pruned ones 11.
    assert sorted(runs[-7:]) == [0, 2, 3, 4, 5, 5, 5]
    assert runs[-7:-5] == [0, 2]


def test_without_an_exact_replay_each_state_is_run_alone(tiny_llama, monkeypatch):
    monkeypatch.setattr(many_states, "fast_paths", lambda *a, **k: FastPaths(share_prefix=False))
    calls = []
    real = many_states.perplexity
    monkeypatch.setattr(many_states, "perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = _samples()
    got = perplexities(tiny_llama, data, [(1,), (2, 3)], batch_size=2)
    assert len(calls) == 2
    assert got == [real(tiny_llama, data, [1], batch_size=2), real(tiny_llama, data, [2, 3], batch_size=2)]


def test_bad_states_and_empty_data_are_refused(tiny_llama):
    with pytest.raises(BlockCBOError, match=r"blocks \[6\] do not exist"):
        perplexities(tiny_llama, _samples(), [(1,), (2, 6)])
    empty = CalibrationSet(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long), source="e")
    with pytest.raises(BlockCBOError, match="empty"):
        perplexities(tiny_llama, empty, [(1,), (2,)])


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_stream_until_and_skipped_blocks_equal_the_gated_model(fixture, request):
    model = request.getfixturevalue(fixture)
    data = _samples(m=3)
    ids, mask = data.input_ids, data.attention_mask
    layers = get_layers(model)
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handle = layers[4].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad(), BlockGates(model) as gates:
        gates.set_removed([1, 2])
        logits = model(input_ids=ids, attention_mask=mask).logits
    handle.remove()
    as_tuple = many_states.output_is_tuple(layers, model, ids, mask)
    h2 = stream_until(model, layers, ids, mask, 2, skip=[1], as_tuple=as_tuple)
    h4 = stream_until(model, layers, ids, mask, 4, start=(2, h2), skip=[1, 2], as_tuple=as_tuple)
    torch.testing.assert_close(h4, seen["h"], rtol=1e-5, atol=1e-6)
    with torch.no_grad(), skipped_blocks(layers, [1, 2], as_tuple):
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, logits, rtol=1e-5, atol=1e-5)
    assert all(type(layer).__name__ != "_Skip" for layer in layers)  # restored


def test_forward_until_stopped_leaves_no_hook_or_stand_in_whether_it_stops_finishes_or_fails(tiny_llama):
    from hf_blockcbo.hessian.replay import StopForward, forward_until_stopped, shared_prefix

    data = _samples(m=2)
    ids, mask = data.input_ids, data.attention_mask
    layers = get_layers(tiny_llama)
    originals = list(layers)
    ran = []

    def stop_at_2(module, args, output):
        ran.append(2)
        raise StopForward

    def fail(module, args, output):
        raise RuntimeError("boom")

    def count(module, args, output):
        ran.append(len(ran))

    hidden = torch.zeros(ids.shape[0], ids.shape[1], tiny_llama.config.hidden_size)
    with torch.no_grad():
        handles = [layers[2].register_forward_hook(stop_at_2), layers[3].register_forward_hook(count)]
        forward_until_stopped(tiny_llama, ids, mask, handles, [shared_prefix(layers, 1, hidden, False)])
        assert ran == [2]  # stopped at block 2: block 3 never ran
        forward_until_stopped(tiny_llama, ids, mask, [layers[5].register_forward_hook(count)])
        assert ran == [2, 1]  # no stop: the whole forward ran once
        with pytest.raises(RuntimeError, match="boom"):
            forward_until_stopped(tiny_llama, ids, mask, [layers[1].register_forward_hook(fail)])
    assert list(layers) == originals
    assert all(not layer._forward_hooks for layer in layers)
