"""Benchmark evaluation of trained students: ``python -m recipe.ta_opd.reproduce.evaluate TARGET ... --out DIR``.

    # GPU (the paper's protocol): EvalScope over a vLLM server, six benchmarks, five seeds
    python -m recipe.ta_opd.reproduce.evaluate $CKPT_DIR/ta_opd --out eval/ --evalscope-python .venv-eval/bin/python
    # the untrained student as the Base row of a setting
    python -m recipe.ta_opd.reproduce.evaluate Qwen/Qwen3-1.7B --hub --name qwen3_4b_to_qwen3_1p7b__base --out eval/ ...
    # CPU: the toy pair's checkpoints on its held-out task, Hugging Face generate
    python -m recipe.ta_opd.reproduce.evaluate runs/toy_sweep --backend hf --benchmarks toy_addition \\
        --dataset-file toy_addition=$TOY/data/test.parquet --max-tokens 40 --out eval/

TARGET is a checkpoint or a folder of runs:
- a Hugging Face folder (``config.json``): evaluated as is; run name = folder name or ``--name``;
- a run folder (``trainer.default_local_dir``): its latest checkpoint (``latest_checkpointed_iteration.txt``
  in it, verl's layout, or in ``checkpoints/``, the CPU backend's), or ``--step N``. A verl FSDP actor
  (``global_step_N/actor`` with ``fsdp_config.json``) is merged into a Hugging Face folder by verl's
  own merger, ``python -m verl.model_merger merge --backend fsdp``, into ``OUT/_merged/<run>/step_N``
  (once; reused); the CPU backend's ``actor/`` is already one;
- a folder whose sub-folders are run folders: each of them (a sub-folder without a checkpoint is an
  error naming it).

For every (run, benchmark, seed) it writes ``OUT/<run>/<benchmark>/seed<k>.json``: one record with
the score (%), the samples, the final-answer extraction rate, the checkpoint and step, the harness
and the generation settings (temperature, top-p, max tokens, seed; chat template on). Existing
records are kept (the command resumes) unless ``--overwrite``. ``python -m recipe.ta_opd.reproduce.results OUT``
aggregates them.

Prompts go through the student's chat template (vLLM's chat endpoint / ``apply_chat_template``; a
tokenizer without one is refused) with the benchmark's answer instruction (``\\boxed{}`` for the
math sets). A third-party reproduction of the paper evaluated base students 0-shot without a
chat template and measured MATH-500 ≈ 0.4 %, AIME ≈ 0: an artefact of answer extraction. So
every math / multiple-choice / toy evaluation checks the share of responses with an extractable
final answer, and fails loudly (exit 3, no record written) below ``--min-extraction-rate``.

Backends: ``evalscope`` (GPU): vLLM's OpenAI server (``--vllm-python``, default this interpreter)
with the checkpoint, and EvalScope (``--evalscope-python``: its own virtualenv, see
``evalscope_driver.py``) per benchmark and seed; ``hf`` (CPU): ``transformers`` generate on a local
benchmark file (``--dataset-file NAME=FILE``), graded by the toy checker or verl's MATH scorer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ta_opd.errors import TAConfigError, TAInputError
from recipe.ta_opd.grading import MIN_EXTRACTION_RATE
from recipe.ta_opd.reproduce.results import (KNOWN_BENCHMARKS, PAPER_BENCHMARKS, SCHEMA, TOY_BENCHMARK, check_benchmarks,
                            parse_run_name)

TRACKER = "latest_checkpointed_iteration.txt"
MATH_PROMPT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
# how each benchmark's final answer is found (None: no single final answer to extract)
ANSWER_FORMAT = {"aime24": "boxed", "aime25": "boxed", "math_500": "boxed", "gpqa_diamond": "choice",
                 "humaneval": None, "ifeval": None, TOY_BENCHMARK: "toy"}
HF_BENCHMARKS = ("aime24", "aime25", "math_500", TOY_BENCHMARK)  # gradable here without EvalScope


class SanityError(RuntimeError):
    """The share of responses with an extractable final answer is below the threshold."""


@dataclass(frozen=True)
class Generation:
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 8192

    def __post_init__(self):
        if not (self.temperature >= 0 and 0 < self.top_p <= 1 and self.max_tokens >= 1):
            raise TAConfigError(f"generation settings {asdict(self)} are not allowed: temperature >= 0, top_p in "
                                "(0, 1], max_tokens >= 1")


@dataclass(frozen=True)
class Target:
    run: str
    model: str          # Hugging Face folder (or hub id with --hub)
    checkpoint: str     # what was resolved (run folder / checkpoint / hub id)
    step: int | None


# ---------------------------------------------------------------- checkpoints


def _tracker_dir(run: Path) -> Path | None:
    for d in (run, run / "checkpoints"):
        if (d / TRACKER).is_file():
            return d
    return None


def _is_hf(p: Path) -> bool:
    return (p / "config.json").is_file()


def _is_fsdp_actor(p: Path) -> bool:
    return (p / "fsdp_config.json").is_file() or any(p.glob("model_world_size_*_rank_*.pt"))


def merge_fsdp(actor: Path, target: Path) -> Path:
    """verl's own merger (never a hand-written converter); cached in ``target``."""
    if _is_hf(target):
        return target
    cmd = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
           "--local_dir", str(actor), "--target_dir", str(target)]
    print("[ta-opd] evaluate: merging " + " ".join(cmd[1:]), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 or not _is_hf(target):
        raise TAInputError(f"verl's model merger failed on {actor} (exit {out.returncode}): {out.stderr[-2000:]}")
    return target


def resolve_run(run: Path, step: int | None, merged_root: Path) -> Target:
    """A run folder (or a checkpoint / HF folder) -> the HF folder to evaluate."""
    if _is_hf(run):
        return Target(run.name, str(run), str(run), None)
    if _is_fsdp_actor(run):
        return Target(run.parent.name, str(merge_fsdp(run, merged_root / run.parent.name)), str(run), None)
    d = _tracker_dir(run)
    if d is None and step is None:
        raise TAInputError(f"run folder {str(run)!r} has no checkpoints: no {TRACKER} in it or in its checkpoints/ "
                           "folder, and no Hugging Face config.json")
    d = d or (run / "checkpoints" if (run / "checkpoints").is_dir() else run)
    n = step if step is not None else int((d / TRACKER).read_text().strip())
    ckpt = d / f"global_step_{n}"
    actor = ckpt / "actor"
    if not ckpt.is_dir():
        raise TAInputError(f"run folder {str(run)!r} has no checkpoint global_step_{n} (looked in {d})")
    if _is_hf(actor):  # the CPU backend's checkpoint: already a Hugging Face folder
        return Target(run.name, str(actor), str(ckpt), n)
    if _is_fsdp_actor(actor):
        return Target(run.name, str(merge_fsdp(actor, merged_root / run.name / f"step_{n}")), str(ckpt), n)
    raise TAInputError(f"checkpoint {str(ckpt)!r} has neither a Hugging Face actor/ folder nor verl FSDP shards "
                       "(actor/fsdp_config.json)")


def resolve_targets(paths: list[str], *, step: int | None, name: str | None, hub: bool, merged_root: Path) -> list[Target]:
    if name is not None and len(paths) != 1:
        raise TAConfigError(f"--name={name!r} names one target; {len(paths)} were given")
    targets = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            if not hub:
                raise FileNotFoundError(f"target {raw!r} does not exist; a hub model id needs --hub (and --name)")
            if name is None:
                raise TAConfigError(f"hub model {raw!r} needs --name (e.g. <setting>__base)")
            targets.append(Target(name, raw, raw, None))
            continue
        if _is_hf(p) or _is_fsdp_actor(p) or _tracker_dir(p) is not None or step is not None:
            t = resolve_run(p, step, merged_root)
            targets.append(Target(name or t.run, t.model, t.checkpoint, t.step))
            continue
        subs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))
        if not subs:
            raise TAInputError(f"run folder {str(p)!r} has no checkpoints: no {TRACKER} in it or in its checkpoints/ "
                               "folder, no Hugging Face config.json, and no run sub-folders")
        if name is not None:
            raise TAConfigError(f"--name={name!r} needs a single run, but {str(p)!r} is a folder of {len(subs)} runs")
        targets += [resolve_run(d, None, merged_root) for d in subs]
    return targets


