"""lm-evaluation-harness: local task files offline, gated model == pruned folder, our scorer == the harness."""

import json
import sys

import pytest
import torch

from hf_blockcbo.commands.cli import main
from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.evaluation.harness import evaluate_tasks, local_task_yaml, require_lm_eval, task_name
from hf_blockcbo.evaluation.likelihood import multiple_choice_accuracy, read_multiple_choice

from .conftest import make_model, make_tokenizer, tiny_llama_config


pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is part of the test install")

WORDS = "the cat sat on a mat while rain fell over old stone roofs and quiet streets".split()


def _task_files(folder):
    """Three small local tasks: benchkit-style (plain and ARC prompt) and BoolQ."""
    rng = torch.Generator().manual_seed(0)

    def phrase(n):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=rng))

    plain, arc, boolq = [], [], []
    for i in range(12):
        choices = [phrase(3) for _ in range(4)]
        plain.append({"question": phrase(6), "choices": choices, "labels": list("ABCD"), "answer": "ABCD"[i % 4]})
        arc.append(
            {"question": phrase(5) + "?", "choices": choices[:3], "labels": list("ABC"), "answer": "ABC"[i % 3]}
        )
        boolq.append({"question": phrase(4), "passage": phrase(12), "answer": "yes" if i % 2 else "no"})
    paths = {}
    for name, rows in (("hellaswag", plain), ("arc_easy", arc), ("boolq", boolq)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return _task_files(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = make_tokenizer()
    return make_model(tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=256)), tokenizer


def test_local_task_files_become_offline_harness_tasks(tasks):
    yaml = local_task_yaml(tasks["arc_easy"])
    assert "dataset_path: json" in yaml and "Question: {{question}}\\nAnswer:" in yaml
    assert task_name(tasks["boolq"]) == "boolq_local"
    assert '["no", "yes"]' in local_task_yaml(tasks["boolq"])


def test_our_scorer_gives_the_harness_accuracy_on_the_same_items(tasks, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    scores = evaluate_tasks(model, tokenizer, [str(p) for p in tasks.values()], batch_size=4)
    for name, path in tasks.items():
        ours = multiple_choice_accuracy(model, tokenizer, read_multiple_choice(path))
        assert scores[f"{name}_local"]["acc"] == pytest.approx(ours), name
        assert "acc_stderr" in scores[f"{name}_local"]


def test_gated_model_scores_like_the_pruned_folder(tasks, model_and_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_blockcbo.surgery.removal import remove_blocks, save_pruned

    model, tokenizer = model_and_tokenizer
    files = [str(tasks["hellaswag"]), str(tasks["boolq"])]
    removed = [1, 3]
    gated = evaluate_tasks(model, tokenizer, files, removed=removed, batch_size=4)
    unpruned = evaluate_tasks(model, tokenizer, files, batch_size=4)
    pruned = remove_blocks(
        make_model(tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=256)), removed
    )
    folder = save_pruned(pruned, tokenizer, tmp_path / "pruned", {"removed_blocks": removed})
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    saved = evaluate_tasks(reloaded, tokenizer, files, batch_size=4)
    for task in gated:
        for metric in ("acc", "acc_norm"):
            assert gated[task][metric] == pytest.approx(saved[task][metric]), (task, metric)
    assert any(gated[t]["acc_norm"] != unpruned[t]["acc_norm"] for t in gated), "gates must change the scores"


def test_eval_command_records_scores_in_the_pruned_folder(tasks, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_model_dir), "--blocks", "2", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--tasks", str(tasks["boolq"]), "--limit", "6", "--record"]) == 0
    assert "boolq_local" in capsys.readouterr().out
    record = json.loads((out / "block_removal.json").read_text())
    assert record["evaluation"]["limit"] == 6 and "acc" in record["evaluation"]["tasks"]["boolq_local"]

    from hf_blockcbo.hub.publish import model_card

    card = str(model_card(out, "user/pruned"))
    assert "boolq_local" in card and "acc (lm-eval)" in card


def test_a_machine_without_lm_eval_gets_one_line(monkeypatch, tasks, tiny_model_dir, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(BlockCBOError, match=r"pip install 'hf_blockcbo\[eval\]'"):
        require_lm_eval()
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", str(tasks["boolq"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf_blockcbo[eval]" in err


def test_bad_task_input_is_one_clear_error(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"\xff\xfe not json")
    with pytest.raises(BlockCBOError, match="not a JSONL file"):
        evaluate_tasks(model, tokenizer, [str(junk)])
    with pytest.raises(BlockCBOError, match="no task file"):
        evaluate_tasks(model, tokenizer, [str(tmp_path / "missing.jsonl")])
    with pytest.raises(BlockCBOError, match="no task given"):
        evaluate_tasks(model, tokenizer, [" "])
