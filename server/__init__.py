"""OpenAI-compatible HTTP server for guard: ``protocol`` (models), ``serving`` (logic), ``routes``
(thin handlers), ``errors`` (the one exception -> OpenAI error JSON mapper), ``app`` (create_app, run)."""
