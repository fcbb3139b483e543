# RPO reproduction: SFT -> reference log-probs -> DPO / RPO -> generations -> judgments -> Table 1.
#   snakemake --cores all results/table1.csv                                  (offline quickstart)
#   snakemake --cores all results/table1.csv --configfile config/<other>.yaml
import sys

from snakemake.utils import min_version

from eval import preflight

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
include: "workflow/rules/fusion.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/judge.smk"
# one rule file per benchmark of eval/registry.py: its generate, judge and score rules
include: "workflow/rules/mtbench.smk"
include: "workflow/rules/alpacaeval.smk"
include: "workflow/rules/arenahard.smk"
include: "workflow/rules/lm_eval.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/overopt.smk"
include: "workflow/rules/reward_common.smk"
include: "workflow/rules/reward.smk"
include: "workflow/rules/rso.smk"
include: "workflow/rules/overopt_rso.smk"
include: "workflow/rules/rounds.smk"


# A dry run (snakemake -n) gets what the preflight can check offline, as warnings: planning a paper run on a
# laptop needs no key and no hub. Parsing itself touches no network (every cluster job re-parses this file).
if preflight.dry_run_requested(workflow, sys.argv[1:]):
    preflight.check(config, online=False, dryrun=True, gpu_limit=preflight.gpu_limit(workflow))


onstart:
    # Not in a dry run: before any job, everything the jobs of this run will need (eval/preflight.py: judge
    # endpoints and keys, hub models and data, benchmark files, harness datasets, settings the scorers
    # require), then the record of who holds the lock (rpo/locks.py).
    preflight.check(config, rules={job.rule.name for job in workflow.dag.needrun_jobs()}, online=True,
                    gpu_limit=preflight.gpu_limit(workflow))
    locks.write_owner()


rule all:
    input:
        "results/table1.csv",
        VALIDITY,  # results/judge_validity.csv when judge_validity.enabled (workflow/rules/judge.smk)
