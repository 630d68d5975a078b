"""Build (once, resumably) and locate the real-LM pair: student = SmolLM2-135M-Instruct as
published (fp32), teacher = the same model fine-tuned on the arithmetic task of
``ta_opd.tools.real_pair.task``. ``python -m ta_opd.tools.real_pair.build [--cache-dir DIR]
[--print-root]``; docs/real_lm.md has the measured numbers.

Layout under ``<cache_dir>/<key>/`` (``$TA_OPD_CACHE/real_pair`` or ``~/.cache/ta_opd/real_pair``;
the key hashes the spec, the source model and ``BUILD_RECIPE``):

    student/, teacher/     Hugging Face folders (fp32 safetensors, tokenizer with EOS/pad fixed)
    data/{train,val,test}.parquet   verl's dataset layout (task.to_rows)
    manifest.json          spec, source, license, accuracies (greedy and T = 1), SFT losses, timings

Phases, each written to a temporary name and renamed into ``<key>.partial/`` when complete, so a
killed build resumes where it stopped: data → student → prefix features → SFT (a checkpoint of
the trainable parameters and AdamW state every ``ckpt_every`` steps) → teacher → the four
evaluations → manifest; then ``<key>.partial`` becomes ``<key>``. One build per key at a time
(a lock file).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ta_opd.tools.built_pair import BuiltPair
from ta_opd.tools.real_pair import load, sft, task
from ta_opd.tools.real_pair.checkpoint import load_sft_checkpoint, save_sft_checkpoint, write_atomic
from ta_opd.tools.real_pair.evaluate import evaluate

DEFAULT_CACHE = Path(os.environ.get("TA_OPD_CACHE", Path.home() / ".cache" / "ta_opd")) / "real_pair"
BUILD_RECIPE = 1  # bump when the build procedure changes: an old cache is never reused for a new recipe


@dataclass(frozen=True)
class RealPairSpec:
    version: int = 1
    n_train: int = 2000  # OPD training prompts; the first n_sft of them are the teacher's SFT problems
    n_val: int = 100
    n_test: int = 100  # held-out problems of the accuracies in the manifest
    n_sft: int = 320
    n_frozen: int = 24  # bottom layers (and embeddings, tied LM head) frozen; SmolLM2-135M has 30
    sft_steps: int = 100
    batch_size: int = 8
    lr: float = 3e-4
    warmup: int = 10
    ckpt_every: int = 10
    eval_batch_size: int = 50
    eval_slack_tokens: int = 8  # greedy/sampled max_new_tokens = the longest test solution + this
    min_margin: float = 0.2  # the teacher must beat the student's greedy test accuracy by this much
    seed: int = 0

    def __post_init__(self):
        positive = ("n_train", "n_val", "n_test", "n_sft", "sft_steps", "batch_size", "ckpt_every", "eval_batch_size")
        bad = [f"{k}={getattr(self, k)}" for k in positive if getattr(self, k) < 1]
        if bad:
            raise ValueError(f"RealPairSpec: {', '.join(bad)} not allowed; each must be >= 1")
        if self.n_sft > self.n_train:
            raise ValueError(f"RealPairSpec: n_sft={self.n_sft} > n_train={self.n_train}; the SFT problems are the "
                             "first n_sft training problems")
        if self.n_frozen < 0 or self.eval_slack_tokens < 0 or not 0 <= self.min_margin < 1:
            raise ValueError(f"RealPairSpec: n_frozen={self.n_frozen}, eval_slack_tokens={self.eval_slack_tokens} "
                             f"must be >= 0 and min_margin={self.min_margin} in [0, 1)")
        sft.SFTConfig(self.sft_steps, self.batch_size, self.lr, self.warmup, self.seed)  # validates those

    def sft_config(self) -> sft.SFTConfig:
        return sft.SFTConfig(self.sft_steps, self.batch_size, self.lr, self.warmup, self.seed)


@dataclass(frozen=True)
class Source:
    """Where the student comes from: ``load()`` -> (fp32 model, tokenizer with EOS/pad fixed)."""

    name: str
    load: Callable[[], tuple]
    license: str


PUBLISHED = Source(f"{load.MODEL_NAME} ({load.GGUF_FILE} from {load.PACKAGE_PIN}, dequantized to fp32)",
                   load.load_published, load.LICENSE)


def cache_key(spec: RealPairSpec, source: Source) -> str:
    blob = json.dumps({"spec": asdict(spec), "source": source.name, "build_recipe": BUILD_RECIPE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


RealPair = BuiltPair  # the real pair's folders (ta_opd/tools/built_pair.py)


def _paths(root: Path) -> RealPair:
    return RealPair.at(root, json.loads((root / "manifest.json").read_text()))


def build_cached(cache_dir: str | Path | None = None, spec: RealPairSpec = RealPairSpec(), source: Source = PUBLISHED,
                 log=print) -> RealPair:
    """The pair from ``<cache_dir>/<key>/``; built there first (resuming ``<key>.partial/``) if absent."""
    root = Path(cache_dir or DEFAULT_CACHE).expanduser() / cache_key(spec, source)
    if (root / "manifest.json").exists():
        log(f"real pair: using cache {root}")
        return _paths(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root.with_name(root.name + ".lock")):
        if not (root / "manifest.json").exists():  # another build may have finished while we waited
            work = root.with_name(root.name + ".partial")
            log(f"real pair: building in {work} (resumable; phases already there are kept)")
            work.mkdir(exist_ok=True)
            _Build(work, spec, source, log).run()
            os.replace(work, root)
    return _paths(root)


@contextmanager
def _lock(path: Path):
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another process is building this pair (lock {path}); wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Build:
    def __init__(self, work: Path, spec: RealPairSpec, source: Source, log):
        self.work, self.spec, self.source, self.log = work, spec, source, log
        self.timings_file = work / "timings.json"
        self.timings = json.loads(self.timings_file.read_text()) if self.timings_file.exists() else {}
        self._student = None

    def _timed(self, name: str, path: Path, write: Callable[[Path], None]) -> None:
        if path.exists():
            return
        t0 = time.time()
        self.log(f"real pair: phase {name}")
        write_atomic(path, write)
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - t0
        self.timings_file.write_text(json.dumps(self.timings, indent=2))

    def run(self) -> None:
        s, w = self.spec, self.work
        self.splits = _splits(s)
        self._timed("data", w / "data", self._write_data)
        self._timed("student", w / "student", self._write_student)
        self._timed("features", w / "features.safetensors", self._write_features)
        self._timed("sft", w / "sft_done.json", self._write_sft)
        self._timed("teacher", w / "teacher", self._write_teacher)
        (w / "eval").mkdir(exist_ok=True)
        for who in ("student", "teacher"):
            for temp in (0.0, 1.0):
                name = f"{who}_{'greedy' if temp == 0 else 'sampled_t1'}"
                self._timed(f"eval_{name}", w / "eval" / f"{name}.json", lambda p, who=who, t=temp: self._write_eval(p, who, t))
        write_atomic(w / "manifest.json", lambda p: p.write_text(json.dumps(self._manifest(), indent=2)))

    # --- phases -------------------------------------------------------------------------------
    def _write_data(self, out: Path) -> None:
        import pandas as pd

        (out).mkdir()
        for name, probs in self.splits.items():
            pd.DataFrame(task.to_rows(probs, name)).to_parquet(out / f"{name}.parquet")

    def _write_student(self, out: Path) -> None:
        model, tok = self.source.load()
        model.save_pretrained(out)  # safetensors, fp32
        tok.save_pretrained(out)

    def student(self):
        """(model, tokenizer) loaded from student/ (a fresh copy each call is not needed: cached)."""
        if self._student is None:
            self._student = _load_folder(self.work / "student")
        return self._student

    def examples(self) -> list[sft.Example]:
        _, tok = self.student()
        return sft_examples(tok, self.splits["train"][:self.spec.n_sft])

    def _write_features(self, out: Path) -> None:
        from safetensors.torch import save_file

        model, tok = self.student()
        feats = sft.prefix_features(model, self.examples(), self.spec.n_frozen, tok.pad_token_id, log=self.log)
        save_file({"features": torch.cat(feats), "lengths": torch.tensor([len(f) for f in feats])}, str(out))

    def _features(self) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        t = load_file(str(self.work / "features.safetensors"))
        return list(torch.split(t["features"], t["lengths"].tolist()))  # each (L_i, H)

    def _write_sft(self, out: Path) -> None:
        model, _ = self.student()
        cfg, ckpt = self.spec.sft_config(), self.work / "sft_ckpt"
        params = sft.trainable_parameters(model, self.spec.n_frozen)
        opt, sched = sft.make_optimizer(params, cfg)
        start, losses = load_sft_checkpoint(ckpt, params, opt, sched)
        if start:
            self.log(f"real pair: resuming SFT at step {start}/{cfg.steps}")
        feats, examples = self._features(), self.examples()
        while start < cfg.steps:
            stop = min(cfg.steps, start + self.spec.ckpt_every)
            losses += sft.train_steps(model, params, opt, sched, feats, examples, self.spec.n_frozen, cfg, start, stop,
                                      log=self.log)
            save_sft_checkpoint(ckpt, params, opt, stop, losses)
            start = stop
        for p in model.parameters():
            p.requires_grad_(False)
        out.write_text(json.dumps({"losses": losses, "trainable_params": sum(p.numel() for p in params)}))

    def _write_teacher(self, out: Path) -> None:
        model, tok = self.student()  # the student copy in memory; the trained parameters come from the checkpoint
        params = sft.trainable_parameters(model, self.spec.n_frozen)
        load_sft_checkpoint(self.work / "sft_ckpt", params, None, None)
        for p in model.parameters():
            p.requires_grad_(False)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        self._student = None  # the in-memory model is now the teacher: reload the student when needed

    def _write_eval(self, out: Path, who: str, temperature: float) -> None:
        model, tok = _load_folder(self.work / who)
        res = evaluate(model, tok, self.splits["test"], temperature=temperature, seed=self.spec.seed,
                       batch_size=self.spec.eval_batch_size, max_new_tokens=self.max_new_tokens(tok))
        self.log(f"real pair: {who} accuracy at temperature {temperature:g}: {res['accuracy']:.3f} "
                 f"({res['correct']}/{res['n']}, {res['seconds']:.0f} s)")
        out.write_text(json.dumps(res, indent=2))

    def max_new_tokens(self, tok) -> int:
        longest = max(len(tok(task.solution(p), add_special_tokens=False)["input_ids"]) for p in self.splits["test"])
        return longest + 1 + self.spec.eval_slack_tokens  # + EOS

    def _manifest(self) -> dict:
        ev = {p.stem: json.loads(p.read_text()) for p in sorted((self.work / "eval").glob("*.json"))}
        acc = {k: v["accuracy"] for k, v in ev.items()}
        sft_info = json.loads((self.work / "sft_done.json").read_text())
        losses = sft_info["losses"]
        k = max(1, min(10, len(losses)))
        margin = acc["teacher_greedy"] - acc["student_greedy"]
        _, tok = _load_folder(self.work / "student", model=False)
        if margin < self.spec.min_margin:
            self.log(f"real pair: WARNING the teacher is not clearly better: greedy {acc['teacher_greedy']:.3f} vs "
                     f"student {acc['student_greedy']:.3f} (margin {margin:.3f} < min_margin {self.spec.min_margin}); "
                     "raise sft_steps")
        return {"spec": asdict(self.spec), "key": cache_key(self.spec, self.source), "build_recipe": BUILD_RECIPE,
                "source": self.source.name, "license": self.source.license, "data_source": task.DATA_SOURCE,
                "student": "the source model as published", "teacher": (
                    f"the source model with its top layers (above layer {self.spec.n_frozen}) and final norm fine-tuned "
                    f"on {self.spec.n_sft} training problems' solutions; embeddings and the tied LM head frozen"),
                "trainable_params": sft_info["trainable_params"],
                "eos_token": tok.eos_token, "pad_token": tok.pad_token, "vocab_size": len(tok),
                "accuracy_test": acc, "teacher_margin_greedy": margin, "teacher_clearly_better": margin >= self.spec.min_margin,
                "eval": {k2: {x: v[x] for x in ("n", "correct", "temperature", "max_new_tokens", "seconds", "samples")}
                         for k2, v in ev.items()},
                "sft_loss_first10": sum(losses[:k]) / k, "sft_loss_last10": sum(losses[-k:]) / k,
                "seconds": {**self.timings, "total": sum(self.timings.values())},
                "build_environment": {"torch": torch.__version__, "threads": torch.get_num_threads()}}


def _splits(spec: RealPairSpec) -> dict[str, list[task.Problem]]:
    train = task.make_split(spec.n_train, spec.seed + 1)
    seen = {p.prompt for p in train}
    val = task.make_split(spec.n_val, spec.seed + 2, exclude=seen)
    seen |= {p.prompt for p in val}
    return {"train": train, "val": val, "test": task.make_split(spec.n_test, spec.seed + 3, exclude=seen)}


def sft_examples(tok, problems: list[task.Problem]) -> list[sft.Example]:
    """Chat-template prompt + solution + EOS (``<|im_end|>`` after the fix) per problem."""
    from ta_opd.rollout import encode_prompt

    out = []
    for p in problems:
        prompt = encode_prompt(tok, [{"role": "user", "content": p.prompt}])
        resp = tok(task.solution(p), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(sft.Example(prompt + resp, len(prompt)))
    return out


def _load_folder(path: Path, model: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not model:
        return None, tok
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="build (once, resumably) or locate the real-LM teacher-student pair")
    p.add_argument("--cache-dir", default=None, help=f"default {DEFAULT_CACHE}")
    p.add_argument("--print-root", action="store_true", help="print only the pair's folder")
    a = p.parse_args(argv)
    import sys

    log = (lambda m: print(m, file=sys.stderr, flush=True)) if a.print_root else (lambda m: print(m, flush=True))
    pair = build_cached(a.cache_dir, log=log)
    if a.print_root:
        print(pair.root)
        return
    print(json.dumps({k: str(v) for k, v in asdict(pair).items() if k != "manifest"}, indent=2))
    print(json.dumps({k: pair.manifest[k] for k in ("accuracy_test", "teacher_clearly_better", "seconds", "license")},
                     indent=2))


if __name__ == "__main__":
    main()
