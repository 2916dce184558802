import json
import subprocess
import sys
import time

import pytest

from hf_blockcbo.commands.cli import main
from hf_blockcbo.hessian.artifact import HessianArtifact

from .conftest import run_plain_transformers


COMMON = ["--num-samples", "6", "--seq-len", "24", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def artifact_path(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "h.safetensors"
    assert main(["calibrate", "--model", str(tiny_model_dir), *COMMON, "--output", str(path)]) == 0
    return path


def test_help_is_instant():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "hf_blockcbo.commands.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "calibrate" in out.stdout and "prune" in out.stdout
    assert time.perf_counter() - start < 5
    check = "import sys, hf_blockcbo.commands.cli as c; c.build_parser(); print('torch' in sys.modules)"
    heavy = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert heavy.stdout.strip() == "False", "parsing the CLI must not import torch"


def test_calibrate_writes_the_artifact(artifact_path, tiny_model_dir):
    art = HessianArtifact.load(artifact_path)
    assert art.A is None and art.Q_samples.shape == (6, 6, 6) and art.curvature == "measured"  # the default
    assert art.metadata["model"] == str(tiny_model_dir) and art.metadata["seq_len"] == "24"
    assert art.metadata["dataset"] == "embedded" and art.metadata["gate"] == "branch"
    assert art.block_names[0] == "model.layers.0" and art.block_kinds == ["attention"] * 6


def test_solve_writes_sorted_candidates(artifact_path, tmp_path, capsys):
    out = tmp_path / "candidates.json"
    assert main(["solve", "--hessian", str(artifact_path), "--remove", "2", "--top-k", "5", "--output", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = payload["candidates"]
    assert payload["block_names"] == [f"model.layers.{i}" for i in range(6)] and payload["model_fingerprint"]
    assert [r["rank"] for r in rows] == list(range(5))
    assert [r["energy"] for r in rows] == sorted(r["energy"] for r in rows)
    assert all(len(r["blocks"]) == 2 for r in rows) and len({tuple(r["blocks"]) for r in rows}) == 5
    assert "certified exact" in capsys.readouterr().out


def test_prune_from_candidates_and_reload(artifact_path, tiny_model_dir, tmp_path, capsys):
    candidates = tmp_path / "c.json"
    main(["solve", "--hessian", str(artifact_path), "--remove", "2", "--top-k", "4", "--output", str(candidates)])
    chosen = json.loads(candidates.read_text())["candidates"][3]["blocks"]
    out = tmp_path / "pruned"
    code = main(
        ["prune", "--model", str(tiny_model_dir), "--candidates", str(candidates), "--rank", "3", "--output", str(out)]
    )
    assert code == 0
    provenance = json.loads((out / "block_removal.json").read_text())
    assert provenance["removed_blocks"] == chosen and provenance["rank"] == 3
    assert provenance["num_blocks_before"] == 6 and provenance["num_blocks_after"] == 4
    assert provenance["num_parameters_after"] < provenance["num_parameters_before"]
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    script = (
        "import json; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "print(json.dumps({'layers': m.config.num_hidden_layers, 'n': len(m.model.layers)}))"
    )
    assert run_plain_transformers(script) == {"layers": 4, "n": 4}


def test_prune_end_to_end_with_saved_hessian(tiny_model_dir, tmp_path, capsys):
    out, art = tmp_path / "p", tmp_path / "h.safetensors"
    args = ["prune", "--model", str(tiny_model_dir), "--remove", "3", *COMMON, "--save-hessian", str(art)]
    assert main([*args, "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "6 → 3 blocks" in text and "energy" in text
    provenance = json.loads((out / "block_removal.json").read_text())
    spectrum = provenance["spectrum"]
    best = min(spectrum, key=lambda row: (row["score"], row["rank"]))
    assert provenance["removed_blocks"] == best["blocks"] and provenance["solver"]["certified"]
    assert provenance["validation_perplexity"] == best["score"] and provenance["scorer"] == "cbo"
    assert [row["rank"] for row in spectrum] == list(range(len(spectrum)))
    assert provenance["config"]["validation_metric"] == "perplexity"
    # reuse the artifact: same choice, no calibration
    out2 = tmp_path / "p2"
    assert (
        main(
            ["prune", "--model", str(tiny_model_dir), "--remove", "3", *COMMON, "--hessian", str(art)]
            + ["--output", str(out2)]
        )
        == 0
    )
    assert json.loads((out2 / "block_removal.json").read_text())["removed_blocks"] == provenance["removed_blocks"]


def test_prune_explicit_blocks(tiny_model_dir, tmp_path):
    out = tmp_path / "p"
    assert main(["prune", "--model", str(tiny_model_dir), "--blocks", "0,5", "--output", str(out)]) == 0
    assert json.loads((out / "block_removal.json").read_text())["removed_blocks"] == [0, 5]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--remove", "6"], "1..5"),
        (["--remove", "0"], "positive"),
        (["--remove", "2", "--top-k", "0"], "--top-k must be a positive integer"),
        (["--remove", "2", "--rank", "12"], "rank 12"),
        (["--blocks", "1,x"], "comma-separated"),
    ],
)
def test_prune_bad_input_fails_cleanly(tiny_model_dir, tmp_path, capsys, extra, match, artifact_path):
    out = tmp_path / "never"
    code = main(
        ["prune", "--model", str(tiny_model_dir), "--hessian", str(artifact_path), *extra, "--output", str(out)]
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and match in errors[0] and "Traceback" not in err
    assert not out.exists()


def test_existing_output_and_foreign_artifact_are_refused(tiny_model_dir, tmp_path, capsys, artifact_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main(["prune", "--model", str(tiny_model_dir), "--blocks", "1", "--output", str(busy)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    art = HessianArtifact.load(artifact_path)
    foreign = HessianArtifact(
        A=None, Q_samples=art.Q_samples[:, :4, :4], block_names=art.block_names[:4], block_kinds=art.block_kinds[:4]
    )
    foreign.save(tmp_path / "foreign.safetensors")
    args = [
        "prune",
        "--model",
        str(tiny_model_dir),
        "--remove",
        "1",
        "--hessian",
        str(tmp_path / "foreign.safetensors"),
    ]
    assert main([*args, "--output", str(tmp_path / "o")]) == 2
    assert "do not match" in capsys.readouterr().err


def test_empty_data_is_refused(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main(
        ["calibrate", "--model", str(tiny_model_dir), "--data", str(empty), "--output", str(tmp_path / "h.st")]
    )
    assert code == 2 and "no records" in capsys.readouterr().err
    assert not (tmp_path / "h.st").exists()


def test_config_file_with_flag_overrides(tiny_model_dir, tmp_path):
    from hf_blockcbo.config import BlockRemovalConfig

    BlockRemovalConfig(model=str(tiny_model_dir), num_samples=4, seq_len=16, num_remove=2, top_k=3).save_pretrained(
        tmp_path
    )
    out = tmp_path / "p"
    assert (
        main(
            [
                "prune",
                "--config",
                str(tmp_path / "block_removal_config.json"),
                "--remove",
                "1",
                "--no-progress",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    provenance = json.loads((out / "block_removal.json").read_text())
    assert provenance["config"]["num_remove"] == 1 and provenance["config"]["num_samples"] == 4
    assert len(provenance["removed_blocks"]) == 1


def test_solve_plot_and_constraints(artifact_path, tmp_path, capsys):
    png = tmp_path / "spectrum.png"
    out = tmp_path / "c.json"
    args = ["solve", "--hessian", str(artifact_path), "--remove", "2", "--top-k", "6", "--protect", "0,5"]
    assert main([*args, "--param-budget", "10", "--plot", str(png), "--output", str(out)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(out.read_text())["candidates"]
    assert all(not {0, 5} & set(r["blocks"]) for r in rows)
    assert main([*args, "--per-kind", "moe=1", "--output", str(out), "--overwrite"]) == 2
    assert "no blocks of kind" in capsys.readouterr().err


def test_prune_with_a_baseline_scorer_and_energy_selection(tiny_model_dir, tmp_path):
    out = tmp_path / "bi"
    assert (
        main(
            ["prune", "--model", str(tiny_model_dir), "--remove", "2", "--scorer", "bi", *COMMON, "--output", str(out)]
        )
        == 0
    )
    provenance = json.loads((out / "block_removal.json").read_text())
    assert provenance["scorer"] == "bi" and len(provenance["removed_blocks"]) == 2
    out = tmp_path / "swm"
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_model_dir),
                "--remove",
                "2",
                "--scorer",
                "swm",
                *COMMON,
                "--output",
                str(out),
            ]
        )
        == 0
    )
    provenance = json.loads((out / "block_removal.json").read_text())
    assert provenance["merged_into"] == provenance["removed_blocks"][0] - 1
    out = tmp_path / "energy"
    args = ["prune", "--model", str(tiny_model_dir), "--remove", "2", "--select", "energy", *COMMON]
    assert main([*args, "--output", str(out)]) == 0
    provenance = json.loads((out / "block_removal.json").read_text())
    assert provenance["rank"] == 0 and provenance["selection"].startswith("ground state")


def test_compare_writes_table_csv_and_plot(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"question": "The sky is", "choices": ["blue.", "green."], "labels": ["A", "B"], "answer": "A"}\n')
    args = [
        "compare",
        "--model",
        str(tiny_model_dir),
        "--remove",
        "1,2",
        *COMMON,
        "--eval-samples",
        "3",
        "--mc",
        str(mc),
    ]
    assert main([*args, "--sleb-samples", "2", "--top-k", "4", "--output-dir", str(out)]) == 0
    table = (out / "compare.md").read_text()
    cbo_test = {
        int(c[1]): float(c[6]) for c in (line.split("|") for line in table.splitlines()) if c[2:3] == [" cbo "]
    }
    for method in ("cbo", "cbo (ground state)", "bi", "angular", "norm_ratio", "sleb", "swm", "random"):
        assert f"| {method} |" in table
    assert "Spearman" in table and "mc acc" in table
    assert "test ppl ÷ CBO's (95 % interval)" in table
    for line in table.splitlines():  # every baseline's test perplexity over CBO's, with its interval
        if line.startswith("| 2 | bi |"):
            cells = [c.strip() for c in line.split("|")]
            ratio, interval = cells[7].split(" ")
            low, high = (float(x) for x in interval.strip("()").split("–"))
            assert low <= float(ratio) <= high
            assert float(ratio) == pytest.approx(float(cells[6]) / cbo_test[2], rel=2e-3)
        if line.startswith("| 2 | cbo |"):
            assert line.split("|")[7].strip() == ""
    assert len((out / "compare.csv").read_text().splitlines()) == 1 + 2 * 8
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_every_command_is_also_an_optimum_cli_subcommand():
    import shutil

    exe = shutil.which("optimum-cli")
    assert exe, "optimum is a dependency: optimum-cli must be installed"
    out = subprocess.run([exe, "blockcbo", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("calibrate", "solve", "prune", "compare", "push"):
        assert name in out.stdout, f"{name} missing: is hf_blockcbo installed non-editable (pip install .)?"


def test_diagnose_reports_rank_correlations_and_a_plot(artifact_path, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "diag"
    args = ["diagnose", "--model", str(tiny_model_dir), "--hessian", str(artifact_path), "--remove", "1,2"]
    args += ["--seq-len", "24", "--eval-samples", "3", "--random-states", "4", "--bootstrap", "10", "--no-progress"]
    assert main([*args, "--output-dir", str(out)]) == 0
    text = (out / "diagnose.md").read_text()
    assert "Spearman" in text and "| 1 | 6 + 0 |" in text  # M = 1: all 6 states are the top-K, no random left over
    assert "| 2 |" in text and (out / "diagnose.png").stat().st_size > 5000
    row = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    assert " ± " in row.split("|")[-5] and " over [" in row.split("|")[-5]  # the ground state's lead over the next
    before = (out / "diagnose.md").stat().st_mtime_ns
    assert main([*args, "--output-dir", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "diagnose.md").stat().st_mtime_ns == before


def test_diagnose_reports_the_stability_of_the_validation_pick(artifact_path, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "diag"
    args = ["diagnose", "--model", str(tiny_model_dir), "--hessian", str(artifact_path), "--remove", "2"]
    args += ["--seq-len", "24", "--eval-samples", "2", "--random-states", "0", "--no-progress"]
    args += ["--output-dir", str(out)]
    assert main([*args, "--bootstrap", "0", "--pick-stability"]) == 2
    assert "--bootstrap" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--bootstrap", "4", "--pick-stability", "--validation-samples", "2"]) == 0
    row = next(line for line in (out / "diagnose.md").read_text().splitlines() if line.startswith("| 2 |"))
    assert " % of [" in row.split("|")[-2]  # the "validation pick kept" column: the share and the pick


def _snapshot(paths):
    return {str(p): (p.read_bytes() if p.is_file() else sorted(x.name for x in p.iterdir())) for p in paths}


def test_an_output_never_replaces_or_contains_an_input(artifact_path, tiny_model_dir, tmp_path, capsys):
    """Each row: a command whose output is an input, contains one, or exists; one line, exit 2, inputs untouched."""
    import shutil

    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir, model)
    hessian = tmp_path / "h.safetensors"
    shutil.copy(artifact_path, hessian)
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("keep")
    plays = tmp_path / "plays.txt"
    plays.write_text("Enter a messenger.\n\n" * 200)
    rows = [
        (["solve", "--hessian", str(hessian), "--remove", "2", "--output", str(hessian)], "input"),
        (["solve", "--hessian", str(hessian), "--remove", "2", "--output", str(existing)], "--overwrite"),
        (["calibrate", "--model", str(model), *COMMON, "--output", str(existing)], "--overwrite"),
        (["calibrate", "--model", str(model), *COMMON, "--output", str(model / "h.safetensors")], "input"),
        (  # a data setting naming several sources: each is an input
            ["calibrate", "--model", str(model), *COMMON, "--data", f"embedded,{plays}", "--output", str(plays)],
            "input",
        ),
        (
            ["prune", "--model", str(model), "--blocks", "1", "--output", str(tmp_path / "models"), "--overwrite"],
            "input",
        ),
        (["prune", "--model", str(model), "--blocks", "1", "--output", str(busy)], "--overwrite"),
        (
            ["compare", "--model", str(model), "--remove", "1", "--methods", "bi", "--output-dir", str(busy)],
            "--overwrite",
        ),
    ]
    watched = [model, hessian, existing, busy, plays]
    before = _snapshot(watched)
    for argv, fragment in rows:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert _snapshot(watched) == before, "no input changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "busy",
        "existing.safetensors",
        "h.safetensors",
        "models",
        "plays.txt",
    ]


def test_library_errors_name_fields_and_the_cli_names_flags(artifact_path, capsys):
    from hf_blockcbo.commands.base import to_flags

    assert to_flags("use `solver=tabu` or raise `time_limit`; lower `num_samples`") == (
        "use --solver tabu or raise --time-limit; lower --num-samples"
    )
    assert to_flags("say how many blocks to remove (`num_remove`)") == "say how many blocks to remove (--remove)"
    assert to_flags("`not_a_field` stays") == "`not_a_field` stays"
    argv = ["solve", "--hessian", str(artifact_path), "--remove", "2", "--per-kind", "attention=2"]
    assert main([*argv, "--param-budget", "90", "--solver", "exact"]) == 2
    assert "relax --per-kind / --param-budget / --protect" in capsys.readouterr().err


def test_compare_with_repair_harness_tasks_and_measured_speed(tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "cmp"
    task = tmp_path / "boolq.jsonl"
    rows = [
        {"question": f"is it {w}", "passage": f"the {w} sky", "answer": "yes" if i % 2 else "no"}
        for i, w in enumerate(["blue", "green", "red", "grey"])
    ]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["compare", "--model", str(tiny_model_dir), "--remove", "2", *COMMON, "--eval-samples", "3"]
    args += ["--methods", "cbo,bi,swm", "--repair", "--repair-samples", "4", "--tasks", str(task), "--speed"]
    assert main([*args, "--top-k", "3", "--output-dir", str(out)]) == 0
    table = (out / "compare.md").read_text()
    assert "repaired test ppl" in table and "boolq_local acc" in table and "decode speed-up (measured)" in table
    assert "| cbo (repair-aware) |" in table
    with (out / "compare.csv").open() as handle:
        import csv

        parsed = list(csv.DictReader(handle))
    bi = next(r for r in parsed if r["method"] == "bi")
    assert float(bi["repaired_test_ppl"]) > 0 and float(bi["decode_speedup"]) > 1.0


def test_a_failed_plot_leaves_no_candidates_file(artifact_path, tmp_path, monkeypatch, capsys):
    import hf_blockcbo.selection.plots as plots
    from hf_blockcbo.errors import BlockCBOError

    def broken(*args, **kwargs):
        raise BlockCBOError("the plot needs matplotlib: pip install matplotlib")

    monkeypatch.setattr(plots, "plot_spectrum", broken)
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    argv = ["solve", "--hessian", str(artifact_path), "--remove", "2", "--output", str(out), "--plot", str(png)]
    assert main(argv) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not out.exists() and not png.exists()


def test_validation_metric_flag_reaches_the_selection(tiny_model_dir, artifact_path, tmp_path, capsys):
    out = tmp_path / "kl"
    args = ["prune", "--model", str(tiny_model_dir), "--hessian", str(artifact_path), "--remove", "2", *COMMON]
    assert main([*args, "--validation-metric", "kl", "--output", str(out)]) == 0
    provenance = json.loads((out / "block_removal.json").read_text())
    assert provenance["config"]["validation_metric"] == "kl"
    assert provenance["selection"].startswith("validation KL from the unpruned model")
    kls = [row["validation_kl"] for row in provenance["spectrum"]]
    assert all(kl is not None and kl >= 0 for kl in kls)
    chosen = next(row for row in provenance["spectrum"] if row["blocks"] == provenance["removed_blocks"])
    assert chosen["validation_kl"] == min(kls)
    capsys.readouterr()
    bad = tmp_path / "never"
    assert main([*args, "--validation-metric", "bleu", "--output", str(bad)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--validation-metric" in errors[0] and "bleu" in errors[0]
    assert not bad.exists()
