"""Install cpcluster under one import namespace.

The repository keeps the top-level folders ``jobs/``, ``sharding/`` and ``aggregate/`` (the layout users asked
for); they are installed as ``cpcluster.jobs``, ``cpcluster.sharding`` and ``cpcluster.aggregate`` so nothing with a
generic name lands in site-packages.
"""
from setuptools import setup

setup(
    name="cpcluster",
    version="0.1.0",
    description="Consistency Purification certification and fine-tuning at cluster scale (SLURM, DDP)",
    python_requires=">=3.10",
    packages=[
        "cpcluster",
        "cpcluster.cli",
        "cpcluster.orchestrate",
        "cpcluster.core",
        "cpcluster.models",
        "cpcluster.models.archs",
        "cpcluster.convert",
        "cpcluster.demo",
        "cpcluster.util",
        "cpcluster.jobs",
        "cpcluster.sharding",
        "cpcluster.aggregate",
    ],
    package_dir={
        "cpcluster": "cpcluster",
        "cpcluster.jobs": "jobs",
        "cpcluster.sharding": "sharding",
        "cpcluster.aggregate": "aggregate",
    },
    package_data={"cpcluster.demo": ["*.safetensors", "*.json"], "cpcluster": ["cluster/*.sh"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.24",
        "scipy>=1.11",
        "h5py>=3.8",
        "fsspec>=2023.6",
        "click>=8.1",
        "submitit>=1.5",
        "lpips>=0.1.4",
        "safetensors>=0.4",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "scikit-learn>=1.2",
    ],
    extras_require={
        "diffusers": ["diffusers>=0.25"],
        "timm": ["timm>=0.9"],
        "convert": ["msgpack>=1.0"],  # cpcluster convert flax-ncsnpp (Flax checkpoints, read without jax)
        "quality": ["torch-fidelity>=0.3"],  # cpcluster quality: FID's Inception network
        "test": ["pytest>=7", "hypothesis>=6", "statsmodels>=0.14", "pot>=0.9"],  # pot: the transport reference
    },
    entry_points={"console_scripts": ["cpcluster=cpcluster.cli:main"]},
)
