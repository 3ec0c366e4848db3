"""The PanoLLaVA recipe: the three stages learn on synthetic panoramas, and the pieces they stand on
(prompt and label mask, image-token splice, LoRA merge, CSV errors) do exactly what they say."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.panollava import recipe
from recipes.panollava.captions import caption_scores
from recipes.panollava.data import read_rows, resolve_image
from recipes.panollava.model import PanoModel, PanoVLM
from recipes.panollava.text import IM_END, PAD, VISION, WordTokenizer, chat_prompt, encode_example
from trainlib.config import ConfigError, DataError
from trainlib.recipe import build_config

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, timeout: int = 900, processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TRAINLIB_CACHE": str(tmp_path / "cache")}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "recipes.panollava", f"trainer.out_dir={tmp_path / 'runs'}",
                           *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_three_stages_learn_to_caption_held_out_panoramas(tmp_path, monkeypatch):
    """The README's demo: 2 processes (captions and predictions gathered across ranks)."""
    r = _run(["trainer.run_name=demo"], tmp_path, processes=2)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "demo"
    for stage in ("vision", "resampler", "finetune"):
        assert (run / stage / "model_final.safetensors").is_file(), stage
    # stage 1: VICReg falls, and adjacent views' overlapping strips agree more than opposite views'
    vision = _rows(run / "vision" / "metrics.jsonl")
    train = [x["loss"] for x in vision if x["split"] == "train"]
    assert train[-1] < 0.7 * train[0], train
    test1 = next(x for x in vision if x["split"] == "test")
    assert test1["adjacent"] > test1["distant"] + 0.05, test1
    # after the three stages: held-out captions far above chance, and the written predictions score it
    final = next(x for x in _rows(run / "finetune" / "metrics.jsonl") if x["split"] == "test")
    assert final["bleu4"] >= 0.5 and final["cider"] > 3.0, final
    preds = json.loads((run / "finetune" / "predictions_test.json").read_text())
    assert len(preds) == 72 and {"id", "url", "query", "prediction", "reference"} <= set(preds[0])
    rescored = caption_scores([p["prediction"] for p in preds], [[p["reference"]] for p in preds])
    assert math.isclose(rescored["bleu4"], final["bleu4"], rel_tol=1e-6)
    # the stage folders chain: resampler started from vision's weights, finetune from resampler's
    assert "initialised weights from" in (run / "finetune" / "train.log").read_text()
    # the LoRA merge: a file trainlib.load_model reads as a model without adapters, computing the same
    from recipes.panollava.export import export_merged
    from trainlib import load_model

    monkeypatch.setenv("TRAINLIB_CACHE", str(tmp_path / "cache"))
    adapted = load_model(run / "finetune" / "model_final.safetensors").eval()
    merged = load_model(export_merged(run / "finetune" / "model_final.safetensors")).eval()
    assert len(adapted.lora) == 14 and len(merged.lora) == 0
    ids = torch.randint(6, len(adapted.ids) + 20, (2, 12))
    with torch.no_grad():
        assert torch.allclose(merged.lm(ids), adapted.lm(ids), atol=1e-5)


def _tiny_model(**kw) -> tuple[PanoVLM, WordTokenizer]:
    tok = WordTokenizer.from_texts(["a red house", "the sky"])
    m = PanoModel(view_size=16, patch_size=8, vision_hidden=16, vision_layers=1, vision_heads=2,
                  vision_intermediate=32, lm_hidden=16, lm_layers=1, lm_heads=2, lm_kv_heads=1, lm_intermediate=32,
                  latent_dim=16, resampler_hidden=32, num_views=4, **kw)
    ids = {"vision": tok.token_id(VISION), "pad": tok.token_id(PAD), "eos": tok.token_id(IM_END)}
    torch.manual_seed(0)
    return PanoVLM(m, len(tok), ids).eval(), tok


def test_prompt_and_label_mask_follow_the_seeds_template():
    tok = WordTokenizer.from_texts(["a red house"])
    ids, labels = encode_example(tok, "house", "a red house")
    text = chat_prompt("house")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "<|vision|>\nIn this panoramic image" in text and '"house"' in text
    prompt_len = len(tok.encode(text))
    assert (labels[:prompt_len] == -100).all() and torch.equal(labels[prompt_len:], ids[prompt_len:])
    assert tok.decode(ids[prompt_len:].tolist()) == "a red house" and ids[-1] == tok.token_id(IM_END)
    assert (ids == tok.token_id(VISION)).sum() == 1
    prompt, none = encode_example(tok, "house", None)
    assert len(prompt) == prompt_len and (none == -100).all()


