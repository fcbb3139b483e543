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


def reward_model_params(cfg_of, ckpt_of, trunk):
    """train_reward_model's job_params: a member's training config `cfg_of(seed)` and checkpoint directory
    `ckpt_of(w)`, the reference pass's log-probs and trunk as inputs when `trunk`."""
    return job_params(
        lambda w: {"ckpt_dir": ckpt_of(w), "cfg": cfg_of(w.seed), "l2": config["reward_models"]["l2"],
                   "eval_batch_size": config["reward_models"]["eval_batch_size"]},
        lambda w, input, output: {"base_dir": input.base, "pairs_path": input.train, "test_path": input.test,
                                  **({"reference_cache": input.cache, "trunk_path": input.trunk} if trunk else {}),
                                  "out_dir": output.model, "metrics_path": output.metrics,
                                  "summary_path": output.summary})


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


def method_sampling(w):
    """The `sampling` of RSO method w.rso (rso.smk); the study's RSO families have theirs (overopt_rso.smk)."""
    return config["methods"][w.rso]["sampling"]


def rso_reward_inputs(sampling_of, rso_dir, data):
    """What the pairs of RSO `{rso}` under `rso_dir` need (an input function): the candidates' gold scores (gold
    reward or labeller; with data config `data` synthetic:verifiable always, to record how the gold orders the
    pairs, rpo.rso) and the members' scores (an ensemble reward)."""
    def inputs(w):
        s = sampling_of(w)
        out = {}
        if "gold" in (s["reward"], s["labeller"]) or data["source"] == "synthetic:verifiable":
            out["gold"] = f"{rso_dir}/{w.rso}/gold.jsonl"
        if s["reward"] != "gold":
            out["scores"] = [f"{rso_dir}/{w.rso}/scores/seed{seed}.jsonl" for seed in RM_SEEDS]
        return out
    return inputs


def rso_candidates_params(sampling_of):
    """rso_candidates' job_params: n_candidates samples per training prompt, as `sampling_of(w)` says."""
    return job_params(lambda w: {"n": sampling_of(w)["n_candidates"],
                                 **{k: sampling_of(w)[k] for k in ("max_new_tokens", "batch_size", "seed")}},
                      lambda w, input, output: {"ref_dir": input.ref, "prompts_path": input.pairs, "out": output[0]})


def rso_scores_params(rm_cfg):
    """rso_scores' job_params: the members' tokenisation (their training config `rm_cfg`)."""
    return job_params(lambda w: {"max_length": rm_cfg["max_length"], "max_prompt_length": rm_cfg["max_prompt_length"],
                                 "batch_size": config["reward_models"]["eval_batch_size"]},
                      lambda w, input, output: {"model_dirs": list(input.models), "base_dir": input.base,
                                                "samples_path": input.samples, "outs": list(output)})


def rso_pairs_params(sampling_of):
    """rso_pairs' job_params: the rejection sampling and labelling `sampling_of(w)` says."""
    return job_params(lambda w: {k: sampling_of(w)[k]
                                 for k in ("reward", "labeller", "m_accepted", "beta", "seed", "uwo_lambda")},
                      lambda w, input, output: {"samples_path": input.samples, "pairs_path": input.pairs,
                                                "out": output.pairs, "summary_path": output.summary,
                                                "gold_path": input.get("gold"),
                                                "score_paths": list(input.scores) if "scores" in input.keys() else None})


def study_sampling(w):
    """The `sampling` of the study's RSO family w.rso (overopt_rso.smk)."""
    return STUDY.rso[w.rso]
