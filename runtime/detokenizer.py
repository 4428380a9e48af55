"""Incremental detokenization of one completion, vLLM's scheme: each new token decodes a short
window of ids (from ``prefix`` to the end) and the text that window adds beyond its first part
(``prefix`` to ``read``) is new. A window that ends inside a multi-byte character (decodes to a
trailing U+FFFD) waits for the next token. Cost per token is bounded by the window, not by the
completion's length.

Stop strings are searched only in the tail the new text can reach. For streaming, ``stable``
holds back the last ``len(longest stop) - 1`` characters: they may still become the start of a
stop string, and text once released is never taken back."""


def decode(tokenizer, ids: list[int]) -> str:
    # NOTE: no clean-up pass: it strips spaces before punctuation, wrong for BPE tokenizers
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.prefix = self.read = 0
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)

    def add(self, token_id: int) -> bool:
        """Appends one token; True when the text now holds a stop string (``text`` is then cut
        just before it and stays so)."""
        if self.stopped:
            return True
        self.ids.append(token_id)
        new = self._pending()
        if not new or new.endswith("\ufffd"):
            return False
        return self._extend(new)

    def _pending(self) -> str:
        """The text the ids past ``read`` add, decoded after the window's head as context."""
        head = self._decode(self.ids[self.prefix:self.read])
        window = self._decode(self.ids[self.prefix:])
        return window[len(head):] if len(window) > len(head) else ""

    def _extend(self, new: str) -> bool:
        start = max(0, len(self.text) - self.hold)  # a stop string may begin in the older tail
        self.text += new
        self.prefix, self.read = self.read, len(self.ids)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        return self.stopped

    def finish(self) -> str:
        """The final text: what a window still held back (an incomplete character) is released."""
        if not self.stopped and self.read < len(self.ids):
            new = self._pending()
            if new:
                self._extend(new)
        return self.text

    @property
    def stable(self) -> str:
        """Text that no later token can change: all of it once stopped, else all but the tail a
        stop string could still claim."""
        return self.text if self.stopped or not self.hold else self.text[:len(self.text) - self.hold]
