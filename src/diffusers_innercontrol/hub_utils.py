# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Fail fast, with one clear line, when a model id needs the network and the machine is offline."""

import os
from typing import Optional

from huggingface_hub import constants, snapshot_download


class OfflineModelError(OSError):
    """A Hub model id was given while `HF_HUB_OFFLINE=1` and it is not in the local cache."""


def is_offline() -> bool:

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def check_model_available(
    name_or_path: Optional[str], option: str, subfolder: Optional[str] = None, filename: Optional[str] = None,
    revision: Optional[str] = None, repo_type: str = "model",
) -> Optional[str]:
    """
    Return `name_or_path` if it is a local path, or a Hub id that can be loaded now (online, or cached).

    Raises [`OfflineModelError`] naming the id and the option that takes a local path otherwise, so that
    a script stops before any model is built instead of retrying the network.
    """
    if name_or_path is None or os.path.exists(os.path.expanduser(str(name_or_path))):
        return name_or_path
    if not is_offline():
        return name_or_path

    patterns = None
    if filename:
        patterns = [f"{subfolder}/{filename}" if subfolder else filename]
    elif subfolder:
        patterns = [f"{subfolder}/*"]
    try:
        snapshot_download(name_or_path, revision=revision, repo_type=repo_type, local_files_only=True, allow_patterns=patterns)
        return name_or_path
    except Exception:
        raise OfflineModelError(
            f"'{name_or_path}' ({option}) is a Hub id, this machine is offline (HF_HUB_OFFLINE=1) and it is not in "
            f"the cache: download it where there is network, or pass a local directory with {option} /path/to/model."
        ) from None