def test_image_tokens_replace_the_placeholder_row_by_row():
    model, tok = _tiny_model()
    a, la = encode_example(tok, "house", "a red house")
    b, lb = encode_example(tok, "sky", "the sky")
    n = max(len(a), len(b))
    ids = torch.full((2, n), tok.token_id(PAD))
    mask, labels = torch.zeros(2, n, dtype=torch.long), torch.full((2, n), -100)
    for i, (x, lx) in enumerate(((a, la), (b, lb))):
        ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(x)] = x, 1, lx
    image = torch.randn(2, 5, 16)
    emb, m2, l2 = model.splice(ids, image, mask, labels)
    for i in range(2):                                    # the plain way: cut at the placeholder, insert
        at = int((ids[i] == tok.token_id(VISION)).nonzero())
        e = model.lm.embed(ids[i])
        want = torch.cat([e[:at], image[i], e[at + 1:]])
        assert torch.equal(emb[i], want)
        assert torch.equal(m2[i], torch.cat([mask[i, :at], torch.ones(5, dtype=torch.long), mask[i, at + 1:]]))
        assert torch.equal(l2[i], torch.cat([labels[i, :at], torch.full((5,), -100), labels[i, at + 1:]]))


def test_lora_merges_into_the_base_weights(tmp_path):
    model, tok = _tiny_model(lora_r=4, lora_alpha=8.0, lora_dropout=0.0)
    with torch.no_grad():
        for ad in model.lora.values():
            ad.B.normal_()                                 # adapters that change the output
    assert len(model.lora) == 7                             # q k v o gate up down of the one layer
    ids = torch.tensor([tok.encode("a red house")])
    with torch.no_grad():
        adapted = model.lm(ids)
        plain, _ = _tiny_model(lora_r=0)                  # the same base weights (same seed), no adapters
        assert not torch.allclose(plain.lm(ids), adapted, atol=1e-3)
        merged = model.merged_state_dict()
        assert not any(k.startswith("lora.") for k in merged)
        plain.load_state_dict(merged)
        assert torch.allclose(plain.lm(ids), adapted, atol=1e-5)
    # the file route (python -m recipes.panollava.export): the scale from the config in the metadata
    from safetensors.torch import load_file

    from recipes.panollava.export import export_merged
    from trainlib.checkpoint import export_safetensors

    src = tmp_path / "finetune" / "model_final.safetensors"
    src.parent.mkdir()
    export_safetensors(model.state_dict(), src, {"config": "model:\n  lora_r: 4\n  lora_alpha: 8.0\n"})
    out = load_file(str(export_merged(src)))
    assert out.keys() == merged.keys() and all(torch.allclose(out[k], merged[k], atol=1e-6) for k in out)
    export_safetensors(merged, tmp_path / "plain.safetensors", {"config": "model:\n  lora_r: 4\n  lora_alpha: 8.0\n"})
    with pytest.raises(ValueError, match="plain.safetensors: no LoRA adapters to merge"):
        export_merged(tmp_path / "plain.safetensors")
    with pytest.raises(ConfigError, match=r"lora_targets=\['qkv'\]: no linear layer of the LM has these names"):
        _tiny_model(lora_r=4, lora_targets=["qkv"])
    with pytest.raises(ConfigError, match=r"model.overlap=0.25 pairs no patch column of the 2 per view"):
        _tiny_model(overlap=0.25)


def test_csv_and_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text("image,question,caption\nx.jpg,q,c\n")
    with pytest.raises(ValueError, match=r"train.csv: missing column\(s\) url, query, annotation; its header is "
                                         r"image,question,caption"):
        read_rows(bad)
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffurl,query,annotation\nx.jpg,street,a street\n".encode("utf-8"))
    assert read_rows(bom) == [{"url": "x.jpg", "query": "street", "annotation": "a street"}]
    good = tmp_path / "valid.csv"
    good.write_text("url,query,annotation\nimages/a.jpg,street,a street\n")
    with pytest.raises(DataError, match=r"valid.csv, line 2: image images/a.jpg not found \(looked at"):
        resolve_image(read_rows(good)[0]["url"], good, tmp_path, 2)
    with pytest.raises(DataError, match=r"nothing.csv: no such CSV \(expected columns url,query,annotation\)"):
        read_rows(tmp_path / "nothing.csv")


