"""Load Hugging Face SegFormer checkpoints from a local folder (no download, ever).

    model = from_pretrained("/models/mit-b0")                      # encoder only: decode head random
    model = from_pretrained("/models/segformer-b0-ade", num_labels=150)
    python -m recipes.segformer model.pretrained=/models/mit-b0 ...

A folder in the Hugging Face layout holds config.json (model_type "segformer") and model.safetensors
(or model.safetensors.index.json + shards, or pytorch_model.bin). Two kinds are understood:

- nvidia/mit-b0..b5 (`SegformerForImageClassification`): `segformer.encoder.*` + `classifier.*`
  (the ImageNet head, discarded);
- `SegformerForSemanticSegmentation`: `segformer.encoder.*` + `decode_head.*`.

Key mapping, HF -> ours (model.py names its modules after the hub keys):

    segformer.<rest>            -> <rest>
    attention.self.<x>          -> attention.<x>        (query, key, value, sr, layer_norm)
    attention.output.dense      -> attention.proj
    mlp.dwconv.dwconv           -> mlp.dwconv
    decode_head.*               -> decode_head.*

Checkpoints written by transformers >= 5 with save_pretrained(save_original_format=False) use its
in-memory names (segformer.stages.i.blocks.j..., q_proj, fc1, linear_projections...); they are
first renamed to the hub names above.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from trainlib.data import load_json
from trainlib.checkpoint import CheckpointError
from trainlib.config import ConfigError

from .model import FIXED, VARIANTS, SegFormer, SegFormerConfig

HUB_TO_OURS = [("attention.self.", "attention."), ("attention.output.dense.", "attention.proj."),
               ("mlp.dwconv.dwconv.", "mlp.dwconv.")]
# transformers >= 5 in-memory names -> hub names
V5_TO_HUB = [
    (r"^segformer\.stages\.(\d+)\.patch_embeddings\.", r"segformer.encoder.patch_embeddings.\1."),
    (r"^segformer\.stages\.(\d+)\.blocks\.(\d+)\.", r"segformer.encoder.block.\1.\2."),
    (r"^segformer\.stages\.(\d+)\.layer_norm\.", r"segformer.encoder.layer_norm.\1."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".mlp.dense1."),
    (r"\.mlp\.fc2\.", ".mlp.dense2."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
    (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
]
ENCODER_FIELDS = ("hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "patch_sizes", "strides",
                  "mlp_ratios", "num_channels")
OPTIONAL = ("num_batches_tracked",)   # BatchNorm's counter: not every exporter writes it
_MAX_LISTED = 6


def hf_to_ours(key: str) -> str | None:
    """Our key for a Hugging Face key; None for keys that are not part of our model (classifier.*)."""
    if key.startswith("segformer.stages.") or key.startswith("decode_head.linear_projections."):
        for pattern, repl in V5_TO_HUB:
            key = re.sub(pattern, repl, key)
    if key.startswith("segformer."):
        key = key[len("segformer."):]
        for old, new in HUB_TO_OURS:
            key = key.replace(old, new)
        return key
    if key.startswith("decode_head."):
        return key
    return None


def ours_to_hf(key: str) -> str:
    """Hub key of one of our keys (the inverse of hf_to_ours for hub-format checkpoints)."""
    if key.startswith("decode_head."):
        return key
    key = re.sub(r"\.attention\.(query|key|value|sr|layer_norm)\.", r".attention.self.\1.", key)
    key = key.replace(".attention.proj.", ".attention.output.dense.").replace(".mlp.dwconv.", ".mlp.dwconv.dwconv.")
    return "segformer." + key


def to_hf_state_dict(model: SegFormer) -> dict[str, torch.Tensor]:
    """Our weights under SegformerForSemanticSegmentation's hub keys (load with load_state_dict)."""
    return {ours_to_hf(k): v for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Reading a folder

def _listing(items: list[str]) -> str:
    more = f" ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def read_config(folder: str) -> dict:
    if not os.path.isdir(folder):
        raise CheckpointError(f"pretrained folder not found: {folder}")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no config.json: expected a Hugging Face model folder "
                              f"(config.json + model.safetensors), e.g. a local copy of nvidia/mit-b0")
    config = load_json(path, "pretrained config", CheckpointError)
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "segformer":
        arch = ", ".join(config.get("architectures") or []) if isinstance(config, dict) else ""
        raise CheckpointError(f"{folder} holds a {kind or 'unknown'!r} model ({arch or 'no architectures listed'}), "
                              f"not SegFormer: expected config.json with \"model_type\": \"segformer\"")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{folder}: hidden_act={act!r} is not supported (SegFormer uses gelu)")
    return config


