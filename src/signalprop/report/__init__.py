"""Presentation: terminal tables, JSON, HTML and PNG figures from records."""