def test_a_stage_without_its_previous_stages_weights_is_refused(tmp_path):
    r = _run(["stage=finetune", "trainer.run_name=fresh"], tmp_path, timeout=300)
    assert r.returncode != 0
    assert "stage finetune starts from stage resampler's final weights" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr


def test_stage_settings_and_unknown_stage():
    from trainlib.stages import select

    cfg, _, demo = build_config(recipe, [])
    assert demo and cfg.optim.scheduler == "linear" and cfg.optim.betas == [0.9, 0.98]
    names = [s.name for s in recipe.stages]
    assert names == ["vision", "resampler", "finetune"]
    vision = build_config(recipe, ["data.root=/d"], stage=recipe.stages[0])[0]
    assert vision.optim.lr == 1e-4 and vision.data.batch_size == 64 and vision.trainer.accumulate_grad_batches == 2
    assert recipe.stages[1].trains(vision) == ["resampler", "projection", "lm"]       # a from-scratch LM
    vision.model.lm_pretrained = "/models/qwen"
    assert recipe.stages[1].trains(vision) == ["resampler", "projection"]             # the seed's rule
    assert recipe.stages[2].trains(vision) == ["resampler", "projection", "lora"]
    vision.model.lora_r = 0
    assert recipe.stages[2].trains(vision) == ["resampler", "projection", "lm"]       # "LM or LoRA"
    with pytest.raises(ConfigError, match="stage=decoder: this recipe's stages are vision, resampler, finetune"):
        select(recipe.stages, "decoder")


def test_a_checkpoints_tokenizer_json_gets_the_vision_token(tmp_path):
    """A Qwen-shaped tokenizer.json (byte-level BPE, <|im_start|>/<|im_end|>/<|endoftext|> special, no
    <|vision|>): the placeholder is added as one token, pad is <|endoftext|> (Qwen's pad = eos)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, decoders, trainers

    from recipes.panollava.text import HFTokenizer, load_tokenizer

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([chat_prompt("street").replace(VISION, ""), "a red house on a quiet street"] * 20,
                            trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(str(tmp_path), [])
    assert isinstance(hf, HFTokenizer)
    assert hf.encode(VISION) == [hf.token_id(VISION)] and hf.token_id(PAD) == hf.token_id("<|endoftext|>")
    ids, labels = encode_example(hf, "street", "a red house")
    assert (ids == hf.token_id(VISION)).sum() == 1 and ids[-1] == hf.token_id(IM_END)
    start = int((labels != -100).nonzero()[0])
    assert hf.decode(ids[start:].tolist()) == "a red house"
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "nothing"), [])


@pytest.mark.slow
def test_finetune_under_fsdp_trains_like_ddp_and_keeps_no_state_for_the_frozen_lm(tmp_path, monkeypatch):
    """2 gloo ranks, the finetune stage (LoRA on a frozen LM) from the same start: FSDP with the recipe's
    units (LM decoder layers, SigLIP encoder layers) gives DDP's losses; the optimizer holds state for
    the resampler, the projection and the adapters only."""
    from trainlib import checkpoint
    from trainlib.checkpoint import export_safetensors
    from trainlib.recipe import prepare_synthetic

    monkeypatch.setenv("TRAINLIB_CACHE", str(tmp_path / "cache"))
    cfg, _, demo = build_config(recipe, [])
    prepare_synthetic(recipe, cfg)
    torch.manual_seed(0)
    model = recipe.build_model(cfg)
    trainable = [n for n, _ in model.named_parameters() if n.startswith(("resampler", "projection", "lora"))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    losses = {}
    for strategy in ("ddp", "fsdp"):
        export_safetensors(model.state_dict(), tmp_path / "runs" / strategy / "resampler" / "model_final.safetensors", {})
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "recipes.panollava", "stage=finetune", f"trainer.out_dir={tmp_path / 'runs'}",
                            f"trainer.run_name={strategy}", f"trainer.strategy={strategy}", "trainer.max_epochs=1",
                            "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "log.every_n_steps=1"],
                           capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = _rows(tmp_path / "runs" / strategy / "finetune" / "metrics.jsonl")
        losses[strategy] = [x["loss"] for x in rows if x["split"] in ("train", "val", "test")]
        saved = checkpoint.load(tmp_path / "runs" / strategy / "finetune" / "checkpoints" / "last.ckpt")
        assert sum(len(g["params"]) for g in saved["optimizer"]["param_groups"]) == len(trainable), strategy
    assert len(losses["ddp"]) >= 6 and losses["ddp"][0] > losses["ddp"][-1]
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-4, abs=1e-5)
