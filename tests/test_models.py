"""The cfg parser, the Darknet network, the shipped architectures and the model facts (docs/model.md)."""

import math
import os

import numpy as np
import pytest
import torch

import yolo_kernels as yk
from yolo_kernels.models import CFG_DIR, Darknet, YOLOLayer, format_cfg, parse_cfg_text, parse_model_cfg
from yolo_kernels.models.zoo import SHIPPED

FACTS = {  # cfg: (parameters, module_list entries, yolo_layers, strides)
    "yolov3": (61_949_149, 107, [82, 94, 106], [32, 16, 8]),
    "yolov3-spp": (62_998_749, 114, [89, 101, 113], [32, 16, 8]),
    "yolov3-tiny": (8_852_366, 24, [16, 23], [32, 16]),
    "yolov3-1cls": (61_523_734, 107, [82, 94, 106], [32, 16, 8]),
    "yolov4": (64_363_101, 162, [139, 150, 161], [8, 16, 32]),
}


def defs_equal(a, b):
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for k in x:
            if isinstance(x[k], np.ndarray) or isinstance(y[k], np.ndarray):
                if not np.array_equal(x[k], y[k]):
                    return False
            elif x[k] != y[k] or type(x[k]) is not type(y[k]):
                return False
    return True


@pytest.mark.parametrize("name", sorted(FACTS))
def test_model_facts(name, cfg_dir):
    n_params, n_modules, yolo_layers, strides = FACTS[name]
    model = Darknet(os.path.join(cfg_dir, name + ".cfg"))
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert len(model.module_list) == n_modules
    assert model.yolo_layers == yolo_layers
    assert model.stride == strides
    assert model.nc == (1 if name.endswith("1cls") else 80)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_architectures_equal_the_darknet_files(name, cfg_dir):
    real = parse_model_cfg(os.path.join(cfg_dir, name + ".cfg"))
    generated = SHIPPED[name](80)
    assert defs_equal(generated, real)
    assert defs_equal(parse_cfg_text(format_cfg(generated)), generated)  # text round trip
    built, from_file = Darknet(name), Darknet(os.path.join(cfg_dir, name + ".cfg"))
    assert [type(m) for m in built.module_list] == [type(m) for m in from_file.module_list]
    assert sum(p.numel() for p in built.parameters()) == FACTS[name][0]


def test_one_class_yolov3_is_the_generator_with_nc_1(cfg_dir):
    assert defs_equal(SHIPPED["yolov3"](1), parse_model_cfg(os.path.join(cfg_dir, "yolov3-1cls.cfg")))


def test_parser_types_and_anchors(cfg_dir):
    defs = parse_model_cfg(os.path.join(cfg_dir, "yolov3.cfg"))
    assert defs[0]["type"] == "net" and defs[0]["width"] == 416 and defs[0]["hue"] == 0.1
    yolo = [d for d in defs if d["type"] == "yolo"]
    assert yolo[0]["mask"] == [6, 7, 8] and yolo[0]["anchors"].shape == (9, 2)
    assert yolo[0]["anchors"].tolist()[6:] == [[116, 90], [156, 198], [373, 326]]
    assert [d["layers"] for d in defs if d["type"] == "route"] == [[-4], [-1, 61], [-4], [-1, 36]]
    assert defs[-2]["batch_normalize"] == 0 and defs[1]["batch_normalize"] == 1


def test_parser_rejects_unknown_fields_by_name():
    text = "[net]\nwidth=32\n[convolutional]\nfilters=8\nsize=3\nstride=1\nflavour=mint\nbogus=1\n"
    with pytest.raises(ValueError, match=r"unsupported fields \['bogus', 'flavour'\]"):
        parse_cfg_text(text)
    with pytest.raises(ValueError, match="key=value"):
        parse_cfg_text("[net]\nwidth\n")
    with pytest.raises(FileNotFoundError, match="no such file"):
        parse_model_cfg("/nonexistent/x.cfg")


def test_unknown_layer_type_and_activation_are_errors():
    with pytest.raises(ValueError, match="unsupported layer type 'local'"):
        Darknet([{"type": "net"}, {"type": "local"}])
    bad_act = {
        "type": "convolutional",
        "batch_normalize": 1,
        "filters": 4,
        "size": 1,
        "stride": 1,
        "pad": 1,
        "activation": "gelu9",
    }
    with pytest.raises(ValueError, match="unsupported activation 'gelu9'"):
        Darknet([{"type": "net"}, bad_act])


