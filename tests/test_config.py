"""Tests of gfldet.config: loading, inheritance, overrides, strict typing, validation, dump."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from gfldet.config import (
    Config,
    ConfigError,
    SyntheticConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_overrides,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
R50_1X = CONFIGS / "gfl_r50_fpn_1x_coco.yaml"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ------------------------------------------------------------------ shipped configs


def test_shipped_configs_exist():
    names = {p.relative_to(CONFIGS).as_posix() for p in SHIPPED}
    assert {
        "gfl_r50_fpn_1x_coco.yaml",
        "gfl_r50_fpn_ms_2x_coco.yaml",
        "gfl_r101_fpn_ms_2x_coco.yaml",
        "demo_synthetic_cpu.yaml",
        "examples/my_dataset.yaml",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    cfg.validate()


def test_1x_recipe_values():
    cfg = load_config(R50_1X)
    m, d, o, s = cfg.model, cfg.data, cfg.optim, cfg.schedule
    assert m.num_classes == 80
    assert (m.backbone.depth, m.backbone.weights) == (50, "torchvision")
    assert (m.backbone.frozen_stages, m.backbone.norm_eval) == (1, True)
    assert m.fpn.out_channels == 256
    assert (m.head.feat_channels, m.head.stacked_convs, m.head.norm) == (256, 4, "gn")
    assert (m.head.reg_max, m.priors.octave_base_scale) == (16, 8)
    assert m.assigner.topk == 9
    assert (m.loss.cls_loss, m.head.box_repr, m.head.dgqp) == ("qfl", "distribution", None)
    assert (m.loss.qfl_beta, m.loss.cls_weight) == (2.0, 1.0)
    assert (m.loss.giou_weight, m.loss.dfl_weight) == (2.0, 0.25)
    assert (m.test.score_thr, m.test.nms_pre, m.test.nms_iou, m.test.max_per_img) == (
        0.05, 1000, 0.6, 100)
    assert d.synthetic is None
    assert (d.train_short_side, d.test_short_side, d.max_size) == ((800, 800), 800, 1333)
    assert (d.flip_prob, d.batch_size, d.size_divisor) == (0.5, 2, 32)
    assert (o.name, o.lr, o.reference_batch_size, o.scale_lr) == ("sgd", 0.01, 16, True)
    assert (o.momentum, o.weight_decay, o.grad_clip) == (0.9, 1e-4, None)
    # one lr and weight decay for every parameter, as MMDetection's GFL recipe
    assert (o.norm_weight_decay, o.bias_weight_decay, o.bias_lr_factor) == (None, None, 1.0)
    assert (s.epochs, s.policy, s.milestones, s.gamma) == (12, "step", [8, 11], 0.1)
    assert (s.warmup_iters, s.warmup_ratio) == (500, 0.001)
    assert cfg.train.work_dir is None
    # the 1x file spells out the schema defaults
    assert cfg == Config()


def test_1x_file_spells_out_every_key():
    import yaml

    written = yaml.safe_load(R50_1X.read_text())

    def keys(tree, prefix=""):
        out = set()
        for k, v in tree.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out

    assert keys(written) == keys(config_to_dict(Config()))


def test_ms_2x_and_r101_inherit():
    ms = load_config(CONFIGS / "gfl_r50_fpn_ms_2x_coco.yaml")
    assert ms.data.train_short_side == (480, 800)
    assert (ms.schedule.epochs, ms.schedule.milestones) == (24, [16, 22])
    assert ms.model.backbone.depth == 50
    assert ms.optim.lr == 0.01 and ms.data.test_short_side == 800  # inherited
    r101 = load_config(CONFIGS / "gfl_r101_fpn_ms_2x_coco.yaml")
    assert r101.model.backbone.depth == 101
    assert r101.model.backbone.frozen_stages == 1  # sibling key kept by the deep merge
    assert r101.data.train_short_side == (480, 800)
    assert r101.schedule.milestones == [16, 22]


def test_demo_and_example_configs():
    demo = load_config(CONFIGS / "demo_synthetic_cpu.yaml")
    assert demo.model.num_classes == 6
    assert demo.model.backbone.depth == 18 and demo.model.backbone.weights is None
    assert demo.data.synthetic == SyntheticConfig(root="data/synthetic")
    assert demo.model.head.feat_channels % 32 == 0
    mine = load_config(CONFIGS / "examples" / "my_dataset.yaml")
    assert mine.model.num_classes == 3
    assert mine.data.train.annotations.endswith(".json")
    assert mine.schedule.epochs == 12
    assert len((CONFIGS / "examples" / "my_dataset.yaml").read_text().splitlines()) <= 6


# ------------------------------------------------------------------ inheritance


def test_base_chain_and_deep_merge(tmp_path):
    write(tmp_path / "root.yaml", "model:\n  backbone: {depth: 101, frozen_stages: 2}\n"
          "schedule: {epochs: 20, milestones: [5, 10, 15]}\n")
    write(tmp_path / "sub" / "mid.yaml", "base: ../root.yaml\nmodel:\n  backbone: {depth: 34}\n")
    leaf = write(tmp_path / "sub" / "leaf.yaml",
                 "base: mid.yaml\nschedule: {milestones: [12]}\noptim: {lr: 0.02}\n")
    cfg = load_config(leaf)
    assert cfg.model.backbone.depth == 34  # child wins
    assert cfg.model.backbone.frozen_stages == 2  # dicts merge recursively
    assert cfg.schedule.milestones == [12]  # lists replace, not concatenate
    assert cfg.schedule.epochs == 20
    assert cfg.optim.lr == 0.02
    assert cfg.model.num_classes == 80  # schema default


def test_child_can_disable_a_mapping_with_null(tmp_path):
    base = write(tmp_path / "b.yaml", "data: {synthetic: {num_train: 10}}\n")
    assert load_config(base).data.synthetic == SyntheticConfig(num_train=10)
    child = write(tmp_path / "c.yaml", "base: b.yaml\ndata: {synthetic: null}\n")
    assert load_config(child).data.synthetic is None


def test_base_cycle_names_the_files(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    msg = error_of(tmp_path / "a.yaml")
    assert "cycle" in msg and "a.yaml" in msg and "b.yaml" in msg


def test_self_base_is_a_cycle(tmp_path):
    msg = error_of(write(tmp_path / "self.yaml", "base: self.yaml\n"))
    assert "cycle" in msg and "self.yaml" in msg


def test_missing_base_names_both_files(tmp_path):
    msg = error_of(write(tmp_path / "child.yaml", "base: nowhere.yaml\n"))
    assert "child.yaml" in msg and "nowhere.yaml" in msg


def test_base_must_be_a_string(tmp_path):
    msg = error_of(write(tmp_path / "x.yaml", "base: [a.yaml]\n"))
    assert "base" in msg and "x.yaml" in msg


def test_missing_config_file(tmp_path):
    assert "not found" in error_of(tmp_path / "absent.yaml")


# ------------------------------------------------------------------ strict keys and types


def test_misspelt_key_in_file_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path / "typo.yaml", "base: " + str(R50_1X) + "\noptim:\n  lrr: 0.02\n")
    msg = error_of(path)
    assert "optim.lrr" in msg and "typo.yaml" in msg and "optim.lr'" in msg


def test_misspelt_override_suggests_key():
    msg = error_of(R50_1X, ["optim.lrr=0.1"])
    assert "optim.lrr" in msg and "--cfg-options" in msg and "did you mean 'optim.lr'" in msg


def test_misplaced_key_suggests_its_section():
    msg = error_of(R50_1X, ["optim.epochs=3"])
    assert "optim.epochs" in msg and "schedule.epochs" in msg


def test_misspelt_top_level_key():
    assert "did you mean 'optim'" in error_of(R50_1X, ["optimizer.lr=0.1"])


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("optim.lr=abc", "optim.lr", "float"),
        ("schedule.milestones=[a]", "schedule.milestones", "int"),
        ("schedule.milestones=8", "schedule.milestones", "list[int]"),
        ("train.ema=3", "train.ema", "bool"),
        ("schedule.epochs=true", "schedule.epochs", "int"),  # a bool is not an int
        ("schedule.epochs=12.5", "schedule.epochs", "int"),
        ("data.train_short_side=[480]", "data.train_short_side", "tuple[int, int]"),
        ("data.train_short_side=[480, 8.5]", "data.train_short_side", "int"),
        ("model.head.norm=bn", "model.head.norm", "'gn', 'none'"),
        ("train.amp=true", "train.amp", "'auto', 'none', 'fp16', 'bf16'"),
        ("optim.grad_clip=abc", "optim.grad_clip", "float or null"),
        ("model.num_classes=null", "model.num_classes", "int"),
        ("data.synthetic=3", "data.synthetic", "mapping"),
        ("model.backbone=resnet", "model.backbone", "mapping"),
        ("optim.lr=.nan", "optim.lr", "finite"),
        ("train.device=1", "train.device", "str"),
    ],
)
def test_wrong_types_name_key_and_expected_type(override, key, expected):
    msg = error_of(R50_1X, [override])
    assert key in msg and expected in msg and "--cfg-options" in msg


def test_wrong_type_in_file_names_file(tmp_path):
    msg = error_of(write(tmp_path / "t.yaml", "train:\n  ema: yes please\n"))
    assert "train.ema" in msg and "t.yaml" in msg and "'yes please'" in msg


def test_all_errors_reported_together():
    msg = error_of(R50_1X, ["optim.lr=abc", "train.ema=3", "optim.lrr=1"])
    assert "optim.lr:" in msg and "train.ema" in msg and "optim.lrr" in msg


def test_coercions_that_are_allowed(tmp_path):
    path = write(tmp_path / "ok.yaml",
                 "optim: {lr: 1, weight_decay: 5e-4, grad_clip: 35}\n"
                 "data: {train_short_side: [640, 800]}\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int accepted for float
    assert cfg.optim.weight_decay == 5e-4  # YAML 1.2 style exponent without a dot
    assert cfg.optim.grad_clip == 35.0
    assert cfg.data.train_short_side == (640, 800)  # list -> tuple


# ------------------------------------------------------------------ overrides


def test_parse_overrides():
    assert parse_overrides(["optim.lr=0.02", "schedule.milestones=[8, 11]",
                            "train.work_dir=null", "data.train.images=a=b",
                            "train.amp=bf16", "train.ema=true"]) == {
        "optim": {"lr": 0.02},
        "schedule": {"milestones": [8, 11]},
        "train": {"work_dir": None, "amp": "bf16", "ema": True},
        "data": {"train": {"images": "a=b"}},
    }
    assert parse_overrides([]) == {}
    assert parse_overrides(["optim.lr=0.1", "optim.lr=0.2"]) == {"optim": {"lr": 0.2}}


@pytest.mark.parametrize("bad", ["optim.lr", "=1", "optim..lr=1", "optim.lr=[1"])
def test_parse_overrides_rejects(bad):
    with pytest.raises(ConfigError) as info:
        parse_overrides([bad])
    assert repr(bad) in str(info.value) or bad in str(info.value)


def test_overrides_applied_and_typed():
    cfg = load_config(R50_1X, ["optim.lr=0.02", "schedule.epochs=24",
                               "schedule.milestones=[16, 22]", "data.train_short_side=[480, 800]",
                               "model.backbone.weights=null", "train.ema=true",
                               "optim.grad_clip=35", "train.work_dir=/tmp/run"])
    assert cfg.optim.lr == 0.02
    assert (cfg.schedule.epochs, cfg.schedule.milestones) == (24, [16, 22])
    assert cfg.data.train_short_side == (480, 800)
    assert cfg.model.backbone.weights is None
    assert cfg.train.ema is True
    assert cfg.optim.grad_clip == 35.0
    assert cfg.train.work_dir == "/tmp/run"
    assert cfg.model.backbone.depth == 50  # untouched siblings stay


def test_override_enables_synthetic_with_defaults():
    cfg = load_config(R50_1X, ["data.synthetic.num_train=50"])
    assert cfg.data.synthetic == SyntheticConfig(num_train=50)


@pytest.mark.parametrize("own", [["data.val.images=my/val"],
                                 ["data.train.annotations=my/train.json", "data.val.images=v"]])
def test_synthetic_data_and_own_files_are_refused_together(tmp_path, own):
    # A config based on the demo that names its own files (or an eval override of data.val)
    # would silently train or score the generated demo set instead.
    demo = CONFIGS / "demo_synthetic_cpu.yaml"
    message = error_of(demo, own)
    named = sorted({o.split(".")[1] for o in own})
    assert "data.synthetic=" in message and "must be null when" in message
    assert " and ".join(f"data.{n}" for n in named) in message
    child = write(tmp_path / "mine.yaml", f"base: {demo}\ndata:\n  val: {{images: my/val}}\n")
    assert "data.synthetic=" in error_of(child)
    stored = config_to_dict(load_config(demo))
    with pytest.raises(ConfigError, match="data.synthetic="):
        config_from_dict(stored, "last.pth", own)
    cfg = load_config(demo, [*own, "data.synthetic=null"])
    assert cfg.data.synthetic is None and cfg.data.val.images != "data/coco/val2017"


def test_override_beats_file_and_base():
    cfg = load_config(CONFIGS / "gfl_r101_fpn_ms_2x_coco.yaml", ["model.backbone.depth=50"])
    assert cfg.model.backbone.depth == 50


# ------------------------------------------------------------------ value validation


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["optim.lr=-0.01"], "optim.lr"),
        (["optim.lr=0"], "optim.lr"),
        (["optim.momentum=1"], "optim.momentum"),
        (["optim.weight_decay=-1"], "optim.weight_decay"),
        (["optim.grad_clip=0"], "optim.grad_clip"),
        (["optim.norm_weight_decay=-0.1"], "optim.norm_weight_decay"),
        (["optim.bias_weight_decay=-1e-4"], "optim.bias_weight_decay"),
        (["optim.bias_lr_factor=0"], "optim.bias_lr_factor"),
        (["optim.bias_lr_factor=-2"], "optim.bias_lr_factor"),
        (["schedule.milestones=[8, 12]"], "schedule.milestones"),  # 12 >= epochs
        (["schedule.milestones=[11, 8]"], "schedule.milestones"),
        (["schedule.epochs=0"], "schedule.epochs"),
        (["schedule.warmup_ratio=0"], "schedule.warmup_ratio"),
        (["model.backbone.depth=42"], "model.backbone.depth"),
        (["model.backbone.frozen_stages=5"], "model.backbone.frozen_stages"),
        (["model.num_classes=0"], "model.num_classes"),
        (["model.head.reg_max=0"], "model.head.reg_max"),
        (["model.head.feat_channels=48"], "model.head.feat_channels"),
        (["model.test.score_thr=1"], "model.test.score_thr"),
        (["model.test.nms_iou=0"], "model.test.nms_iou"),
        (["model.head.box_repr=dirac"], "model.loss.dfl_weight"),
        (["model.head.dirac_init_distance=4"], "model.head.dirac_init_distance"),
        (["model.head.box_repr=dirac", "model.loss.dfl_weight=0",
          "model.head.dirac_init_distance=-1"], "model.head.dirac_init_distance"),
        (["model.priors.octave_base_scale=0"], "model.priors.octave_base_scale"),
        (["data.batch_size=0"], "data.batch_size"),
        (["data.train_short_side=[800, 480]"], "data.train_short_side"),
        (["data.max_size=700"], "data.max_size"),
        (["data.flip_prob=1.5"], "data.flip_prob"),
        (["train.ema_decay=1"], "train.ema_decay"),
        (["train.device=gpu"], "train.device"),
        (["train.max_decode_failures=2"], "train.max_decode_failures"),
    ],
)
def test_impossible_values_rejected(overrides, key):
    msg = error_of(R50_1X, overrides)
    assert key in msg and "must be" in msg


def test_value_error_shows_value_and_allowed():
    msg = error_of(R50_1X, ["model.backbone.depth=42"])
    assert "model.backbone.depth=42" in msg and "18, 34, 50, 101" in msg


def test_milestone_error_points_at_the_file_that_set_them():
    msg = error_of(CONFIGS / "gfl_r50_fpn_ms_2x_coco.yaml", ["schedule.epochs=20"])
    assert "schedule.milestones" in msg and "gfl_r50_fpn_ms_2x_coco.yaml" in msg


def test_valid_edge_values_accepted():
    cfg = load_config(R50_1X, ["model.head.norm=none", "model.head.feat_channels=48",
                               "model.head.box_repr=dirac", "model.loss.dfl_weight=0",
                               "schedule.milestones=[]", "model.backbone.frozen_stages=-1",
                               "train.device=cuda:1", "train.eval_interval=0"])
    assert cfg.model.head.feat_channels == 48 and cfg.schedule.milestones == []
    gfocal = load_config(R50_1X, ["optim.bias_lr_factor=2", "optim.bias_weight_decay=0",
                                  "optim.norm_weight_decay=0"])
    assert (gfocal.optim.bias_lr_factor, gfocal.optim.bias_weight_decay) == (2.0, 0.0)
    assert gfocal.optim.norm_weight_decay == 0.0
    assert load_config(R50_1X, ["optim.bias_lr_factor=0.5"]).optim.bias_lr_factor == 0.5


@pytest.mark.parametrize(("options", "expected"), [
    ([], 4.0),  # unset: half the ATSS anchor's side, octave_base_scale / 2
    (["model.priors.octave_base_scale=6"], 3.0),
    (["model.head.dirac_init_distance=0"], 0.0),
])
def test_dirac_init_distance_reaches_the_head(options, expected):
    from gfldet.engine.build import build_model

    cfg = load_config(CONFIGS / "demo_synthetic_cpu.yaml",
                      ["model.head.box_repr=dirac", "model.loss.dfl_weight=0", *options])
    head = build_model(cfg.model, size_divisor=cfg.data.size_divisor).head
    assert head.box_repr == "dirac" and torch.equal(head.gfl_reg.bias, torch.full((4,), expected))


@pytest.mark.parametrize("size_divisor", [32, 64])
def test_data_size_divisor_reaches_the_model(size_divisor):
    """The model marks priors valid inside each image padded to `data.size_divisor`, the padding
    the loader applies (before, the model kept its own 32 whatever the config said)."""
    from gfldet.inference import build_inference_model
    from gfldet.models.priors import make_priors, valid_prior_mask

    cfg = load_config(CONFIGS / "demo_synthetic_cpu.yaml", [f"data.size_divisor={size_divisor}"])
    model = build_inference_model(cfg)
    assert model.size_divisor == size_divisor
    priors = make_priors([(8, 8), (4, 4)], [8, 16], cfg.model.priors.octave_base_scale)
    valid = valid_prior_mask(priors, torch.tensor([[30, 30]]), model.size_divisor)
    # a 30 x 30 image padded to 64 covers every prior of the 64 x 64 grid, padded to 32 not
    assert valid.all().item() == (size_divisor == 64)


def test_cosine_ignores_milestones():
    cfg = load_config(R50_1X, ["schedule.policy=cosine", "schedule.epochs=5"])
    assert cfg.schedule.policy == "cosine"


def test_validate_on_python_objects():
    cfg = Config()
    cfg.validate()
    cfg.optim.lr = -1.0
    with pytest.raises(ConfigError, match="optim.lr"):
        cfg.validate()
    assert [key for key, _ in cfg.problems()] == ["optim.lr"]


# ------------------------------------------------------------------ YAML safety and shape


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "optim:\n  lr: 0.01\n  momentum: [0.9\n")
    msg = error_of(path)
    assert "broken.yaml:" in msg and "line 3" in msg


def test_malformed_yaml_bad_indent(tmp_path):
    path = write(tmp_path / "indent.yaml", "optim:\n  lr: 0.01\n    momentum: 0.9\n")
    msg = error_of(path)
    assert "indent.yaml:3:" in msg


def test_duplicate_key_rejected(tmp_path):
    msg = error_of(write(tmp_path / "dup.yaml", "optim:\n  lr: 0.1\n  lr: 0.2\n"))
    assert "dup.yaml:3" in msg and "duplicate key 'lr'" in msg


@pytest.mark.parametrize("text", ["!!python/object/apply:os.system [\"touch {m}\"]\n",
                                  "optim: {lr: !!python/object/apply:os.system [\"touch {m}\"]}\n"])
def test_python_tags_refused_by_safe_loader(tmp_path, text):
    marker = tmp_path / "pwned"
    path = write(tmp_path / "evil.yaml", text.replace("{m}", str(marker)))
    msg = error_of(path)
    assert "evil.yaml" in msg and "python" in msg
    assert not marker.exists()


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "42\n", ""])
def test_top_level_must_be_a_mapping(tmp_path, text):
    msg = error_of(write(tmp_path / "top.yaml", text))
    assert "top.yaml" in msg and "mapping" in msg


def test_empty_mapping_is_all_defaults(tmp_path):
    assert load_config(write(tmp_path / "empty.yaml", "{}\n")) == Config()


def test_non_string_key_rejected(tmp_path):
    msg = error_of(write(tmp_path / "k.yaml", "schedule:\n  1: 2\n"))
    assert "schedule.1" in msg and "string" in msg


# ------------------------------------------------------------------ dict / dump round trip


def test_config_to_dict_is_plain():
    d = config_to_dict(Config())
    assert d["data"]["train_short_side"] == [800, 800]
    assert d["schedule"]["milestones"] == [8, 11]
    assert d["data"]["synthetic"] is None
    assert config_from_dict(d) == Config()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_dump_load_round_trip(tmp_path, path):
    cfg = load_config(path, ["optim.grad_clip=35", "train.work_dir='1e5'"])
    out = tmp_path / "dumped" / "config.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert "base:" not in out.read_text()


def test_round_trip_keeps_every_non_default_value(tmp_path):
    cfg = Config()
    cfg.model.loss.cls_loss = "focal"
    cfg.data.synthetic = SyntheticConfig(root="somewhere", num_train=7, num_val=3, seed=4)
    cfg.data.train_short_side = (320, 640)
    cfg.optim.weight_decay = 1e-10
    cfg.schedule.milestones = []
    cfg.train.amp = "bf16"
    cfg.train.device = "cpu"
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert dataclasses.asdict(load_config(tmp_path / "c.yaml")) == dataclasses.asdict(cfg)


def test_config_from_dict_is_strict():
    with pytest.raises(ConfigError, match=r"model\.bogus"):
        config_from_dict({"model": {"bogus": 1}}, source="checkpoint")


# ------------------------------------------------------------ messages (every problem at once)


def problem_lines(msg: str) -> dict[str, str]:
    """The '  - ' lines of a several-problem message, by the dotted key each names first."""
    lines = [line[4:] for line in msg.splitlines() if line.startswith("  - ")]
    assert msg.splitlines()[0].endswith(f"({len(lines)} problems):")
    keyed = {}
    for line in lines:
        unknown = line.startswith("unknown key")
        keyed[line.split("'")[1] if unknown else line.split(":")[0].split("=")[0]] = line
    return keyed


def test_types_ranges_and_unknown_keys_reported_together():
    msg = error_of(R50_1X, ["optim.lr=abc", "data.flip_prob=2", "model.backbone.depth=42",
                            "schedule.milestones=[8, x]", "train.device=gpu", "model.head.nrom=gn"])
    lines = problem_lines(msg)
    assert set(lines) == {"optim.lr", "data.flip_prob", "model.backbone.depth",
                          "schedule.milestones[1]", "train.device", "model.head.nrom"}
    assert lines["optim.lr"].startswith("optim.lr: expected float, got 'abc' (str)")
    assert "data.flip_prob=2.0 is invalid: must be in [0, 1]" in lines["data.flip_prob"]
    assert "must be one of 18, 34, 50, 101" in lines["model.backbone.depth"]
    assert "expected int, got 'x' (str)" in lines["schedule.milestones[1]"]
    assert "one of 'auto', 'cpu', 'cuda', 'cuda:N'" in lines["train.device"]
    assert "did you mean 'model.head.norm'?" in lines["model.head.nrom"]
    assert all(line.endswith("[from --cfg-options]") for line in lines.values())


def test_cross_field_rules_reported_together():
    msg = error_of(R50_1X, ["model.head.dirac_init_distance=2", "schedule.milestones=[11, 8]",
                            "data.max_size=700"])
    lines = problem_lines(msg)
    assert set(lines) == {"model.head.dirac_init_distance", "schedule.milestones", "data.max_size"}
    assert "schedule.milestones=[11, 8] is invalid: must be strictly increasing" in msg
    assert "data.max_size=700 is invalid: must be >= the largest short side (800)" in msg


def test_each_problem_names_the_file_that_set_its_key(tmp_path):
    write(tmp_path / "base.yaml", "data: {flip_prob: 2}\nschedule: {gamma: 0}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nschedule: {gamma: 0.5, epochs: 0}\n"
                  "optim:\n  lrr: 0.1\ntrain:\n  7: 1\n")
    lines = problem_lines(error_of(child, ["model.num_classes=0"]))
    assert lines["data.flip_prob"].endswith(f"[in {tmp_path / 'base.yaml'}]")
    assert lines["schedule.epochs"].endswith(f"[in {child}]")
    assert lines["optim.lrr"].endswith(f"[in {child}]")
    assert lines["train.7"].endswith(f"[in {child}]") and "keys must be strings" in lines["train.7"]
    assert lines["model.num_classes"].endswith("[from --cfg-options]")
    assert "schedule.gamma" not in lines  # the child's 0.5 replaced the base's 0


def test_problems_of_python_objects_include_types():
    cfg = Config()
    cfg.train.ema = "yes"
    cfg.data.train_short_side = (800, 600.5)
    cfg.optim.grad_clip = 0.0
    found = dict(cfg.problems())
    assert set(found) == {"train.ema", "data.train_short_side[1]", "optim.grad_clip"}
    assert "expected bool (true/false), got 'yes'" in found["train.ema"]
    assert found["optim.grad_clip"] == "optim.grad_clip=0.0 is invalid: must be > 0 or null"


# ------------------------------------------------- the model sections are constructor arguments


def _model_sections():
    from gfldet.config import (
        AssignerConfig,
        BackboneConfig,
        DGQPConfig,
        FPNConfig,
        HeadConfig,
        PriorsConfig,
    )
    from gfldet.models.backbone import ResNetBackbone
    from gfldet.models.detector import GFL
    from gfldet.models.fpn import FPN
    from gfldet.models.head import DGQP, GFLHead

    return [  # (section, the part it is passed to, the part's other arguments)
        (BackboneConfig, ResNetBackbone, set()),
        (FPNConfig, FPN, {"in_channels"}),
        (HeadConfig, GFLHead, {"num_classes", "in_channels", "num_levels"}),
        (DGQPConfig, DGQP, {"reg_max"}),
        (PriorsConfig, GFL, {"backbone", "neck", "head", "loss", "test", "topk", "size_divisor"}),
        (AssignerConfig, GFL, {"backbone", "neck", "head", "loss", "test", "octave_base_scale",
                               "size_divisor"}),
    ]


@pytest.mark.parametrize("index", range(6))
def test_model_sections_are_keyword_arguments_with_the_schema_default_only(index):
    import inspect

    section, part, others = _model_sections()[index]
    params = inspect.signature(part).parameters
    keys = {f.name for f in dataclasses.fields(section)}
    assert keys | others == set(params), f"{section.__name__} vs {part.__name__}"
    # each default is written once, in the schema: the constructor has none for its knobs
    assert [k for k in keys if params[k].default is not inspect.Parameter.empty] == []


# ------------------------------------------------------------------ keys that moved (issue 17)


def test_old_keys_in_a_file_are_refused_naming_their_new_place(tmp_path):
    old = write(tmp_path / "old.yaml", "base: " + str(R50_1X) + "\nmodel:\n"
                "  head: {octave_base_scale: 6, dgqp: true, dgqp_topk: 3}\n"
                "  loss: {box_repr: dirac, dirac_init_distance: 2, dfl_weight: 0}\n")
    msg = error_of(old, ["model.head.dgqp_channels=8", "optim.lr=abc"])
    lines = [line[4:] for line in msg.splitlines() if line.startswith("  - ")]
    assert msg.splitlines()[0].endswith("(7 problems):")  # every problem at once
    where = f"[in {old}]"
    assert f"model.loss.box_repr moved to model.head.box_repr {where}" in lines
    assert (f"model.loss.dirac_init_distance moved to model.head.dirac_init_distance {where}"
            in lines)
    assert f"model.head.octave_base_scale moved to model.priors.octave_base_scale {where}" in lines
    assert f"model.head.dgqp_topk moved to model.head.dgqp.topk {where}" in lines
    assert "model.head.dgqp_channels moved to model.head.dgqp.channels [from --cfg-options]" \
        in lines
    assert any(line.startswith("model.head.dgqp is GFLv2's section now: write model.head.dgqp: {}")
               and line.endswith(where) for line in lines)
    assert any(line.startswith("optim.lr: expected float") for line in lines)


def _old_layout(cfg: Config) -> dict:
    """`cfg` as a checkpoint written before issue 17 stored it."""
    d = config_to_dict(cfg)
    m = d["model"]
    dgqp = m["head"].pop("dgqp")
    m["head"].update(octave_base_scale=m.pop("priors")["octave_base_scale"], dgqp=dgqp is not None,
                     **{f"dgqp_{k}": v for k, v in (dgqp or DGQP_PAPER).items()})
    m["loss"].update(box_repr=m["head"].pop("box_repr"),
                     dirac_init_distance=m["head"].pop("dirac_init_distance"))
    return d


DGQP_PAPER = {"topk": 4, "channels": 64, "add_mean": True}


@pytest.mark.parametrize("options", [
    ["model.priors.octave_base_scale=6", "model.head.box_repr=dirac", "model.loss.dfl_weight=0",
     "model.head.dirac_init_distance=2.5"],
    ["model.head.dgqp={topk: 3, channels: 16, add_mean: false}"],
    [],
])
def test_a_stored_config_of_the_old_layout_is_migrated_and_logged(options, caplog):
    from gfldet.inference import config_for_checkpoint

    cfg = load_config(R50_1X, options)
    old = _old_layout(cfg)
    assert "box_repr" in old["model"]["loss"] and "priors" not in old["model"]
    with pytest.raises(ConfigError, match="moved to model.head.box_repr"):  # as a user's file
        config_from_dict(old, "old.pth", ["optim.lr=0.01", "model.loss.box_repr=distribution"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="gfldet"):
        got = config_for_checkpoint({"config": old}, None, "old.pth")
    assert got == cfg
    log = caplog.text
    assert "old.pth (stored config): config written before gfldet's keys moved" in log
    assert "model.loss.box_repr -> model.head.box_repr" in log
    assert "model.head.octave_base_scale -> model.priors.octave_base_scale" in log
    if cfg.model.head.dgqp is None:
        assert "model.head.dgqp: false -> null" in log and "model.head.dgqp_topk dropped" in log
    else:
        assert "model.head.dgqp: true -> {}" in log and "dgqp_topk -> model.head.dgqp.topk" in log
    caplog.clear()
    with caplog.at_level("WARNING", logger="gfldet"):  # a config of today's layout: no note
        assert config_from_dict(config_to_dict(cfg), "new.pth") == cfg
    assert "migrated" not in caplog.text
