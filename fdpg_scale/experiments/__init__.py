"""Experiments: the paper's findings (Go et al., ICML 2023) at small scale, with seeds and intervals
(``fdpg-scale reproduce``), and the plainer sweep of configs × divergences (``fdpg-scale sweep``).

One job per module: ``grid`` (what runs, and its YAML file), ``runner`` (bases, runs in worker processes or
as SLURM array tasks), ``stats`` (intervals over seeds), ``verdicts`` (the claims' rules), ``report``
(results.json, report.md, plots). The commands themselves are thin: fdpg_scale/apps/reproduce.py and
fdpg_scale/apps/sweep.py.

The paper's claims, tested here on bases the project pretrains itself (nothing is downloaded):

1. no divergence is best everywhere: each makes a different trade between alignment and diversity;
2. Jensen–Shannon strikes a good balance and often beats forward KL by a wide margin;
3. these differences persist as the model grows.

What runs (a *grid*: every (task, size) cell × divergence × seed is one f-DPG run):

1. bases: the stdlib GPT-2 of ``pretrain-base`` at each size of the grid (cached; the middle size is the
   demo's own base), with held-out perplexity against the unigram (``pretrain_report.json``);
2. prompts: the conditional task's contexts, function signatures from the held-out documents;
3. runs: ``fdpg-scale train`` in its own process (``runner.train_run``), checkpoints every
   ``steps / eval_points`` steps, each checkpoint evaluated by ``apps.evaluate.evaluate_run`` (alignment,
   KL(p‖π), KL(π‖a), Distinct-1/2, Self-BLEU-3 by plain Monte Carlo): the last is the run's result, the
   others its curve against training samples; a run with its ``cell.json`` is not redone;
4. report: ``OUT/results.json`` and ``OUT/report.md``: per (task, size) the mean ± 95% t-interval over seeds,
   the curves, whether KL(p‖π) still moved over the last checkpoint interval (beyond the final interval's
   half-width), the alignment–diversity frontier (``apps.report.plot_alignment_vs_diversity`` on the
   means) and a verdict per claim.

Sizing of the full grid (its budget: ≤ 2 h on 2 CPU cores, pretraining included). Bases: GPT-2
with a 2048-token BPE, 500 pretraining steps of 32 × 128 tokens each (0.8 epoch of the stdlib): tiny
2 layers × 32 (0.095 M parameters), small 2 × 64 (0.24 M), middle 4 × 128 (1.07 M, the demo's base), 11.3×
from tiny to middle. Tasks: all five (pointwise common "def ", pointwise rare "return", distributional,
reward, conditional) at the middle size; pointwise common (the cheapest, with the largest support, so Z is
estimated well at every size) at all three sizes. Divergences kl, rkl, js, tv; seeds 0, 1, 2. That is
5 × 4 × 3 + 2 × 4 × 3 = 84 runs of 60 steps × 32 sequences (1,920 samples), each evaluated after 30 and 60
steps on 256 samples (the rare constraint holds on ~3.6% of the base's draws: 256 leave about 9 of them
to estimate KL(p‖π) from). The runs go two at a time, one thread each (``--workers``'s default on 2
cores). Measured cost: docs/reproduction.md (pretraining each base, and every run's seconds in
results.json).

Why these sizes and not 0.24 M / 1.07 M / 3.09 M (6 × 192): on these 2 cores the 3 M base pretrains at
2.25 s a step (19 min idle, more than 50 beside the runs) and its runs cost ~3× a middle one; with it the
grid needed about 4 hours. Why one task across sizes: a middle-size run costs ~2.5 minutes of one core; a
second task at two more sizes adds 24 runs. Why 60 steps: the demo's 30 were still moving; more would not
fit either, so the curves in the report show whether the metrics have stopped moving, and the verdicts
say so when they have not (intervals stay wide).

The quick mode (``--quick``): the tiny base, pointwise common and reward, kl/rkl/js/tv, seeds 0 and 1,
20 steps evaluated at 2 checkpoints on 64 samples: 16 runs. Measured on 2 idle cores with no base cached:
417 s, 111 of them pretraining the tiny base (a run's start-up, three models and two evaluations, is most
of its cost at this size).

Other grids (``--grid FILE``): a YAML file of ``Grid``'s fields, read by ``grid.load_grid`` with the run
configs' typed loader (other tasks, sizes, seeds, budgets); the SLURM test runs a miniature of the array this
way. The verdicts' rules: ``verdicts``.
"""
