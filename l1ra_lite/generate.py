"""Try a finished run: the adapter on its base model, through the chat template.

The base is loaded as in training (NF4 via bitsandbytes, or unquantised, in the run's
compute dtype) and the adapter with stock peft `PeftModel.from_pretrained`, so what
you see is what the adapter folder gives any peft user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, TextIO

from l1ra_lite.errors import UserError
from l1ra_lite.finished_run import RunInfo


@dataclass
class Reply:
    text: str  # the answer, special tokens removed
    prompt_ids: list[int]  # the templated conversation fed to the model
    output_ids: list[int]  # prompt_ids followed by the generated tokens


def load_for_generation(run: RunInfo, device: Optional[str] = None) -> tuple[Any, Any]:
    """(peft model in eval mode, tokenizer) for the run."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from l1ra_lite.models import nf4_config

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, run.compute_dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": device}, "trust_remote_code": run.trust_remote_code}
    if run.quant == "nf4":
        kwargs["quantization_config"] = nf4_config(dtype)
    base = AutoModelForCausalLM.from_pretrained(run.base_dir, **kwargs)
    model = PeftModel.from_pretrained(base, run.adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_dir, trust_remote_code=run.trust_remote_code)
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer in {run.tokenizer_dir} has no chat template; generate needs one")
    return model, tokenizer


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The conversation through the chat template, ending with the assistant's turn opening."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def check_system_message(tokenizer: Any, opening: list[dict[str, str]]) -> None:
    """A system message (--system) must reach the model: some chat templates refuse the
    role (an error) and some drop it without a word; both are said in one line."""
    if not opening:
        return
    from jinja2 import TemplateError

    conversation = opening + [{"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except TemplateError as err:
        raise UserError(f"this model's chat template refuses a system message ({err}); leave out --system") from None
    if opening[0]["content"] not in text:
        raise UserError("this model's chat template leaves system messages out; --system would have no effect")


def generate_reply(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_new_tokens: int = 256,
    temperature: float = 0.7,
) -> Reply:
    """The model's answer to the conversation (greedy when temperature is 0)."""
    import torch

    if temperature < 0:
        raise UserError(f"--temperature cannot be negative (got {temperature})")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    ids = prompt_ids(tokenizer, messages)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **sampling,
        )
    output_ids = output[0].tolist()
    text = tokenizer.decode(output_ids[len(ids) :], skip_special_tokens=True).strip()
    return Reply(text=text, prompt_ids=ids, output_ids=output_ids)


def chat_loop(
    answer: Callable[[list[dict[str, str]]], Reply],
    stdin: TextIO,
    stdout: TextIO,
    opening: Optional[list[dict[str, str]]] = None,
) -> list[dict[str, str]]:
    """Read user lines until EOF or an empty line; answer each with the whole conversation
    so far, which starts with `opening` (a system message, or nothing)."""
    messages: list[dict[str, str]] = list(opening or [])
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or not line.strip():
            stdout.write("\n")
            return messages
        messages.append({"role": "user", "content": line.strip()})
        reply = answer(messages)
        messages.append({"role": "assistant", "content": reply.text})
        stdout.write(f"model> {reply.text}\n")
        stdout.flush()
