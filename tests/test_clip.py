"""CLIP mode: the text tower's read-outs ignore padding, the contrastive loss against a direct
recomputation and across two gloo processes, gradient accumulation, tokeniser, caption data,
zero-shot evaluation, and a short training run with resume and the zero-shot command line."""

import csv
import json
import math
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from dino_sparo import SPARO
from dino_sparo.data.captions import CaptionTable, FashionMNISTCaptions, TarShardCaptions
from dino_sparo.data.images import CorruptImageError
from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT
from dino_sparo.cli import zeroshot as zeroshot_cli
from dino_sparo.evaluation import zeroshot
from dino_sparo.evaluation.options import Extraction
from dino_sparo.losses import ClipLoss
from dino_sparo.methods.clip import ClipMethod
from dino_sparo.models.clip import baseline_config, build_clip_model
from dino_sparo.models.text import EOT_TOKEN_ID, SOT_TOKEN_ID, TextTransformer, Tokenizer
from dino_sparo.models.vit import count_parameters

from conftest import TINY_CLIP_TRAINING, tiny_config

HAS_FASHION = Path(DEFAULT_FASHION_MNIST_ROOT).exists()
needs_fashion = pytest.mark.skipif(not HAS_FASHION, reason="Fashion-MNIST not installed (make data)")

TINY = TINY_CLIP_TRAINING


def tiny(*extra):
    return tiny_config(*extra, base=TINY)


def tiny_text(readout="sparo", vocab=64, eot=63):
    torch.manual_seed(0)
    return TextTransformer(vocab_size=vocab, context_length=12, width=32, depth=3, num_heads=2, readout=readout,
                           sparo=dict(num_slots=4, slot_dim=8), eot_token_id=eot, attn_backend="sdpa").eval()


def random_tokens(eot_positions, vocab=64, eot=63, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, eot, (len(eot_positions), length), generator=g)
    for row, pos in enumerate(eot_positions):
        tokens[row, pos] = eot
        tokens[row, pos + 1:] = 0
    return tokens


# --------------------------------------------------------------------------- text tower


@pytest.mark.parametrize("readout", ["sparo", "eot"])
def test_text_readout_ignores_everything_after_end_of_text(readout):
    model = tiny_text(readout)
    positions = [3, 7, 11, 1]
    tokens = random_tokens(positions)
    changed = tokens.clone()
    for row, pos in enumerate(positions):  # anything after the end of text: other ids, even another EOT
        changed[row, pos + 1:] = torch.randint(1, 64, (12 - pos - 1,))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    before = tokens.clone()
    before[0, 1] = (before[0, 1] % 60) + 2  # a token before the end of text does matter
    with torch.no_grad():
        assert not torch.allclose(model(before)[0], a[0], atol=1e-4)


def test_text_sparo_attention_is_zero_after_end_of_text():
    model = tiny_text("sparo")
    tokens = random_tokens([2, 9])
    with torch.no_grad():
        _, attn = model.readout(tokens, model.forward_tokens(tokens), return_attn=True)  # B × L × N
    assert attn.shape == (2, 4, 12)
    assert attn[0, :, 3:].abs().max() == 0 and attn[1, :, 10:].abs().max() == 0
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4))


def test_one_sparo_class_serves_both_towers_and_both_modes():
    model = build_clip_model(tiny())
    readouts = [m for m in model.modules() if "sparo" in type(m).__name__.lower()]
    assert len(readouts) == 2 and all(type(m) is SPARO for m in readouts)
    from dino_sparo.models.build import build_backbone  # DINO mode's backbone: the same class again

    assert type(build_backbone(tiny().model).sparo) is SPARO


