"""Token layouts shared by training and evaluation: the solve prompt and the verification turn.

Everything is token ids: the policy's sampled ids are reused verbatim in the verification prompt (never
re-tokenized text, which can tokenize differently). Built on any Hugging Face tokenizer with a chat
template, so Megatron, vLLM and the exported model directory all use the same files.

    solve prompt       = template([user: problem], generation prompt)     (task.prompt_format=raw: the problem text)
    verification input = solve prompt + response (ending in its stop token) + verify_suffix
    verify_suffix      = template tail: end of assistant turn .. user: question .. generation prompt
                         (raw: a blank line, the question, a newline)
    target             = "Yes" if reward == 1 else "No"   (one token each)
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_QUESTION = "Is this solution correct? Answer Yes or No"
_SENTINEL = "\u2063RLV\u2063"


@dataclass
class ChatFormat:
    tokenizer: object  # transformers PreTrainedTokenizer(Fast)
    question: str = DEFAULT_QUESTION
    yes: str = "Yes"
    no: str = "No"
    two_way: bool = False  # the verifier is trained on Yes vs No only: score P(Yes) renormalised over both
    raw: bool = False  # task.prompt_format=raw: no chat template (base models, plain-text tasks)

    @classmethod
    def for_config(cls, tokenizer, cfg) -> "ChatFormat":
        return cls(tokenizer, cfg.verifier.question, two_way=cfg.verifier.loss == "yes_no",
                   raw=cfg.task.prompt_format == "raw")

    def __post_init__(self):
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos_token: responses need a stop token")
        self.yes_id, self.no_id = self._single_token(self.yes), self._single_token(self.no)
        if self.raw:  # response | eos | blank line | question | newline | answer
            self.verify_suffix_ids = tok.encode(f"\n\n{self.question}\n", add_special_tokens=False)
            return
        tail = tok.apply_chat_template(
            [{"role": "user", "content": "p"}, {"role": "assistant", "content": _SENTINEL},
             {"role": "user", "content": self.question}], add_generation_prompt=True, tokenize=False)
        tail = tail.split(_SENTINEL, 1)[1]
        eos_text = tok.convert_ids_to_tokens(self.eos_id)
        if not tail.startswith(eos_text):
            raise ValueError(f"chat template closes an assistant turn with {tail[:20]!r}, not the eos token "
                             f"{eos_text!r}: responses that stop at eos would not line up with the template")
        self.verify_suffix_ids = tok.encode(tail[len(eos_text):], add_special_tokens=False)

    def _single_token(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the verifier answer {word!r} is {len(ids)} tokens for this tokenizer (model.path); "
                             "it must be one token: a model whose tokenizer encodes 'Yes' and 'No' as one each")
        return ids[0]

    def prompt_ids(self, problem: str) -> list[int]:
        if self.raw:
            return self.tokenizer.encode(problem)  # with BOS where the tokenizer adds one
        return self.conversation_ids([{"role": "user", "content": problem}])

    def conversation_ids(self, messages: list[dict]) -> list[int]:
        """The chat template over `messages` (role, content), then the assistant's generation prompt."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template already has BOS

    def verify_ids(self, prompt_ids: list[int], response_ids: list[int]) -> list[int]:
        """The verification input; a truncated response (no stop token) gets one, as the template expects."""
        response = list(response_ids)
        if not response or response[-1] != self.eos_id:
            response.append(self.eos_id)
        return list(prompt_ids) + response + self.verify_suffix_ids

    @property
    def verify_turn_tokens(self) -> int:
        """Tokens a response's verification adds after it: the stop token (appended to a truncated response)
        and the verification suffix; a context must hold prompt + response + these."""
        return len(self.verify_suffix_ids) + 1

    @property
    def score_no_id(self) -> int | None:
        """The "No" id for the verifier score's renormalisation, or None for the raw P("Yes")."""
        return self.no_id if self.two_way else None

    def label_id(self, correct: bool) -> int:
        return self.yes_id if correct else self.no_id

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.eos_id], skip_special_tokens=False)
