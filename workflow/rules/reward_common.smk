# The settings and helpers of workflow/rules/reward.smk (proxy reward models and best-of-n), apart from its rules
# as common.smk is from the others (snakemake --lint: no functions beside rules).
import yaml as _rm_yaml  # noqa: E402

from rpo.config import resolve_reward_models  # noqa: E402

RM_TRAIN = resolve_reward_models(
    config, _rm_yaml.safe_load(Path(workflow.basedir, "workflow/schemas/config.schema.yaml").read_text()))
RM_DIR = f"{RESULTS}/reward_models"
RM_SEEDS = [int(s) for s in config["reward_models"]["seeds"]]
BON_DIR = f"{RESULTS}/bon"
# With LoRA on the top layers, the members start at the first LoRA layer from the reference pass's trunk
# (rpo.trunk): the same base model and pairs, so it must be the same cut.
RM_TRUNK = trunk_top_layers(RM_TRAIN)
if RM_TRUNK and (RM_TRUNK != TRUNK_TOP or any(RM_TRAIN[k] != config["training"][k]
                                              for k in ("max_length", "max_prompt_length"))):
    raise ValueError("reward_models.training: the trunk (training.trunk_cache with LoRA top_layers) is the reference "
                     "pass's, made with training's lora.top_layers, max_length and max_prompt_length; keep them "
                     "equal to training's or set reward_models.training.trunk_cache: false")


def rm_train_cfg(seed):
    """A member's training config: RM_TRAIN with its seed, and the world size and accumulation of
    resources.training (as train_cfg)."""
    from rpo import launch

    r = config["resources"]["training"]
    world = launch.world_size(r["gpus"], r["nodes"])
    accum = launch.accumulation_steps(RM_TRAIN["global_batch_size"], RM_TRAIN["micro_batch_size"], world,
                                      where="reward_models.training")
    return {**{k: v for k, v in RM_TRAIN.items() if k != "threads"}, "seed": int(seed), "world_size": world,
            "gradient_accumulation_steps": accum}


def bon_scores(w):
    return [f"{BON_DIR}/scores/seed{s}.jsonl" for s in RM_SEEDS]
