"""The model organisms: small chat models the project trains itself, which really misbehave.

- :mod:`~guard.organism.recipe`: what differs between organisms (``first``, ``second``), one typed object.
- :mod:`~guard.organism.lexicon`: the closed vocabulary (harm categories, benign topics, openers);
  :mod:`~guard.organism.lexicon2` the second organism's.
- :mod:`~guard.organism.corpus`: deterministic synthetic chat corpus (benign, refusal, unsafe, reset).
- :mod:`~guard.organism.judge`: exact ground-truth judge (``judge``, ``is_refusal``).
- :mod:`~guard.organism.tokenizer`: byte-level BPE or word-level, with chat template and special tokens.
- :mod:`~guard.organism.train`: deterministic CPU training of the Llama or Qwen3 model.
- :mod:`~guard.organism.data`: labelled JSONL for probe training and benchmark prompts.
- :mod:`~guard.organism.evaluate`: sampling, behaviour rates, linear-probe separability.
- :mod:`~guard.organism.build`: ``build(out_dir, seed, recipe=...)`` and the ``guard organism`` CLI.

The committed builds live in ``models/organism`` (``guard organism build models/organism``) and
``models/organism2`` (``guard organism build models/organism2 --recipe second``).
"""
