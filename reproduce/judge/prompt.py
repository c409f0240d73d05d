"""The judge's instructions (SPEC §7, in this project's own words) and the chat message around them.

The message holds, in order: the full image with the region boxed in red, the
instructions with the candidate words, and the close-up crop of the region.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

PROMPT_VERSION = "1"  # bump when the wording changes: it is part of every cache key
WORDS_MARKER = "CANDIDATE WORDS: "  # the words follow on the same line as a JSON array

_TEMPLATE = """\
You are an expert in visual analysis, skilled at telling how words relate to what a \
picture shows.

You receive:
1. The full image (shown above). A region of it is outlined in red and lightly tinted red.
2. A close-up crop of exactly that region (shown below). Use it only when details in the \
region are too small to make out in the full image (for instance small text); otherwise \
judge from the full image.
3. A list of candidate words, which may repeat:
{marker}{words}

For every candidate word, decide whether it relates to the outlined region, and how. \
There are three kinds of relation:

- concrete: the word names something you can actually see inside the region. This \
covers objects and parts of objects, colours, textures and materials, text, letters, \
digits or symbols, and shapes, patterns or other visual features.
- abstract: the word is not visible as such but is tied in meaning to what the region \
shows. This covers emotions or impressions the content evokes, activities or functions \
linked to it, cultural or conceptual associations, qualities or characteristics, and \
anything else you judge to be semantically related to the region or to the image as a \
whole.
- global: the word names something that is visible somewhere else in the image, outside \
the outlined region, but not inside it.

Text inside the region counts: a word can be concretely related because it is part of \
the text shown (a fragment or a single letter of it), or abstractly related to what that \
text means. A word that fits none of the three kinds is unrelated; leave it out.

Look at the region, its surroundings and the whole image before deciding. In your \
reasoning, go through the three kinds one by one (concrete, then abstract, then global) \
and say for each whether any candidate word belongs to it.

Answer with exactly one JSON object and nothing after it, with these keys:
{{
  "reasoning": "<your discussion of the concrete, abstract and global relations>",
  "interpretable": <true if at least one word is related to the region, else false>,
  "concrete_words": [<the candidate words with a concrete relation>],
  "abstract_words": [<the candidate words with an abstract relation>],
  "global_words": [<the candidate words with a global relation>]
}}
Use an empty list for a kind that no word fits.
"""


def format_words(words: Sequence[str]) -> str:
    """The candidate words as a one-line JSON array (readable, unambiguous about spaces)."""
    return json.dumps(list(words), ensure_ascii=False)


def build_prompt(words: Sequence[str]) -> str:
    """The judge's instructions for one patch's candidate words."""
    return _TEMPLATE.format(marker=WORDS_MARKER, words=format_words(words))


def parse_prompt_words(text: str) -> list[str] | None:
    """The candidate words written into a prompt by :func:`build_prompt`, or ``None``."""
    for line in text.splitlines():
        if line.startswith(WORDS_MARKER):
            try:
                words = json.loads(line[len(WORDS_MARKER) :])
            except json.JSONDecodeError:
                return None
            return [str(w) for w in words] if isinstance(words, list) else None
    return None


def build_messages(
    words: Sequence[str], boxed_url: str, crop_url: str, image_detail: str | None = None
) -> list[dict[str, Any]]:
    """Chat-completions ``messages``: boxed image, instructions, crop (images as data URLs)."""

    def image(url: str) -> dict[str, Any]:
        part: dict[str, Any] = {"url": url}
        if image_detail:
            part["detail"] = image_detail
        return {"type": "image_url", "image_url": part}

    content = [image(boxed_url), {"type": "text", "text": build_prompt(words)}, image(crop_url)]
    return [{"role": "user", "content": content}]
