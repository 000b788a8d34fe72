# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Model cards and uploads for the trained ControlNets and probes.

The card is written with `huggingface_hub.ModelCard` / `ModelCardData` into the output folder; it is
not `diffusers.utils.hub_utils.load_or_create_model_card`, which raises for a local directory and retries
the network for a repo id. `push_folder` writes the card *before* `upload_folder`:
`save_pretrained(push_to_hub=True)` would overwrite it with a generic card. A failed upload leaves the
local save untouched and says where it is.

API (stable; `train_probe.py` imports it):
    save_model_card(output_dir, *, base_model, model_kind="controlnet", repo_id=None, task=None, alpha=None,
                    beta=None, reward_window=None, alignment_window=None, probe=None, reward_model=None,
                    controlnet=None, dataset=None, images=None, validation_prompts=None, train_args=None,
                    use_lora=False, license=None (the base model's, hub.base_model_license), extra_tags=(), extra_text="") -> README path
    push_folder(output_dir, repo_id=None, token=None, private=False, card_kwargs=None,
                commit_message="End of training", ignore_patterns=DEFAULT_IGNORE) -> url
    HubUploadError (RuntimeError)
"""

import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

logger = logging.getLogger(__name__)

DEFAULT_IGNORE = ["step_*", "epoch_*", "checkpoint-*", "checkpoint-*/**", "logs/**", "*.tmp/**"]
MODEL_KINDS = ("controlnet", "probe", "lora")


class HubUploadError(RuntimeError):
    """The upload failed; the local save is intact (the message says where)."""


def _fmt_window(window) -> str:
    return "-" if window is None else f"[{int(window[0])}, {int(window[1])}]"


def _local_card_data(model) -> Optional[ModelCardData]:
    """The metadata of a local model folder's README.md, or None (a Hub id, or no card)."""
    readme = os.path.join(str(model), "README.md")
    return ModelCard.load(readme).data if os.path.isfile(readme) else None


def base_model_license(base_model, default: str = "creativeml-openrail-m") -> str:
    """
    The license a model trained from `base_model` inherits: the one in the model card of a local base model folder
    (the bundled toy SD is apache-2.0), else `default` (SD1.5's CreativeML OpenRAIL-M).
    """
    data = _local_card_data(base_model)
    return getattr(data, "license", None) or default


def is_toy_model(model) -> bool:
    """Whether a local model folder's card marks it as a ShapesWorld toy (tags `toy` / `shapesworld`)."""
    tags = getattr(_local_card_data(model), "tags", None) or []
    return bool({"toy", "shapesworld"} & set(tags))


def shown_name(model) -> Optional[str]:
    """How a card names a model: a Hub id as it is, a local folder by its name alone (no machine paths)."""
    if model is None:
        return None
    text = str(model)
    return os.path.basename(os.path.normpath(text)) if os.path.exists(text) or os.path.isabs(text) else text


def save_model_card(
    output_dir: str,
    *,
    base_model: str,
    model_kind: str = "controlnet",
    repo_id: Optional[str] = None,
    task=None,
    alpha: Optional[float] = None,
    beta: Optional[float] = None,
    reward_window=None,
    alignment_window=None,
    probe: Optional[str] = None,
    reward_model: Optional[str] = None,
    controlnet: Optional[str] = None,
    dataset: Optional[str] = None,
    images: Optional[Sequence] = None,
    validation_prompts: Optional[Sequence[str]] = None,
    train_args: Optional[Dict] = None,
    use_lora: bool = False,
    license: Optional[str] = None,
    extra_tags: Iterable[str] = (),
    extra_text: str = "",
    sdxl: bool = False,
) -> str:
    """
    Write `output_dir/README.md`: YAML metadata (base_model, license, library, tags: controlnet/innercontrol/
    diffusers/the task) and a description of the training (task, alpha, beta, windows, base model, probe,
    reward model, validation images).

    Args:
        output_dir: the folder the model was saved to. base_model: the SD1.5 id or path.
        model_kind: `"controlnet"` (stage 2) or `"probe"` (stage 1) or `"lora"`.
        task: a `Task` (its name, windows and loss kinds are written) or a task name.
        alpha, beta, reward_window, alignment_window: the values used (default: the task's).
        probe, reward_model, controlnet: ids or paths of the models used.
        images: PIL images (saved as `images_{i}.png` next to the card and embedded) or existing file names.
        validation_prompts: captions of the images. train_args: a dict of settings shown in a table.
        sdxl: the base model is SDXL (its tags, and its pipelines in the code that shows how to use the model).
    Returns:
        The path of the README.md.
    """

    if model_kind not in MODEL_KINDS:
        raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {model_kind!r}.")
    os.makedirs(output_dir, exist_ok=True)
    task_name = getattr(task, "name", task)
    if task is not None and not isinstance(task, str):
        alpha = task.alpha if alpha is None else alpha
        beta = task.beta if beta is None else beta
        reward_window = task.reward_window if reward_window is None else reward_window
        alignment_window = task.alignment_window if alignment_window is None else alignment_window

    image_files: List[str] = []
    for i, image in enumerate(images or []):
        if isinstance(image, str):
            image_files.append(os.path.basename(image))
        else:
            name = f"images_{i}.png"
            image.save(os.path.join(output_dir, name))
            image_files.append(name)

    toy = is_toy_model(base_model)
    local_base = os.path.exists(str(base_model))
    base = shown_name(base_model)
    tags = (["stable-diffusion-xl", "stable-diffusion-xl-diffusers"] if sdxl else
            ["stable-diffusion", "stable-diffusion-diffusers"]) + ["diffusers", "innercontrol"]
    tags += ["controlnet", "text-to-image"] if model_kind != "probe" else ["readout-probe", "controlnet"]
    if use_lora or model_kind == "lora":
        tags.append("lora")
    if task_name:
        tags.append(str(task_name))
    if toy:
        tags += ["toy", "shapesworld"]
    tags += [t for t in extra_tags if t not in tags]
    data = ModelCardData(
        base_model=None if local_base else base_model,  # Hub metadata takes Hub ids only; a folder is named below
        license=license or base_model_license(base_model),
        library_name="diffusers",
        pipeline_tag="text-to-image" if model_kind != "probe" else None,
        tags=tags,
        datasets=[dataset] if dataset and not os.path.exists(str(dataset)) else None,
        inference=not local_base,
    )
    base_text = f"`{base}`" + (" (a local folder)" if local_base and not toy else "")
    if toy:
        base_text = f"`{base}`, the toy Stable Diffusion of ShapesWorld bundled with diffusers-innercontrol"

    name = repo_id or os.path.basename(os.path.normpath(output_dir))
    lines = []
    if model_kind == "probe":
        lines.append(f"# InnerControl readout probe - {name}\n")
        lines.append(
            f"A `ReadoutProbe` (diffusers_innercontrol) that reads the **{task_name}** control out of the decoder "
            f"features of the UNet of {base_text} at any timestep (stage 1 of InnerControl). It is the frozen "
            "probe of the alignment loss (Eq. 7) of stage 2.\n"
        )
    else:
        what = (
            "ControlNet weights trained as LoRA adapters (fused into the ControlNet here; the adapters alone are in "
            "`lora/`)" if (use_lora or model_kind == "lora") else "ControlNet weights"
        )
        lines.append(f"# InnerControl ControlNet - {name}\n")
        lines.append(
            f"{what} for {base_text}, task **{task_name}**, trained with InnerControl's objective (Eq. 8 of "
            "\"Heeding the inner voice: aligning ControlNet training via intermediate features feedback\"):\n\n"
            "    L = L_diffusion + alpha * L_reward(t in reward window) + beta * L_alignment(t in alignment window)\n"
        )
        mode = "ControlNet (diffusion loss only)" if not alpha and not beta else (
            "ControlNet++ (reward, no alignment)" if not beta else (
                "alignment only" if not alpha else "InnerControl (reward + alignment)"))
        lines.append(f"Mode: {mode}.\n")
    if toy:
        lines.append(
            "**A ShapesWorld toy.** It was trained on ShapesWorld, procedural 64 px scenes of coloured shapes with "
            "exact controls, to make InnerControl runnable and testable on a CPU; it draws nothing else.\n"
        )
    rows = [("task", task_name), ("base model", base)]
    if model_kind != "probe":
        rows += [("alpha (reward weight)", alpha), ("beta (alignment weight)", beta),
                 ("reward window (t)", _fmt_window(reward_window)), ("alignment window (t)", _fmt_window(alignment_window))]
        if task is not None and not isinstance(task, str):
            rows += [("reward loss", task.reward_loss), ("alignment loss", task.alignment_loss)]
        rows += [("initial ControlNet", shown_name(controlnet) or "from the UNet (ControlNetModel.from_unet)"),
                 ("readout probe", shown_name(probe) or "-"), ("reward model", shown_name(reward_model) or "-")]
    else:
        if task is not None and not isinstance(task, str):
            rows += [("feature kind", task.feature_kind), ("loss", task.alignment_loss)]
        if controlnet:
            rows.append(("ControlNet conditioning", shown_name(controlnet)))
    if dataset:
        rows.append(("dataset", shown_name(dataset)))
    for key, value in (train_args or {}).items():
        if value is None:  # a setting that did not apply (e.g. the validation guidance of a run without validation)
            continue
        rows.append((key, shown_name(value) if isinstance(value, str) and os.path.isabs(value) else value))
    lines.append("## Training\n")
    lines.append("| setting | value |\n|---|---|")
    lines += [f"| {k} | `{v}` |" for k, v in rows]
    lines.append("")
    if image_files:
        lines.append("## Validation images\n")
        prompts = list(validation_prompts or [])
        for i, fname in enumerate(image_files):
            caption = prompts[i] if i < len(prompts) else ""
            lines.append(f"![{caption or fname}](./{fname})" + (f"\n*{caption}*" if caption else "") + "\n")
    lines.append("## How to use\n")
    guidance = (train_args or {}).get("validation_guidance_scale")  # the how-to samples as the validation did
    lines.append(_how_to_use(model_kind, name, base_model, task_name, toy, validation_prompts, sdxl, guidance))
    lines.append("## Limitations\n")
    if toy:
        lines.append("Only for ShapesWorld scenes at 64 px and the toy Stable Diffusion above: a demonstration and test "
                     "model, not an image model for real use.\n")
    elif model_kind == "probe":
        lines.append("The probe reads the features of the UNet it was trained on, and no other; its readouts are "
                     "coarse at the highest noise levels (see the error per timestep).\n")
    else:
        lines.append("The ControlNet follows its control only as well as its training data and steps allow; it "
                     "inherits the base model's biases and license.\n")
    if extra_text:
        lines.append(extra_text)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path


def _how_to_use(model_kind, name, base_model, task_name, toy, validation_prompts, sdxl=False, guidance_scale=None) -> str:
    """Code that runs as it is: every name it uses is defined (the control image is the user's file)."""
    guidance = "" if guidance_scale is None else f"guidance_scale={guidance_scale}, "
    family = "StableDiffusionXL" if sdxl else "StableDiffusion"
    if model_kind == "probe":
        return (
            "```py\nfrom diffusers_innercontrol import ReadoutProbe\n\n"
            f"probe = ReadoutProbe.from_pretrained(\"{name}\")\n"
            f"# with the pipeline: {family}ControlNetReadoutPipeline(..., readout_probe=probe)\n```\n"
        )
    code = ["```py", "import torch", f"from diffusers import ControlNetModel, {family}ControlNetPipeline",
            "from diffusers.utils import load_image"]
    if toy:
        code += ["from diffusers_innercontrol.toy.quickstart import bundled_path, validation_pairs", "",
                 f"controlnet = ControlNetModel.from_pretrained(\"{name}\")",
                 "pipe = StableDiffusionControlNetPipeline.from_pretrained(bundled_path(\"toy-sd\"), controlnet=controlnet, "
                 "safety_checker=None)",
                 f"(prompt,), (control_path,) = validation_pairs(\"{task_name}\", n=1)  # a held-out ShapesWorld scene",
                 "control_image = load_image(control_path)",
                 "image = pipe(prompt, image=control_image, height=64, width=64, num_inference_steps=20,",
                 f"             {guidance}generator=torch.Generator().manual_seed(0)).images[0]"]
    else:
        prompt = (list(validation_prompts or []) or ["a photograph"])[0].replace('"', "'")
        base = base_model if not os.path.exists(str(base_model)) else shown_name(base_model)
        code += ["", f"controlnet = ControlNetModel.from_pretrained(\"{name}\", torch_dtype=torch.float16)",
                 f"pipe = {family}ControlNetPipeline.from_pretrained(\"{base}\", controlnet=controlnet, "
                 "torch_dtype=torch.float16).to(\"cuda\")",
                 f"control_image = load_image(\"control.png\")  # your {task_name} control, as the task draws it",
                 f"prompt = \"{prompt}\"",
                 "image = pipe(prompt, image=control_image, num_inference_steps=20,",
                 f"             {guidance}generator=torch.Generator(\"cuda\").manual_seed(0)).images[0]"]
    code += ["image.save(\"image.png\")", "```", ""]
    return "\n".join(code)


def push_folder(
    output_dir: str,
    repo_id: Optional[str] = None,
    token: Optional[str] = None,
    private: bool = False,
    card_kwargs: Optional[Dict] = None,
    commit_message: str = "End of training",
    ignore_patterns: Optional[Sequence[str]] = None,
) -> str:
    """
    Upload `output_dir` to the Hub. With `card_kwargs` the card is (re)written first (`save_model_card`);
    either way the card in the folder is uploaded as is. Raises `HubUploadError` if the upload fails; the
    local folder is left as it was.
    """

    repo_id = repo_id or os.path.basename(os.path.normpath(output_dir))
    if card_kwargs is not None:
        save_model_card(output_dir, repo_id=repo_id, **card_kwargs)
    try:
        repo_id = create_repo(repo_id, exist_ok=True, token=token, private=private).repo_id
        info = upload_folder(
            repo_id=repo_id, folder_path=output_dir, commit_message=commit_message, token=token,
            ignore_patterns=list(DEFAULT_IGNORE if ignore_patterns is None else ignore_patterns),
        )
    except Exception as err:
        raise HubUploadError(
            f"Upload of {output_dir!r} to the Hub repo {repo_id!r} failed ({type(err).__name__}: {err}). "
            f"The model and its card are saved locally in {os.path.abspath(output_dir)}: upload that folder later "
            f"with `hf upload {repo_id} {output_dir}`."
        ) from None
    url = getattr(info, "commit_url", None) or str(info)
    logger.info(f"Uploaded {output_dir} to {repo_id}: {url}")
    return url
