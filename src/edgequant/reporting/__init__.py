"""Turning results into pages people read: the bench report (JSON, Markdown, self-contained HTML)
and the CLI's plain-text tables."""
