"""The Qwen2 / Qwen2.5 decoder in plain PyTorch, loadable from a Hugging Face checkpoint folder.

PanoLLaVA's language model (Qwen2.5-0.5B in the seed). Parameter names follow the Hugging Face
layout (`model.layers.N.self_attn.q_proj`, ...), so a folder's model.safetensors loads as is and
transformers is needed only by the parity tests (tests/test_panollava_models.py):

    x = embed(input_ids) or inputs_embeds
    for each layer:  x = x + o_proj(attention(rope(q), rope(k), v))   on RMSNorm(x), GQA through SDPA
                     x = x + down(silu(gate(h)) * up(h))                on RMSNorm(x)
    logits = lm_head(RMSNorm(x))                                        (tied to embed when the config says)

`generate` keeps a KV cache per layer (one tensor pair grown by concatenation: short captions,
no paging) and decodes greedily or by temperature / top-p sampling.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainlib.checkpoint import load_model_state
from trainlib.config import ConfigError


@dataclass
class Qwen2Config:
    """The keys of a Qwen2 config.json this module reads (defaults: Qwen2.5-0.5B)."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 0                    # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    bos_token_id: Optional[int] = 151643
    eos_token_id: Optional[int] = 151643
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Qwen2Config":
        """A config.json mapping -> config; refuses what this module does not implement."""
        kind = d.get("model_type")
        if kind not in ("qwen2",):
            raise ConfigError(f"{source}: model_type {kind!r} is not a Qwen2/Qwen2.5 checkpoint (expected 'qwen2')")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported (Qwen2.5 checkpoints have false)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"{source}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                             "(expected the default rotary embedding)")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (expected 'silu')")
        known = {f.name for f in fields(cls)}
        kw = {k: d[k] for k in known if k in d and (d[k] is not None or k.endswith("token_id"))}
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        for k in ("eos_token_id", "bos_token_id"):      # a list in some generation configs: the first
            if isinstance(kw.get(k), list):
                kw[k] = kw[k][0]
        return cls(**kw)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, L] -> cos, sin [B, 1, L, head_dim] (computed in float32, as the reference)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: Qwen2Config) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                cache: Optional[list] = None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if cache is not None:                       # [k, v] of the earlier positions, grown in place
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        groups = self.heads // self.kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, c: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: Qwen2Config) -> None:
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                cache: Optional[list] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Body(nn.Module):
    """`model.*` of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, c: Qwen2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


def _attention_mask(keep: Optional[torch.Tensor], q_len: int, k_len: int, dtype: torch.dtype,
                    device: torch.device) -> Optional[torch.Tensor]:
    """Causal mask for q_len new positions after k_len - q_len cached ones, AND the padding mask
    `keep` [B, k_len] (1 = a real token) -> additive [B, 1, q_len, k_len], or None (plain causal
    over a full batch: SDPA's is_causal path is not used so that cached decoding shares one code path)."""
    past = k_len - q_len
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=past)
    allowed = causal[None, None]
    if keep is not None:
        allowed = allowed & keep[:, None, None, :k_len].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class Qwen2LM(nn.Module):
    """Qwen2ForCausalLM's computation: forward(input_ids | inputs_embeds, attention_mask) -> logits [B, L, V]."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        """transformers' Qwen2 initialisation (initializer_range 0.02): a fresh model's logits start
        near uniform (PyTorch's N(0, 1) embeddings would give a tied head logits in the tens)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def blocks(self) -> nn.ModuleList:
        """The repeated decoder layers: FSDP units of a sharding plan."""
        return self.model.layers

    def resize_vocab(self, size: int) -> None:
        """Room for added tokens (<|vision|>): new rows start at the mean of the old embeddings. A no-op
        when the matrix is already big enough (Qwen2.5 pads its vocabulary to 151936)."""
        old = self.model.embed_tokens.weight
        if size <= old.shape[0]:
            return
        emb = nn.Embedding(size, old.shape[1]).to(old.dtype)
        with torch.no_grad():
            emb.weight[: old.shape[0]] = old
            emb.weight[old.shape[0]:] = old.mean(0)
        self.model.embed_tokens, self.config.vocab_size = emb, size
        head = nn.Linear(old.shape[1], size, bias=False).to(old.dtype)
        if self.config.tie_word_embeddings:
            head.weight = emb.weight
        else:
            with torch.no_grad():
                head.weight[: self.lm_head.weight.shape[0]] = self.lm_head.weight
                head.weight[self.lm_head.weight.shape[0]:] = self.lm_head.weight.mean(0)
        self.lm_head = head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, *, position_ids: Optional[torch.Tensor] = None,
                caches: Optional[list] = None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Qwen2LM.forward: give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, n, _ = x.shape
        past = caches[0][0].shape[2] if caches and caches[0] else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=x.device).expand(b, n)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = _attention_mask(attention_mask, n, past + n, x.dtype, x.device)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, caches[i] if caches is not None else None)
        return self.lm_head(self.model.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: Optional[torch.Tensor] = None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, *, attention_mask: Optional[torch.Tensor] = None,
                 inputs_embeds: Optional[torch.Tensor] = None, eos_token_id: Optional[int] = -1,
                 pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 all_ranks: bool = False) -> torch.Tensor:
        """New tokens [B, <= max_new_tokens] after the prompt (left-padded when `attention_mask` has
        zeros). A row that produced `eos_token_id` (default: the config's) is padded with
        `pad_token_id` (default: the config's, else eos) after it; decoding stops when every row has
        (all_ranks=True: every row of every process, so that processes whose layers are FSDP units
        make the same collective calls). With input_ids, the prompt is returned in front, as
        transformers' generate does."""
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens}, expected >= 1")
        if do_sample and not (temperature > 0 and 0 < top_p <= 1):
            raise ValueError(f"generate: temperature={temperature} must be > 0 and top_p={top_p} in (0, 1]")
        eos = self.config.eos_token_id if eos_token_id == -1 else eos_token_id
        pad = next((p for p in (pad_token_id, self.config.pad_token_id, eos) if p is not None), 0)
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = x.shape[:2]
        keep = (torch.ones(b, n, dtype=torch.long, device=x.device) if attention_mask is None
                else attention_mask.to(x.device).long())
        positions = (keep.cumsum(-1) - 1).clamp(min=0)          # left padding: real tokens count from 0
        caches: list = [[] for _ in self.model.layers]
        logits = self(inputs_embeds=x, attention_mask=keep, position_ids=positions, caches=caches)[:, -1]
        out, done = [], torch.zeros(b, dtype=torch.bool, device=x.device)
        for step in range(max_new_tokens):
            token = self._pick(logits.float(), do_sample, temperature, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad), token)
            out.append(token)
            if eos is not None:
                done = done | (token == eos)
                finished = done.all()
                if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
                    finished = finished.to(torch.int32)
                    torch.distributed.all_reduce(finished, op=torch.distributed.ReduceOp.MIN)
                if bool(finished):                              # host sync: one per generated token
                    break
            if step == max_new_tokens - 1:
                break
            keep = torch.cat([keep, keep.new_ones(b, 1)], dim=1)
            positions = positions[:, -1:] + 1
            logits = self(token[:, None], attention_mask=keep, position_ids=positions, caches=caches)[:, -1]
        new = torch.stack(out, dim=1)
        return torch.cat([input_ids, new], dim=1) if input_ids is not None and inputs_embeds is None else new

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
              generator: Optional[torch.Generator]) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:                       # nucleus: the smallest set whose mass reaches top_p
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p >= top_p
            sorted_p = sorted_p.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards an index names, of a checkpoint folder."""
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    raise ConfigError(f"{folder}: no model.safetensors (nor model.safetensors.index.json)")


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a Hugging Face folder's tensors into `module` by name: the engine's strict load
    (trainlib.checkpoint.load_model_state: missing and mis-shaped keys named in one message) over
    the tensors the module has (a full SiglipModel folder also holds the text tower)."""
    own = module.state_dict()
    load_model_state(module, {k: v for k, v in state.items() if k in own}, source)


def lm_from_pretrained(folder: str | Path, dtype: torch.dtype = torch.float32) -> Qwen2LM:
    """A Qwen2/Qwen2.5 Hugging Face folder (config.json + model.safetensors) -> Qwen2LM."""
    folder = Path(folder)
    config = Qwen2Config.from_dict(_read_config(folder), str(folder / "config.json"))
    model = Qwen2LM(config)
    state = read_safetensors(folder)
    if config.tie_word_embeddings:              # tied checkpoints may store only one of the two
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
        state = {k: v for k, v in state.items() if v is not None}
    load_into(model, state, str(folder))
    return model.to(dtype)
