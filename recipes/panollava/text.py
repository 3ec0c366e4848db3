"""PanoLLaVA's text side: tokenizers, the ChatML prompt and the label mask.

A training example is one chat turn (the seed's hard-coded template for the Qwen family):

    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision|>\n{prompt with query}<|im_end|>\n
    <|im_start|>assistant\n{caption}<|im_end|>\n

Labels are -100 up to and including `<|im_start|>assistant\n` (the model is not trained to write the
prompt), then the caption's tokens and its end (`<|im_end|>`). The model replaces the one
`<|vision|>` token by the projected image tokens (their labels are -100 too).

Two tokenizers with one interface (encode, decode, special ids):
- `HFTokenizer`: a checkpoint folder's tokenizer.json (Qwen's byte-level BPE) through the
  `tokenizers` package (an optional extra, imported only here), `<|vision|>` added when absent;
- `WordTokenizer`: whole words, punctuation and newlines over a fixed vocabulary, for synthetic data
  (built from the training captions, so a tiny LM can learn them).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

from trainlib.config import ConfigError

VISION, IM_START, IM_END, PAD, EOT = "<|vision|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|endoftext|>"
SPECIALS = [PAD, EOT, IM_START, IM_END, VISION]
SYSTEM = "You are a helpful assistant. Describe the panorama image."
PROMPT = 'In this panoramic image, please provide a concise but detailed description of "{query}".'
_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
_WORDS = re.compile(r"\n|[A-Za-z0-9]+(?:'[a-z]+)?|[^\sA-Za-z0-9]")


def chat_prompt(query: str, system: str = SYSTEM, template: str = PROMPT) -> str:
    """The text before the answer (ends with the assistant header)."""
    user = f"{VISION}\n" + template.format(query=query)
    return f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"


class WordTokenizer:
    """Words, punctuation and newlines of a fixed vocabulary; unknown words map to `<|endoftext|>`'s
    neighbour `<unk>`. Special tokens are whole tokens."""

    def __init__(self, words: Sequence[str]) -> None:
        self.vocab = SPECIALS + ["<unk>"] + [w for w in words if w not in SPECIALS and w != "<unk>"]
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "WordTokenizer":
        """The sorted set of the texts' words plus the prompt's: the same vocabulary on every rank."""
        seen: set[str] = set()
        for t in [*texts, chat_prompt("x"), "\n"]:
            for part in _SPLIT.split(t):
                if part and part not in SPECIALS:
                    seen.update(m.lower() for m in _WORDS.findall(part))
        return cls(sorted(seen))

    def __len__(self) -> int:
        return len(self.vocab)

    def token_id(self, token: str) -> int:
        return self.ids[token]

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        unk = self.ids["<unk>"]
        for part in _SPLIT.split(text):
            if part in self.ids and part in SPECIALS:
                out.append(self.ids[part])
            elif part:
                out += [self.ids.get(w.lower(), unk) for w in _WORDS.findall(part)]
        return out

    def decode(self, ids: Iterable[int]) -> str:
        words = [self.vocab[i] for i in ids if 0 <= i < len(self.vocab) and self.vocab[i] not in SPECIALS]
        return re.sub(r" ([^\w\s'])", r"\1", " ".join(w for w in words if w != "\n"))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"kind": "word", "vocab": self.vocab}))


class HFTokenizer:
    """A Hugging Face tokenizer.json (Qwen2's byte-level BPE) through the `tokenizers` package."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import AddedToken, Tokenizer
        except ImportError:
            raise ConfigError("a checkpoint's tokenizer.json needs the `tokenizers` package: "
                              "pip install -e \".[panollava]\"") from None
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library's own exception type
            raise ConfigError(f"{path}: not a tokenizer.json the tokenizers package reads ({e})") from None
        missing = [s for s in (VISION, IM_START, IM_END, EOT) if self.tok.token_to_id(s) is None]
        if missing:
            self.tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in missing])

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of a special token; the pad token is the end-of-text token when the vocabulary has
        none (Qwen's rule: pad = eos)."""
        i = self.tok.token_to_id(token)
        if i is None and token == PAD:
            i = self.tok.token_to_id(EOT)
        if i is None:
            raise ConfigError(f"tokenizer.json has no token {token!r}")
        return int(i)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True).strip()


def load_tokenizer(lm_folder: str, texts: Iterable[str]) -> WordTokenizer | HFTokenizer:
    """The checkpoint's tokenizer.json when an LM folder is given, else words of `texts`."""
    if lm_folder:
        path = Path(lm_folder) / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{lm_folder}: no tokenizer.json (expected a Hugging Face Qwen2 folder)")
        return HFTokenizer(path)
    return WordTokenizer.from_texts(texts)


def encode_example(tok: WordTokenizer | HFTokenizer, query: str, answer: str | None,
                   system: str = SYSTEM, template: str = PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of one chat turn; answer None: the prompt only (for generation), labels all -100."""
    prompt = tok.encode(chat_prompt(query, system, template))
    if tok.encode(VISION) != [tok.token_id(VISION)] or prompt.count(tok.token_id(VISION)) != 1:
        raise ConfigError("the tokenizer does not keep <|vision|> as one token: the image tokens have no place")
    answer_ids = [] if answer is None else tok.encode(answer) + [tok.token_id(IM_END)]
    ids = torch.tensor(prompt + answer_ids, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    labels[len(prompt):] = ids[len(prompt):]
    return ids, labels
