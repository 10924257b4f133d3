"""ATSS assignment: a case worked out on paper, and the batched version against a plain
per-image, per-box reference written from the algorithm's description (ATSS paper Alg. 1)."""

import pytest
import torch
from torchvision.ops import box_iou

from gfldet import assigner
from gfldet.assigner import atss_assign
from gfldet.models.priors import make_priors, valid_prior_mask


def reference_atss(anchors, num_per_level, gt_boxes, topk=9):
    """One image, loops over boxes; priors already restricted to the valid ones."""
    num_anchors = anchors.shape[0]
    out = torch.full((num_anchors,), -1, dtype=torch.long)
    if len(gt_boxes) == 0:
        return out
    ious = box_iou(anchors, gt_boxes)  # [A, G]
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = torch.full((num_anchors,), -float("inf"))
    for g, box in enumerate(gt_boxes):
        g_ctr = (box[:2] + box[2:]) / 2
        dist = (a_ctr - g_ctr).norm(dim=1)
        cands, start = [], 0
        for n in num_per_level:
            if n:
                nearest = dist[start : start + n].topk(min(topk, n), largest=False).indices
                cands.append(nearest + start)
            start += n
        cands = torch.cat(cands)
        c_iou = ious[cands, g]
        thr = c_iou.mean() + c_iou.std()
        for c, iou in zip(cands.tolist(), c_iou.tolist(), strict=True):
            cx, cy = a_ctr[c].tolist()
            inside = min(cx - box[0], cy - box[1], box[2] - cx, box[3] - cy) > 0.01
            # Strictly greater keeps the lowest box index on exact ties, as argmax does.
            if iou >= thr and inside and iou > best[c]:
                best[c], out[c] = iou, g
    return out


def test_hand_built_case():
    # One level of four 16x16 anchors centred at (8, 8), (24, 8), (40, 8), (8, 24); top-k = 3.
    anchors = torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16], [32, 0, 48, 16],
                            [0, 16, 16, 32]]).float()
    gts = torch.tensor([[0, 0, 20, 16], [6, 0, 36, 16], [0, 0, 18, 17]]).float()
    # gt0, centre (10, 8): nearest a0 (2), a1 (14), a3 (16.1). IoUs 256/320 = 0.8, 64/512 = 0.125,
    #   0. Threshold = mean 0.30833 + std 0.43036 = 0.73869 -> a0 passes, centre inside.
    # gt1, centre (21, 8): nearest a1 (3), a0 (13), a2 (19). IoUs 256/480 = 0.53333,
    #   160/576 = 0.27778, 64/672 = 0.09524. Threshold 0.30212 + 0.22006 = 0.52218 -> a1.
    # gt2, centre (9, 8.5): nearest a0 (1.12), a1 (15.01), a3 (15.53). IoUs 256/306 = 0.83660,
    #   32/530 = 0.06038, 16/546 = 0.02930. Threshold 0.30876 + 0.45739 = 0.76615 -> a0.
    # a0 is claimed by gt0 (IoU 0.8) and gt2 (IoU 0.8366): the higher IoU wins.
    out = atss_assign(anchors, [4], gts[None], torch.ones(1, 3, dtype=torch.bool), topk=3)
    assert out.tolist() == [[2, 1, -1, -1]]
    # Without gt2, a0 goes to gt0.
    out = atss_assign(anchors, [4], gts[None, :2], torch.ones(1, 2, dtype=torch.bool), topk=3)
    assert out.tolist() == [[0, 1, -1, -1]]
    # A padded (masked) gt2 changes nothing.
    out = atss_assign(anchors, [4], gts[None], torch.tensor([[True, True, False]]), topk=3)
    assert out.tolist() == [[0, 1, -1, -1]]


def test_centre_must_be_strictly_inside():
    # The anchor centre (8, 8) sits 0.005 px inside the box's left edge: not > 0.01, so not positive
    # even though it has the highest IoU.
    anchors = torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16]]).float()
    gt = torch.tensor([[[7.995, 0, 30, 16]]])
    out = atss_assign(anchors, [2], gt, torch.ones(1, 1, dtype=torch.bool), topk=2)
    assert out[0, 0].item() == -1


