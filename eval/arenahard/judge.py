"""Arena-Hard-Auto judging: two games per question against the category's baseline, as upstream.

Game 1 shows the baseline as assistant A and the model as B; game 2 swaps them. System prompt and
user template are upstream's (the creative-writing system prompt drops the "generate your own answer
first" paragraph). Each version's judgment attempts and verdict rule are eval.arenahard.protocol's
(`judge_games`). Rows are written in upstream's `model_judgment` format (see eval.arenahard.data).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from eval.arenahard.data import baseline_for
from eval.arenahard.protocol import V2, judge_games
from rpo.io import write_jsonl

_INTRO = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user prompt displayed below. You will be given assistant A's answer and assistant B's "
    "answer. Your job is to evaluate which assistant's answer is better.\n\n"
)
_OWN_ANSWER = (
    "Begin your evaluation by generating your own answer to the prompt. You must provide your answers "
    "before judging any answers.\n\n"
    "When evaluating the assistants' answers, compare both assistants' answers with your answer. You must "
    "identify and correct any mistakes or inaccurate information.\n\n"
)
_COMPARE_ONLY = (
    "When evaluating the assistants' answers, compare both assistants' answers. You must identify and "
    "correct any mistakes or inaccurate information.\n\n"
)
_CRITERIA = (
    "Then consider if the assistant's answers are helpful, relevant, and concise. Helpful means the answer "
    "correctly responds to the prompt or follows the instructions. Note when user prompt has any ambiguity or "
    "more than one interpretation, it is more helpful and appropriate to ask for clarifications or more "
    "information from the user than providing an answer based on assumptions. Relevant means all parts of the "
    "response closely connect or are appropriate to what is being asked. Concise means the response is clear "
    "and not verbose or excessive.\n\n"
    "Then consider the creativity and novelty of the assistant's answers when needed. Finally, identify any "
    "missing important information in the assistants' answers that would be beneficial to include when "
    "responding to the user prompt.\n\n"
    "After providing your explanation, you must output only one of the following choices as your final "
    "verdict with a label:\n\n"
    "1. Assistant A is significantly better: [[A>>B]]\n"
    "2. Assistant A is slightly better: [[A>B]]\n"
    "3. Tie, relatively the same: [[A=B]]\n"
    "4. Assistant B is slightly better: [[B>A]]\n"
    "5. Assistant B is significantly better: [[B>>A]]\n\n"
    "Example output: \"My final verdict is tie: [[A=B]]\"."
)
SYSTEM_PROMPT = _INTRO + _OWN_ANSWER + _CRITERIA
# what a constrained judge may answer (eval.judging.constraint): the five labels the system prompt lists
LABELS = ("[[A>>B]]", "[[A>B]]", "[[A=B]]", "[[B>A]]", "[[B>>A]]")
CREATIVE_WRITING_SYSTEM_PROMPT = _INTRO + _COMPARE_ONLY + _CRITERIA
PROMPT_TEMPLATE = (
    "<|User Prompt|>\n{QUESTION}\n\n"
    "<|The Start of Assistant A's Answer|>\n{ANSWER_A}\n<|The End of Assistant A's Answer|>\n\n"
    "<|The Start of Assistant B's Answer|>\n{ANSWER_B}\n<|The End of Assistant B's Answer|>"
)



def system_prompt_for(category: str) -> str:
    return CREATIVE_WRITING_SYSTEM_PROMPT if category == "creative_writing" else SYSTEM_PROMPT


def judge_messages(question: dict, answer_a: str, answer_b: str) -> list[dict]:
    user = PROMPT_TEMPLATE.format(QUESTION=question["prompt"], ANSWER_A=answer_a, ANSWER_B=answer_b)
    return [{"role": "system", "content": system_prompt_for(question["category"])},
            {"role": "user", "content": user}]


def game_requests(question: dict, model_answer: str, baseline_answer: str, *,
                  temperature: float = 0.0, max_tokens: int = 16000) -> list[dict]:
    """The two judge requests of one question: game 1 baseline as A, game 2 the model as A."""
    return [{"messages": judge_messages(question, baseline_answer, model_answer),
             "temperature": temperature, "max_tokens": max_tokens, "constraint": LABELS},
            {"messages": judge_messages(question, model_answer, baseline_answer),
             "temperature": temperature, "max_tokens": max_tokens, "constraint": LABELS}]


def judge_answers(questions: Sequence[dict], model_answers: Mapping[str, str],
                  baseline_answers: Mapping[str, Mapping[str, str]], judge, out_path, *, model: str,
                  judge_name: str, version: str = V2, temperature: float = 0.0, max_tokens: int = 16000) -> Path:
    """Judge every question's two games and write upstream-format rows to `out_path`, in question order.

    `judge` has complete_many(requests) -> texts, requests {"messages", "temperature", "max_tokens"};
    `judge_name` is the judge's label (eval.judging.config.judge_label). `version`'s judgment attempts and
    verdict rule apply (eval.arenahard.protocol.judge_games: v0.1 continues a game without a label in its
    conversation, as upstream's `number_of_judgment_attempts: 2`). The file is written whole at the end;
    an interrupted run resumes through the judge cache, which repeats no finished call.
    """
    out_path = Path(out_path)
    missing = [q["uid"] for q in questions if q["uid"] not in model_answers]
    if missing:
        raise ValueError(f"model {model!r} has no answer to {len(missing)} questions, e.g. {missing[:3]}")
    requests, meta = [], []
    for q in questions:
        base = baseline_for(q["category"])
        if q["uid"] not in baseline_answers.get(base, {}):
            raise ValueError(f"no {base!r} baseline answer to question {q['uid']!r}")
        requests += game_requests(q, model_answers[q["uid"]], baseline_answers[base][q["uid"]],
                                  temperature=temperature, max_tokens=max_tokens)
        meta.append((q, base))
    judged = judge_games(judge, requests, version)
    if len(judged) != len(requests):
        raise RuntimeError(f"judge returned {len(judged)} completions for {len(requests)} requests")
    rows = []
    for i, (q, base) in enumerate(meta):
        games = []
        for g in range(2):
            req, (text, label) = requests[2 * i + g], judged[2 * i + g]
            games.append({"score": label, "judgment": text,
                          "user_prompt": req["messages"][1]["content"], "prompt": req["messages"]})
        rows.append({"uid": q["uid"], "question_id": q["uid"], "category": q["category"], "judge": judge_name,
                     "model": model, "baseline": base, "games": games})
    write_jsonl(rows, out_path)
    return out_path
