"""The v0 ``RayPPOTrainer`` with five methods overridden; ``fit()`` is verl's, untouched.

- ``init_workers``: verl's workers, plus the FSDP teacher worker group on the teacher pool.
- ``_compute_old_log_prob``: teacher fields (FSDP worker group, or derived from verl's vLLM
  teacher output), then verl's own method, whose old-log-prob forward also emits the TA
  statistics through the actor's logits processor — the same forward verl runs anyway, so no
  extra student pass, and whatever verl returns (MoE router replay, ``sum_pi_squared``) is kept.
- ``_update_actor``: normalization + budget selection over the WHOLE batch on the driver (the
  driver holds every data-parallel rank's rows, so selection is global by construction), the
  mask ANDed into ``response_mask`` for the update (verl counts the loss denominator from it),
  then verl's update; the TA metrics join the actor's; every test_freq steps and at the end the
  kept-token page (``ta_opd/tools/kept_tokens.py``), with ``ta_opd.token_export`` every step's tokens.
- ``_log_rollout_data``: verl's JSONL dump plus the rollouts as a diagnostic context bank.
- ``_save_checkpoint``: the run identity into the checkpoint folder, then verl's save.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from verl import DataProto
from verl.protocol import DataProtoConfig
from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.trainer.ppo.utils import Role
from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import no_padding_2_padding

from recipe.ta_opd.verl_backend import fields as F
from recipe.ta_opd.verl_backend.losses import entropy_from_hook, update_flags
from ta_opd.config import TAConfig
from ta_opd.rollout import response_slice
from ta_opd.select import Selection, select_positions
from ta_opd.stats import PositionStats
from ta_opd.teacher_outputs import sampled_logp_from_topk


@dataclass(frozen=True)
class VerlSettings:
    teacher_backend: str  # fsdp | vllm
    vocab_size: int  # shared tokenizer vocabulary
    teacher_worker: dict  # TeacherWorkerConfig fields (fsdp backend)
    loss_mode: str  # the registered verl distillation loss mode
    wandb_histogram: bool = True
    token_export: bool = False  # every step's tokens to <default_local_dir>/tokens/step_<n>.parquet


def teacher_logp_from_topk(batch: DataProto, vocab_size: int) -> dict[str, float]:
    """vLLM teacher: log π_T(y_t) from verl's full-sequence top-K' fields, into the response grid."""
    responses = batch.batch["responses"]
    R = responses.shape[1]
    P = batch.batch["input_ids"].shape[1] - R
    ids = batch.batch[F.TEACHER_IDS][:, response_slice(P, R)]
    lp = batch.batch[F.TEACHER_LOGPROBS][:, response_slice(P, R)]
    valid = batch.batch["response_mask"].bool()
    logp = torch.zeros(responses.shape, dtype=torch.float32)
    got, known = sampled_logp_from_topk(ids[valid], lp[valid], responses[valid], vocab_size)
    logp[valid] = got
    batch.batch[F.TEACHER_LOGP] = logp
    return {"ta_opd/teacher/sampled_missing_fraction": float((~known).float().mean()) if known.numel() else 0.0}


def exclude_invalid_sampled(batch: DataProto, vocab_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Take positions whose sampled id lies outside the shared vocabulary out of ``response_mask``.

    The rollout engine samples over every logit row, padding rows included (a Qwen student at
    temperature 1 can sample an unused row; an untrained one does so often). Such a token has no
    teacher probability, so its position leaves the statistics, selection and the loss; the
    context keeps it. Returns the original response_mask (to restore after the update) and
    ``ta_opd/invalid_sampled_fraction`` (over valid response positions)."""
    full = batch.batch["response_mask"]
    valid = full.bool()
    invalid = valid & (batch.batch["responses"] >= vocab_size)  # (B, R)
    if bool(invalid.any()):
        batch.batch["response_mask"] = (valid & ~invalid).to(full.dtype)
    frac = float(invalid.sum()) / max(int(valid.sum()), 1)  # max: an all-padding batch has no valid position
    return full, {"ta_opd/invalid_sampled_fraction": frac}


