# Decoding-time alignment transfer (eval/fusion.py, docs/fusion.md), when fusion.enabled:
#   materialise_fusion_source   a fused model's part given as a model source (hub, local, packaged GGUF)
#   make_fused_model            the fused model's directory: fusion.json naming its parts, alpha and the grid
# Everything after is the rules every model goes through (generate_*, judge_*, score_*, run_lm_eval): a fused
# model's answers come from the `fusion` backend (common.smk: get_base_dir, generation_backend).
from eval.fusion_config import fused_dirs, fusion_sources, input_dirs

FUSION_SOURCES = fusion_sources(FUSED, config["methods"])  # {directory name: model source}
FUSION_SOURCE_DIR = f"{RESULTS}/models/fusion_sources"
# each fused model's parts as directories: a model of the DAG where the DAG keeps it (a method: its reference and
# its adapter), a model source where materialise_fusion_source puts it
FUSED_DIRS = {m: fused_dirs(spec, config["methods"], lambda name: {"ref_dir": f"{RESULTS}/models/base", "policy_dir": None}
                            if name == "base" else {"ref_dir": get_base_dir(name), "policy_dir": get_policy_dir(name)},
                            FUSION_SOURCE_DIR)
              for m, spec in FUSED.items()}


rule materialise_fusion_source:
    output:
        directory(f"{FUSION_SOURCE_DIR}/{{source}}"),
    wildcard_constraints:
        source="|".join(re.escape(k) for k in sorted(FUSION_SOURCES)) or "^$",
    params:
        **job_params(lambda w: {"source": FUSION_SOURCES[w.source], "dtype": config["base_model"]["dtype"]},
                     lambda w, input, output: {"out": output[0]}),
    threads: 2
    resources:
        **res("data"),
    log:
        "logs/materialise_fusion_source/{source}.log",
    shell:
        "python -m rpo materialise-model --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule make_fused_model:
    # A fused model is a directory naming its parts (their directories are this rule's inputs, so a retrained
    # expert re-makes it and, through it, every answer of the fused model); loading them is the answer jobs' work.
    input:
        lambda w: input_dirs(FUSED_DIRS[w.fused]),
    output:
        directory(f"{RESULTS}/models/fused/{{fused}}"),
    wildcard_constraints:
        fused="|".join(re.escape(m) for m in sorted(FUSED)) or "^$",
    params:
        **job_params(
            lambda w: {"name": w.fused, "alpha": FUSED[w.fused]["alpha"], "vocab_check": FUSED[w.fused]["vocab_check"],
                       "parts": {k: FUSED[w.fused][k] for k in ("large", "small", "experts")},
                       "alpha_grid": config["fusion"]["alpha_grid"]},
            lambda w, input, output: {"dirs": FUSED_DIRS[w.fused], "out": output[0]}),
    resources:
        **res("cpu"),
    log:
        "logs/make_fused_model/{fused}.log",
    shell:
        "python -m eval make-fused-model --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
