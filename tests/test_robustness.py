"""Bad input: one clear line, exit 2, no traceback, nothing written (the cases a first run of a new user hits)."""

import pytest
import torch

from hf_blockcbo.commands.cli import main


def _files(folder):
    (folder / "binary.bin").write_bytes(bytes(range(256)) * 16)
    (folder / "junk.gguf").write_bytes(b"NOTGGUF" + bytes(range(200)))
    (folder / "bad.yaml").write_text("num_remove: [1, 2\n  bad: : :\n")
    (folder / "bad.json").write_text('{"num_remove": 2,')
    (folder / "list.yaml").write_text("- 1\n- 2\n")
    (folder / "typed.json").write_text('{"num_remove": "two"}')
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(folder / "other.safetensors"))
    (folder / "trunc.safetensors").write_bytes(b"\x00" * 100)


CASES = [
    ("binary data", ["prune", "--model", "{model}", "--remove", "2", "--data", "{dir}/binary.bin"], "not UTF-8 text"),
    ("junk gguf", ["prune", "--model", "{dir}/junk.gguf", "--remove", "2"], "cannot read the GGUF file"),
    ("bad yaml", ["prune", "--model", "{model}", "--config", "{dir}/bad.yaml"], "not valid YAML"),
    ("bad json", ["prune", "--model", "{model}", "--config", "{dir}/bad.json"], "not valid JSON"),
    ("yaml list", ["prune", "--model", "{model}", "--config", "{dir}/list.yaml"], "must hold a mapping"),
    ("wrong type", ["prune", "--model", "{model}", "--config", "{dir}/typed.json"], "--remove must be int"),
    ("blocks and remove", ["prune", "--model", "{model}", "--blocks", "1,2", "--remove", "3"], "give one of them"),
    ("rank and blocks", ["prune", "--model", "{model}", "--blocks", "1,2", "--rank", "1"], "give one of them"),
    ("foreign safetensors", ["solve", "--hessian", "{dir}/other.safetensors", "--remove", "1"], "not an hf_blockcbo"),
    ("truncated hessian", ["solve", "--hessian", "{dir}/trunc.safetensors", "--remove", "1"], "not a readable"),
    ("missing model", ["prune", "--model", "{dir}/no-such-model", "--remove", "2"], "cannot load the model"),
    ("zero blocks", ["prune", "--model", "{model}", "--remove", "0"], "--remove must be a positive integer"),
    (
        "repair knob, repair off",
        ["prune", "--model", "{model}", "--remove", "2", "--repair-depth", "1"],
        "--repair-depth has no effect without --repair",
    ),
    (
        "repair knob, --no-repair",
        ["prune", "--model", "{model}", "--remove", "2", "--no-repair", "--repair-ridge", "1"],
        "--repair-ridge has no effect without --repair",
    ),
    ("missing student", ["heal", "--student", "{dir}/no-such-student", "--output", "{dir}/out"], "not a folder here"),
    ("student not a model", ["heal", "--student", "{dir}", "--output", "{dir}/out"], "not a model folder"),
]


@pytest.mark.parametrize("name, argv, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(name, argv, fragment, tiny_model_dir, tmp_path, capsys):
    _files(tmp_path)
    out = tmp_path / "out"
    argv = [a.format(model=tiny_model_dir, dir=tmp_path) for a in argv]
    if argv[0] == "prune":
        argv += ["--output", str(out)]
    capsys.readouterr()
    assert main(argv) == 2, name
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], (name, err[-2000:])
    assert "Traceback" not in err
    assert not out.exists()


def test_a_config_file_may_keep_repair_settings_with_the_repair_off(tmp_path):
    """Only a flag given on the command line is refused: a config file may hold repair settings for later."""
    from argparse import Namespace

    from hf_blockcbo.commands.base import config_from_args

    path = tmp_path / "c.json"
    path.write_text('{"num_remove": 2, "repair_depth": 1, "repair_ridge": 1.0}')
    config = config_from_args(Namespace(config=str(path)))
    assert (config.repair, config.repair_depth, config.repair_ridge) == (False, 1, 1.0)
    assert config_from_args(Namespace(config=str(path), repair=True, repair_depth=0)).repair_depth == 0