# ---------------------------------------------------------------- answers and grading


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, j = 0, i + len("\\boxed")
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None


_CHOICE = re.compile(r"ANSWER\s*:\s*\$?\(?([A-J])\b", re.I)


def extract(fmt: str | None, text: str):
    if fmt == "boxed":
        return last_boxed(text)
    if fmt == "choice":
        m = _CHOICE.findall(text)
        return m[-1] if m else None
    if fmt == "toy":
        from ta_opd.tools.toy.task import extract_answer

        return extract_answer(text)
    return None


def extraction_rate(fmt: str | None, texts: list[str]) -> float | None:
    from recipe.ta_opd.grading import share_extracted  # the share training-time grading warns on, written once

    return None if fmt is None else share_extracted(lambda t: extract(fmt, t), texts)


def sanity_check(run: str, bench: str, seed: int, rate: float | None, threshold: float) -> None:
    if rate is not None and rate < threshold:
        raise SanityError(
            f"run {run!r}, benchmark {bench!r}, seed {seed}: only {rate:.1%} of responses have an extractable final "
            f"answer ({ANSWER_FORMAT[bench]}), below --min-extraction-rate={threshold}. Scores this low usually come "
            "from the evaluation, not the model: a missing chat template, a prompt without the answer instruction, "
            "or --max-tokens cutting responses before the answer. Inspect the generations; no record was written.")


