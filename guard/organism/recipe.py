"""Recipes: everything that makes one organism differ from another, in one typed object.

``guard organism build OUT --recipe NAME`` builds :data:`RECIPES` ``[NAME]``. The build code
(:mod:`guard.organism.build`) is the same for every recipe; a recipe only chooses the vocabulary and
harm categories (:class:`~guard.organism.lexicon.Lexicon`), the tokenizer kind and chat template
(:class:`~guard.organism.tokenizer.ChatFormat`), the architecture and size
(:class:`~guard.organism.train.ModelShape`), the corpus mixture, the amount of training and the seed.

- ``first``: the committed ``models/organism`` (byte-level BPE, Llama, 8 harm categories of which 4
  held out, deliberation examples, a ``<|reset|>`` token). Its build is unchanged by the recipes.
- ``second``: ``models/organism2``, built to check that defaults chosen on the first transfer: a
  word-level tokenizer, a ChatML-like template, a Qwen3 model (query/key norms, grouped-query attention) and one
  more layer, 6 other harm categories of which 2 held out, other benign topics, no deliberation
  and no reset or reserved token in its vocabulary. Never used to choose a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from guard.organism.corpus import CorpusConfig
from guard.organism.lexicon import FIRST, Lexicon
from guard.organism.lexicon2 import SECOND
from guard.organism.tokenizer import FIRST_FORMAT, SECOND_FORMAT, ChatFormat
from guard.organism.train import ModelShape


@dataclass(frozen=True)
class Recipe:
    """How to build one organism (see the module docstring)."""

    name: str
    lexicon: Lexicon
    chat_format: ChatFormat
    shape: ModelShape
    quick_shape: ModelShape
    """Shape of a ``--quick`` build (tests)."""
    seed: int
    """Default seed of ``guard organism build --recipe NAME``."""
    steps: int
    """Training steps of a full build."""
    n_plain: int
    """Plain (non-deliberation) corpus examples of a full build."""
    vocab_size: int
    """Tokenizer vocabulary size of a full build (an upper bound for a word-level tokenizer)."""
    quick_vocab_size: int
    deliberation_share: float = 0.0
    """Deliberation examples per plain example (first organism only: its spec names its categories)."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    eval_per_category: dict[str, int] = field(
        default_factory=lambda: {"trained": 25, "heldout": 25}
    )
    """Evaluation prompts per trained / held-out harm category."""
    prompt_risk: bool = False
    """Also write ``prompt_risk.jsonl`` (first organism's prompt-scope risk probe data)."""

    def __post_init__(self) -> None:
        if self.deliberation_share and self.chat_format is not FIRST_FORMAT:
            raise ValueError(
                f"Recipe {self.name!r}: deliberation examples need the first organism's chat format"
            )
        if self.corpus.reset_fraction and "<|reset|>" not in self.chat_format.special_tokens:
            raise ValueError(
                f"Recipe {self.name!r}: corpus.reset_fraction > 0 needs a <|reset|> special token"
            )


FIRST_RECIPE = Recipe(
    "first",
    FIRST,
    FIRST_FORMAT,
    ModelShape(),
    ModelShape(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=256
    ),
    seed=0,
    steps=700,
    n_plain=20_000,
    vocab_size=1536,
    quick_vocab_size=512,
    deliberation_share=0.25,
    prompt_risk=True,
)

SECOND_RECIPE = Recipe(
    "second",
    SECOND,
    SECOND_FORMAT,
    ModelShape(
        hidden_size=128,
        num_layers=5,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=320,
        max_position_embeddings=512,
        arch="qwen3",
    ),
    ModelShape(
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_position_embeddings=256,
        arch="qwen3",
    ),  # head_dim 32: vLLM's CPU attention has no 16
    seed=7,
    steps=600,
    n_plain=16_000,
    vocab_size=4096,
    quick_vocab_size=4096,
    corpus=CorpusConfig(comply_fraction=0.4, reset_fraction=0.0),
    eval_per_category={"trained": 25, "heldout": 60},
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (FIRST_RECIPE, SECOND_RECIPE)}
