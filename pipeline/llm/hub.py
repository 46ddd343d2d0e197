"""Resolving Hugging Face hub revisions to commits, from the local cache first."""

from __future__ import annotations

from pathlib import Path

from pipeline.infra.errors import UserError


def hub_commit(repo_id: str, revision: str | None, repo_type: str = "model") -> str:
    """The commit ``revision`` points at: read from the local HF cache, else asked of the hub."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        snapshot = snapshot_download(
            repo_id, repo_type=repo_type, revision=revision, local_files_only=True, allow_patterns=["*.json", "*.md"]
        )
        return Path(str(snapshot)).name
    except Exception:  # noqa: BLE001 - not cached locally: ask the hub below
        pass
    try:
        api = HfApi()
        info = (api.model_info if repo_type == "model" else api.dataset_info)(repo_id, revision=revision)
        return str(info.sha)
    except Exception as err:  # noqa: BLE001 - network, auth or unknown id: one message for all
        raise UserError(
            f"cannot find {repo_type} {repo_id!r} (revision {revision or 'main'}) in the local "
            f"Hugging Face cache or on the hub ({type(err).__name__}). Check the id and the "
            "network (HF_HUB_OFFLINE), or give a local path."
        ) from None
