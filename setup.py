from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dino_sparo",
    version="0.1.0",
    description="Self-supervised Vision Transformers (DINO, CLIP) with SPARO read-outs",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dino_sparo", "dino_sparo.*"]),
    # Ranges, not pins: the package must install beside an existing (GPU) build of torch.
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "timm>=1.0.23",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "pillow>=9.0",
        "tqdm>=4.60",
        "submitit>=1.5",
        "faiss-cpu>=1.8",
        "matplotlib>=3.7",
    ],
    extras_require={
        "gpu": ["xformers>=0.0.35", "faiss-gpu>=1.8"],
        "clip": ["open_clip_torch>=2.24", "webdataset>=0.2"],
        # xformers in dev too where its wheel exists: it imports beside a CPU torch, so the tests that emulate
        # its kernel on the CPU (packed crops = one forward per crop size) run everywhere
        "dev": ["pytest>=8", "pytest-timeout>=2.2",
                "xformers>=0.0.35; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "tensorboard": ["tensorboard>=2.14"],
    },
    entry_points={
        "console_scripts": [
            "dino-sparo-train=dino_sparo.cli.train:main",
            "dino-sparo-bench=dino_sparo.cli.bench:main",
            "dino-sparo-knn=dino_sparo.cli.knn:main",
            "dino-sparo-linear=dino_sparo.cli.linear:main",
            "dino-sparo-submit=dino_sparo.cli.submit:main",
            "dino-sparo-zeroshot=dino_sparo.cli.zeroshot:main",
            "dino-sparo-sugarcrepe=dino_sparo.cli.sugarcrepe:main",
            "dino-sparo-scenes=dino_sparo.cli.scenes:main",
            "dino-sparo-visualize=dino_sparo.cli.visualize:main",
            "dino-sparo-gpu-check=dino_sparo.cli.gpu_check:main",
            "dino-sparo-export=dino_sparo.cli.export:main",
        ],
    },
)
