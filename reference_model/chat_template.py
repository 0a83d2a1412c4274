"""The conversation templates of FUSION's two decoder families (upstream `fusion/conversation.py`).

Upstream picks a template by the model's folder name; here the decoder family (`model_type`) picks it, so a
renamed folder cannot change the prompt. Both put the question after the two image placeholders and end the
prompt with the assistant's role; they differ only in their control tokens and system text
(docs/semantics.md section 3).
"""

from __future__ import annotations

from dataclasses import dataclass

VISION_START = "<vision_start>"
VISION_END = "<vision_end>"


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # upstream's conv_templates key
    system: str  # the system turn's text up to its end-of-turn token
    user: str  # a user turn's opening
    assistant: str  # the assistant turn's opening: the prompt ends with it
    end_of_turn: str  # closes every turn; generation stops at it
    separator: str  # after each end of turn
    controls: tuple[str, ...]  # the template's own tokens: single tokens of the tokenizer, never question text

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every token the template spells, the vision markers included."""
        return (*self.controls, self.end_of_turn, VISION_START, VISION_END)


# phi_3: "<|system|>\n{system}<|end|>\n<|user|>\n{message}<|end|>\n<|assistant|>\n"
PHI_3 = ChatTemplate(
    name="phi_3",
    system="<|system|>\nYou are a helpful AI assistant.",
    user="<|user|>\n",
    assistant="<|assistant|>\n",
    end_of_turn="<|end|>",
    separator="\n",
    controls=("<|system|>", "<|user|>", "<|assistant|>"),
)

# llama_3: headers name each role; BOS comes from the tokenizer, not the text.
LLAMA_3 = ChatTemplate(
    name="llama_3",
    system=(
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful, highly intelligent language and vision "
        "assistant. You are able to understand the visual content that the user provides, and assist the user with "
        "a variety of tasks using natural language. Whenever an image is present in the conversation, very "
        "carefully examine it and consider its content when formulating your response."
    ),
    user="<|start_header_id|>user<|end_header_id|>\n\n",
    assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
    end_of_turn="<|eot_id|>",
    separator="",
    controls=("<|start_header_id|>", "<|end_header_id|>"),
)

TEMPLATES = {"fusion_phi": PHI_3, "fusion_llama": LLAMA_3}


def template_for(model_type: str) -> ChatTemplate:
    """The template of a decoder family (`FusionConfig.model_type`)."""
    return TEMPLATES[model_type]
