"""TagCLIP's pieces on constructed inputs, where the right answer is known by construction."""

import cv2
import numpy as np
import torch

from tests.tiny import build_tiny_clip
from worker.model import vit
from worker.model.bundle import ClipBundle
from worker.model.tagclip import (
    AttentionVotes,
    LocalScores,
    TagCLIPConfig,
    candidates,
    class_box_masks,
    class_region,
    cls_attention_mask,
    crop_inputs,
    dmar,
    global_scores,
    local_scores,
    reidentify,
)


def _bundle() -> ClipBundle:
    model = build_tiny_clip()
    return ClipBundle(model, None, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), "tiny")


def test_layer_defaults_follow_the_paper_for_twelve_blocks_and_scale_down():
    assert TagCLIPConfig().layers(12) == ((8, 9, 10), 4)
    assert TagCLIPConfig().layers(6) == ((2, 3, 4), 2)
    assert TagCLIPConfig(refine_layers=(1,), vote_min=3).layers(12) == ((1,), 3)


def test_attention_votes_count_blocks_above_their_mean_and_average_refine_layers():
    votes = AttentionVotes(refine_layers=(1, 2))
    strong = torch.zeros(1, 3, 3)
    strong[0, 1, 2] = 1.0  # one patch pair above the mean
    weak = torch.full((1, 3, 3), 1 / 3)  # nothing above the mean
    for layer, attention in enumerate([strong, strong, weak]):
        votes(layer, attention)
    refined = votes.refined(vote_min=2)
    expected = torch.zeros(1, 2, 2)
    expected[0, 0, 1] = (strong[0, 1, 2] + weak[0, 1, 2]) / 2  # refine layers 1 and 2, on the voted pair ...
    torch.testing.assert_close(refined, expected)  # ... and zero wherever fewer than 2 blocks voted
    assert votes.refined(vote_min=3).sum() == 0


def test_box_masks_are_the_union_of_region_boxes_including_the_border():
    h, w = 6, 7
    scores = torch.zeros(h, w, 3)
    scores[1, 1, 0] = scores[2, 2, 0] = 1.0  # a diagonal blob (8-connected): box rows 1-2, cols 1-2
    scores[5, 6, 0] = 1.0  # a blob in the bottom-right corner: the reference's clipping drops it
    scores[0, 3:5, 1] = 1.0  # class 1: one row segment
    scores[..., 2] = 0.3  # class 2: flat, no region
    masks = class_box_masks(scores.reshape(h * w, 3), (h, w)).reshape(h, w, 3)
    expected0 = torch.zeros(h, w)
    expected0[1:3, 1:3] = 1
    expected0[5, 6] = 1
    torch.testing.assert_close(masks[..., 0], expected0)
    expected1 = torch.zeros(h, w)
    expected1[0, 3:5] = 1
    torch.testing.assert_close(masks[..., 1], expected1)
    assert masks[..., 2].sum() == 0


