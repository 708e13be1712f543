"""``M3Config``: the encoder's shape and conventions, from a HF ``config.json`` or an e5 header.

Two position conventions exist and both are supported:

* ``xlm-roberta`` (BGE-M3): position ids start at ``pad_token_id + 1`` and count only
  non-pad tokens; ``max_position_embeddings`` is 8194, so 8192 usable tokens.
* ``bert`` (multilingual-e5-small): position ids are ``0..L-1``.

>>> M3Config.from_dict({"model_type": "xlm-roberta", "hidden_size": 8, "num_hidden_layers": 1,
...     "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 250002,
...     "max_position_embeddings": 514}).max_length
512
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class M3Config:
    vocab_size: int = 250002
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 8194
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0   # CLS, <s>
    eos_token_id: int = 2   # </s>
    unk_token_id: int = 3
    model_type: str = "xlm-roberta"
    hidden_act: str = "gelu"
    pooling: str = "cls"    # dense pooling: "cls" (BGE-M3) or "mean" (e5)

    def __post_init__(self):
        if self.model_type not in ("xlm-roberta", "bert"):
            raise ValueError(f"unsupported model_type {self.model_type!r}; expected 'xlm-roberta' or 'bert'")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_length(self) -> int:
        """Longest token sequence the position table allows (8192 for BGE-M3, 512 for e5)."""
        if self.model_type == "xlm-roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: dict) -> "M3Config":
        """Known keys of a ``config.json`` dict; a value of the wrong type is an error naming the key.

        >>> M3Config.from_dict({"hidden_size": "384"})
        Traceback (most recent call last):
        ...
        ValueError: config key 'hidden_size' must be an int, got str '384'
        """
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(d).__name__}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key, value in known.items():
            want = type(cls.__dataclass_fields__[key].default)
            ok = (isinstance(value, want) and not isinstance(value, bool) if want is int
                  else isinstance(value, (int, float)) and not isinstance(value, bool) if want is float
                  else isinstance(value, want))
            if not ok:
                raise ValueError(f"config key {key!r} must be a{'n' if want is int else ''} {want.__name__}, "
                                 f"got {type(value).__name__} {value!r}")
        if "model_type" in d and d["model_type"] in ("roberta", "xlm-roberta", "xlm_roberta"):
            known["model_type"] = "xlm-roberta"
        return cls(**known)

    @classmethod
    def from_json(cls, path: str | Path) -> "M3Config":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config.json not found: {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None

    @classmethod
    def from_e5_header(cls, header: dict) -> "M3Config":
        """Config for multilingual-e5-small read from an ``e5-small-q4.bin`` header (BERT mode)."""
        return cls(model_type="bert", pooling="mean", pad_token_id=1, **header)

    def to_dict(self) -> dict:
        return asdict(self)
