"""Revisions of a Hugging Face repository, read offline from the local cache.

Published series (Pythia's ``step0`` ... ``step143000`` branches, OLMo's) live as
revisions of one repository. ``huggingface_hub`` resolves a revision to its snapshot
folder in the cache (``models--ORG--NAME/refs/REVISION`` names a commit,
``snapshots/COMMIT/`` holds the files) with ``local_files_only=True``: nothing is
downloaded, and a revision that is not in the cache is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ckpt_tools.importer.formats import WEIGHT_FILES, Checkpoint, CheckpointError, folder_checkpoint

__all__ = ["hub_checkpoints"]


def hub_checkpoints(
    repo: str, revisions: Sequence[str], *, cache_dir: str | Path | None = None
) -> list[Checkpoint]:
    """The checkpoints of `repo` at `revisions`, from the local Hugging Face cache.

    Args:
        repo: The repository id, ``ORG/NAME``.
        revisions: Branch or tag names (``step1000``) or commit hashes, in series order.
        cache_dir: The hub cache (default: huggingface_hub's, i.e. ``HF_HUB_CACHE``).

    Raises:
        CheckpointError: a revision is not in the cache, or its snapshot holds no weights.
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError("reading the Hugging Face cache needs huggingface_hub: "
                              "pip install 'ckpt-tools[hub]'") from None
    if not revisions:
        raise CheckpointError("--hf-repo needs --revisions (e.g. step0,step1000)")
    where = f" ({cache_dir})" if cache_dir else ""
    found = []
    for revision in revisions:
        label = f"{repo}@{revision}"
        try:
            folder = snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                       local_files_only=True)
        except HFValidationError:
            raise CheckpointError(f"{repo!r} is not a Hugging Face repository id (ORG/NAME)"
                                  ) from None
        except (LocalEntryNotFoundError, FileNotFoundError):
            raise CheckpointError(
                f"revision {revision!r} of {repo} is not in the Hugging Face cache{where}; "
                f"download it first (hf download {repo} --revision {revision}) or leave it "
                "out of --revisions") from None
        ckpt = folder_checkpoint(Path(folder), name=revision, label=label)
        if ckpt is None:
            raise CheckpointError(f"{label} in the Hugging Face cache holds no weights "
                                  f"({' or '.join(WEIGHT_FILES)}); download them first")
        found.append(ckpt)
    return found