def test_no_boxes_means_all_background():
    priors = make_priors([(8, 8), (4, 4)], [8, 16], octave_base_scale=8)
    out = atss_assign(priors.boxes, priors.num_per_level, torch.zeros(2, 0, 4),
                      torch.zeros(2, 0, dtype=torch.bool), topk=9)
    assert out.shape == (2, 80) and (out == -1).all()
    # Padding-only boxes behave the same.
    out = atss_assign(priors.boxes, priors.num_per_level, torch.rand(2, 3, 4),
                      torch.zeros(2, 3, dtype=torch.bool), topk=9)
    assert (out == -1).all()


def random_boxes(generator, count, height, width):
    xy = torch.rand(count, 2, generator=generator) * torch.tensor([width, height])
    wh = 4 + torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) * 0.6
    boxes = torch.cat([xy, xy + wh], 1)
    return torch.minimum(boxes, torch.tensor([width, height, width, height]).float())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("one_box_blocks", [False, True], ids=["default-blocks", "one-box-blocks"])
def test_batched_equals_per_image_reference(seed, one_box_blocks, monkeypatch):
    if one_box_blocks:  # every level's distances one box at a time
        monkeypatch.setattr(assigner, "CPU_BLOCK_ELEMENTS", 1)
    gen = torch.Generator().manual_seed(seed)
    # A 200x328 batch: P7 has 2x3 = 6 priors, fewer than top-k = 9.
    sizes = [(25, 41), (13, 21), (7, 11), (4, 6), (2, 3)]
    priors = make_priors(sizes, [8, 16, 32, 64, 128], octave_base_scale=8)
    image_sizes = torch.tensor([[200, 328], [150, 200], [97, 300]])
    counts = [7, 0, 12]
    gt = torch.zeros(3, 12, 4)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for i, (n, (h, w)) in enumerate(zip(counts, image_sizes.tolist(), strict=True)):
        gt[i, :n] = random_boxes(gen, n, h, w)
        mask[i, :n] = True
    valid = valid_prior_mask(priors, image_sizes, size_divisor=32)
    batched = atss_assign(priors.boxes, priors.num_per_level, gt, mask, topk=9, valid_mask=valid)
    for i, n in enumerate(counts):
        keep = valid[i]
        # Each image alone: only its own valid priors, per-level counts recomputed.
        level_id = torch.repeat_interleave(torch.arange(5), torch.tensor(priors.num_per_level))
        per_level = torch.bincount(level_id[keep], minlength=5).tolist()
        alone = reference_atss(priors.boxes[keep], per_level, gt[i, :n])
        assert torch.equal(batched[i, keep], alone), f"image {i}"
        assert (batched[i, ~keep] == -1).all()
    assert (batched[0] >= 0).any() and (batched[2] >= 0).any()


def test_level_with_fewer_priors_than_topk():
    # A 64x64 input: P6 is 1x1 and P7 1x1, fewer than 9 priors each.
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    priors = make_priors(sizes, [8, 16, 32, 64, 128], octave_base_scale=8)
    gt = torch.tensor([[[10.0, 10.0, 60.0, 50.0]]])
    out = atss_assign(priors.boxes, priors.num_per_level, gt, torch.ones(1, 1, dtype=torch.bool),
                      topk=9)
    expected = reference_atss(priors.boxes, priors.num_per_level, gt[0])
    assert torch.equal(out[0], expected) and (out >= 0).any()


def test_thousand_boxes_at_full_resolution():
    # 800x1344 (22,400 priors), two images, 1,000 boxes each: runs without a per-box loop.
    sizes = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
    priors = make_priors(sizes, [8, 16, 32, 64, 128], octave_base_scale=8)
    gen = torch.Generator().manual_seed(0)
    gt = torch.stack([random_boxes(gen, 1000, 800, 1344) for _ in range(2)])
    mask = torch.ones(2, 1000, dtype=torch.bool)
    out = atss_assign(priors.boxes, priors.num_per_level, gt, mask, topk=9)
    assert out.shape == (2, 22400)
    assert out.max() < 1000 and (out >= 0).sum() > 1000
    assert assigner._box_block(2, 16800, torch.device("cpu")) < 1000  # P3's distances in blocks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(assigner, "CPU_BLOCK_ELEMENTS", 2 * 1000 * 16800)  # one block per level
        assert torch.equal(atss_assign(priors.boxes, priors.num_per_level, gt, mask, topk=9), out)
