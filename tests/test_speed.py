"""Measured speed and memory of physically pruned models (ratios measured side by side, never absolute times)."""

import json

import pytest
import torch

from hf_blockcbo.commands.cli import main
from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.evaluation.speed import benchmark, cache_bytes, measure_once
from hf_blockcbo.surgery.removal import remove_blocks

from .conftest import make_model, tiny_llama_config


def _pair():
    original = make_model(tiny_llama_config(num_hidden_layers=12))  # own configs: removal rewrites the config
    pruned = remove_blocks(make_model(tiny_llama_config(num_hidden_layers=12)), list(range(3, 12)))
    return original, pruned


def test_a_pruned_model_decodes_faster_and_keeps_a_smaller_cache():
    original, pruned = _pair()
    report = benchmark({"original": original, "pruned": pruned}, prompt_len=8, new_tokens=24, repeats=3)
    assert report.models["pruned"].layers == 3 and report.models["original"].layers == 12
    # decode-bound and tiny: time is per-layer overhead, so 3 of 12 layers must be clearly faster
    assert report.ratio("decode_tokens_per_s", "pruned", "original") > 1.5
    assert report.kv_cache_bytes("original") == 4 * report.kv_cache_bytes("pruned")
    assert report.models["pruned"].weights_bytes < report.models["original"].weights_bytes
    data = report.to_dict()
    assert data["models"]["original"]["decode_tokens_per_s_ratio"] == 1.0
    low, high = report.spread("pruned", "decode_tokens_per_s")
    assert low <= report.median("pruned", "decode_tokens_per_s") <= high
    assert "ideal N/(N−M)" in report.markdown() and "4.000×" in report.markdown()


def test_cache_size_is_the_kv_tensors():
    model = make_model(tiny_llama_config())
    prompt = torch.randint(3, 256, (2, 10))
    result = measure_once(model, prompt, new_tokens=5)
    # 6 layers × (K + V) × batch 2 × 2 KV heads × 15 positions × head_dim 8 × 4 bytes (the last step is not cached)
    assert result.kv_cache_bytes == 6 * 2 * 2 * 2 * 15 * 8 * 4
    out = model(input_ids=prompt, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    assert cache_bytes(cache) == 6 * 2 * 2 * 2 * 10 * 8 * 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_len=0), "prompt_len must be a positive integer"),
        (dict(repeats=0), "repeats must be >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(BlockCBOError, match=message):
        benchmark({"m": make_model(tiny_llama_config())}, **kwargs)


def test_bench_command_compares_with_the_original_named_in_the_provenance(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_model_dir), "--blocks", "1,2,3", "--output", str(out)]) == 0
    capsys.readouterr()
    args = ["bench", "--model", str(out), "--prompt-len", "8", "--new-tokens", "8", "--repeats", "2", "--record"]
    assert main([*args, "--no-progress", "--output", str(tmp_path / "speed.json")]) == 0
    text = capsys.readouterr().out
    assert "| original | 6 |" in text and "| pruned | 3 |" in text
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["models"]["pruned"]["layers"] == 3
    record = json.loads((out / "block_removal.json").read_text())
    assert record["speed"]["models"]["original"]["layers"] == 6

    from hf_blockcbo.hub.publish import model_card

    assert "Measured speed" in str(model_card(out, "user/pruned"))


def test_bench_refuses_a_folder_without_provenance_and_no_baseline(tiny_model_dir, capsys):
    assert main(["bench", "--model", str(tiny_model_dir)]) == 2
    assert "block_removal.json" in capsys.readouterr().err


def test_prefill_computes_the_head_for_the_last_position_only_as_generate_does():
    model = make_model(tiny_llama_config())
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    try:
        measure_once(model, torch.randint(3, 256, (2, 10)), new_tokens=3)
    finally:
        handle.remove()
    assert shapes[0][:2] == (2, 1), "the prompt's logits are computed for its last position only"
    assert len(shapes) == 4 and all(s[:2] == (2, 1) for s in shapes)


def test_a_speed_up_is_the_median_of_back_to_back_ratios():
    from hf_blockcbo.evaluation.speed import ModelSpeed, RunResult, SpeedReport

    def runs(decode_seconds):
        return [RunResult(1.0, d, 0, None) for d in decode_seconds]

    # the machine slows down 2× halfway: each back-to-back pair still says "twice as fast"
    original = ModelSpeed(4, 0, runs([1.0, 1.0, 2.0, 2.0, 2.0]))
    pruned = ModelSpeed(2, 0, runs([0.5, 0.5, 1.0, 1.0, 1.0]))
    report = SpeedReport("cpu", 8, 10, 1, 5, {"original": original, "pruned": pruned})
    assert report.ratio("decode_tokens_per_s", "pruned", "original") == pytest.approx(2.0)
    assert report.paired_ratios("decode_tokens_per_s", "pruned", "original") == pytest.approx([2.0] * 5)
    # a drift that hits the pruned model in more repetitions: the ratio of the medians would say 0.67× (slower)
    drifting = ModelSpeed(4, 0, runs([1.0, 1.0, 1.0, 3.0, 3.0]))
    faster = ModelSpeed(2, 0, runs([0.5, 0.5, 1.5, 1.5, 1.5]))
    skewed = SpeedReport("cpu", 8, 10, 1, 5, {"original": drifting, "pruned": faster})
    assert skewed.ratio("decode_tokens_per_s", "pruned", "original") == pytest.approx(2.0)
    medians = skewed.median("pruned", "decode_tokens_per_s") / skewed.median("original", "decode_tokens_per_s")
    assert medians == pytest.approx(2 / 3)
    assert skewed.to_dict()["models"]["pruned"]["decode_tokens_per_s_ratio_spread"] == pytest.approx([2 / 3, 2.0])
    assert "2.000× (0.667–2.000)" in skewed.markdown()