def test_share_queries_ties_one_parameter_to_both_towers():
    model = build_clip_model(tiny("clip.share_queries=true"))
    assert model.text.sparo.queries is model.visual.sparo.queries
    untied = build_clip_model(tiny())
    assert count_parameters(untied) - count_parameters(model) == model.visual.sparo.queries.numel()
    images, tokens = torch.randn(2, 3, 28, 28), random_tokens([3, 5], vocab=49408, eot=EOT_TOKEN_ID, length=20)
    image_features, text_features, _ = model(images, tokens)
    (image_features.sum() + text_features.sum()).backward()
    assert model.visual.sparo.queries.grad is not None
    clone = build_clip_model(tiny("clip.share_queries=true"))
    clone.load_state_dict(model.state_dict())  # strict load of a checkpoint naming the queries twice
    assert clone.text.sparo.queries is clone.visual.sparo.queries


def test_sparo_models_are_not_larger_than_their_plain_clip_baselines():
    cfg = tiny()
    sparo, plain = build_clip_model(cfg), build_clip_model(baseline_config(cfg))
    assert plain.image_projection is not None and plain.text_projection is not None
    assert sparo.image_projection is None and sparo.text_projection is None
    assert count_parameters(sparo) <= count_parameters(plain)
    assert math.isclose(float(sparo.logit_scale.detach().exp()), 1 / 0.07, rel_tol=1e-6)


def test_logit_scale_is_clamped_at_100():
    model = build_clip_model(tiny())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert math.isclose(float(model.logit_scale.detach().exp()), 100.0, rel_tol=1e-6)


# --------------------------------------------------------------------------- tokeniser


def test_tokenizer_round_trip_and_layout():
    tokenizer = Tokenizer(context_length=77)
    texts = ["a photo of a t-shirt/top.", "Two dogs playing in the snow!"]
    tokens = tokenizer(texts)
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    for row, text in zip(tokens, texts):
        ids = row.tolist()
        end = ids.index(EOT_TOKEN_ID)
        assert ids[0] == SOT_TOKEN_ID and all(i == 0 for i in ids[end + 1:])
        decoded = tokenizer.decode(row)
        assert decoded.replace(" ", "") == text.lower().replace(" ", "")
        assert torch.equal(tokenizer(decoded)[0], row)  # decode -> encode gives the same ids
    long = tokenizer("word " * 200)[0]
    assert long[-1] == EOT_TOKEN_ID and (long != 0).all()  # truncated, end-of-text kept last


# --------------------------------------------------------------------------- loss


def reference_clip_loss(image, text, scale):
    """Written out per row in float64: -log softmax of the matching pair, both directions."""
    image, text = image.double(), text.double()
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        row = scale * (image[i] @ text.T)
        col = scale * (text[i] @ image.T)
        total += -(row[i] - torch.logsumexp(row, 0)) - (col[i] - torch.logsumexp(col, 0))
    return total / (2 * n)


