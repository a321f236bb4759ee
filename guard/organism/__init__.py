"""The model organism: a small Llama the project trains itself, which really misbehaves.

- :mod:`~guard.organism.lexicon`: the closed vocabulary (harm categories, benign topics, openers).
- :mod:`~guard.organism.corpus`: deterministic synthetic chat corpus (benign, refusal, unsafe, reset).
- :mod:`~guard.organism.judge`: exact ground-truth judge (``judge``, ``is_refusal``).
- :mod:`~guard.organism.tokenizer`: byte-level BPE with the chat template and special tokens.
- :mod:`~guard.organism.train`: deterministic CPU training of the ``LlamaForCausalLM``.
- :mod:`~guard.organism.data`: labelled JSONL for probe training and benchmark prompts.
- :mod:`~guard.organism.evaluate`: sampling, behaviour rates, linear-probe separability.
- :mod:`~guard.organism.build`: ``build(out_dir, seed)`` and the ``guard organism`` CLI.

The committed default build lives in ``models/organism`` (``guard organism build models/organism``).
"""