def teacher_request(batch: DataProto) -> DataProto:
    """What the FSDP teacher group is sent: tensors only, with verl's auto-padding on, so the batch
    is padded to a multiple of the group's ranks and the padding dropped from the output (every
    rank runs the same number of forwards, as FSDP2's collectives need); any teacher pool size
    then works with any batch size."""
    # meta_info_keys=[]: select() would otherwise share the batch's meta_info dict, and the padding
    # flag would ride along into the actor's calls
    inputs = batch.select(batch_keys=list(F.TEACHER_INPUTS), non_tensor_batch_keys=[], meta_info_keys=[])
    inputs.meta_info[DataProtoConfig.auto_padding_key] = True
    return inputs


def apply_selection(batch: DataProto, cfg: TAConfig, step: int) -> tuple[Selection, torch.Tensor]:
    """Pop the statistics fields, select over the whole batch, AND the mask into response_mask.
    Returns the selection and the response_mask it selected from (the valid positions I)."""
    stats = PositionStats.from_scalars({n: batch.batch.pop(F.stat_key(n)) for n in PositionStats.SCALARS})
    current = batch.batch["response_mask"]
    valid = current.bool()
    sel = select_positions(stats, valid, cfg, step)
    batch.batch["response_mask"] = (valid & sel.mask).to(current.dtype)
    return sel, current


def log_score_histogram(scores: torch.Tensor, step: int) -> None:
    """A W&B histogram of the selector score over valid positions, when a W&B run is active."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None and scores.numel():
        wandb.log({"ta_opd/score_hist": wandb.Histogram(scores.float().numpy())}, step=step, commit=False)


def selection_view(batch: DataProto, sel: Selection, raw: dict[str, torch.Tensor], valid: torch.Tensor,
                   cfg: TAConfig, decode_one, decode_rows: list[int] | None):
    """One step's selection as a ``ta_opd.tools.kept_tokens.TokenView``: D, C, H from ``raw`` (the
    statistics as the actor shipped them, (B, R)), the score and kept mask of ``sel``, advantage
    log π_T(y_t) - log π_old(y_t). Token texts (``decode_one``: id -> text) of the sequences
    ``decode_rows`` only (None: all)."""
    from ta_opd.tools import kept_tokens as kt

    b = batch.batch
    valid = valid.bool()
    decoded = valid.clone()
    if decode_rows is not None:
        decoded = torch.zeros_like(valid)
        decoded[decode_rows] = valid[decode_rows]
    return kt.TokenView.of(b["responses"], kt.decode_tokens(decode_one, b["responses"], decoded), valid, raw["D"],
                           raw["C" if cfg.compatibility == "exact" else "C_hat"], raw["H"], sel.scores,
                           sel.mask & valid, b[F.TEACHER_LOGP] - b["old_log_probs"])


def prompt_texts(batch: DataProto, rows: list[int], decode_text) -> list[str]:
    """The prompts of ``rows`` as text ("" for the others); ``decode_text``: a list of ids -> text."""
    b = batch.batch
    P = b["prompts"].shape[1]  # left-padded prompts: attention_mask[:, :P] marks the real tokens
    return [decode_text(b["prompts"][j][b["attention_mask"][j, :P].bool()].tolist()) if j in rows else ""
            for j in range(len(b["prompts"]))]


def write_atomic(path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp.{path.name}")
    write(tmp)
    tmp.replace(path)


def log_kept_tokens(page: str, step: int) -> None:
    """The page to W&B as ``ta_opd/kept_tokens`` when a W&B run is active."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.log({"ta_opd/kept_tokens": wandb.Html(page, inject=False, data_is_not_path=True)}, step=step,
                  commit=False)


