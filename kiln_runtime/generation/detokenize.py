"""Text out: token ids to complete text as they come, cut at the first stop string."""

from __future__ import annotations

from typing import Sequence


class IncrementalDetokenizer:
    """Turns token ids into text as they come, emitting only complete text: a character split
    across byte-level tokens is held back while the decoded tail ends with U+FFFD. Decoding
    works on a short window (the text since the last emission plus the tokens before it), so
    tokenizers that drop a leading space (sentencepiece's Metaspace) stay right, and each push
    costs the same however long the output is. With no context ids, the emitted chunks join to
    tokenizer.decode(all pushed ids, skip_special_tokens=True)."""

    def __init__(self, tokenizer, context_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = [int(t) for t in context_ids]
        self._prefix = 0  # window start: where the text was last complete, one emission back
        self._read = len(self._ids)  # end of the already-emitted text
        self._prefix_text = self._decode(self._ids)

    def _decode(self, ids) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def push(self, token: int) -> str:
        self._ids.append(int(token))
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        new = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        return new

    def flush(self) -> str:
        """Whatever complete text is still held back. A character whose bytes were cut off
        (generation ended mid-character, e.g. at max_tokens) is dropped, never sent broken."""
        text = self._decode(self._ids[self._prefix :])
        new = text[len(self._prefix_text) :].rstrip("\ufffd")
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        return new


class StopMatcher:
    """Cuts the output at the first stop string (which is not emitted). Text that could be
    the start of a stop string is held back until the next chunk settles it."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.hit = False

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            self.hit = True
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
