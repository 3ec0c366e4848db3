"""PanoLLaVA's model: SigLIP views -> MLP resampler -> projection -> Qwen2, trained in three stages.

    panorama [B, 3, H, W] uint8
      -> erp_to_views: V perspective views [B*V, 3, s, s] (SigLIP-normalised)
      -> vision (SigLIP)           patch tokens [B*V, N, D]
      stage vision:    -> resampler -> vicreg_projector -> VICReg between adjacent views' overlapping strips
      stage resampler/finetune:
      -> resampler (token-wise MLP) [B*V, N, latent] -> rows of all views side by side [B, V*N, latent]
      -> projection [B, V*N, lm_hidden] -> in place of the prompt's <|vision|> token
      -> lm (Qwen2, LoRA in finetune) -> next-token loss on the caption

Every part exists in every stage (LoRA starts as a no-op: B = 0), so a stage's final weights load
into the next stage's model as they are; the stages only choose what trains (recipes/panollava/
__init__.py). LoRA adapters live under the top-level `lora` module and act through forward hooks
on the LM's linear layers, so `trains=["lora"]` names them and `merge_lora` folds them into the
base weights for export.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainlib.config import ConfigError, opt

from .lm import Qwen2Config, Qwen2LM, lm_from_pretrained
from .vicreg import VICRegWeights, agreement, vicreg_loss
from .views import erp_to_views, sampling_grid, siglip_normalize
from .vision import SiglipVisionConfig, SiglipVisionTower, vision_from_pretrained

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class PanoModel:
    vision_pretrained: str = opt("", "SigLIP Hugging Face folder (google/siglip-base-patch16-224 layout); empty: "
                                     "a SigLIP of the vision_* sizes below, randomly initialised")
    lm_pretrained: str = opt("", "Qwen2/Qwen2.5 Hugging Face folder (config.json, model.safetensors, tokenizer.json); "
                                 "empty: a Qwen2 of the lm_* sizes below over the data's own word vocabulary")
    vision_hidden: int = opt(768, "SigLIP width (without vision_pretrained)", ge=8, le=8192)
    vision_layers: int = opt(12, "SigLIP layers (without vision_pretrained)", ge=1, le=64)
    vision_heads: int = opt(12, "SigLIP attention heads (without vision_pretrained)", ge=1, le=128)
    vision_intermediate: int = opt(3072, "SigLIP MLP width (without vision_pretrained)", ge=8, le=32768)
    view_size: int = opt(224, "side of a view in pixels (SigLIP's image_size; a pretrained folder's wins)", ge=8, le=1024)
    patch_size: int = opt(16, "SigLIP patch side (without vision_pretrained)", ge=2, le=64)
    lm_hidden: int = opt(896, "Qwen2 width (without lm_pretrained)", ge=8, le=16384)
    lm_layers: int = opt(24, "Qwen2 layers (without lm_pretrained)", ge=1, le=128)
    lm_heads: int = opt(14, "Qwen2 attention heads (without lm_pretrained)", ge=1, le=256)
    lm_kv_heads: int = opt(2, "Qwen2 key/value heads, grouped-query attention (without lm_pretrained)", ge=1, le=256)
    lm_intermediate: int = opt(4864, "Qwen2 MLP width (without lm_pretrained)", ge=8, le=65536)
    rope_theta: float = opt(1000000.0, "rotary embedding base (without lm_pretrained)", gt=0, le=1e9)
    num_views: int = opt(8, "perspective views per panorama (yaws 0, 360/V, ...)", ge=2, le=64)
    fov_deg: float = opt(90.0, "horizontal and vertical field of view of a view, degrees", gt=0, lt=180)
    central_crop: float = opt(0.9, "fraction of a view's height kept (the seed's CENTRAL_CROP_RATIO), resized back",
                              gt=0, le=1)
    overlap: float = opt(0.5, "VICReg: fraction of a view's patch columns paired with the next view's", gt=0, le=1)
    projector_depth: int = opt(2, "VICReg projector: linear layers (token-wise, LayerNorm + GELU between)", ge=1, le=8)
    vicreg_invariance: float = opt(25.0, "VICReg invariance weight", ge=0, le=1e4)
    vicreg_variance: float = opt(25.0, "VICReg variance weight", ge=0, le=1e4)
    vicreg_covariance: float = opt(1.0, "VICReg covariance weight", ge=0, le=1e4)
    vicreg_loss_weight: float = opt(1.0, "weight of the whole VICReg loss", gt=0, le=1e4)
    resampler_type: Literal["mlp"] = opt("mlp", "resampler: token-wise MLP (the seed's default)")
    latent_dim: int = opt(768, "resampler output width", ge=8, le=16384)
    resampler_hidden: int = opt(1536, "resampler hidden width", ge=8, le=65536)
    resampler_depth: int = opt(3, "resampler linear layers (LayerNorm + GELU between)", ge=1, le=16)
    lora_r: int = opt(32, "LoRA rank on the LM (finetune stage); 0: no adapters", ge=0, le=1024)
    lora_alpha: float = opt(64.0, "LoRA scale numerator (scale = alpha / r)", gt=0, le=1e5)
    lora_dropout: float = opt(0.1, "dropout on the LoRA input", ge=0, lt=1)
    lora_targets: list[str] = opt(list(LORA_TARGETS), "LM linear layers that get adapters (by their last name)")
    max_new_tokens: int = opt(32, "caption length limit when generating (validation, test)", ge=1, le=4096)
    system_prompt: str = opt("You are a helpful assistant. Describe the panorama image.", "the chat's system message")
    prompt_template: str = opt('In this panoramic image, please provide a concise but detailed description of '
                               '"{query}".', "the user's message; {query} is the CSV's query")


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers through `dims`, LayerNorm (eps 1e-5) + GELU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers += [nn.LayerNorm(b, eps=1e-5), nn.GELU()]
    return nn.Sequential(*layers)


class LoRA(nn.Module):
    """One adapter: x -> dropout(x) A^T B^T * alpha / r, B zero at the start (a no-op)."""

    def __init__(self, fan_in: int, fan_out: int, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, fan_in))
        self.B = nn.Parameter(torch.zeros(fan_out, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale, self.drop = alpha / r, nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x) @ self.A.t() @ self.B.t() * self.scale


class PanoVLM(nn.Module):
    def __init__(self, m: PanoModel, vocab_size: int, ids: dict[str, int]) -> None:
        super().__init__()
        self.m, self.ids = m, ids                 # ids: vision, pad, eos (the chat's end token)
        if m.vision_pretrained:
            self.vision = vision_from_pretrained(m.vision_pretrained)
        else:
            for key, value, unit, of in (("view_size", m.view_size, "patch_size", m.patch_size),
                                         ("vision_hidden", m.vision_hidden, "vision_heads", m.vision_heads)):
                if value % of:
                    raise ConfigError(f"model.{key}={value} must be a multiple of model.{unit}={of}")
            self.vision = SiglipVisionTower(SiglipVisionConfig(
                hidden_size=m.vision_hidden, intermediate_size=m.vision_intermediate, num_hidden_layers=m.vision_layers,
                num_attention_heads=m.vision_heads, image_size=m.view_size, patch_size=m.patch_size))
        if m.lm_pretrained:
            self.lm = lm_from_pretrained(m.lm_pretrained)
            self.lm.resize_vocab(vocab_size)
        else:
            self.lm = Qwen2LM(Qwen2Config(
                vocab_size=vocab_size, hidden_size=m.lm_hidden, intermediate_size=m.lm_intermediate,
                num_hidden_layers=m.lm_layers, num_attention_heads=m.lm_heads, num_key_value_heads=m.lm_kv_heads,
                rope_theta=m.rope_theta, eos_token_id=ids["eos"], pad_token_id=ids["pad"]))
        side = self.vision.config.image_size // self.vision.config.patch_size
        if int(side * m.overlap) < 1:
            raise ConfigError(f"model.overlap={m.overlap} pairs no patch column of the {side} per view "
                              f"(needs overlap >= {1 / side:g})")
        d = self.vision.config.hidden_size
        self.resampler = mlp([d] + [m.resampler_hidden] * (m.resampler_depth - 1) + [m.latent_dim])
        self.vicreg_projector = mlp([m.latent_dim] * (m.projector_depth + 1))
        self.projection = nn.Linear(m.latent_dim, self.lm.config.hidden_size)
        self.lora = nn.ModuleDict()
        if m.lora_r:
            self._add_lora(m)
        self.objective = "caption"               # set per stage: "vicreg" or "caption"
        self._grid: torch.Tensor | None = None

    # ------------------------------------------------------------------ LoRA
    def _add_lora(self, m: PanoModel) -> None:
        targets = set(m.lora_targets)
        for name, mod in self.lm.named_modules():
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                key = name.replace(".", "_")
                self.lora[key] = LoRA(mod.in_features, mod.out_features, m.lora_r, m.lora_alpha, m.lora_dropout)
                object.__setattr__(mod, "_lora", self.lora[key])   # not a submodule: one state-dict key
                mod.register_forward_hook(_lora_hook)
        if not len(self.lora):
            raise ConfigError(f"model.lora_targets={m.lora_targets}: no linear layer of the LM has these names "
                             f"(expected some of {', '.join(LORA_TARGETS)})")

    # ------------------------------------------------------------------ image tokens
    def views(self, erp: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] panoramas [B, 3, H, W] -> SigLIP inputs [B*V, 3, s, s]."""
        x = erp.float() / 255.0 if erp.dtype == torch.uint8 else erp.float()
        s = self.vision.config.image_size
        if self._grid is None or self._grid.device != x.device or self._grid_hw != tuple(x.shape[-2:]):
            self._grid = sampling_grid(tuple(x.shape[-2:]), self.m.num_views, self.m.fov_deg, (s, s), device=x.device)
            self._grid_hw = tuple(x.shape[-2:])
        v = erp_to_views(x, self.m.num_views, self.m.fov_deg, (s, s), self.m.central_crop, grid=self._grid)
        return siglip_normalize(v).flatten(0, 1)

    def patch_tokens(self, erp: torch.Tensor) -> torch.Tensor:
        """[B*V, N, D]; no graph through the encoder when it is frozen (it never trains in these stages
        unless a stage names it)."""
        views = self.views(erp)
        if any(p.requires_grad for p in self.vision.parameters()):
            return self.vision(views)
        with torch.no_grad():
            return self.vision(views)

    def vicreg_features(self, erp: torch.Tensor) -> torch.Tensor:
        """Stage 1's features [B*V, N, latent]: the resampled tokens through the VICReg projector (the
        seed's stable revision trains the resampler and the projector on VICReg, the encoder frozen)."""
        return self.vicreg_projector(self.resampler(self.patch_tokens(erp)))

    def image_embeddings(self, erp: torch.Tensor) -> torch.Tensor:
        """[B, V*N, lm_hidden]: each view's resampled tokens, rows of all views side by side."""
        tokens = self.resampler(self.patch_tokens(erp))
        b, v = erp.shape[0], self.m.num_views
        side = int(round(tokens.shape[1] ** 0.5))
        grid = tokens.view(b, v, side, side, -1).permute(0, 2, 1, 3, 4)      # [B, h, V, w, latent]
        return self.projection(grid.reshape(b, v * side * side, -1))

    def splice(self, ids: torch.Tensor, image: torch.Tensor, *extra: torch.Tensor) -> list[torch.Tensor]:
        """Token embeddings with each row's <|vision|> token replaced by its image tokens, without a host
        sync (positions by arithmetic, scatter). `extra` [B, L] tensors (mask, labels) are widened the same
        way: the image positions get mask 1 and label -100."""
        b, n = ids.shape
        m = image.shape[1]
        at = (ids == self.ids["vision"]).float().argmax(dim=1, keepdim=True)     # the placeholder's position
        j = torch.arange(n, device=ids.device).expand(b, n)
        target = j + (j > at) * (m - 1)
        image_at = at + torch.arange(m, device=ids.device)
        emb = self.lm.embed(ids)
        out = [emb.new_zeros(b, n + m - 1, emb.shape[-1]).scatter(1, target[..., None].expand_as(emb), emb)
               .scatter(1, image_at[..., None].expand(b, m, emb.shape[-1]), image.to(emb.dtype))]
        for t, fill in zip(extra, (1, -100)):
            out.append(t.new_full((b, n + m - 1), fill).scatter(1, target, t).scatter(1, image_at, fill))
        return out

    # ------------------------------------------------------------------ forwards
    def forward(self, batch: dict, predict: bool = False) -> dict:
        """The training forward of the current objective -> {"loss": ..., parts by name}; with
        predict=True the evaluation forward (through forward, so that FSDP gathers the root's
        parameters first): the views' agreement (vision stage) or greedy captions {"tokens"}."""
        if predict:
            if self.objective == "vicreg":
                return agreement(self.vicreg_features(batch["image"]), self.m.num_views, self.m.overlap)
            return {"tokens": self.caption(batch)}
        if self.objective == "vicreg":
            w = VICRegWeights(self.m.vicreg_invariance, self.m.vicreg_variance, self.m.vicreg_covariance)
            out = vicreg_loss(self.vicreg_features(batch["image"]), self.m.num_views, self.m.overlap, w)
            return {**out, "loss": out["loss"] * self.m.vicreg_loss_weight}
        emb, mask, labels = self.splice(batch["input_ids"], self.image_embeddings(batch["image"]),
                                        batch["attention_mask"], batch["labels"])
        logits = self.lm(inputs_embeds=emb, attention_mask=mask)
        target = labels[:, 1:]
        n = (target != -100).sum()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                               reduction="sum") / n.clamp(min=1)
        return {"loss": loss, "weight": n}

    @torch.no_grad()
    def caption(self, batch: dict, max_new_tokens: int | None = None) -> torch.Tensor:
        """Greedy captions of the left-padded prompts -> token ids [B, max_new_tokens] (pad after the end)."""
        emb, mask = self.splice(batch["prompt_ids"], self.image_embeddings(batch["image"]), batch["prompt_mask"])
        k = max_new_tokens or self.m.max_new_tokens
        out = self.lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=k, all_ranks=_sharded(self.lm),
                               eos_token_id=self.ids["eos"], pad_token_id=self.ids["pad"])
        return F.pad(out, (0, k - out.shape[1]), value=self.ids["pad"])

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights with every LoRA adapter folded into its linear layer (W + scale B A), no `lora.*`
        keys: what a model with model.lora_r=0 (or a plain Qwen2 loader, under `lm.`) reads."""
        return merge_lora(self.state_dict(), self.m.lora_alpha / max(self.m.lora_r, 1))


def merge_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold `lora.<module name with _>.A/B` into `lm.<module name>.weight` (a state dict or a file's tensors)."""
    out = {k: v.detach().clone() for k, v in state.items() if not k.startswith("lora.")}
    weights = {k[3:-7].replace(".", "_"): k for k in out if k.startswith("lm.") and k.endswith(".weight")}
    for key in {k[5:].rsplit(".", 1)[0] for k in state if k.startswith("lora.")}:
        if key not in weights:
            raise KeyError(f"LoRA adapter {key} has no linear layer lm.*.weight to merge into")
        a, b = state[f"lora.{key}.A"].float(), state[f"lora.{key}.B"].float()
        w = out[weights[key]]
        out[weights[key]] = (w.float() + (b @ a) * scale).to(w.dtype)
    return out


def _sharded(lm: nn.Module) -> bool:
    """Whether the LM's layers are FSDP units: each layer's forward is then a collective, and every
    process must decode as many tokens as the slowest one (no early stop on this rank's eos alone)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in lm.modules())


def _lora_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """A module-level function (no closure): a deep copy of the model (EMA) calls its own adapters."""
    return out + module._lora(args[0])


def forward(model: Any, batch: dict) -> dict:
    return model(batch)
