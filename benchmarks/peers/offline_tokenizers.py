"""Pieces of the tokenizers the peers' random models ship with, built without a download: only the token ids'
shapes matter (CLIP 77, T5 512)."""


def clip_byte_vocab() -> dict:
    """CLIP's byte-level BPE alphabet, every byte symbol without and with the end-of-word suffix, in GPT-2's
    byte-to-unicode order (transformers 5 no longer exports its bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    vocab = {}
    for suffix in ("", "</w>"):
        for s in symbols:
            vocab[s + suffix] = len(vocab)
    return vocab
