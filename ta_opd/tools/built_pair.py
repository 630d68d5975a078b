"""A teacher-student pair built into one folder, and the verl row of its task data.

Both builders write this layout (the toy, ``ta_opd/tools/toy/build.py``; the real LM,
``ta_opd/tools/real_pair/build.py``): ``<root>/teacher``, ``<root>/student`` (Hugging Face
folders), ``<root>/data/{train,val,test}.parquet`` (verl's dataset layout) and a manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltPair:
    root: Path
    teacher: Path
    student: Path
    train_file: Path
    val_file: Path
    test_file: Path
    manifest: dict

    @classmethod
    def at(cls, root: Path, manifest: dict) -> BuiltPair:
        data = root / "data"
        return cls(root, root / "teacher", root / "student", data / "train.parquet", data / "val.parquet",
                   data / "test.parquet", manifest)


def verl_row(data_source: str, prompt: str, answer, split: str, index: int, **extra) -> dict:
    """One row of verl's dataset layout: chat-message prompt, data_source, rule-based ground truth;
    ``extra`` goes to ``extra_info`` beside the split and index."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": prompt}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(answer)},
        "extra_info": {"split": split, "index": index, **extra},
    }