class StatsPass:
    """The actor worker group as verl's ``_compute_old_log_prob`` sees it during the statistics
    pass: ``compute_log_prob`` also runs the TA statistics hook (the actor loss as logits processor,
    fed the teacher's fields) and keeps the per-token statistics, unpadded to (B, R), in ``stats``;
    every other attribute is the real worker group's. verl's body stays verl's.

    One sweep over the logits (issue 23, item 2): with ``hook_entropy`` (``losses.entropy_from_hook``)
    verl's own entropy is switched off and the hook hands verl its H as ``entropy`` (verl's driver
    turns it into ``actor/entropy``), instead of verl computing the entropy at every row again."""

    def __init__(self, wg, hook_entropy: bool = False):
        self._wg = wg
        self.hook_entropy = hook_entropy
        self.stats: dict[str, torch.Tensor] = {}

    def __getattr__(self, name):
        return getattr(self._wg, name)

    def compute_log_prob(self, batch_td):
        tu.assign_non_tensor(batch_td, compute_loss=True, distillation_use_topk=True, distillation_only=False,
                             **{F.PHASE: F.PHASE_STATS})
        if self.hook_entropy:
            tu.assign_non_tensor(batch_td, calculate_entropy=False)
        output = self._wg.compute_log_prob(batch_td)
        for name in PositionStats.SCALARS:
            key = F.stat_key(name)
            self.stats[key] = no_padding_2_padding(tu.get(output, key), batch_td).float()  # (B, R)
        return output


