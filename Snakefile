# RPO reproduction: SFT -> reference log-probs -> DPO / RPO -> generations -> judgments -> Table 1.
#   snakemake --cores all results/table1.csv                                  (offline quickstart)
#   snakemake --cores all results/table1.csv --configfile config/<other>.yaml
from snakemake.utils import min_version

min_version("9.0")


# The offline quickstart is the default. A --configfile replaces it whole (not merged key by key), so
# a paper config never inherits a quickstart setting it forgot to name; the schema fills the defaults.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/locks.smk"
include: "workflow/rules/gguf.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/judge.smk"
include: "workflow/rules/lm_eval.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/overopt.smk"


onstart:
    # Not in a dry run: before any job, what the evaluation stages will need (eval/preflight.py: API keys,
    # judge models, MT-Bench's files), then the record of who holds the lock (rpo/locks.py).
    from eval import preflight

    preflight.check(config)
    locks.write_owner()


rule all:
    input:
        "results/table1.csv",
        VALIDITY,  # results/judge_validity.csv when judge_validity.enabled (workflow/rules/judge.smk)
