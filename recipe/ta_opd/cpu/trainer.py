"""The CPU backend's driver: the TA-OPD step of the verl recipe, end to end on CPU.

Per step: G samples per prompt from the student (temperature from the rollout config, KV
cache) -> the student's old log-prob pass (full logits) -> teacher top-K' outputs (plus its
log-probs at the student's top-K when compatibility is exact) -> statistics -> normalization
and selection over the WHOLE batch -> one PG-OPD optimizer step on the kept positions ->
periodic evaluation on held-out prompts (task accuracy graded by data_source, and the held-out
teacher–student KL). Checkpoints are atomic and resumable.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from recipe.ta_opd import runlock
from recipe.ta_opd.cpu import checkpoint, console, identity, preflight, report
from recipe.ta_opd.cpu.data import PromptStream, load_rows
from recipe.ta_opd.cpu.evaluate import (MIN_STABLE_PROMPTS, greedy_texts, heldout_change, heldout_metrics,
                                       heldout_sums, sample_heldout)
from recipe.ta_opd.cpu.step import score_batch, update
from recipe.ta_opd.grading import MIN_EXTRACTION_RATE, Grader
from ta_opd.config import TAConfig
from ta_opd.tools import kept_tokens
from ta_opd.tools.diagnose import bank
from ta_opd.errors import TAConfigError
from ta_opd.metrics import kept_advantage_metrics
from ta_opd.rollout import encode_prompt, generate, special_ids
from ta_opd.vocab import shared_vocab_size


@dataclass(frozen=True)
class CPURunConfig:
    """One CPU run, as ``cpu/plan.py`` builds it from the Hydra config (every field checked there,
    once; its KNOBS table names each field's Hydra key)."""

    student_path: str
    teacher_path: str
    train_file: str
    val_file: str
    test_file: str | None
    out_dir: str
    prompts_per_step: int
    n_samples: int  # G rollouts per prompt
    max_response_length: int
    temperature: float
    total_steps: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    test_freq: int  # evaluate every this many steps (<= 0: only before and after)
    save_freq: int  # checkpoint every this many steps (<= 0: only at the end)
    resume_mode: str  # auto | disable
    seed: int
    eval_size: int  # held-out problems per evaluation
    project: str
    experiment: str
    loggers: tuple[str, ...]
    ta: TAConfig = field(default_factory=TAConfig)
    rollout_dir: str | None = None  # write each step's rollouts here (context-bank schema)
    vocab_mismatch_ok_ids: tuple[int, ...] = ()  # token ids explicitly allowed to differ between tokenizers
    pair: str = "the CPU toy"  # which teacher-student pair, for titles and summary.json
    heldout_kl_prompts: int = 64  # validation prompts of the held-out KL (first n of the validation set)
    eval_batch_size: int = 256  # sequences per evaluation forward / generation batch
    chat_template_kwargs: dict = field(default_factory=dict)  # data.apply_chat_template_kwargs (verl's key)
    max_ckpt_to_keep: int | None = None  # newest checkpoints kept (trainer.max_actor_ckpt_to_keep; None: all)
    token_export: bool = False  # every step's per-token numbers to <out_dir>/tokens/step_<n>.parquet
    wandb_histogram: bool = True  # the selector score's W&B histogram each step (when wandb is a logger)
    gradient_checkpointing: bool = False  # recompute activations in the update's backward (verl's key; same gradient)


def _load(path: str, key: str = "model path"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise TAConfigError(f"{key}={path} holds no config.json: give a Hugging Face model folder "
                            "(config.json, weights, tokenizer files)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


class CPUTrainer:
    def __init__(self, cfg: CPURunConfig, tracker=None, log=print, grader: Grader | None = None):
        self.cfg, self.log = cfg, log
        self.student, self.tok = _load(cfg.student_path, "actor_rollout_ref.model.path")
        self.teacher, t_tok = _load(cfg.teacher_path, "ta_opd.teacher_model_path")
        preflight.check_finite_weights(self.student, "actor_rollout_ref.model.path")
        preflight.check_finite_weights(self.teacher, "ta_opd.teacher_model_path")
        self.vocab_size = check_vocab(self.tok, t_tok, self.student, self.teacher, cfg.vocab_mismatch_ok_ids)
        cfg.ta.check_vocab(self.vocab_size)
        self.special = special_ids(self.tok, self.student.generation_config, name=cfg.student_path)
        if self.special.pad_is_eos:
            log(f"[ta-opd] the tokenizer has no pad token: padding with the EOS id {self.special.pad_id} "
                "(padding is masked out everywhere)")
        self.grader = grader or Grader(log=log)
        self.train_rows = load_rows(cfg.train_file)
        self.val_rows = load_rows(cfg.val_file)[: cfg.eval_size]
        self.test_rows = load_rows(cfg.test_file)[: cfg.eval_size] if cfg.test_file else self.val_rows
        self._prompt_ids: dict[int, list[int]] = {}  # id(row) -> chat-templated prompt ids, encoded once
        self.stream = PromptStream(self.train_rows, cfg.prompts_per_step, cfg.seed)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=cfg.betas)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.step = 0  # completed optimizer steps
        self.history: list[dict] = []
        self.before: dict = {}
        self.heldout_set: dict | None = None  # the fixed held-out samples (+ their "before" sums), see heldout()
        self.heldout_last: dict | None = None  # per-prompt sums of this session's latest held-out evaluation
        self.extraction: dict[str, float | None] = {}  # extraction rates of the before/after evaluations
        self.wall_before = 0.0  # wall seconds of earlier sessions of this run (from the checkpoint)
        self.session_start = time.perf_counter()
        self.tracker = tracker
        self._warned_wandb = False
        self.ckpt_dir = Path(cfg.out_dir) / "checkpoints"
        self.identity = identity.of(cfg)  # stored with each checkpoint; a resume must match it

    # --- state -----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "model": self.student.state_dict(), "optimizer": self.opt.state_dict(),
                "sampler_rng": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
                "stream": self.stream.state_dict(), "history": self.history, "before": self.before,
                "identity": self.identity, "heldout": self.heldout_set, "extraction": self.extraction,
                "wall_seconds": self.wall_before + time.perf_counter() - self.session_start}

    def load_state(self, s: dict) -> None:
        self.step = int(s["step"])
        self.student.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.gen.set_state(s["sampler_rng"])
        torch.set_rng_state(s["torch_rng"])
        random.setstate(s["python_rng"])
        np.random.set_state(s["numpy_rng"])
        self.stream.load_state_dict(s["stream"])
        self.history, self.before = list(s["history"]), dict(s["before"])
        # absent from checkpoints written before the fixed held-out samples: drawn anew (said in heldout())
        self.heldout_set = s.get("heldout")
        self.extraction = dict(s.get("extraction") or {})
        self.wall_before = float(s.get("wall_seconds", 0.0))

    def maybe_resume(self) -> None:
        """Resume the newest loadable checkpoint of THIS run (same identity), if any."""
        gone = checkpoint.clean_tmp(self.ckpt_dir)  # leftovers of a killed save (we hold the run lock)
        if gone:
            self.log(f"[ta-opd] removed {len(gone)} temporary folder(s) of an interrupted save: {', '.join(gone)}")
        if self.cfg.resume_mode == "disable":
            if checkpoint.step_dirs(self.ckpt_dir):
                self.log(f"[ta-opd] trainer.resume_mode=disable: starting over; this run's checkpoints replace "
                         f"those in {self.ckpt_dir}")
            return
        found = checkpoint.load_latest(self.ckpt_dir, warn=self.log, accept=self._resume_from)
        if found is not None:
            self.log(f"resumed from {found[0]} at step {self.step}")
        if self.step > self.cfg.total_steps:
            raise TAConfigError(f"the checkpoint resumed from {self.ckpt_dir} is at step {self.step}, beyond "
                                f"trainer.total_training_steps={self.cfg.total_steps}; set it to more than {self.step} "
                                "to train on, give a new run its own folder (another trainer.experiment_name; nothing is "
                                "overwritten), or set trainer.resume_mode=disable to start over in this folder (overwriting "
                                "its checkpoints)")
        if found is not None and self.step == self.cfg.total_steps:
            self.log(f"[ta-opd] the checkpoint is at trainer.total_training_steps={self.step}: nothing left to train "
                     "(raise trainer.total_training_steps to continue)")

    def _resume_from(self, path: Path, state: dict) -> None:
        """Load a checkpoint of THIS run; a field of the wrong type or shape (a hand-edited state.json
        of an old checkpoint without its own hash) skips to the previous checkpoint."""
        identity.check_resume(state.get("identity"), self.identity, path,
                              lambda: identity.own_folder(self.cfg, self.identity))
        try:
            self.load_state(state)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise checkpoint.CorruptCheckpoint(f"{path / checkpoint.META} holds an unusable field "
                                               f"({type(e).__name__}: {e})") from None

    def save(self) -> Path:
        return checkpoint.save(self.ckpt_dir, self.step, self.state(), self.student, self.tok,
                               keep=self.cfg.max_ckpt_to_keep)

    def prompt(self, row: dict) -> list[int]:
        """The row's prompt through the tokenizer's chat template (cached)."""
        key = id(row)
        if key not in self._prompt_ids:
            self._prompt_ids[key] = encode_prompt(self.tok, row["prompt"], where=f"row {bank.prompt_key(row, -1)}",
                                                  chat_template_kwargs=self.cfg.chat_template_kwargs)
        return self._prompt_ids[key]

    # --- evaluation ------------------------------------------------------------------------
    def accuracy(self, model, rows: list[dict], who: str) -> tuple[float | None, float | None]:
        """(greedy task accuracy graded by data_source, the share of responses with an extractable
        answer); accuracy None when no row's data source is scorable. A low share is warned once per ``who``."""
        texts = greedy_texts(model, self.tok, [self.prompt(r) for r in rows], self.special,
                             max_new_tokens=self.cfg.max_response_length, batch_size=self.cfg.eval_batch_size)
        return self.grader.accuracy(rows, texts), self.grader.check_extraction(rows, texts, f"{who}'s greedy responses")

    def heldout(self) -> dict[str, float]:
        """Held-out teacher–student KL on the FIXED held-out samples (recipe/ta_opd/cpu/evaluate.py):
        drawn once from the initial student, kept in every checkpoint, scored at every evaluation."""
        cfg = self.cfg
        if self.heldout_set is None:
            if self.step > 0:
                self.log(f"[ta-opd] the checkpoint holds no fixed held-out samples (written by an older version): "
                         f"drawing them from the student at step {self.step}; its held-out KL before is not comparable")
            rows = self.val_rows[: cfg.heldout_kl_prompts]
            if len(rows) < MIN_STABLE_PROMPTS:
                self.log(f"[ta-opd] warning: the held-out KL has only {len(rows)} prompts (the first "
                         f"min(ta_opd.cpu.heldout_kl_prompts={cfg.heldout_kl_prompts}, ta_opd.cpu.eval_size="
                         f"{cfg.eval_size}) validation rows of {cfg.val_file}); below {MIN_STABLE_PROMPTS} its interval "
                         "understates the spread: give more validation rows")
            self.heldout_set = sample_heldout(self.student, [self.prompt(r) for r in rows], self.special,
                                              max_new_tokens=cfg.max_response_length, temperature=cfg.temperature,
                                              seed=cfg.seed, batch_size=cfg.eval_batch_size)
            empty = sum(1 for r in self.heldout_set["responses"] if not r)
            if empty:
                self.log(f"[ta-opd] the held-out KL scores {len(rows) - empty} of {len(rows)} prompts: the student's "
                         f"sample of {empty} is empty (no token to score)")
        sums = heldout_sums(self.student, self.teacher, self.heldout_set, self.special.pad_id,
                            temperature=cfg.temperature, vocab_size=self.vocab_size, batch_size=cfg.eval_batch_size,
                            chunk_size=cfg.ta.chunk_size)
        self.heldout_set.setdefault("before", sums)
        self.heldout_last = sums
        return heldout_metrics(sums, cfg.seed)

    def evaluate(self, step: int) -> dict:
        """Validation accuracy (skipped when it can only be null: no scorer) and the held-out KL,
        announced in one line."""
        graded = self.grader.scorable(self.val_rows)
        n_kl = len(self.val_rows[: self.cfg.heldout_kl_prompts])
        what = [f"student greedy accuracy on {len(self.val_rows)} validation rows"] if graded else []
        self.log(f"[ta-opd] step {step}: evaluating " + "; ".join(what + [f"held-out KL on {n_kl} fixed samples"]))
        acc, rate = self.accuracy(self.student, self.val_rows, "the student") if graded else (None, None)
        return {"val/student_accuracy": acc, "ta_opd/grading/val_extraction_rate": rate, **self.heldout()}

    def test_accuracy(self, model, who: str) -> tuple[float | None, float | None]:
        """Greedy accuracy on the test rows (the validation rows when there is no test file), announced;
        (None, None) without a scorer."""
        if not self.grader.scorable(self.test_rows):
            return None, None
        split = "validation" if self.test_rows is self.val_rows else "test"
        self.log(f"[ta-opd] evaluating {who}'s greedy accuracy on {len(self.test_rows)} {split} rows")
        return self.accuracy(model, self.test_rows, who)

    # --- the loop --------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        t0, c0 = time.perf_counter(), time.process_time()
        rows = self.stream.next_batch()
        prompts = [self.prompt(r) for r in rows for _ in range(cfg.n_samples)]
        ro = generate(self.student, prompts, max_new_tokens=cfg.max_response_length, eos_id=self.special.eos_ids,
                      pad_id=self.special.pad_id, temperature=cfg.temperature, generator=self.gen)
        t1 = time.perf_counter()
        scored = score_batch(self.student, self.teacher, ro, cfg.ta, step=self.step, vocab_size=self.vocab_size,
                             temperature=cfg.temperature)
        t2 = time.perf_counter()
        m = update(self.student, self.opt, ro, scored, cfg.ta, cfg.grad_clip, vocab_size=self.vocab_size,
                   temperature=cfg.temperature, gradient_checkpointing=cfg.gradient_checkpointing)
        t3 = time.perf_counter()
        valid = ro.response_mask
        texts = self.tok.batch_decode(ro.responses, skip_special_tokens=True)
        sample_rows = [r for r in rows for _ in range(cfg.n_samples)]
        if cfg.rollout_dir:
            self.write_rollouts(rows, prompts, ro, texts, scored.old_logp)
        self.show_selection(ro, scored, rows, self.step + 1)
        m.update(scored.selection.metrics)
        m.update(kept_advantage_metrics(scored.teacher_logp - scored.old_logp, valid, scored.selection.mask))
        m.update({
            "step": self.step + 1,
            "ta_opd/kl/sampled_mean": float((scored.old_logp - scored.teacher_logp)[valid].mean()),
            "rollout/accuracy": self.grader.accuracy(sample_rows, texts),
            "ta_opd/grading/extraction_rate": self.grader.check_extraction(sample_rows, texts, "the rollouts"),
            "rollout/response_length": float(valid.sum(-1).float().mean()),
            # one timing namespace on both backends: ta_opd/timing/<phase>_s
            "ta_opd/timing/rollout_s": t1 - t0, "ta_opd/timing/teacher_and_scoring_s": t2 - t1,
            "ta_opd/timing/update_s": t3 - t2,
            "ta_opd/timing/step_cpu_s": time.process_time() - c0,  # CPU seconds of all threads: robust to other load
            "ta_opd/timing/step_s": time.perf_counter() - t0,  # wall seconds of the whole step
        })
        return m

    def show_selection(self, ro, scored, rows, step: int) -> None:
        """What was kept, for a person (ta_opd/tools/kept_tokens.py): the HTML page
        ``<out_dir>/kept_tokens/step_<n>.html`` every test_freq steps and at the last step (also to
        W&B as ``ta_opd/kept_tokens``), the score histogram to W&B each step, and with
        ``ta_opd.token_export`` every step's token rows to ``<out_dir>/tokens/step_<n>.parquet``."""
        cfg = self.cfg
        page_due = (cfg.test_freq > 0 and step % cfg.test_freq == 0) or step == cfg.total_steps
        wb = self.wandb_run()
        valid = ro.response_mask
        if wb is not None and cfg.wandb_histogram:
            wb.log({"ta_opd/score_hist": wb.Histogram(scored.selection.scores[valid].float().numpy())}, step=step,
                   commit=False)
        if not (page_due or cfg.token_export):
            return
        shown = valid.clone()
        if not cfg.token_export:  # decode only what the page shows
            on_page = torch.zeros(len(shown), dtype=torch.bool)
            on_page[kept_tokens.one_per_prompt(len(shown), cfg.n_samples, SHOWN_ROLLOUTS)] = True
            shown &= on_page.unsqueeze(-1)
        view = kept_tokens.TokenView.of(
            ro.responses, kept_tokens.decode_tokens(self._decode_one, ro.responses, shown), valid, scored.stats.D,
            scored.stats.compatibility(cfg.ta.compatibility), scored.stats.H, scored.selection.scores,
            scored.selection.mask & valid, scored.teacher_logp - scored.old_logp)
        out = Path(cfg.out_dir)
        if cfg.token_export:
            write_atomic(out / "tokens" / f"step_{step}.parquet",
                         lambda tmp: pd_frame(kept_tokens.export_rows(view, step)).to_parquet(tmp, index=False))
        if page_due:
            header = kept_tokens.Header(step=step, rho=cfg.ta.budget, selector=cfg.ta.selector, title=cfg.experiment,
                                        kept_ratio=float(scored.selection.mask[valid].float().mean()))
            prompts = [_last_message(r) for r in rows for _ in range(cfg.n_samples)]
            show = kept_tokens.one_per_prompt(len(prompts), cfg.n_samples, SHOWN_ROLLOUTS)
            page = kept_tokens.render_page(view, header, show=show, prompts=prompts)
            write_atomic(out / "kept_tokens" / f"step_{step}.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))
            if wb is not None:
                wb.log({"ta_opd/kept_tokens": wb.Html(page, inject=False, data_is_not_path=True)}, step=step, commit=False)

    def _decode_one(self, token_id: int) -> str:
        """One token's text, special tokens included (EOS shows on the page)."""
        return self.tok.decode([token_id], skip_special_tokens=False)

    def wandb_run(self):
        """The wandb module verl's Tracking initialised, or None when wandb is not a logger."""
        loggers = getattr(self.tracker, "logger", None)
        if "wandb" in self.cfg.loggers and not isinstance(loggers, dict) and not self._warned_wandb:
            self._warned_wandb = True
            self.log("[ta-opd] wandb is a logger but the tracker exposes no wandb run: the score histogram and "
                     "the kept-token panel are not logged to W&B")
        return loggers.get("wandb") if isinstance(loggers, dict) else None

    def write_rollouts(self, rows, prompts, ro, texts, old_logp) -> None:
        """This step's rollouts as a context bank (ta_opd/tools/diagnose/bank.py schema), one parquet per step."""
        recs = []
        for j, p in enumerate(prompts):
            r = rows[j // self.cfg.n_samples]
            n = int(ro.response_mask[j].sum())
            recs.append(bank.record(r, j // self.cfg.n_samples, p, ro.responses[j, :n].tolist(), texts[j],
                                    old_logp[j, :n].tolist(), self.step + 1))
        bank.write_step(self.cfg.rollout_dir, self.step + 1, recs)

    def fit(self) -> dict:
        with runlock.hold(self.cfg.out_dir, log=self.log):  # one run per output folder
            return self._fit()

    def _fit(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        self.session_start = time.perf_counter()
        self.maybe_resume()
        done = self.finished_summary()
        if done is not None:
            return done
        if not self.before:
            self.before_training()
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="ta-opd", dynamic_ncols=True)
        while self.step < cfg.total_steps:
            m = self.train_step()
            self.step += 1
            if (cfg.test_freq > 0 and self.step % cfg.test_freq == 0) or self.step == cfg.total_steps:
                m.update(self.evaluate(self.step))
            self.history.append(m)
            self._log(m, self.step)
            bar.update(1)
            bar.set_postfix(kept=f"{m['ta_opd/kept_ratio']:.3f}", kl=f"{m['ta_opd/kl/sampled_mean']:.3f}")
            if (cfg.save_freq > 0 and self.step % cfg.save_freq == 0) or self.step == cfg.total_steps:
                self.save()
        bar.close()
        return self.finish()

    def before_training(self) -> None:
        """The evaluations before step 1: validation accuracy and held-out KL (step 0), then the
        student's and the teacher's test accuracy — the student's pass reused when the test rows ARE
        the validation rows, both skipped when no scorer exists."""
        first = {"step": 0, **self.evaluate(0)}
        if not self.grader.scorable(self.test_rows):
            self.log("[ta-opd] accuracy evaluations skipped: no scorer for these data sources (accuracy fields are null)")
        if self.test_rows is self.val_rows:  # no test file: step 0's validation pass is the student's test pass
            student = first["val/student_accuracy"], first["ta_opd/grading/val_extraction_rate"]
        else:
            student = self.test_accuracy(self.student, "the student")
        teacher = self.test_accuracy(self.teacher, "the teacher")
        self.before = {"student_accuracy_before": student[0], "teacher_accuracy": teacher[0],
                       **{f"heldout_kl{k}_before{b}": first[f"ta_opd/heldout/kl{k}{b}"]
                          for k in ("", "_sampled") for b in ("", "_lo", "_hi")}}
        self.extraction.update(student_before=student[1], teacher=teacher[1])
        self.history.append(first)
        self._log(first, 0)

    def finished_summary(self) -> dict | None:
        """A finished run launched again: its summary.json as it is (wall time, accuracies), nothing
        re-evaluated or rewritten; None when the run is not finished or has no readable summary."""
        path = Path(self.cfg.out_dir) / "summary.json"
        if self.step < self.cfg.total_steps or not self.before or not path.is_file():
            return None
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(summary, dict) or summary.get("steps") != self.step:
            return None
        self.log(f"[ta-opd] the run is finished (step {self.step} of trainer.total_training_steps={self.cfg.total_steps})"
                 f": {path} is left as it is")
        return summary

    def _log(self, m: dict, step: int) -> None:
        if self.tracker is not None:
            self.tracker.log(data={k: v for k, v in m.items() if k != "step" and v is not None}, step=step)
        if "console" in self.cfg.loggers:  # the compact line; every metric goes to metrics.csv and the loggers
            self.log(console.line(m, step, self.cfg.total_steps, self.cfg.ta.loss))

    def finish(self) -> dict:
        cfg = self.cfg
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        train = [h for h in self.history if "ta_opd/kept_ratio" in h]
        last_eval = next((h for h in reversed(self.history) if "ta_opd/heldout/kl" in h), {})
        if self.test_rows is self.val_rows and last_eval.get("step") == self.step:  # that pass is the test pass
            after = last_eval.get("val/student_accuracy"), last_eval.get("ta_opd/grading/val_extraction_rate")
        else:
            after = self.test_accuracy(self.student, "the student")
        self.extraction["student_after"] = after[1]
        if self.heldout_last is None:  # resumed at the last step: score the fixed samples once more
            last_eval = {**last_eval, **self.heldout()}
        rates = [h["ta_opd/grading/extraction_rate"] for h in train if h.get("ta_opd/grading/extraction_rate") is not None]
        before = (self.heldout_set or {}).get("before")
        same = before is not None and before["tokens"] == self.heldout_last["tokens"]
        summary = {
            "backend": "cpu", "pair": cfg.pair, "student": cfg.student_path, "teacher": cfg.teacher_path,
            "selector": cfg.ta.selector, "budget": cfg.ta.budget, "topk": cfg.ta.topk,
            "teacher_topk": cfg.ta.teacher_topk, "steps": self.step,
            "kept_ratio": float(np.mean([h["ta_opd/kept_ratio"] for h in train])) if train else None,
            **self.before,
            "student_accuracy_after": after[0],
            **{f"heldout_kl{k}_after{b}": last_eval.get(f"ta_opd/heldout/kl{k}{b}")
               for k in ("", "_sampled") for b in ("", "_lo", "_hi")},
            **(heldout_change(before, self.heldout_last, cfg.seed) if same else {}),
            "heldout_kl_prompts": sum(1 for r in self.heldout_set["responses"] if r) if self.heldout_set else 0,
            "heldout_kl_tokens": last_eval.get("ta_opd/heldout/tokens"),
            "eval_problems": len(self.test_rows),
            "unscorable_data_sources": sorted(self.grader.unscorable),
            "extraction_rate": {"rollouts": float(np.mean(rates)) if rates else None, **self.extraction},
            "min_extraction_rate": MIN_EXTRACTION_RATE,
            "wall_seconds": self.wall_before + time.perf_counter() - self.session_start,
            "resumed": self.wall_before > 0, "seed": cfg.seed, "output_dir": str(out),
        }
        report.write_csv(out / "metrics.csv", self.history)
        report.plot(out / "curves.png", self.history,
                    f"TA-OPD ({cfg.ta.selector}, rho={cfg.ta.budget}, K={cfg.ta.topk}) on {cfg.pair}")
        report.write_summary(out / "summary.json", summary)
        return summary


SHOWN_ROLLOUTS = 4  # sequences on the kept-token page: one per prompt first (kept_tokens.one_per_prompt)


def _last_message(row: dict) -> str:
    """The prompt's last chat message, as the page shows it above the response."""
    return str(list(row["prompt"])[-1]["content"])


def pd_frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows, columns=["step", *kept_tokens.EXPORT_COLUMNS])


def write_atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp.{path.name}")
    write(tmp)
    tmp.replace(path)


def check_vocab(s_tok, t_tok, student, teacher, allowed_mismatch_ids=()) -> int:
    """Teacher and student must share the tokenizer vocabulary; logit rows beyond it are padding
    and are sliced off (score_batch/update get vocab_size = len(tokenizer)). Returns V."""
    return shared_vocab_size(s_tok.get_vocab(), t_tok.get_vocab(), student_logits=student.config.vocab_size,
                             teacher_logits=teacher.config.vocab_size,
                             allowed_mismatch_ids=frozenset(allowed_mismatch_ids))