@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_against_direct_recomputation(local_loss):
    torch.manual_seed(0)
    image = F.normalize(torch.randn(12, 16), dim=-1)
    text = F.normalize(image + 0.5 * torch.randn(12, 16), dim=-1)
    loss = ClipLoss(local_loss=local_loss)(image, text, torch.tensor(1 / 0.07))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference_clip_loss(image, text, 1 / 0.07), rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # arithmetic stays fp32 under autocast
        low = ClipLoss(local_loss=local_loss)(image, text, torch.tensor(1 / 0.07))
    torch.testing.assert_close(low, loss)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gathered_loss_worker(rank, world, port, out, image, text, scale):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        rows = slice(rank * image.shape[0] // world, (rank + 1) * image.shape[0] // world)
        for local_loss in (False, True):
            for with_grad in (False, True):
                img = image[rows].clone().requires_grad_(True)
                txt = text[rows].clone().requires_grad_(True)
                s = scale.clone().requires_grad_(True)
                loss = ClipLoss(local_loss=local_loss, gather_with_grad=with_grad)(img, txt, s)
                loss.backward()
                results[(local_loss, with_grad)] = (loss.detach(), img.grad, txt.grad, s.grad)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gathered_loss_on_two_gloo_processes_equals_one_process_on_the_whole_batch(tmp_path):
    torch.manual_seed(1)
    image = F.normalize(torch.randn(8, 6), dim=-1)
    text = F.normalize(image + torch.randn(8, 6), dim=-1)
    scale = torch.tensor(5.0)
    # fork: the children inherit the imported modules instead of importing them again (seconds each)
    mp.start_processes(_gathered_loss_worker, args=(2, _free_port(), str(tmp_path), image, text, scale), nprocs=2,
                       join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    img, txt, s = image.clone().requires_grad_(True), text.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    full = ClipLoss()(img, txt, s)
    full.backward()
    for local_loss in (False, True):
        for with_grad in (False, True):
            losses = torch.stack([r[(local_loss, with_grad)][0] for r in ranks])
            # the local loss is each rank's share; their mean (what is logged) is the global loss
            torch.testing.assert_close(losses.mean(), full.detach(), rtol=1e-5, atol=1e-6)
            if not local_loss:
                torch.testing.assert_close(losses[0], losses[1])
    for local_loss in (False, True):  # with gradient through the gather: DDP's mean over ranks is exact
        per_rank = [r[(local_loss, True)] for r in ranks]
        image_grad = torch.cat([g[1] for g in per_rank]) / 2
        text_grad = torch.cat([g[2] for g in per_rank]) / 2
        torch.testing.assert_close(image_grad, img.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(text_grad, txt.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((per_rank[0][3] + per_rank[1][3]) / 2, s.grad, rtol=1e-5, atol=1e-6)
    # without it, the non-local loss gives each rank the exact gradient of its own rows (DDP: ÷ world)
    image_grad = torch.cat([r[(False, False)][1] for r in ranks])
    torch.testing.assert_close(image_grad, img.grad, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_gives_the_whole_batch_loss_and_gradient():
    images, tokens = torch.randn(8, 3, 28, 28), random_tokens([3, 5, 7, 2, 9, 4, 6, 8], vocab=49408,
                                                               eot=EOT_TOKEN_ID, length=20)
    grads = []
    losses = []
    for steps in (1, 4):
        torch.manual_seed(0)
        method = ClipMethod(tiny("data.batch_size_per_gpu=8", f"clip.accum_steps={steps}"), torch.device("cpu"))
        loss, metrics = method.loss((images, tokens), 0, 0)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in method.model.named_parameters()})
        assert set(metrics) == {"logit_scale", "positive_cosine"}
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- data


def _write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.fromarray(np.full((8, 10, 3), 20 * i, dtype=np.uint8)).save(folder / f"img{i}.png")
        names.append(f"imgs/img{i}.png")
    return names


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_caption_table_paths_relative_to_the_table(tmp_path, suffix):
    names = _write_images(tmp_path / "imgs", 3)
    table = tmp_path / f"pairs{suffix}"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="," if suffix == ".csv" else "\t")
        writer.writerow(["caption", "filepath"])
        writer.writerows([[f"caption, number {i}", name] for i, name in enumerate(names)])
    data = CaptionTable(table, image_column="filepath")
    assert len(data) == 3
    image, caption = data[2]
    assert caption == "caption, number 2" and image.size == (10, 8) and image.getpixel((0, 0)) == (40, 40, 40)
    tokenized = CaptionTable(table, image_column="filepath", tokenizer=Tokenizer(20))[0][1]
    assert tokenized.shape == (20,)


def test_caption_table_errors_name_file_and_line(tmp_path):
    names = _write_images(tmp_path / "imgs", 2)
    table = tmp_path / "pairs.csv"
    table.write_text("path,caption\n" + f"{names[0]},first\n" + "imgs/missing.png,second\n")
    with pytest.raises(ValueError, match=r"no column 'text'.*pairs\.csv|pairs\.csv.*no column 'text'"):
        CaptionTable(table, caption_column="text")
    with pytest.raises(CorruptImageError, match=r"pairs\.csv, line 3: image not found: .*imgs/missing\.png$"):
        CaptionTable(table)  # a missing file is found when the table is read, not mid-epoch
    table.write_text("path,caption\n" + f"{names[0]},first\n" + f"{names[1]},\n")
    with pytest.raises(ValueError, match=r"pairs\.csv, line 3: empty 'caption'"):
        CaptionTable(table)


def test_webdataset_shards_are_indexed_and_read_by_offset(tmp_path):
    import webdataset as wds

    expected = []
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{shard:05d}.tar")) as sink:
            for i in range(3):
                key = f"{shard:05d}{i:04d}"
                image = Image.fromarray(np.full((6, 6, 3), 10 * (3 * shard + i), dtype=np.uint8))
                sink.write({"__key__": key, "png": image, "txt": f"caption {shard}.{i}", "json": {"i": i}})
                expected.append((10 * (3 * shard + i), f"caption {shard}.{i}"))
            sink.write({"__key__": f"{shard:05d}nocap", "png": image})  # no caption: skipped
    data = TarShardCaptions(str(tmp_path / "shard-{00000..00001}.tar"), image_keys="jpg;png")
    assert len(data) == 6
    for index, (value, caption) in enumerate(expected):
        image, text = data[index]
        assert text == caption and image.getpixel((0, 0)) == (value, value, value)
    assert len(TarShardCaptions(str(tmp_path))) == 6  # a folder of shards
    cache = tmp_path / "index" / "shards.npz"
    first = TarShardCaptions(str(tmp_path / "shard-{00000..00001}.tar"), image_keys="jpg;png", index_cache=cache)
    assert cache.is_file()
    again = TarShardCaptions(str(tmp_path / "shard-{00000..00001}.tar"), image_keys="jpg;png", index_cache=cache)
    assert np.array_equal(again.samples, first.samples) and again[5][1] == "caption 1.2"
    with pytest.raises(FileNotFoundError, match="shard-00002.tar"):
        TarShardCaptions(str(tmp_path / "shard-{00000..00002}.tar"))


@needs_fashion
def test_fashion_mnist_captions_are_templates_filled_with_the_class_name():
    data = FashionMNISTCaptions(None, "test", templates=["a photo of a {}.", "a {} again"], limit=20)
    assert len(data) == 20
    random.seed(0)
    for index in range(20):
        _, caption = data[index]
        name = data.classes[int(data.targets[index])].lower()
        assert caption in (f"a photo of a {name}.", f"a {name} again")
    with pytest.raises(ValueError, match="clip.templates"):
        FashionMNISTCaptions(None, "test", templates=["no slot"])


# --------------------------------------------------------------------------- evaluation


def test_retrieval_recall_against_brute_force_ranks():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(30, 8), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(30, 8), dim=-1)
    result = zeroshot.retrieval_recall(image, text, chunk_size=7)
    sims = image @ text.T
    for k in (1, 5, 10):
        i2t = np.mean([int((sims[i] > sims[i, i]).sum()) < k for i in range(30)])
        t2i = np.mean([int((sims[:, i] > sims[i, i]).sum()) < k for i in range(30)])
        assert math.isclose(result[f"image_to_text_R@{k}"], i2t) and math.isclose(result[f"text_to_image_R@{k}"], t2i)


def test_grouped_retrieval_recall_against_brute_force_ranks():
    """Several captions per image (COCO, Flickr): an image is found by any of its captions."""
    torch.manual_seed(0)
    images = F.normalize(torch.randn(10, 8), dim=-1)
    image_of_text = torch.arange(10).repeat_interleave(3)[torch.randperm(30)]  # three captions each, shuffled
    texts = F.normalize(images[image_of_text] + 0.9 * torch.randn(30, 8), dim=-1)
    result = zeroshot.retrieval_recall(images, texts, chunk_size=4, image_of_text=image_of_text)
    sims = images @ texts.T  # 10 × 30
    for k in (1, 5, 10):
        i2t = np.mean([int((sims[i][image_of_text != i] >= sims[i][image_of_text == i].max()).sum()) < k
                       for i in range(10)])
        t2i = np.mean([int((sims[:, t] > sims[image_of_text[t], t]).sum()) < k for t in range(30)])
        assert math.isclose(result[f"image_to_text_R@{k}"], i2t) and math.isclose(result[f"text_to_image_R@{k}"], t2i)
    one_each = zeroshot.retrieval_recall(images, texts[:10], image_of_text=torch.arange(10))
    assert one_each == zeroshot.retrieval_recall(images, texts[:10])  # one caption per image: the paired case


def test_a_table_listing_images_several_times_is_retrieved_per_image(clip_checkpoint, tmp_path):
    names = _write_images(tmp_path / "imgs", 4)
    rows = [(name, f"caption {j} of image {i}") for j in range(3) for i, name in enumerate(names)]
    (tmp_path / "coco.csv").write_text("path,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
    result = zeroshot.zeroshot_from_checkpoint(clip_checkpoint, dataset="none", retrieval=str(tmp_path / "coco.csv"),
                                               extraction=Extraction(device="cpu", progress=False))
    r = result["retrieval"]
    assert r["num_images"] == 4 and r["num_pairs"] == 12
    assert r["image_to_text_R@10"] == 1.0  # 12 captions, of which 3 are each image's: always within 10
    assert "images / captions" in zeroshot.format_table(result)


def test_zeroshot_on_an_image_folder_uses_openai_templates_with_its_class_names(clip_checkpoint, tmp_path):
    for split in ("train", "val"):
        for name in ("sneaker", "bag"):
            (tmp_path / "shop" / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((28, 28, 3), 60 * i, dtype=np.uint8)).save(
                    tmp_path / "shop" / split / name / f"{i}.png")
    result = zeroshot.zeroshot_from_checkpoint(clip_checkpoint, dataset="imagefolder",
                                               data_path=str(tmp_path / "shop"), split="val",
                                               extraction=Extraction(device="cpu", progress=False))
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert result["zeroshot"]["num_templates"] == len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert result["zeroshot"]["num_classes"] == 2
    assert zeroshot.load_templates("auto", ["a {} again"], "fashion_mnist") == ["a {} again"]


def test_greedy_zeroshot_selection_finds_the_informative_slot():
    torch.manual_seed(0)
    num_slots, slot_dim, classes, n = 4, 3, 3, 60
    labels = torch.arange(n) % classes
    prototypes = F.normalize(torch.randn(classes, num_slots, slot_dim), dim=-1)
    noise = torch.randn(n, num_slots, slot_dim)
    images = noise.clone()
    images[:, 2] = prototypes[labels, 2] + 0.05 * noise[:, 2]  # only slot 2 carries the class
    images = F.normalize(F.normalize(images, dim=-1).flatten(1), dim=-1)
    class_features = F.normalize(prototypes.flatten(1), dim=-1)
    result = zeroshot.greedy_zeroshot_slots(images, class_features, labels, num_slots, slot_dim)
    assert result["selected"][0] == 2 and result["curve"][0] == 1.0 and len(result["selected"]) == 1
    assert zeroshot.zeroshot_subset_accuracy(images, class_features, labels, num_slots, slot_dim, [2]) == 1.0


def test_zeroshot_evaluation_of_a_tiny_model_has_sane_shapes():
    model = build_clip_model(tiny()).eval()
    tokenizer = Tokenizer(20)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(24, 3, 28, 28, generator=g)
    labels = torch.arange(24) % 3
    tokens = tokenizer([f"caption {i}" for i in range(24)])
    test_set = torch.utils.data.TensorDataset(images, labels)
    classes = ["cat", "dog", "bird"]
    result = zeroshot.evaluate(model, tokenizer, test_set=test_set, classnames=classes,
                               templates=["a photo of a {}.", "a {}."], selection_set=test_set,
                               retrieval_set=torch.utils.data.TensorDataset(images, tokens), batch_size=10)
    assert 0.0 <= result["zeroshot"]["top1"] <= result["zeroshot"]["top5"] == 1.0
    assert len(result["slot_alignment_classes"]["matched"]) == 4 and len(result["slot_alignment_pairs"]["mismatched"]) == 4
    selected = result["slot_selection"]["selected"]
    assert selected and set(selected) <= set(range(4)) and len(result["slot_selection"]["per_slot_accuracy"]) == 4
    r = result["retrieval"]
    assert r["image_to_text_R@1"] <= r["image_to_text_R@5"] <= r["image_to_text_R@10"] <= 1.0
    # class embeddings: the renormalised mean of the normalised template embeddings
    class_features = zeroshot.class_embeddings(model, tokenizer, classes, ["a photo of a {}.", "a {}."])
    with torch.no_grad():
        direct = [F.normalize(model.encode_text(tokenizer([f"a photo of a {c}.", f"a {c}."])).mean(0), dim=0)
                  for c in classes]
    torch.testing.assert_close(class_features, torch.stack(direct), rtol=1e-5, atol=1e-6)
    assert "zero-shot top-1" in zeroshot.format_table(result)


# --------------------------------------------------------------------------- training


@needs_fashion
def test_clip_mode_trains_resumes_and_beats_chance_at_zero_shot(tmp_path):
    from dino_sparo.checkpoint import load_checkpoint
    from dino_sparo.train import train

    out = tmp_path / "run"
    # warm-up matters: without it the first steps can collapse every embedding onto one (loss ln B)
    run = ["data.batch_size_per_gpu=64", "data.limit=512", "optim.warmup_epochs=1",
           'clip.templates=["a photo of a {}."]', f"output_dir={out}"]
    train(tiny(*run, "optim.epochs=3"))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {"loss", "logit_scale", "positive_cosine"} <= set(rows[0])
    first, last = np.mean([r["loss"] for r in rows[:4]]), np.mean([r["loss"] for r in rows[-4:]])
    assert last < first - 0.2, (first, last)
    state = load_checkpoint(out / "checkpoint.pth")
    assert state["step"] == 24 and "model" in state and state["config"]["mode"] == "clip"

    # the same run, longer: resumes at step 24, with zero-shot after the last epoch into log.jsonl
    train(tiny(*run, "optim.epochs=4", "clip.zeroshot_every_epochs=2"))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows[24:] if "loss" in r] == list(range(25, 33))
    evals = [r for r in rows if "zeroshot_top1" in r]
    assert len(evals) == 1 and evals[0]["step"] == 32 and evals[0]["epoch"] == 3
    assert 0.2 < evals[0]["zeroshot_top1"] <= evals[0]["zeroshot_top5"] <= 1.0  # chance: 0.1 and 0.5

    args = zeroshot_cli.build_parser().parse_args([
        "--checkpoint", str(out / "checkpoint.pth"), "--limit", "500", "--slot-selection", "--selection-size", "100",
        "--num-workers", "0", "--output-json", str(tmp_path / "z.json")])
    result = zeroshot_cli.run(args)
    saved = json.loads((tmp_path / "z.json").read_text())
    assert saved["zeroshot"]["num_images"] == 500 and saved["zeroshot"]["top1"] == result["zeroshot"]["top1"]
    assert saved["zeroshot"]["num_classes"] == 10 and len(saved["slot_alignment_classes"]["matched"]) == 4
    assert saved["zeroshot"]["top1"] > 0.25, saved["zeroshot"]  # chance: 0.10 (± 0.013 on 500 images)
