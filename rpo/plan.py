"""The plan of a run: from the resolved config, what will run and with which settings.

The workflow builds one Plan when it is parsed (workflow/rules/common.smk) and takes from it every trained run
and its seed, each method's reference, Table 1's pairs (per seed too), the overoptimization study's runs, and
each training stage's config as its job receives it; the rule files keep the paths and input functions. The
config is resolved first (common.smk: `extends`, the schema's defaults, the method zoo and the fused models'
experts folded into `methods`, Table 1's all_vs_ref and fusion pairs added, rpo.config.check_config).

Importable without torch: every cluster job re-parses the workflow.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rpo import launch
from rpo.config import hyperparameters, resolve_study


def top_layers_of(cfg: dict) -> int:
    """The LoRA top layers a training config's reference pass writes the trunk for (rpo.trunk); 0: no trunk (off,
    full fine-tuning, or LoRA on every layer: then no layer is frozen and shared)."""
    if not cfg.get("trunk_cache") or cfg.get("finetuning") != "lora":
        return 0
    return cfg["lora"].get("top_layers") or 0


def stage_cfg(cfg: dict, resources: dict, where: str, **extra) -> dict:
    """A training stage's config as its job gets it: the world size of its resources, the gradient accumulation
    that keeps the configured global batch (rpo.launch, checked by the trainer; errors name `where`), `extra`
    (seed, snapshot_every) on top. Without `threads`: they reach the job as `threads:` (--threads), and a thread
    count changes no result and must not re-run training."""
    world = launch.world_size(resources["gpus"], resources["nodes"])
    accum = launch.accumulation_steps(cfg["global_batch_size"], cfg["micro_batch_size"], world, where=where)
    return {**{k: v for k, v in cfg.items() if k != "threads"}, **extra, "world_size": world,
            "gradient_accumulation_steps": accum}


@dataclass(frozen=True)
class Study:
    """The overoptimization study (workflow/rules/overopt.smk): each run of overoptimization.grid once per seed,
    from the base model on the study's own data, with `data` and `training` the study's keys over the main ones."""

    runs: dict  # run name -> its method (loss and hyperparameters), rpo.config.expand_grid
    seeds: list
    data: dict
    training: dict
    snapshot_every: int
    eval: dict
    family: dict = field(default_factory=dict)  # run name -> the grid key it comes from
    reward_training: dict | None = None  # the training config of the study's reward models (RSO runs)

    @property
    def run_names(self) -> list[str]:
        return sorted(self.runs)

    @property
    def trunk_top(self) -> int:
        return top_layers_of(self.training)

    # RSO in the study (issue 26): a grid family with `sampling` trains on pairs rejection-sampled from the study's
    # reference (the base model) for the study's training prompts, one set per family (a family's runs differ in
    # their loss's hyperparameters only, so they share its candidates and pairs; the seeds vary the training).

    @property
    def rso(self) -> dict[str, dict]:
        """The RSO families -> their `sampling`."""
        return {self.family[r]: self.runs[r]["sampling"] for r in self.run_names if "sampling" in self.runs[r]}

    def rso_family(self, run: str) -> str | None:
        """The RSO family of a run (None: the run trains on the study's pairs)."""
        return self.family[run] if "sampling" in self.runs[run] else None

    @property
    def needs_reward_models(self) -> bool:
        """Whether an RSO family scores its candidates with the study's reward models (a reward other than gold)."""
        return any(s["reward"] != "gold" for s in self.rso.values())

    @property
    def reward_trunk_top(self) -> int:
        """The LoRA top layers of the study's reward models when they start from the study reference pass's trunk
        (the same cut: top layers and lengths equal to the study's training), else 0."""
        top = top_layers_of(self.reward_training or {})
        if not top or top != self.trunk_top:
            return 0
        same = all(self.reward_training[k] == self.training[k] for k in ("max_length", "max_prompt_length"))
        return top if same else 0

    @property
    def label_noise(self):
        """The synthetic data's label noise (None for a hub or file source)."""
        return self.data["synthetic"]["label_noise"] if self.data["source"] == "synthetic:verifiable" else None

    def specs(self) -> list[dict]:
        """What eval.overoptimization needs of each run and seed, runs in name order, then seeds."""
        return [{"name": run, "loss": self.runs[run]["loss"], "seed": seed,
                 "hparams": hyperparameters(self.runs[run]), "label_noise": self.label_noise,
                 "pairs": "rso" if self.rso_family(run) else "study"}
                for run in self.run_names for seed in self.seeds]


@dataclass(frozen=True)
class Plan:
    """What a resolved config runs. Runs: every method once per seed; the first seed's run keeps the method's
    name (and is the one the benchmarks, lm-eval and figures evaluate), the others are <method>-seed<s>, answered
    and judged for Table 1, whose pairs get per-seed rows and a row pooled over the seeds. Without `seeds`, one
    run per method with training.seed."""

    config: dict = field(repr=False)
    study: Study = field(repr=False)

    @property
    def methods(self) -> list[str]:
        return sorted(self.config["methods"])

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in (self.config["seeds"] or [self.config["training"]["seed"]])]

    @property
    def replicas(self) -> dict[str, tuple[str, int]]:
        """Each further seed's run: <method>-seed<s> -> (method, seed)."""
        return {f"{m}-seed{s}": (m, s) for m in self.methods for s in self.seeds[1:]}

    @property
    def runs(self) -> list[str]:
        """Every trained policy: the methods' own runs, then the replicas in name order."""
        return self.methods + sorted(self.replicas)

    def run_method(self, run: str) -> str:
        """The method (a key of `methods`) a trained run replicates."""
        return self.replicas[run][0] if run in self.replicas else run

    def run_seed(self, run: str) -> int:
        """The training seed of a run (the first seed for the method's own run, and for ref)."""
        return self.replicas[run][1] if run in self.replicas else self.seeds[0]

    def replica(self, model: str, seed: int) -> str:
        """The run of `model` with `seed` (ref is one model, whatever the seed)."""
        return model if model == "ref" or seed == self.seeds[0] else f"{model}-seed{seed}"

    def method(self, run: str) -> dict:
        """The method a run trains: its loss, hyperparameters, reference (and RSO's sampling, online rounds)."""
        return self.config["methods"][self.run_method(run)]

    def reference(self, run: str) -> str:
        """The reference a run trains against: "ref" (Table 1's Ref model), "soup" (SALSA) or "base"."""
        return self.method(run).get("reference", "ref")

    @property
    def references(self) -> dict[str, str]:
        """Each method's reference."""
        return {m: self.reference(m) for m in self.methods}

    @property
    def trunk_top(self) -> int:
        return top_layers_of(self.config["training"])

    @property
    def table1_pairs(self) -> list[tuple[str, str]]:
        """Table 1's pairs (the configured ones, all_vs_ref's and the fused models'), then each again for every
        further seed's runs."""
        pairs = [tuple(p) for p in self.config["table1"]["pairs"]]
        return pairs + [(self.replica(a, s), self.replica(b, s)) for s in self.seeds[1:] for a, b in pairs]

    @property
    def seed_pairs(self) -> dict[str, list[list[str]]]:
        """Each configured pair's runs per seed, {"a_vs_b": [[a_s, b_s] for each seed]}: make_table1 pools
        them (empty with one seed)."""
        if len(self.seeds) == 1:
            return {}
        return {f"{a}_vs_{b}": [[self.replica(a, s), self.replica(b, s)] for s in self.seeds]
                for a, b in self.config["table1"]["pairs"]}

    @property
    def validity_pairs(self) -> list[list[str]]:
        """judge_validity's model pairs: its own, or Table 1's."""
        return [list(p) for p in (self.config["judge_validity"]["pairs"] or self.table1_pairs)]

    @property
    def validity_models(self) -> list[str]:
        return sorted({m for p in self.validity_pairs for m in p})

    def train_cfg(self, stage: str) -> dict:
        """The config of training stage "sft" (sft.train) or "training", with resources.<stage>'s world size."""
        cfg = self.config["sft"]["train"] if stage == "sft" else self.config["training"]
        return stage_cfg(cfg, self.config["resources"][stage], stage)

    def run_cfg(self, run: str) -> dict:
        """A trained run's training config: the training stage's with the run's seed."""
        return {**self.train_cfg("training"), "seed": self.run_seed(run)}

    def study_cfg(self, seed: int) -> dict:
        """A study run's training config: the study's training keys with the seed and the snapshots, and the
        world size and accumulation of resources.training."""
        return stage_cfg(self.study.training, self.config["resources"]["training"], "overoptimization.training",
                         seed=int(seed), snapshot_every=self.study.snapshot_every)

    def study_reward_cfg(self, seed: int) -> dict:
        """A study reward model's training config: the study's training with reward_models.training's keys on
        top, its seed, and the world size and accumulation of resources.training."""
        return stage_cfg(self.study.reward_training, self.config["resources"]["training"],
                         "overoptimization: reward_models.training", seed=int(seed))


def make_study(config: dict, schema: dict) -> Study:
    """The study of a resolved config; `schema` (the loaded config.schema.yaml) checks its data and training."""
    study = resolve_study(config, schema)
    o = config["overoptimization"]
    return Study(runs=study["runs"], seeds=[int(s) for s in o["seeds"]], data=study["data"],
                 training=study["training"], snapshot_every=o["snapshot_every"], eval=o["eval"],
                 family=study["families"], reward_training=study["reward_training"])


def make_plan(config: dict, schema: dict) -> Plan:
    """The plan of a resolved config (see the module's docstring for what resolving does)."""
    return Plan(config=config, study=make_study(config, schema))
