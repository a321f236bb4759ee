"""``guard eval``: a user's model, policy, labelled prompts and judge, measured through a live server.

- :mod:`guard.eval.data`: the labelled prompt file (JSONL) and its groups;
- :mod:`guard.judge`: the judge (a Python callable, a regex or a word list), shared with `guard probe train`;
- :mod:`guard.eval.run`: the unguarded twin of a policy, the server, the streamed requests;
- :mod:`guard.eval.report`: the tables.
"""