class TAOPDRayTrainer(RayPPOTrainer):
    def __init__(self, *args, ta_cfg: TAConfig, ta_settings: VerlSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.ta_cfg = ta_cfg
        self.ta = ta_settings
        self.ta_teacher_wg = None
        self._ta_metrics: dict[str, float] = {}
        self._ta_response_mask: torch.Tensor | None = None  # this step's response_mask before TA changed it

    def _shutdown_dump_executor(self):
        """verl's ``fit()`` calls this only where it ends (validation-only return, last step, end of
        the loop), after its last ``logger.log``: the W&B run it opened is finished here, on the task
        runner's thread while ``fit()`` still runs, so the last step's buffered row and the exit record
        are written before the runner returns (Ray then kills it, and W&B's service, its child, with it).
        Left to verl's ``Tracking.__del__`` as ``fit()`` unwinds, that finish never completed in the
        runner: the last step and the exit record were lost."""
        super()._shutdown_dump_executor()
        from recipe.ta_opd.wandb_run import finish

        finish(True)

    def init_workers(self):
        super().init_workers()
        if self.ta.teacher_backend == "fsdp":
            import ray
            from verl.single_controller.ray import RayClassWithInitArgs, RayWorkerGroup

            from recipe.ta_opd.verl_backend.teacher import TATeacherWorker

            pool = self.resource_pool_manager.get_resource_pool(Role.TeacherModel)
            self.ta_teacher_wg = RayWorkerGroup(
                resource_pool=pool, name_prefix="ta_opd_teacher",
                ray_cls_with_init=RayClassWithInitArgs(cls=ray.remote(TATeacherWorker), config=self.ta.teacher_worker))
            self.ta_teacher_wg.init_model()

    def _log_rollout_data(self, batch: DataProto, reward_extra_infos_dict: dict, timing_raw: dict,
                          rollout_data_dir: str):
        """verl's JSONL dump, plus this step's rollouts as a context bank for the diagnostic."""
        from recipe.ta_opd.verl_backend.bank import bank_records
        from ta_opd.tools.diagnose.bank import write_step

        super()._log_rollout_data(batch, reward_extra_infos_dict, timing_raw, rollout_data_dir)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        write_step(rollout_data_dir, int(self.global_steps), bank_records(batch, decode, int(self.global_steps)))

    def _compute_old_log_prob(self, batch: DataProto):
        """Teacher fields, then verl's own ``_compute_old_log_prob`` (everything it returns: old
        log-probs, entropy, MoE ``routed_experts``, ``sum_pi_squared``) with the actor's
        ``compute_log_prob`` asked to also emit the TA statistics (:class:`StatsPass`)."""
        t0 = time.perf_counter()
        self._ta_response_mask, metrics = exclude_invalid_sampled(batch, self.ta.vocab_size)
        if self.ta.teacher_backend == "fsdp":
            teacher = self.ta_teacher_wg.compute_teacher(teacher_request(batch))
            batch.batch.update(teacher.batch)
        else:  # vLLM teacher: top-K' arrived with the rollout
            metrics.update(teacher_logp_from_topk(batch, self.ta.vocab_size))
        t1 = time.perf_counter()
        wg = self.actor_rollout_wg
        self.actor_rollout_wg = stats_pass = StatsPass(wg, hook_entropy=entropy_from_hook(self.ta_cfg))
        try:
            old_log_prob, mfu = super()._compute_old_log_prob(batch)
        finally:
            self.actor_rollout_wg = wg
        old_log_prob.batch.update(stats_pass.stats)
        metrics["ta_opd/timing/teacher_s"] = t1 - t0
        metrics["ta_opd/timing/stats_forward_s"] = time.perf_counter() - t1
        self._ta_metrics = metrics
        return old_log_prob, mfu

    def _show_selection(self, batch: DataProto, sel: Selection, raw: dict[str, torch.Tensor],
                        valid: torch.Tensor) -> None:
        """What was kept, for a person (``ta_opd/tools/kept_tokens.py``): the page
        ``<default_local_dir>/kept_tokens/step_<n>.html`` every test_freq steps and at the last step
        (also to W&B as ``ta_opd/kept_tokens``); with ``ta_opd.token_export`` every step's token rows
        to ``<default_local_dir>/tokens/step_<n>.parquet``."""
        from pathlib import Path

        from ta_opd.tools import kept_tokens as kt

        step, tc = int(self.global_steps), self.config.trainer
        page_due = (tc.test_freq > 0 and step % tc.test_freq == 0) or step == getattr(self, "total_training_steps", None)
        export = self.ta.token_export
        if not (page_due or export):
            return
        out = Path(str(tc.default_local_dir))
        show = kt.one_per_prompt(len(valid), int(self.config.actor_rollout_ref.rollout.n), 4)  # one per prompt first
        decode_one = lambda i: self.tokenizer.decode([i], skip_special_tokens=False)  # noqa: E731
        view = selection_view(batch, sel, raw, valid, self.ta_cfg, decode_one, None if export else show)
        if export:
            import pandas as pd

            rows = kt.export_rows(view, step)
            write_atomic(out / "tokens" / f"step_{step}.parquet", lambda tmp: pd.DataFrame(
                rows, columns=["step", *kt.EXPORT_COLUMNS]).to_parquet(tmp, index=False))
        if page_due:
            header = kt.Header(step=step, rho=self.ta_cfg.budget, selector=self.ta_cfg.selector,
                               title=str(tc.experiment_name or ""), kept_ratio=float(sel.mask[valid.bool()].float().mean()))
            prompts = prompt_texts(batch, show, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
            page = kt.render_page(view, header, show=show, prompts=prompts)
            write_atomic(out / "kept_tokens" / f"step_{step}.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))
            log_kept_tokens(page, step)

    def _save_checkpoint(self):
        """verl's save, with this run's identity copied into the checkpoint folder first
        (``verl_backend/identity.py``: a later launch resumes it only under the same identity)."""
        from recipe.ta_opd.verl_backend.identity import stamp_checkpoint

        stamp_checkpoint(str(self.config.trainer.default_local_dir), int(self.global_steps))
        super()._save_checkpoint()

    def _update_actor(self, batch: DataProto) -> DataProto:
        t0 = time.perf_counter()
        full_mask = self._ta_response_mask if self._ta_response_mask is not None else batch.batch["response_mask"]
        self._ta_response_mask = None
        raw = {n: batch.batch[F.stat_key(n)] for n in ("D", "C", "C_hat", "H")}  # (B, R) each, for the page
        sel, valid = apply_selection(batch, self.ta_cfg, step=int(self.global_steps))  # valid: the positions I
        metrics = {**self._ta_metrics, **sel.metrics, "ta_opd/timing/select_s": time.perf_counter() - t0}
        self._show_selection(batch, sel, raw, valid)
        if self.ta.wandb_histogram:
            log_score_histogram(sel.scores[valid.bool()], int(self.global_steps))
        if not update_flags(self.ta.loss_mode)["distillation_use_topk"]:
            for key in (F.TEACHER_IDS, F.TEACHER_LOGPROBS):  # PG-OPD needs only log π_T(y_t)
                batch.batch.pop(key, None)
        try:
            out = super()._update_actor(batch)
        finally:
            batch.batch["response_mask"] = full_mask  # later metrics (response length etc.) see every token
        out.meta_info["metrics"].update(metrics)
        return out
