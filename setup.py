# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
from setuptools import find_packages, setup

extras = {
    # ControlNet annotators (HED, LineArt) for rewards, on-the-fly controls and evaluation.
    "annotators": ["controlnet_aux==0.0.10"],
    "train": ["tensorboard", "peft>=0.17", "datasets>=3.0"],
    "eval": ["torchmetrics[image]>=1.4", "scipy>=1.11"],  # scipy 1.11: the Welch test's df and interval
}
extras["test"] = ["pytest>=8", "pytest-timeout", "ruff>=0.17,<0.18"] + extras["train"] + extras["eval"] + extras["annotators"]
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})

setup(
    name="diffusers-innercontrol",
    version="0.1.0",
    description="InnerControl for diffusers: readout probes and ControlNet training with alignment and reward losses",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    # the bundled ShapesWorld models (toy/quickstart.py): toy SD, per-task ControlNets, probes and reward models
    package_data={"diffusers_innercontrol": ["toy/assets/shapesworld/**/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.42.1,<0.43",
        "transformers>=5.0",
        "accelerate>=1.0",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "numpy",
        "Pillow",
        "tqdm",
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["innercontrol-tiny=diffusers_innercontrol.toy.tiny:main"]},
)
