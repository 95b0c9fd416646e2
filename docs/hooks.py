"""mkdocs hook: show on the site the file each Python block belongs to.

The pages mark a block's file with an HTML comment (`<!-- file: NAME.py -->`, or
`<!-- continues -->` for the file before it; tests/unit/test_readme.py runs the files).
GitHub shows neither comment, which is fine there; on the site the file name becomes the
code block's title, so a reader knows what to save each block as.
"""

from __future__ import annotations

import re
from typing import Any

MARKED = re.compile(r"^<!--\s*(file:\s*(?P<name>\S+)|continues)\s*-->\n```python\n", flags=re.M)


def titled(markdown: str) -> str:
    """The page's marked ```python fences with their file as the title."""
    current = ""

    def title(match: re.Match[str]) -> str:
        nonlocal current
        if match["name"]:
            current = match["name"]
            return f'```python title="{current}"\n'
        return f'```python title="{current} (continued)"\n'

    return MARKED.sub(title, markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return titled(markdown)
