"""`BlockRemover`: the from_pretrained-style Python face of the verbs, over one `BlockRemovalConfig`.

```python
from hf_blockcbo import BlockRemovalConfig, BlockRemover

remover = BlockRemover.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", BlockRemovalConfig(num_remove=6))
remover.calibrate()          # the Hessian pass (or remover.load_hessian("user/smollm2-hessian"))
remover.solve()              # the low-energy spectrum
remover.prune()              # choose (validation by default) and remove the blocks
remover.save_pretrained("smollm2-pruned")
remover.push_to_hub("user/smollm2-pruned")
```
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .config import BlockRemovalConfig
from .errors import BlockCBOError
from .hessian.artifact import HessianArtifact
from .models import ModelSource, load_model, model_fingerprint, resolve_model
from .pipeline import Selection, calibrate, choose_blocks, prune_and_save, solve_artifact
from .solvers import SolveResult


class BlockRemover:
    """Holds a model, its tokenizer, the config and what the verbs produced (artifact, spectrum, selection)."""

    def __init__(self, model, tokenizer, config: BlockRemovalConfig, source: ModelSource):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.source = source
        self.artifact: HessianArtifact | None = None
        self.result: SolveResult | None = None
        self.selection: Selection | None = None
        self._saved: Path | None = None

    @classmethod
    def from_pretrained(
        cls, model_id: str | None = None, config: BlockRemovalConfig | None = None, **overrides
    ) -> BlockRemover:
        """Load ``model_id`` (Hub id, folder, .gguf, or None for the embedded SmolLM2) with ``config`` + overrides."""
        config = (config or BlockRemovalConfig()).replace(model=model_id, **overrides)
        source = resolve_model(config.model, config.revision)
        model, tokenizer = load_model(source, dtype=config.dtype)
        return cls(model, tokenizer, config, source)

    def calibrate(self, progress: bool = True) -> HessianArtifact:
        self.artifact = calibrate(self.model, self.tokenizer, self.config, self.source, progress=progress)
        return self.artifact

    def load_hessian(self, path_or_repo: str) -> HessianArtifact:
        """Reuse an artifact from a file, folder or Hub repository instead of calibrating."""
        from .hub.publish import load_hessian
        from .surgery.architectures import describe_blocks

        artifact = load_hessian(path_or_repo)
        artifact.check_model(
            self.source.model_id, [b.name for b in describe_blocks(self.model)], model_fingerprint(self.model)
        )
        self.artifact = artifact
        return artifact

    def solve(self, num_remove: int | None = None) -> SolveResult:
        if self.artifact is None:
            raise BlockCBOError("no Hessian yet: call calibrate() or load_hessian() first")
        if num_remove is not None:
            self.config = self.config.replace(num_remove=num_remove)
        self.result = solve_artifact(self.artifact, self.config)
        return self.result

    def prune(self, progress: bool = True):
        """Choose the blocks (config.select) and keep the choice; the model is cut when saved."""
        if self._saved is not None:
            raise BlockCBOError("this model was already pruned and saved; load it again to prune differently")
        self.selection, self.artifact = choose_blocks(
            self.model, self.tokenizer, self.config, self.source, self.artifact, progress=progress
        )
        return self.selection

    def save_pretrained(self, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Remove the chosen blocks and save a plain transformers checkpoint with provenance (and the config)."""
        if self.selection is None:
            self.prune()
        prune_and_save(
            self.model, self.tokenizer, self.selection, output_dir, self.source, self.config, self.artifact, overwrite
        )
        self.config.save_pretrained(output_dir)
        self._saved = Path(output_dir)
        return self._saved

    def push_to_hub(self, repo_id: str, private: bool = False, revision: str | None = None, token: str | None = None):
        """Upload the pruned model with a generated card (and the Hessian artifact) in one commit."""
        from .hub.publish import push_model

        if self._saved is None:
            self.save_pretrained(tempfile.mkdtemp(prefix="hf_blockcbo_"))
        hessian = None
        if self.artifact is not None:
            hessian = self._saved / ".hessian.safetensors"
            self.artifact.save(hessian)
        try:
            return push_model(self._saved, repo_id, private, revision, token, hessian)
        finally:
            if hessian is not None:
                hessian.unlink(missing_ok=True)
