"""Publishing: model cards generated from the provenance, and atomic pushes of pruned models and Hessian artifacts.

A push is one commit (model, tokenizer, card, provenance and optionally the Hessian artifact), so a failure leaves the
repository as it was; a repository created by a push that then fails is deleted again.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from ..errors import BlockCBOError


HESSIAN_FILE = "hessian.safetensors"
TAGS = ["pruned", "depth-pruning", "hf-blockcbo"]
_KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}


def read_provenance(model_dir: str | os.PathLike) -> dict:
    """The folder's provenance, validated (every key the card and the push need is there)."""
    from ..provenance import Provenance

    return Provenance.from_dir(model_dir).to_dict()


def _block_map(num_blocks: int, removed: list[int]) -> str:
    marks = "".join("█" if i in removed else "·" for i in range(num_blocks))
    ruler = "".join(str(i // 10) if i % 10 == 0 else " " for i in range(num_blocks))
    return f"{ruler}\n{marks}"


def _evaluations(provenance: dict) -> list[dict]:
    rows = []
    dataset = provenance.get("validation_data") or "validation"
    if provenance.get("validation_perplexity") is not None:
        rows.append({"name": "perplexity", "dataset": dataset, "value": provenance["validation_perplexity"]})
    if provenance.get("validation_perplexity_unpruned") is not None:
        rows.append(
            {
                "name": "perplexity (unpruned base)",
                "dataset": dataset,
                "value": provenance["validation_perplexity_unpruned"],
                "card_only": True,
            }
        )
    for name, value in (provenance.get("evaluations") or {}).items():
        dataset, _, metric = name.partition("/")
        rows.append({"name": metric or "value", "dataset": dataset, "value": float(value)})
    harness = provenance.get("evaluation") or {}
    for task, scores in (harness.get("tasks") or {}).items():  # `hf-blockcbo eval --record`
        for metric in ("acc", "acc_norm"):
            if scores.get(metric) is not None:
                rows.append({"name": f"{metric} (lm-eval)", "dataset": task, "value": float(scores[metric])})
    return rows


def _speed_rows(provenance: dict) -> list[dict]:
    """The `hf-blockcbo bench --record` report as card rows (original first)."""
    speed = provenance.get("speed") or {}
    rows = []
    for name, row in (speed.get("models") or {}).items():
        rows.append(
            {
                "name": name,
                "layers": row["layers"],
                "prefill": row["prefill_tokens_per_s"]["median"],
                "decode": row["decode_tokens_per_s"]["median"],
                "speedup": row["decode_tokens_per_s_ratio"],
                "kv_mb": row["kv_cache_bytes"] / 2**20,
                "weights_mb": row["weights_bytes"] / 2**20,
            }
        )
    return rows


def model_card(model_dir: str | os.PathLike, repo_id: str, license: str | None = None):
    """A `huggingface_hub.ModelCard` for the pruned model in ``model_dir``, filled from its provenance."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    provenance = read_provenance(model_dir)
    base = provenance.get("base_model")
    healed = bool(provenance.get("healing"))
    calibration = provenance.get("calibration") or {}
    evaluations = _evaluations(provenance)
    dataset = calibration.get("dataset")
    eval_results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=e["dataset"],
            dataset_name=e["dataset"],
            metric_type=e["name"],
            metric_value=e["value"],
        )
        for e in evaluations
        if not e.get("card_only")
    ]
    card_data = ModelCardData(
        base_model=base,
        base_model_relation="finetune" if healed else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=TAGS,
        license=license or _KNOWN_LICENSES.get(base or ""),
        datasets=[dataset] if dataset and "/" in dataset else None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    before, after = provenance["num_parameters_before"], provenance["num_parameters_after"]
    template = resources.files("hf_blockcbo.templates").joinpath("model_card.md").read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        repo_id=repo_id,
        model_name=repo_id.split("/")[-1],
        base_model=base,
        healed=healed,
        removed=provenance["removed_blocks"],
        num_blocks_before=provenance["num_blocks_before"],
        num_blocks_after=provenance["num_blocks_after"],
        params_before=before,
        params_after=after,
        reduction=100 * (1 - after / before),
        scorer=provenance.get("scorer", "cbo"),
        selection=provenance.get("selection", ""),
        energy=provenance.get("energy"),
        rank=provenance.get("rank"),
        merged_into=provenance.get("merged_into"),
        spectrum=provenance.get("spectrum") or [],
        block_map=_block_map(provenance["num_blocks_before"], provenance["removed_blocks"]),
        evaluations=evaluations,
        calibration=calibration,
        solver=provenance.get("solver"),
        config_json=json.dumps(provenance.get("config", {}), indent=2, sort_keys=True),
        repair=provenance.get("repair"),
        repair_rejected=provenance.get("repair_rejected"),
        speed=provenance.get("speed"),
        speed_rows=_speed_rows(provenance),
    )


def check_repo_id(repo_id: str) -> None:
    """One clear line for a malformed repository id, before anything is read or uploaded."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise BlockCBOError(f"{repo_id!r} is not a Hub repository id (user/name): {str(err).splitlines()[0]}") from err


def _unreachable(err: Exception) -> bool:
    name = type(err).__name__
    return any(word in name for word in ("Offline", "Connect", "Timeout", "NameResolution"))


def _commit_atomically(api, repo_id: str, operations, private: bool, revision: str | None, message: str) -> str:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        api.repo_info(repo_id)
        existed = True
    except RepositoryNotFoundError:
        existed = False
    except Exception as err:
        if _unreachable(err):
            raise BlockCBOError(
                f"cannot reach the Hub to push {repo_id!r} ({type(err).__name__}); check the network, or unset "
                "HF_HUB_OFFLINE; nothing was uploaded"
            ) from err
        raise
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    try:
        info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision)
    except Exception:
        if not existed:
            api.delete_repo(repo_id, missing_ok=True)
        raise
    return info.commit_url


def push_model(
    model_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    hessian: str | os.PathLike | None = None,
    license: str | None = None,
    message: str | None = None,
) -> str:
    """Upload a pruned folder with a generated card (and optionally its Hessian artifact) in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    check_repo_id(repo_id)
    model_dir = Path(model_dir)
    provenance = read_provenance(model_dir)
    if hessian is not None:  # a junk or foreign artifact is refused before anything is uploaded
        from ..hessian.artifact import HessianArtifact

        artifact = HessianArtifact.load(hessian)
        made_with = (provenance.get("calibration") or {}).get("model_fingerprint")
        fingerprint = artifact.metadata.get("model_fingerprint")
        if made_with and fingerprint and made_with != fingerprint:
            raise BlockCBOError(
                f"the Hessian {str(hessian)!r} was computed on another model than the one {str(model_dir)!r} was "
                "pruned from; push the artifact the prune used (or none)"
            )
    card = model_card(model_dir, repo_id, license=license)
    operations = [
        CommitOperationAdd(path_in_repo=str(p.relative_to(model_dir)), path_or_fileobj=str(p))
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and p.name != "README.md" and not p.name.startswith(".")
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    if hessian is not None:
        operations.append(CommitOperationAdd(path_in_repo=HESSIAN_FILE, path_or_fileobj=str(hessian)))
    removed = provenance["removed_blocks"]
    message = (
        message or f"Upload {provenance['num_blocks_after']}-block model (removed blocks {removed}) with hf_blockcbo"
    )
    return _commit_atomically(HfApi(token=token), repo_id, operations, private, revision, message)


def push_hessian(
    artifact_path: str | os.PathLike,
    repo_id: str,
    config=None,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> str:
    """Upload a Hessian artifact (+ the BlockRemovalConfig that made it) so anyone can re-solve for another M."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from ..config import CONFIG_NAME

    check_repo_id(repo_id)
    operations = [CommitOperationAdd(path_in_repo=HESSIAN_FILE, path_or_fileobj=str(artifact_path))]
    if config is not None:
        payload = json.dumps(config.to_dict(), indent=2, sort_keys=True).encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=payload))
    return _commit_atomically(HfApi(token=token), repo_id, operations, private, revision, "Upload hf_blockcbo Hessian")


def load_hessian(path_or_repo: str, revision: str | None = None, token: str | None = None):
    """A Hessian artifact from a local file or folder, or from a Hub repository holding `hessian.safetensors`."""
    from ..hessian.artifact import HessianArtifact

    path = Path(path_or_repo)
    if path.is_file():
        return HessianArtifact.load(path)
    if path.is_dir():
        return HessianArtifact.load(path / HESSIAN_FILE)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        local = hf_hub_download(path_or_repo, HESSIAN_FILE, revision=revision, token=token)
    except (RepositoryNotFoundError, EntryNotFoundError) as err:
        raise BlockCBOError(f"no {HESSIAN_FILE} in {path_or_repo!r} (local path or Hub repository)") from err
    return HessianArtifact.load(local)