def grade(bench: str, text: str, truth) -> float:
    if bench == TOY_BENCHMARK:
        from ta_opd.tools.toy.task import is_correct

        return float(is_correct(text, truth))
    from verl.utils.reward_score import default_compute_score

    return float(default_compute_score("HuggingFaceH4/MATH-500", text, str(truth)))


# ---------------------------------------------------------------- benchmark files (hf backend)


def load_items(bench: str, path: str) -> list[tuple[list[dict], str]]:
    """(chat messages, ground truth) per item of a local benchmark file."""
    import pandas as pd

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--dataset-file {bench}={path} does not exist")
    df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_json(p, lines=p.suffix == ".jsonl")
    if "prompt" in df.columns and "reward_model" in df.columns:  # verl layout (the toy task's files)
        return [([dict(m) for m in pr], str(dict(rm)["ground_truth"])) for pr, rm in zip(df["prompt"], df["reward_model"])]
    q = next((c for c in ("problem", "question", "Problem") if c in df.columns), None)
    a = next((c for c in ("answer", "Answer") if c in df.columns), None)
    if q is None or a is None:
        raise TAInputError(f"--dataset-file {bench}={path}: columns {list(df.columns)} have no problem/answer pair "
                           "and are not verl's layout (prompt, reward_model)")
    return [([{"role": "user", "content": MATH_PROMPT.format(problem=x)}], str(y)) for x, y in zip(df[q], df[a])]


def load_hf(model_path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if not tok.chat_template:
        raise TAInputError(f"{model_path}: the tokenizer has no chat template; evaluating a chat student without its "
                           "template measures answer extraction, not the model (refused)")
    tok.padding_side = "left"
    return tok, AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def generate_hf(tok, model, items, gen: Generation, seed: int, batch: int = 16) -> list[str]:
    import torch

    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in items]
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=gen.max_tokens, do_sample=gen.temperature > 0,
                                 temperature=gen.temperature if gen.temperature > 0 else None,
                                 top_p=gen.top_p if gen.temperature > 0 else None, top_k=None,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # (B, P + new)
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


# ---------------------------------------------------------------- EvalScope over vLLM (GPU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """vLLM's OpenAI-compatible server for one model; its chat endpoint applies the chat template."""

    def __init__(self, model: str, name: str, python: str, tp: int, max_model_len: int, timeout: float = 1800):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", name,
               "--port", str(self.port), "--tensor-parallel-size", str(tp), "--max-model-len", str(max_model_len),
               "--seed", "0"]
        print("[ta-opd] evaluate: starting " + " ".join(cmd[1:]), flush=True)
        self.proc = subprocess.Popen(cmd)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server for {model} exited with code {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.url + "/models", timeout=5)
                return
            except OSError:
                time.sleep(5)
        self.close()
        raise RuntimeError(f"the vLLM server for {model} did not come up within {timeout:.0f} s")

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def evalscope_task(run: str, url: str, bench: str, seed: int, gen: Generation, work_dir: Path,
                   local_path: str | None, limit: int | None) -> dict:
    """The driver's arguments: EvalScope TaskConfig fields for one (benchmark, seed)."""
    return {"model": run, "api_url": url, "dataset": bench, "seed": seed, "work_dir": str(work_dir),
            "local_path": local_path, "limit": limit,
            "generation": {"temperature": gen.temperature, "top_p": gen.top_p, "max_tokens": gen.max_tokens,
                           "seed": seed, "n": 1}}


