"""The build report: JSON, Markdown and HTML."""
