"""The teacher worker's per-position pass, measured side by side in one run (not a test).

At V = 151,936 and 4,096 response positions (fp32 logits, 2.5 GB), what the FSDP teacher worker
does with its logits (``ta_opd.teacher_outputs``: top-K' ids and log-probs, sampled-token
log-prob, entropy; chunks of positions) against materializing the full-vocabulary log-probs:
  teacher_vs_logsoftmax   time of the teacher pass relative to ONE torch.log_softmax
  teacher_peak_extra_gb   peak resident memory the teacher pass adds on top of its logits
  full_logp_gb            what the full fp32 log-prob tensor alone would add
  shipped_mb              size of what is shipped per batch (K' ids int32 + log-probs fp32 + 2 fp32)
Usage: python benchmarks/bench_teacher.py [--quick] [--chunk 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import _median_time, measure_memory_in_child, peak_extra_gb  # noqa: E402

from ta_opd.teacher_outputs import teacher_outputs  # noqa: E402


def _inputs(a):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(a.positions, a.vocab, generator=gen) * 3
    sampled = torch.randint(0, a.vocab, (a.positions,), generator=gen)
    return logits, sampled


def memory_child(a) -> None:
    logits, sampled = _inputs(a)
    gb = peak_extra_gb(lambda: teacher_outputs(logits, sampled, teacher_topk=a.teacher_topk, chunk_size=a.chunk))
    print(f"PEAK_EXTRA_GB={gb:.6f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="teacher pass benchmark")
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--teacher-topk", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--mem-child", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if a.quick:
        a.positions, a.vocab, a.repeats = 256, 32000, 1
    if a.mem_child:
        return memory_child(a)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, N={a.positions} V={a.vocab} "
          f"K'={a.teacher_topk} chunk={a.chunk}", flush=True)
    logits, sampled = _inputs(a)
    t_lsm = _median_time(lambda: torch.log_softmax(logits, dim=-1), a.repeats)
    t_teacher = _median_time(lambda: teacher_outputs(logits, sampled, teacher_topk=a.teacher_topk, chunk_size=a.chunk),
                             a.repeats)
    mem = measure_memory_in_child(argv, __file__)
    full_gb = a.positions * a.vocab * 4 / 1024**3
    shipped_mb = a.positions * (a.teacher_topk * 8 + 8) / 1024**2
    print(f"log_softmax   {t_lsm:8.3f} s\nteacher pass  {t_teacher:8.3f} s")
    print(f"teacher_vs_logsoftmax={t_teacher / t_lsm:.2f} teacher_peak_extra_gb={mem:.3f} "
          f"full_logp_gb={full_gb:.3f} shipped_mb={shipped_mb:.1f}")


if __name__ == "__main__":
    sys.exit(main())
