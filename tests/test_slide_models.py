"""Slide-level models: outputs, attention, invariances, the frozen ViT-4K and the registry contract."""

from __future__ import annotations

import pytest
import torch

from hipt.geometry import patch_grid_to_vit4k_input
from hipt.models import create_model, list_models, model_info
from hipt.models.slide import ABMIL, HIPTGlobal, SlideOutput, input_key


def test_registered_as_slide_models():
    assert {"hipt_lgp", "hipt_gp", "abmil"} <= set(list_models(kind="slide"))
    assert input_key("hipt_gp") == "region_features"
    assert input_key("hipt_lgp") == "patch_features"
    assert model_info("abmil").kind == "slide"


@pytest.mark.parametrize("name", ["hipt_gp", "abmil"])
@pytest.mark.parametrize("task,n_out", [("classification", 3), ("survival", 6)])
def test_outputs_and_attention(name, task, n_out):
    torch.manual_seed(0)
    model = create_model(name, n_classes=3, task=task, n_bins=6).eval()
    out = model(torch.randn(9, 192))
    assert isinstance(out, SlideOutput)
    assert out.logits.shape == (n_out,)
    assert out.attention.shape == (9,)
    assert torch.all(out.attention > 0)
    assert out.attention.sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", ["hipt_gp", "abmil"])
def test_bag_order_does_not_change_the_prediction(name):
    # No positional encoding: permuting regions permutes attention and leaves logits unchanged.
    torch.manual_seed(1)
    model = create_model(name, n_classes=2).eval()
    bag = torch.randn(12, 192)
    perm = torch.randperm(12)
    a, b = model(bag), model(bag[perm])
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.allclose(a.attention[perm], b.attention, atol=1e-6)


def test_hipt_gp_architecture_matches_the_original():
    model = create_model("hipt_gp", n_classes=2)
    assert isinstance(model, HIPTGlobal)
    layers = model.global_transformer.layers
    assert len(layers) == 2
    assert layers[0].self_attn.num_heads == 3 and layers[0].self_attn.embed_dim == 192
    assert layers[0].linear1.out_features == 192
    assert model.global_phi[0].in_features == 192 and model.head.classifier.out_features == 2
    assert model.head.attention.score.out_features == 1


def test_attention_is_the_softmax_of_gated_scores():
    torch.manual_seed(2)
    model = create_model("abmil", n_classes=2, hidden_dim=16).eval()
    bag = torch.randn(5, 192)
    h = model.proj(bag)
    att = model.head.attention
    scores = att.score(
        torch.tanh(att.tanh_branch[0](h)) * torch.sigmoid(att.sigmoid_branch[0](h))
    ).squeeze(-1)
    out = model(bag)
    assert torch.allclose(out.attention, torch.softmax(scores, 0), atol=1e-6)
    assert torch.allclose(out.logits, model.head.classifier(out.attention @ h), atol=1e-5)


def test_abmil_without_projection_is_linear_for_one_region():
    model = create_model("abmil", task="survival", n_bins=4, in_dim=7, hidden_dim=0).eval()
    assert isinstance(model, ABMIL)
    x = torch.randn(1, 7)
    out = model(x)
    assert out.attention.tolist() == [1.0]
    assert torch.allclose(out.logits, model.head.classifier(x[0]), atol=1e-6)


def test_bad_bag_shapes_are_clear_errors():
    model = create_model("hipt_gp")
    with pytest.raises(ValueError, match=r"\[M, 192\]"):
        model(torch.randn(4, 100))
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.randn(0, 192))
    with pytest.raises(ValueError, match="task"):
        create_model("abmil", task="regression")


def test_hipt_lgp_runs_a_frozen_vit4k_over_the_patch_grid():
    torch.manual_seed(3)
    model = create_model("hipt_lgp", n_classes=2, random_weights=True, vit4k_kwargs={"depth": 1})
    model.train()
    assert not model.local_vit.training  # frozen: stays in eval mode
    bag = torch.randn(3, 256, 384)
    out = model(bag)
    assert out.logits.shape == (2,) and out.attention.shape == (3,)
    out.logits.sum().backward()
    assert all(p.grad is None for p in model.local_vit.parameters())
    assert any(p.grad is not None for p in model.global_model.parameters())
    # Same numbers as running ViT-4K on the row-major grid, then the global model.
    model.eval()
    with torch.no_grad():
        regions = model.local_vit(patch_grid_to_vit4k_input(bag))
        want = model.global_model(regions)
        got = model(bag)
    assert torch.allclose(got.logits, want.logits, atol=1e-5)


def test_hipt_lgp_unfrozen_trains_the_vit4k():
    model = create_model(
        "hipt_lgp",
        n_classes=2,
        freeze_vit4k=False,
        random_weights=True,
        vit4k_kwargs={"depth": 1},
    )
    model.train()
    assert model.local_vit.training
    model(torch.randn(2, 256, 384)).logits.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.local_vit.parameters())


def test_hipt_lgp_loads_vit4k_weights(tmp_path):
    torch.manual_seed(4)
    src = create_model("vit4k_xs", depth=1)
    path = tmp_path / "vit4k.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()}}, path)
    model = create_model("hipt_lgp", vit4k_weights=str(path), vit4k_kwargs={"depth": 1})
    for k, v in src.state_dict().items():
        assert torch.equal(model.local_vit.state_dict()[k], v)
