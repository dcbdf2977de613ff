"""A word-level tokenizer built locally from an environment's word list (no downloads).

It is a `transformers.PreTrainedTokenizerFast` over a `tokenizers` WordLevel model with whitespace
splitting, so it saves and loads with the model like any Hugging Face tokenizer. The rollout's hot loop
looks words up in a plain dict (`encode_words`), which gives the same ids without the batching machinery.

Special tokens: <pad> (padding, never attended), <bos> (starts every sequence), <unk>, <end> (the model
emits it to finish an action) and ">" (the environment appends it to each observation: "your move").
"""

from __future__ import annotations

from typing import Iterable, List, Sequence

__all__ = ["WordTokenizer", "SPECIAL_TOKENS", "ACTION_PROMPT", "END_OF_ACTION"]

PAD, BOS, UNK, END_OF_ACTION, ACTION_PROMPT = "<pad>", "<bos>", "<unk>", "<end>", ">"
SPECIAL_TOKENS = (PAD, BOS, UNK, END_OF_ACTION, ACTION_PROMPT)


class WordTokenizer:
    """Word <-> id maps for one environment, and the equivalent Hugging Face tokenizer (`.hf`)."""

    def __init__(self, words: Iterable[str]) -> None:
        vocab = list(dict.fromkeys([*SPECIAL_TOKENS, *words]))
        self.id_of = {word: i for i, word in enumerate(vocab)}
        self.words = vocab
        self.pad_id, self.bos_id, self.unk_id = self.id_of[PAD], self.id_of[BOS], self.id_of[UNK]
        self.end_id, self.prompt_id = self.id_of[END_OF_ACTION], self.id_of[ACTION_PROMPT]
        # imported here: the command line checks for tokenizers/transformers before any work
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from tokenizers.pre_tokenizers import WhitespaceSplit
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(WordLevel(vocab=dict(self.id_of), unk_token=UNK))
        backend.pre_tokenizer = WhitespaceSplit()
        self.hf = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, unk_token=UNK,
                                          eos_token=END_OF_ACTION)

    def __len__(self) -> int:
        return len(self.words)

    def encode_words(self, text: str) -> List[int]:
        """Ids of the whitespace-separated words of `text` (unknown words -> <unk>)."""
        return [self.id_of.get(word, self.unk_id) for word in text.split()]

    def observation_ids(self, text: str) -> List[int]:
        """An observation as the model reads it: its words, then the action prompt ">"."""
        return self.encode_words(text) + [self.prompt_id]

    def action_ids(self, action: str) -> List[int]:
        """A (demonstration) action as the model writes it: its words, then <end>."""
        return self.encode_words(action) + [self.end_id]

    def decode_action(self, ids: Sequence[int]) -> str:
        """Generated ids -> the action string the environment parses (<end> and everything after it dropped)."""
        words = []
        for i in ids:
            if i == self.end_id:
                break
            words.append(self.words[i])
        return " ".join(words)

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in ids)
