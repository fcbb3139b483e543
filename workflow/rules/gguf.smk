# GGUF files of the llamacpp generation backend (generation.backend llamacpp; rpo/gguf.py, rpo/llamacpp.py), each
# model's written once and bound to the files it came from (rpo.gguf.source_digest, which every job that samples
# from it checks: a GGUF whose weights changed is refused, and Snakemake rewrites it as the rule's output):
#   gguf_model    a reference model (base, sft, soup) as a model GGUF of generation.llamacpp_dtype
#   gguf_policy   a trained policy: its LoRA adapter as a llama.cpp adapter GGUF (applied on its reference's
#                 GGUF), a fully fine-tuned policy as a model GGUF of its own
# Its settings and the functions the other rules call (gguf_inputs, gguf_paths, ...) are at the end of common.smk.


rule gguf_model:
    input:
        lambda w: GGUF_SOURCES[w.name],
    output:
        f"{GGUF_DIR}/{{name}}.gguf",
    wildcard_constraints:
        name="base|sft|soup",
    params:
        **job_params(lambda w: {"dtype": config["generation"]["llamacpp_dtype"]},
                     lambda w, input, output: {"model_dir": input[0], "out": output[0]}),
    threads: 1
    resources:
        **res("cpu"),
    log:
        "logs/gguf_model/{name}.log",
    shell:
        "python -m rpo export-gguf --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule gguf_policy:
    input:
        base=lambda w: get_base_dir(w.model),
        policy=lambda w: get_policy_dir(w.model),
    output:
        f"{GGUF_DIR}/policy/{{model}}.gguf",
    wildcard_constraints:
        model=RUN_NAMES,
    params:
        **job_params(lambda w: {"dtype": config["generation"]["llamacpp_dtype"]},
                     lambda w, input, output: {"model_dir": input.policy, "base_dir": input.base, "out": output[0]}),
    threads: 1
    resources:
        **res("cpu"),
    log:
        "logs/gguf_policy/{model}.log",
    shell:
        "python -m rpo export-gguf --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