def read_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    legacy = os.path.join(folder, "pytorch_model.bin")
    try:
        if os.path.isfile(single):
            return load_file(single)
        if os.path.isfile(index):
            with open(index) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(os.path.join(folder, shard)))
            return state
        if os.path.isfile(legacy):
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # truncated or foreign files
        raise CheckpointError(f"weights in {folder} cannot be read: {type(e).__name__}: {e}") from None
    raise CheckpointError(f"{folder} has no weights: expected model.safetensors (or model.safetensors.index.json, "
                          f"pytorch_model.bin); found {', '.join(sorted(os.listdir(folder))) or 'nothing'}")


def architecture_from_hf(config: dict, num_labels: int | None = None) -> dict:
    """SegFormer keyword arguments from a HF config.json (defaults as SegformerConfig's)."""
    arch: dict[str, Any] = {**FIXED, **VARIANTS["b0"]}
    for key in (*ENCODER_FIELDS, "decoder_hidden_size"):
        if key in config:
            arch[key] = config[key]
    if num_labels is None:
        num_labels = config.get("num_labels") or len(config.get("id2label") or {}) or SegFormerConfig().num_labels
    arch["num_labels"] = int(num_labels)
    arch["drop_path_rate"] = float(config.get("drop_path_rate", 0.1))
    arch["classifier_dropout"] = float(config.get("classifier_dropout_prob", 0.1))
    return arch


def is_encoder_only(config: dict) -> bool:
    return "SegformerForSemanticSegmentation" not in (config.get("architectures") or [])


def _variant_of(arch: dict) -> str:
    for name, v in VARIANTS.items():
        if v["hidden_sizes"] == list(arch["hidden_sizes"]) and v["depths"] == list(arch["depths"]):
            return name
    return ""


def _describe(arch: dict) -> str:
    v = _variant_of(arch)
    return f"hidden_sizes={list(arch['hidden_sizes'])} depths={list(arch['depths'])}" + (f" (mit-{v})" if v else "")


# ------------------------------------------------------------------------------------------------
# Loading

@dataclass
class LoadReport:
    folder: str
    loaded: list[str] = field(default_factory=list)        # our keys filled from the checkpoint
    missing: list[str] = field(default_factory=list)       # our keys left as initialised (decode head)
    discarded: list[str] = field(default_factory=list)     # checkpoint keys not used (ImageNet classifier)
    head_loaded: bool = False
    head_note: str = ""

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.folder}"]
        if self.discarded:
            parts.append(f"discarded {len(self.discarded)} ({_listing(self.discarded)})")
        parts.append("decode head loaded" if self.head_loaded else f"decode head random: {self.head_note}")
        return "; ".join(parts)