def test_head_bias_initialisation():
    model = Darknet("yolov3-tiny")
    for j in model.yolo_layers:
        head = model.module_list[j]
        conv = model.module_list[j - 1][0]
        bias = conv.bias.detach().view(head.na, head.no)
        fresh = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 1)  # default init bound
        bound = 1 / math.sqrt(conv.in_channels)
        assert fresh.bias.abs().max() <= bound
        assert ((bias[:, 4] + 4.5).abs() <= bound).all()
        assert ((bias[:, 5:] - math.log(0.6 / (80 - 0.99))).abs() <= bound).all()
        assert conv.bias.requires_grad and isinstance(conv.bias, torch.nn.Parameter)


def test_training_and_inference_outputs():
    torch.manual_seed(0)
    model = Darknet("yolov3-tiny").train()
    x = torch.rand(2, 3, 64, 96)
    p = model(x)
    assert [tuple(t.shape) for t in p] == [(2, 3, 2, 3, 85), (2, 3, 4, 6, 85)]
    model.eval()
    with torch.no_grad():
        decoded, p_eval = model(x)
    assert decoded.shape == (2, 3 * 2 * 3 + 3 * 4 * 6, 85)
    head = model.module_list[model.yolo_layers[1]]
    p1 = p_eval[1]
    # cell (gj=2, gi=5), anchor 1 of the stride-16 head, decoded by hand
    row = p1[1, 1, 2, 5]
    box = decoded[1, 3 * 2 * 3 + (1 * 4 + 2) * 6 + 5]
    assert torch.allclose(box[0], (torch.sigmoid(row[0]) + 5) * 16)
    assert torch.allclose(box[1], (torch.sigmoid(row[1]) + 2) * 16)
    assert torch.allclose(box[2:4], torch.exp(row[2:4]) * head.anchors[1], rtol=1e-5)
    assert torch.allclose(box[4:], torch.sigmoid(row[4:]))


def test_model_drives_the_loss_end_to_end():
    torch.manual_seed(0)
    model = Darknet("yolov3-tiny")
    model.hyp = dict(yk.DEFAULT_HYP, cls=yk.DEFAULT_HYP["cls"] * 80 / 80)
    model.gr = 0.7
    p = model(torch.rand(2, 3, 64, 64))
    targets = torch.tensor([[0, 3, 0.5, 0.5, 0.4, 0.3], [1, 7, 0.2, 0.7, 0.2, 0.2]])
    loss, items = yk.compute_loss(p, targets, model)
    loss.backward()
    assert torch.isfinite(loss).all() and items.shape == (4,)
    assert model.module_list[0][0].weight.grad is not None
    anchor_vec = model.module_list[model.yolo_layers[0]].anchor_vec
    assert torch.equal(anchor_vec, torch.tensor([[81, 82], [135, 169], [344, 319]]) / 32.0)


def test_yolo_layer_rejects_wrong_channels():
    layer = YOLOLayer(np.array([[10.0, 13.0]]), nc=2, stride=8)
    with pytest.raises(ValueError, match="expected 1 \\* 7 = 7 input channels, got 8"):
        layer(torch.zeros(1, 8, 2, 2))


@pytest.mark.parametrize("name", ["yolov4", "yolov3-1cls", "yolov4.cfg"])
def test_packaged_cfgs_by_name(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name here: the packaged one is used
    model = Darknet(name)
    stem = name.removesuffix(".cfg")
    assert sum(p.numel() for p in model.parameters()) == FACTS[stem][0]
    assert model.yolo_layers == FACTS[stem][2] and model.cfg_name == stem


def test_unknown_cfg_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no file 'yolov9'.*'yolov3-1cls'.*'yolov4'"):
        Darknet("yolov9")


def test_a_users_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "yolov3.cfg").write_text(open(os.path.join(CFG_DIR, "yolov3-tiny.cfg")).read())
    assert Darknet("yolov3.cfg").yolo_layers == FACTS["yolov3-tiny"][2]
