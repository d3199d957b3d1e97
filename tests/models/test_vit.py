"""The ViT matches Hugging Face's ViT on the same random weights."""

import os

import pytest
import torch

from anyformer.convert.vit import vit_config_from_hf, vit_state_dict_from_hf
from anyformer.models import build_model
from anyformer.nn.attention import KERNELS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers


@pytest.mark.parametrize("kernel", KERNELS.names())
@pytest.mark.parametrize("classify", [False, True])
def test_vit_matches_transformers(kernel, classify):
    hf_cfg = transformers.ViTConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=16,
        patch_size=4, num_channels=3, num_labels=5,
    )
    torch.manual_seed(0)
    cls = transformers.ViTForImageClassification if classify else transformers.ViTModel
    hf = cls(hf_cfg).eval()
    for p in hf.parameters():  # HF leaves some tensors at zero; make every weight matter
        p.data.normal_(0, 0.2)
    cfg_dict = hf_cfg.to_dict() | {"architectures": [cls.__name__]}
    cfg = vit_config_from_hf(cfg_dict)
    cfg.attention.kernel = kernel
    ours = build_model(cfg).eval()
    missing, unexpected = ours.load_state_dict(vit_state_dict_from_hf(hf.state_dict(), cfg), strict=False)
    assert not missing and not unexpected
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        if classify:
            torch.testing.assert_close(ours(images), hf(pixel_values=images).logits, atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(ours.hidden(images), hf(pixel_values=images).last_hidden_state, atol=1e-5, rtol=0)


def test_vit_rejects_wrong_image_shape():
    cfg = vit_config_from_hf(dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=8, patch_size=4))
    with pytest.raises(ValueError, match=r"expected \(batch, 3, 8, 8\)"):
        build_model(cfg)(torch.randn(1, 3, 16, 16))
