"""Prompt strings shared by data generation, evaluation and the CLI, word for word as official.

Self-QA (SakanaAI/doc-to-lora `self_generate_qa.py`, `modeling/context_distillation.py`): the
teacher sees `QA_PROMPT_TEMPLATE` (document + instructions + question); the student the question.
Eval (official EVAL_INTX_TEMPLATES): the question wording D2L was trained and evaluated with.
"""

from __future__ import annotations

SELF_QA_INTX = (
    "# System Instruction\n"
    "- The information provided is up-to-date information and/or the user instruction.\n"
    "- When the provided information is not relevant to the question, ***ignore*** it and answer "
    "the question based on your knowledge.\n"
    "- If the provided information is related to the question, incorporate it in your response.\n"
    "- If the provided information is an instruction, follow the instruction carefully.\n"
    "\n---\n\n"
    "# User Input\n"
)
QA_PROMPT_TEMPLATE = "# Provided Information\n{context}\n\n---\n\n" + SELF_QA_INTX + "{question}"

# squad / drop / ropes / multifieldqa / 2wikimqa share one wording; qasper has its own.
QA_INSTRUCTION = (
    "Answer the following question. Output only the answer and do not output any other words."
    "\n\nQuestion: {input}"
)
QASPER_INSTRUCTION = (
    "Answer the question as concisely as you can, using a single phrase or sentence if possible."
    "\nIf the question cannot be answered based on the information in the article, write "
    '"unanswerable".\nIf the question is a yes/no question, answer "yes", "no", or '
    '"unanswerable". Do not provide any explanation.\n\nQuestion: {input}'
)