def load_pretrained(model: SegFormer, folder: str, log: Callable[[str], None] | None = None) -> LoadReport:
    """Fill `model` from a HF folder: the encoder always (it must fit exactly), the decode head when the
    checkpoint has one of the same shape (same num_labels and decoder width)."""
    config = read_config(folder)
    ckpt_arch = architecture_from_hf(config)
    ours = model.arch
    diff = [f"{k}: checkpoint {ckpt_arch[k]} vs model {ours[k]}" for k in ENCODER_FIELDS
            if list(map(int, _as_list(ckpt_arch[k]))) != list(map(int, _as_list(ours[k])))]
    if diff:
        raise ConfigError(f"{folder} is a SegFormer with {_describe(ckpt_arch)}, which does not fit this model "
                          f"({_describe(ours)}): {'; '.join(diff)} ({_fit_hint(ckpt_arch, ours)})")

    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    report = LoadReport(folder=folder)
    unexpected = []
    for k, v in read_weights(folder).items():
        o = hf_to_ours(k)
        if o is None:
            report.discarded.append(k)
        elif o not in own:
            unexpected.append(k)
        else:
            mapped[o] = v
    if unexpected:
        raise CheckpointError(f"{folder}: {len(unexpected)} checkpoint key(s) have no place in this SegFormer: "
                              f"{_listing(unexpected)}")
    enc_keys = [k for k in own if not k.startswith("decode_head.")]
    missing = [k for k in enc_keys if k not in mapped and not k.endswith(OPTIONAL)]
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} encoder weight(s) missing from the checkpoint: "
                              f"{_listing(missing)}")
    shapes = [f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
              for k in enc_keys if k in mapped and mapped[k].shape != own[k].shape]
    if shapes:
        raise CheckpointError(f"{folder}: encoder weights of another shape: {_listing(shapes)}")

    head_keys = [k for k in own if k.startswith("decode_head.")]
    in_ckpt = [k for k in head_keys if k in mapped]
    take = [k for k in own if k in mapped and k not in head_keys]
    if not in_ckpt:
        report.head_note = f"the checkpoint has none ({', '.join(config.get('architectures') or ['encoder only'])})"
    else:
        absent = [k for k in head_keys if k not in mapped and not k.endswith(OPTIONAL)]
        wrong = [k for k in in_ckpt if mapped[k].shape != own[k].shape]
        if absent:
            report.head_note = f"the checkpoint's head lacks {_listing(absent)}"
        elif wrong:
            k_ckpt = mapped.get("decode_head.classifier.weight", torch.empty(0)).shape[0]
            width = mapped.get("decode_head.linear_fuse.weight", torch.empty(0)).shape[0]
            report.head_note = (f"the checkpoint's head has {k_ckpt} labels and width {width}, the model has "
                                f"model.num_labels={ours['num_labels']} and width {ours['decoder_hidden_size']}")
        else:
            take += in_ckpt
            report.head_loaded = True
    with torch.no_grad():
        for k in take:
            own[k].copy_(mapped[k].to(own[k].dtype))
    report.loaded = take
    report.missing = [k for k in own if k not in take]
    if log is not None:
        log(report.summary())
    return report


def _fit_hint(ckpt: dict, ours: dict) -> str:
    """The command-line settings that make our model fit a checkpoint's encoder."""
    fixed = [k for k in ENCODER_FIELDS if k not in ("hidden_sizes", "depths", "num_attention_heads")
             and _as_list(ckpt[k]) != _as_list(ours[k])]
    if fixed:
        return f"{', '.join(fixed)} cannot be set from the command line: build the model with from_pretrained()"
    v = _variant_of(ckpt)
    sets = [f"model.variant={v}"] if v else []
    for k in ("hidden_sizes", "depths", "num_attention_heads"):
        default = FIXED["num_attention_heads"] if k == "num_attention_heads" else None
        if (v and k != "num_attention_heads") or _as_list(ckpt[k]) == _as_list(default if v else ours[k]):
            continue
        sets.append(f"model.{k}={_cli(ckpt[k])}")
    return "set " + " ".join(sets)


def _cli(value: Any) -> str:
    return "[" + ",".join(str(int(x)) for x in _as_list(value)) + "]"


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def from_pretrained(folder: str, num_labels: int | None = None, log: Callable[[str], None] | None = print,
                    **overrides: Any) -> SegFormer:
    """Our SegFormer built from `folder`/config.json and filled from its weights, in eval mode.

    num_labels: default the checkpoint's for a SegformerForSemanticSegmentation folder; for an
    encoder-only mit-b* folder (whose 1000 ImageNet labels mean nothing here) the recipe default, 35.
    overrides: other SegFormer arguments (drop_path_rate, classifier_dropout).
    """
    config = read_config(folder)
    if num_labels is None and is_encoder_only(config):
        num_labels = SegFormerConfig().num_labels
    arch = {**architecture_from_hf(config, num_labels), **overrides}
    model = SegFormer(**arch)
    model.load_report = load_pretrained(model, folder, log)
    return model.eval()
