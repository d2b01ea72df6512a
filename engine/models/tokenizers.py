"""Synthetic tokenizers of the real vocabulary sizes (CLIP-L byte-level BPE, T5 unigram): no hub download."""

from __future__ import annotations

import string

# ----------------------------------------------------------------------------- synthetic tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def synthetic_clip_tokenizer(vocab_size: int, max_length: int = 77):
    """A byte-level BPE tokenizer of CLIP's shape: `vocab_size` tokens, bos/eos the last two ids.

    The merges are made up (prefixes grown one character at a time), so any text tokenizes and
    the sequence lengths behave like CLIP's; the ids mean nothing.
    """
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    target = vocab_size - len(specials)
    base = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in base + [b + "</w>" for b in base]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    alphabet = string.ascii_lowercase + string.digits
    prefixes = list(alphabet)
    index = 0
    while len(vocab) < target and index < len(prefixes):
        prefix = prefixes[index]
        index += 1
        for char in alphabet:
            for end in (char, char + "</w>"):
                if len(vocab) >= target:
                    break
                token = prefix + end
                if token in vocab:
                    continue
                vocab[token] = len(vocab)
                merges.append((prefix, end))
                if not end.endswith("</w>"):
                    prefixes.append(token)
    if len(vocab) > target:
        raise ValueError(f"CLIP vocab_size {vocab_size} is below the {len(vocab) + 2} byte-level base tokens")
    for token in specials:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def synthetic_t5_tokenizer(vocab_size: int, max_length: int):
    """A Unigram tokenizer of T5's shape: pad 0, eos 1, unk 2, 100 sentinel ids at the top.

    `vocab_size` counts the sentinels, as `len(T5TokenizerFast)` does (32100 for T5-XXL).
    """
    from transformers import T5Tokenizer

    extra_ids = 100
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    target = vocab_size - extra_ids
    seen = {p for p, _ in pieces}
    alphabet = string.ascii_lowercase + string.digits + string.punctuation
    frontier = [""]
    while len(pieces) < target and frontier:
        next_frontier = []
        for stem in frontier:
            for char in alphabet:
                for piece in ("\u2581" + stem + char, stem + char):
                    if len(pieces) >= target:
                        break
                    if piece in seen:
                        continue
                    seen.add(piece)
                    pieces.append((piece, -float(len(piece))))
                next_frontier.append(stem + char)
        frontier = next_frontier
    return T5Tokenizer(vocab=pieces, extra_ids=extra_ids, model_max_length=max_length)
