"""PanoLLaVA: panoramic vision-language model (seed: wooseungw/panollava; docs/recipes/panollava.md).

Work in progress (issue 16). Landed: the models in plain PyTorch, loadable from Hugging Face
folders, with parity tests against transformers (tests/test_panollava_models.py):
`vision_from_pretrained(DIR)` (SigLIP vision tower) and `lm_from_pretrained(DIR)` (Qwen2 decoder
with a KV-cache `generate`). Not yet a registered recipe: no stages, data or training.
"""
from .lm import Qwen2Config, Qwen2LM, lm_from_pretrained
from .vision import SiglipVisionConfig, SiglipVisionTower, vision_from_pretrained

__all__ = ["Qwen2Config", "Qwen2LM", "lm_from_pretrained", "SiglipVisionConfig", "SiglipVisionTower",
           "vision_from_pretrained"]