def test_a_malformed_repo_id_is_refused_before_anything_is_read(tiny_model_dir, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_model_dir), "--blocks", "1", "--output", str(pruned)]) == 0
    capsys.readouterr()
    assert main(["push", "--model", str(pruned), "--repo", "not a repo id!!"]) == 2
    err = capsys.readouterr().err
    assert "is not a Hub repository id" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"per_kind": {"moe": 1}}, "no blocks of kind"),
        ({"protected": [0, 1, 2, 3, 4]}, "only 1 of 6 are not protected"),
        ({"per_kind": {"attention": 2}, "solver": "bnb"}, "takes no per-kind counts"),
    ],
)
def test_infeasible_constraints_are_refused_before_the_hessian_pass(settings, fragment, tiny_model_dir, monkeypatch):
    import hf_blockcbo.pipeline as pipeline
    from hf_blockcbo.config import BlockRemovalConfig
    from hf_blockcbo.errors import BlockCBOError
    from hf_blockcbo.models import load_model, resolve_model

    def no_pass(*args, **kwargs):
        raise AssertionError("the Hessian pass ran before the refusal")

    monkeypatch.setattr(pipeline, "calibrate", no_pass)
    source = resolve_model(str(tiny_model_dir))
    model, tokenizer = load_model(source)
    with pytest.raises(BlockCBOError, match=fragment):
        pipeline.choose_blocks(model, tokenizer, BlockRemovalConfig(num_remove=2, **settings), source, progress=False)


@pytest.mark.parametrize("keep", [False, True])
def test_an_interrupted_calibration_names_the_resume_file_it_keeps(tmp_path, monkeypatch, capsys, keep):
    from hf_blockcbo.commands.calibrate import CalibrateCommand

    output = tmp_path / "h.safetensors"

    def interrupted(self):
        if keep:
            (tmp_path / "h.safetensors.partial").write_bytes(b"rows")
        raise KeyboardInterrupt

    monkeypatch.setattr(CalibrateCommand, "run", interrupted)
    assert main(["calibrate", "--output", str(output)]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    if keep:
        assert f"kept in {output}.partial" in err and "rerun the same command to resume" in err
    else:
        assert err.endswith("interrupted; nothing was written")
    assert not output.exists()


def test_a_model_without_a_tokenizer_is_pruned_by_explicit_choice(tmp_path, capsys):
    from .conftest import make_model, tiny_llama_config

    bare = tmp_path / "bare"
    make_model(tiny_llama_config()).save_pretrained(bare)  # weights and config, no tokenizer files
    out = tmp_path / "out"
    assert main(["prune", "--model", str(bare), "--blocks", "1,3", "--output", str(out), "--no-progress"]) == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    capsys.readouterr()
    # choosing the blocks needs text, so a tokenizer: one line that says what to do, nothing written
    assert main(["prune", "--model", str(bare), "--remove", "2", "--output", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "cannot load the tokenizer" in errors[0] and "--blocks" in errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o2").exists()


def test_a_damaged_resume_file_is_one_line_and_kept(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "h.safetensors"
    partial = tmp_path / "h.safetensors.partial"
    partial.write_bytes(b"\x00" * 50)
    argv = ["calibrate", "--model", str(tiny_model_dir), "--curvature", "empirical", "--num-samples", "4"]
    argv += ["--seq-len", "16", "--no-progress", "--checkpoint-every", "1", "--output", str(output)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "is damaged" in errors[0] and "delete it" in errors[0]
    assert "Traceback" not in err
    assert partial.read_bytes() == b"\x00" * 50 and not output.exists()