def run_evalscope(python: str, task: dict) -> dict:
    driver = Path(__file__).with_name("evalscope_driver.py")
    out = subprocess.run([python, str(driver), json.dumps(task)], capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines()[::-1] if ln.startswith("TA_OPD_RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"EvalScope failed on {task['dataset']} seed {task['seed']} (exit {out.returncode}): "
                           f"{out.stderr[-3000:]}")
    res = json.loads(line[len("TA_OPD_RESULT "):])
    if res["score"] is None:
        raise RuntimeError(f"EvalScope reported no primary metric for {task['dataset']} seed {task['seed']}")
    return res


# ---------------------------------------------------------------- the command


def record(target: Target, bench: str, seed: int, score: float, n: int, rate: float | None, harness: str,
           backend: str, gen: Generation) -> dict:
    return {"schema": SCHEMA, "run": target.run, "benchmark": bench, "seed": seed, "score": score, "n": n,
            "extraction_rate": rate, "answer_format": ANSWER_FORMAT[bench], "checkpoint": target.checkpoint,
            "step": target.step, "model": target.model, "harness": harness, "backend": backend,
            "chat_template": True, "generation": {**asdict(gen), "n": 1}, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def evaluate(a) -> list[Path]:
    benches = check_benchmarks(a.benchmarks)
    files = dict(s.split("=", 1) if "=" in s else (s, "") for s in a.dataset_file)
    bad = [k for k, v in files.items() if k not in KNOWN_BENCHMARKS or not v]
    if bad:
        raise TAConfigError(f"--dataset-file {bad[0]!r}: use NAME=FILE with NAME one of {', '.join(KNOWN_BENCHMARKS)}")
    if a.backend == "hf":
        bad = [b for b in benches if b not in HF_BENCHMARKS or b not in files]
        if bad:
            raise TAConfigError(f"benchmark {bad[0]!r} cannot run on --backend hf: it grades {', '.join(HF_BENCHMARKS)} "
                                "from a local --dataset-file NAME=FILE; the others need --backend evalscope")
    if a.api_url is not None and (a.backend != "evalscope" or len(a.targets) != 1 or a.name is None):
        raise TAConfigError(f"--api-url={a.api_url!r} evaluates the model served there: it needs --backend evalscope, "
                            "one target and --name (the served model name)")
    if a.backend == "evalscope" and a.evalscope_python is None:
        raise TAConfigError("--backend evalscope needs --evalscope-python: the interpreter of a virtualenv with "
                            "evalscope (it cannot share verl's; see docs/reproduce.md)")
    if not 0.0 <= a.min_extraction_rate <= 1.0:
        raise TAConfigError(f"--min-extraction-rate={a.min_extraction_rate} is not allowed; it is a share in [0, 1]")
    if not a.seeds or len(set(a.seeds)) != len(a.seeds):
        raise TAConfigError(f"--seeds {a.seeds} must be a non-empty list without repeats")
    gen = Generation(a.temperature, a.top_p, a.max_tokens)
    items = {b: load_items(b, files[b])[:a.limit] for b in benches} if a.backend == "hf" else {}
    out = Path(a.out)
    targets = resolve_targets(a.targets, step=a.step, name=a.name, hub=a.hub, merged_root=out / "_merged")
    for t in targets:
        try:
            parse_run_name(t.run)
        except (TAInputError, TAConfigError) as e:
            print(f"[ta-opd] warning: {e}; python -m recipe.ta_opd.reproduce.results will refuse its records (rename the run folder "
                  "or pass --name)", file=sys.stderr)
    written = []
    for t in targets:
        todo = [(b, s) for b in benches for s in a.seeds
                if a.overwrite or not (out / t.run / b / f"seed{s}.json").exists()]
        print(f"[ta-opd] evaluate: {t.run} ({t.model}): {len(todo)} of {len(benches) * len(a.seeds)} "
              "(benchmark, seed) pairs to run", flush=True)
        if not todo:
            continue
        server = hf = None
        try:
            if a.backend == "evalscope":
                url = a.api_url or None
                if url is None:
                    server = VLLMServer(t.model, t.run, a.vllm_python, a.tensor_parallel_size, a.max_model_len)
                    url = server.url
            else:
                hf = load_hf(t.model)
            for bench, seed in todo:
                path = out / t.run / bench / f"seed{seed}.json"
                if a.backend == "hf":
                    texts = generate_hf(*hf, items[bench], gen, seed)
                    truths = [truth for _, truth in items[bench]]
                    scores = [grade(bench, x, truth) for x, truth in zip(texts, truths)]
                    _write(path.with_name(f"seed{seed}.generations.json"),
                           [{"response": x, "ground_truth": y, "score": sc} for x, y, sc in zip(texts, truths, scores)])
                    score, harness = 100.0 * sum(scores) / len(scores), "ta_opd.hf"
                else:
                    task = evalscope_task(t.run, url, bench, seed, gen, path.with_name(f"seed{seed}_evalscope"),
                                          files.get(bench), a.limit)
                    res = run_evalscope(a.evalscope_python, task)
                    texts, score, harness = res["completions"], 100.0 * res["score"], f"evalscope {res['evalscope_version']}"
                rate = extraction_rate(ANSWER_FORMAT[bench], texts)
                sanity_check(t.run, bench, seed, rate, a.min_extraction_rate)
                _write(path, record(t, bench, seed, score, len(texts), rate, harness,
                                    "vllm" if a.backend == "evalscope" else "hf", gen))
                written.append(path)
                print(f"[ta-opd] evaluate: {t.run} {bench} seed {seed}: {score:.2f} % "
                      f"(n={len(texts)}, extraction {'n/a' if rate is None else f'{rate:.1%}'})", flush=True)
        finally:
            if server is not None:
                server.close()
    return written


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="benchmark evaluation of checkpoints (one record per run, benchmark, seed)")
    p.add_argument("targets", nargs="+", help="run folder(s), a folder of runs, a checkpoint or a Hugging Face folder")
    p.add_argument("--out", required=True, help="output folder of the result records")
    p.add_argument("--benchmarks", nargs="+", default=list(PAPER_BENCHMARKS), help="EvalScope dataset names")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="evaluation seeds [0 1 2 3 4]")
    p.add_argument("--backend", choices=("evalscope", "hf"), default="evalscope")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--name", default=None, help="run name of a single target (e.g. <setting>__base)")
    p.add_argument("--hub", action="store_true", help="a target that is not a local path is a hub model id")
    p.add_argument("--dataset-file", nargs="+", default=[], metavar="NAME=PATH",
                   help="offline benchmark data: a parquet/jsonl file (hf backend), or a local copy of the benchmark's "
                        "dataset folder as on the hub, e.g. DIR/test.jsonl (evalscope backend)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=8192, help="new tokens per response [8192]")
    p.add_argument("--limit", type=int, default=None, help="first N items of each benchmark (smoke tests)")
    p.add_argument("--min-extraction-rate", type=float, default=MIN_EXTRACTION_RATE,
                   help="fail when fewer responses have an extractable final answer [%(default)s]; 0 disables")
    p.add_argument("--overwrite", action="store_true", help="re-run (run, benchmark, seed) records that exist")
    p.add_argument("--evalscope-python", default=None, help="python of the EvalScope virtualenv (evalscope backend)")
    p.add_argument("--vllm-python", default=sys.executable, help="python with vLLM (evalscope backend)")
    p.add_argument("--api-url", default=None,
                   help="an OpenAI-compatible server already serving the model as --name (instead of starting vLLM)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=10240, help="vLLM context: prompt + --max-tokens [10240]")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    try:
        written = evaluate(a)
    except SanityError as e:
        print(f"[ta-opd] SANITY CHECK FAILED: {e}", file=sys.stderr)
        return 3
    except (TAConfigError, TAInputError, FileNotFoundError) as e:
        print(f"[ta-opd] error: {e}", file=sys.stderr)
        return 2
    print(f"[ta-opd] evaluate: wrote {len(written)} record(s) under {a.out}; aggregate with python -m recipe.ta_opd.reproduce.results {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
