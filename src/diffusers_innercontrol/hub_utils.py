# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Fail fast, with one clear line, when a model cannot be loaded: a Hub id that needs the network while the machine
is offline, a local folder that is not a saved model, weights that do not load."""

import os
from typing import Optional

from huggingface_hub import constants, snapshot_download


class OfflineModelError(OSError):
    """A Hub model id was given while `HF_HUB_OFFLINE=1` and it is not in the local cache."""


class ModelLoadError(ValueError):
    """A model folder or its weights cannot be loaded; the message names the option and the fix."""


def is_offline() -> bool:

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def check_model_available(
    name_or_path: Optional[str], option: str, subfolder: Optional[str] = None, filename: Optional[str] = None,
    revision: Optional[str] = None, repo_type: str = "model", required: Optional[str] = None,
) -> Optional[str]:
    """
    Return `name_or_path` if it is a local path, or a Hub id that can be loaded now (online, or cached).

    Raises [`OfflineModelError`] naming the id and the option that takes a local path otherwise, so that
    a script stops before any model is built instead of retrying the network. For a local folder, `required` (a
    file such as `config.json`, inside `subfolder` if given) must be there, else [`ModelLoadError`].
    """
    if name_or_path is None:
        return name_or_path
    local = os.path.expanduser(str(name_or_path))
    if os.path.exists(local):
        wanted = os.path.join(local, subfolder or "", required) if required else None
        if wanted and os.path.isdir(local) and not os.path.isfile(wanted):
            raise ModelLoadError(
                f"{option} {name_or_path!r} is a folder without {os.path.relpath(wanted, local)}: it is not a saved "
                "model. Pass the folder that save_pretrained wrote (the training script's --output_dir)."
            )
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


def load_pretrained(model_class, name_or_path: str, option: str, **kwargs):
    """
    `model_class.from_pretrained(name_or_path, **kwargs)`, or one `ModelLoadError` line naming the option, the
    folder and the cause (a truncated or foreign weights file gives a chain of three library errors otherwise).
    """
    try:
        return model_class.from_pretrained(name_or_path, **kwargs)
    except OfflineModelError:
        raise
    except Exception as err:  # OSError, safetensors' SafetensorError, JSON errors: the cause is in the text
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"{option} {name_or_path!r} could not be loaded as a {model_class.__name__} ({type(err).__name__}: "
            f"{cause[:300]}). Its weights may be truncated or of another model: save it again, or pass another folder."
        ) from None
