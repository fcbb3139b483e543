# The settings and helpers of workflow/rules/reward.smk (proxy reward models and best-of-n), apart from its rules
# as common.smk is from the others (snakemake --lint: no functions beside rules).
from rpo.config import resolve_reward_models  # noqa: E402

RM_TRAIN = resolve_reward_models(config, SCHEMA)
RM_DIR = f"{RESULTS}/reward_models"
RM_SEEDS = [int(s) for s in config["reward_models"]["seeds"]]
BON_DIR = f"{RESULTS}/bon"
# With LoRA on the top layers, the members start at the first LoRA layer from the reference pass's trunk
# (rpo.trunk): the same base model and pairs, so it must be the same cut.
RM_TRUNK = _plan.top_layers_of(RM_TRAIN)
if RM_TRUNK and (RM_TRUNK != TRUNK_TOP or any(RM_TRAIN[k] != config["training"][k]
                                              for k in ("max_length", "max_prompt_length"))):
    raise ValueError("reward_models.training: the trunk (training.trunk_cache with LoRA top_layers) is the reference "
                     "pass's, made with training's lora.top_layers, max_length and max_prompt_length; keep them "
                     "equal to training's or set reward_models.training.trunk_cache: false")


def rm_train_cfg(seed):
    """A member's training config: RM_TRAIN with its seed, and the world size and accumulation of
    resources.training (rpo.plan.stage_cfg)."""
    return _plan.stage_cfg(RM_TRAIN, config["resources"]["training"], "reward_models.training", seed=int(seed))


BON_SCORES = [f"{BON_DIR}/scores/seed{s}.jsonl" for s in RM_SEEDS]  # each member's scores of the samples


# ---------------------------------------------------------------------------------------------------
# RSO (a method with `sampling`, workflow/rules/rso.smk): it trains on its own pairs, drawn from the Ref model's
# candidates by rejection sampling, with the Ref model's log-probs (and trunk) of those pairs
# ---------------------------------------------------------------------------------------------------
RSO_DIR = f"{RESULTS}/rso"
RSO_METHODS = sorted(m for m, spec in config["methods"].items() if "sampling" in spec)
RSO_NAMES = "|".join(re.escape(m) for m in RSO_METHODS) or "^$"


def method_pairs(method):
    """The training pairs a run trains on (an input of train_preference): RSO's own, or results/data/train.jsonl."""
    m = run_method(method)
    return f"{RSO_DIR}/{m}/train.jsonl" if m in RSO_METHODS else f"{RESULTS}/data/train.jsonl"


def method_reference_cache(method):
    m = run_method(method)
    return f"{RSO_DIR}/{m}/train_logps.pt" if m in RSO_METHODS else reference_cache(reference_name(method))


def method_reference_trunk(method):
    m = run_method(method)
    return f"{RSO_DIR}/{m}/train_trunk.f32" if m in RSO_METHODS else reference_trunk(reference_name(method))


def rso_reward_inputs(w):
    """What an RSO method's pairs need: the candidates' gold scores (gold reward or labeller) and the members'
    scores (an ensemble reward)."""
    s = config["methods"][w.rso]["sampling"]
    out = {}
    if "gold" in (s["reward"], s["labeller"]):
        out["gold"] = f"{RSO_DIR}/{w.rso}/gold.jsonl"
    if s["reward"] != "gold":
        out["scores"] = rso_score_files(w)
    return out


def rso_score_files(w):
    return [f"{RSO_DIR}/{w.rso}/scores/seed{seed}.jsonl" for seed in RM_SEEDS]