def _box_masks_one_class_at_a_time(scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The reference's loop, per class: normalise, threshold at the mean, union of region boxes."""
    h, w = grid
    values = scores.float().numpy()
    masks = np.zeros((values.shape[1], h, w), dtype=np.float32)
    for c in range(values.shape[1]):
        s = values[:, c] - values[:, c].min()
        if s.max() <= 0:
            continue
        s = s / s.max()
        foreground = (np.floor(s * 255) > np.floor(s.mean() * 255)).reshape(h, w).astype(np.uint8)
        count, _, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
        for x, y, bw, bh, _area in stats[1:count]:
            masks[c, y : y + bh, x : x + bw] = 1.0
    return torch.from_numpy(masks.reshape(values.shape[1], h * w).T.copy())


def test_batched_box_masks_equal_the_per_class_loop():
    generator = torch.Generator().manual_seed(0)
    grid = (9, 13)
    blobs = torch.nn.functional.avg_pool2d(torch.rand(4, 30, *grid, generator=generator), 3, 1, 1)
    scores = blobs.flatten(2).transpose(1, 2)  # [4 images, N, 30 classes], smooth: several regions each
    scores[1, :, 3] = 0.5  # a flat class: no region
    scores[2, :, 4] = torch.rand(grid[0] * grid[1], generator=generator)  # noise: many small regions
    batched = class_box_masks(scores, grid)
    for b in range(4):
        torch.testing.assert_close(batched[b], _box_masks_one_class_at_a_time(scores[b], grid), rtol=0, atol=0)
    assert batched[1, :, 3].sum() == 0 and batched[2, :, 4].sum() > 0


def test_dmar_with_identity_attention_keeps_only_patches_inside_the_class_boxes():
    h, w = 4, 4
    probs = torch.full((h * w, 2), 0.1)
    probs[5, 0] = 0.9  # class 0 strong at (1, 1)
    probs[15, 1] = 0.8  # class 1 strong at (3, 3)
    refined = dmar(probs, torch.eye(h * w), (h, w))
    assert torch.nonzero(refined[:, 0]).flatten().tolist() == [5]
    assert torch.nonzero(refined[:, 1]).flatten().tolist() == [15]
    assert refined[5, 0] == probs[5, 0]


def test_class_region_is_tight_end_exclusive_and_reaches_the_border():
    scores = torch.zeros(5, 6)
    scores[3:5, 4:6] = 1.0
    box, mask = class_region(scores.flatten(), (5, 6))
    assert box == (3, 5, 4, 6)
    assert mask.sum() == 4
    assert class_region(torch.full((30,), 0.2), (5, 6)) is None


def test_cwr_mask_lets_the_class_token_see_only_the_class_patches():
    region = torch.tensor([True, False, False, True] + [False] * 60)  # 8x8 grid, two patches
    mask = cls_attention_mask(region, -1000.0)
    assert mask.shape == (65, 65)
    assert mask[1:].abs().sum() == 0  # patch tokens attend as usual
    assert mask[0, 0] == 0 and mask[0, 1] == 0 and mask[0, 4] == 0 and mask[0, 2] == -1000.0

    visual = build_tiny_clip().visual
    seen = []
    x = vit.embed(visual, torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        vit.block_forward(visual.transformer.resblocks[0], x, mask, observe=seen.append)
    cls_row = seen[0][0, 0]
    visible = torch.tensor([0, 1, 4])
    assert cls_row[visible].sum() > 0.999  # all of the class token's attention is on itself and the region


def test_crop_inputs_resize_to_the_native_input():
    pixels = torch.randn(3, 48, 80)  # a 6x10 grid at patch 8
    region = torch.zeros(6, 10, dtype=torch.bool)
    region[2:4, 5:9] = True
    crop, mask = crop_inputs(pixels, (2, 4, 5, 9), region, patch=8, grid=(8, 8), penalty=-1000.0)
    assert crop.shape == (3, 64, 64)
    assert mask.shape == (65, 65)
    assert (mask[0, 1:] == 0).all()  # the whole crop is the class region here


def test_reidentify_skips_an_empty_region_and_goes_on_to_the_next_class():
    bundle = _bundle()
    text = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    patch_scores = torch.full((64, 3), 0.01)
    patch_scores[:, 0] = 0.9  # class 0: top score but flat, so no region (the reference stops here)
    patch_scores[10, 1] = 0.8  # class 1: one strong patch
    item = LocalScores(torch.randn(3, 64, 64), (8, 8), patch_scores, patch_scores, patch_scores[:, :2].amax(dim=0))
    fused = reidentify(bundle, [item], text, TagCLIPConfig(), batch_size=4)[0]
    assert fused[0] == item.scores[0]  # no crop for class 0
    assert fused[1] != item.scores[1]  # class 1 was still re-identified
    assert 0 <= fused[1] <= 1


def test_cwr_candidates_are_the_best_classes_over_the_threshold_up_to_the_limit():
    scores = torch.tensor([0.2, 0.9, 0.6, 0.7, 0.1])
    assert candidates(scores, torch.tensor(0.5), None) == [1, 3, 2]
    assert candidates(scores, torch.tensor(0.5), 2) == [1, 3]
    assert candidates(scores, torch.tensor(0.95), 2) == []


def test_reidentify_crops_only_the_capped_candidates():
    bundle = _bundle()
    text = torch.nn.functional.normalize(torch.randn(4, 64), dim=-1)
    patch_scores = torch.full((64, 4), 0.01)
    for c, value in enumerate((0.6, 0.9, 0.7, 0.8)):  # each class strong on its own patch
        patch_scores[c * 9, c] = value
    item = LocalScores(torch.randn(3, 64, 64), (8, 8), patch_scores, patch_scores, patch_scores.amax(dim=0))
    fused = reidentify(bundle, [item], text, TagCLIPConfig(cwr_max_classes=2), batch_size=4)[0]
    changed = [c for c in range(4) if fused[c] != item.scores[c]]
    assert changed == [1, 3]  # the two best; classes 0 and 2 keep their local scores


def test_local_scores_shapes_for_a_batch_of_non_square_images():
    bundle = _bundle()
    text = torch.nn.functional.normalize(torch.randn(5, 64), dim=-1)
    out = local_scores(bundle, torch.randn(2, 3, 48, 80), text, n_fg=3, cfg=TagCLIPConfig())
    assert len(out) == 2
    for item in out:
        assert item.grid == (6, 10)
        assert item.patch_scores.shape == (60, 5)
        assert item.scores.shape == (3,)
        torch.testing.assert_close(item.scores, item.patch_scores[:, :3].amax(dim=0))


def test_bf16_autocast_path_agrees_with_fp32():
    """GPUs run under bf16 autocast; the same code on the CPU's bf16 autocast must run and agree."""
    bundle = _bundle()
    text = torch.nn.functional.normalize(torch.randn(6, 64), dim=-1)
    pixels = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        exact = reidentify(bundle, local_scores(bundle, pixels, text, 4, TagCLIPConfig()), text, TagCLIPConfig(), 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            local = local_scores(bundle, pixels, text, 4, TagCLIPConfig())
            fast = reidentify(bundle, local, text, TagCLIPConfig(), 4)
    for a, b in zip(exact, fast, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, atol=0.02, rtol=0.1)


def test_local_stage_matches_the_papers_definition_computed_independently():
    """TagCLIP's local stage written from the paper with torch's own attention module (not
    worker/model/vit.py): blocks 0..L-2 as CLIP runs them; the last block's attention restricted
    to the diagonal (-100 elsewhere) so each patch is classified alone; patch probabilities a
    softmax over the classes; DMAR: every block's patch attention votes where it is above its
    mean, the refinement blocks' (L-4..L-2) mean attention is kept where at least a third of the
    blocks agree, scores propagate along it, then again with each class restricted to the boxes of
    its connected regions above its mean; a class's score is its best refined patch."""
    bundle = _bundle()
    visual, cfg = bundle.visual, TagCLIPConfig()
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 64, 64)
    text = torch.nn.functional.normalize(torch.randn(5, visual.output_dim), dim=-1)
    n_fg, depth, grid = 3, len(visual.transformer.resblocks), (8, 8)

    with torch.no_grad():
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(1, 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x)
        maps = []

        def attend(block, h, mask=None):
            out, weights = block.attn(h, h, h, need_weights=True, average_attn_weights=True, attn_mask=mask)
            return out, weights

        for block in visual.transformer.resblocks[:-1]:
            out, weights = attend(block, block.ln_1(x))
            maps.append(weights[0, 1:, 1:])
            x = x + out
            x = x + block.mlp(block.ln_2(x))
        last = visual.transformer.resblocks[-1]
        maps.append(attend(last, last.ln_1(x))[1][0, 1:, 1:])  # the last block votes with its plain attention
        diagonal = -100.0 * (1 - torch.eye(x.shape[1]))
        out, _ = attend(last, last.ln_1(x), diagonal)
        x = x + out
        x = x + last.mlp(last.ln_2(x))
        features = torch.nn.functional.normalize(visual.ln_post(x[0, 1:]) @ visual.proj, dim=-1)
        probs = (bundle.logit_scale * features @ text.T).softmax(dim=-1)  # [N, C]

        votes = sum((a > a.mean()).int() for a in maps)
        refine = range(depth - 4, depth - 1)
        refined_attention = sum(maps[i] for i in refine) / len(refine) * (votes >= round(depth / 3))
        coarse = refined_attention @ probs
        boxes = torch.zeros_like(coarse)
        for c in range(coarse.shape[1]):
            column = coarse[:, c].numpy()
            normalised = (column - column.min()) / (column.max() - column.min())
            above = (np.floor(normalised * 255) > np.floor(normalised.mean() * 255)).reshape(grid).astype(np.uint8)
            count, _, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
            box = np.zeros(grid, dtype=bool)
            for x0, y0, w, h, _ in stats[1:count]:
                box[y0 : y0 + h, x0 : x0 + w] = True
            boxes[:, c] = torch.from_numpy(box.ravel()).float()
        expected = refined_attention @ (boxes * probs)

    (item,) = local_scores(bundle, pixels, text, n_fg, cfg)
    torch.testing.assert_close(item.patch_probs, probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(item.patch_scores, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(item.scores, expected[:, :n_fg].amax(dim=0), atol=1e-5, rtol=1e-4)


def test_global_scores_put_each_label_against_the_competitors_alone():
    """TAG_SCORES=global, from its definition: p_c = exp(z_c) / (exp(z_c) + sum over competitors
    exp(z_k)), z = scale * cosine. So a label's score does not move when another label joins the
    project, and two labels shown together can both score high (a softmax over all would split)."""
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)  # 2 labels, then 4 competitors
    scores = global_scores(image, text, n_fg=2, logit_scale=50.0)
    z = 50.0 * image @ text.T
    for b in range(3):
        for c in range(2):
            expected = z[b, c].exp() / (z[b, c].exp() + z[b, 2:].exp().sum())
            torch.testing.assert_close(scores[b, c], expected)
    alone_in_project = global_scores(image, torch.cat([text[:1], text[2:]]), n_fg=1, logit_scale=50.0)
    torch.testing.assert_close(scores[:, :1], alone_in_project)
    assert not torch.allclose(scores[:, 0], z[:, :].softmax(dim=-1)[:, 0])  # which a softmax over all is not
    both = torch.nn.functional.normalize(text[0] + text[1], dim=-1)[None]  # an image of both labels
    assert (global_scores(both, text, 2, 50.0) > 0.5).all()
    alone = global_scores(image, text[:2], n_fg=2, logit_scale=50.0)  # no competitors: a softmax over the labels
    torch.testing.assert_close(alone, (z[:, :2]).softmax(dim=-1))


def test_global_scores_stay_in_fp32_under_bf16_autocast():
    torch.manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(4, 64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(40, 64), dim=-1)
    exact = global_scores(image, text, 3, 100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = global_scores(image.bfloat16(), text.bfloat16(), 3, 100.0)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, global_scores(image.bfloat16().float(), text.bfloat16().float(), 3, 100.0))
    assert (under - exact).abs().max() < 0.05
