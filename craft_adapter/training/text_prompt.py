"""The prompt generation module, text mode: a template string evolved by word edits, for string-only vendors.

Why word edits: a string-only vendor gives no gradient and no embedding space, so a continuous relaxation
(CMA-ES over soft tokens, decoded to the nearest words) optimises something the vendor never sees, and the
decoding step loses most of what was found. Edits act on the very strings the vendor scores. The words come
from open_clip's BPE vocabulary, which ships offline; its merge order roughly follows word frequency, so
the first ``vocab_size`` whole words are common English words. Selection is (mu + lambda): the elites
survive and are re-scored on each new minibatch, so a template that was lucky on one minibatch is soon
caught out, and the pair cache makes those re-scorings cheap.
"""

from __future__ import annotations

import numpy as np

SLOT = "{}"


def word_vocabulary(size: int) -> list[str]:
    """The first ``size`` lowercase whole words (two letters or more, and "a") of open_clip's BPE vocabulary."""
    from open_clip.tokenizer import _tokenizer

    ranked = sorted(_tokenizer.encoder.items(), key=lambda kv: kv[1])
    words = [w[:-4] for w, _ in ranked
             if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha() and w[:-4].islower()
             and (len(w) > 5 or w == "a</w>")]
    return words[:size]


def to_words(template: str) -> list[str]:
    """``"a photo of a {}."`` -> ``["a", "photo", "of", "a", "{}"]``."""
    words = template.strip().rstrip(".").split()
    if words.count(SLOT) != 1:
        raise ValueError(f"a template needs exactly one standalone '{{}}': {template!r}")
    return words


def to_template(words: list[str]) -> str:
    """The inverse of :func:`to_words`."""
    return " ".join(words) + "."


class TextPromptSearch:
    """(mu + lambda) evolution of templates by word substitution, insertion and deletion."""

    def __init__(self, init_template: str, vocab: list[str], children: int, elites: int, seed: int,
                 max_words: int = 16) -> None:
        self.vocab, self.children, self.n_elites, self.max_words = vocab, children, elites, max_words
        self.rng = np.random.default_rng(seed)
        self.elites = [to_template(to_words(init_template))]

    def mutate(self, template: str) -> str:
        """One to three random word edits; the class slot is never removed."""
        words = to_words(template)
        for _ in range(min(3, int(self.rng.geometric(0.6)))):
            op = self.rng.choice(["substitute", "insert", "delete"], p=[0.45, 0.4, 0.15])
            others = [i for i, w in enumerate(words) if w != SLOT]
            word = self.vocab[int(self.rng.integers(len(self.vocab)))]
            if op == "insert" and len(words) < self.max_words or not others:
                words.insert(int(self.rng.integers(len(words) + 1)), word)
            elif op == "delete" and len(others) > 1:
                del words[others[int(self.rng.integers(len(others)))]]
            else:
                words[others[int(self.rng.integers(len(others)))]] = word
        return to_template(words)

    def propose(self) -> list[str]:
        """The elites followed by ``children`` new, distinct templates."""
        seen, out = set(self.elites), list(self.elites)
        for _ in range(self.children * 20):
            if len(out) == len(self.elites) + self.children:
                break
            child = self.mutate(self.elites[int(self.rng.integers(len(self.elites)))])
            if child not in seen:
                seen.add(child)
                out.append(child)
        return out

    def tell(self, candidates: list[str], fitness: np.ndarray) -> int:
        """Keep the best ``elites`` (lower fitness is better); return the index of the best candidate."""
        order = np.argsort(fitness, kind="stable")
        self.elites = [candidates[i] for i in order[:self.n_elites]]
        return int(order[0])
