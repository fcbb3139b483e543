"""Arena-Hard-Auto (lmarena/arena-hard-auto), v2.0 and v0.1, each by its own rules.

    data.py      questions and baseline answers (v2.0 offline; v0.1 from the hub), the generation prompts
    judge.py     two games per question against the category's baseline, upstream's prompts and file format
    protocol.py  each version's verdict parsing, judgment attempts, judge settings, battles and score
    stages.py    generate_arenahard, judge_arenahard, score_arenahard: the commands of workflow/rules/arenahard.smk
    checks.py    what the preflight asks of it
"""
