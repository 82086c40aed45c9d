"""ResNextPlus: shapes, attention, ablations, gradients, chunking, checkpointing, TorchScript, BN."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from monai.bundle import verify_net_in_out
from monai.data import MetaTensor, list_data_collate
from torch.nn.functional import cross_entropy

from networks import Bottleneck, MeanSlicePooling, ResNextPlus, SliceAttention


def volumes(batch: int, slices: int, size: int = 64, channels: int = 2, seed: int = 0) -> torch.Tensor:
    """Random (B, C, H, W, S) input: CT in [0, 1] and a binary mask."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, channels, size, size, slices, generator=generator)
    if channels == 2:
        x[:, 1] = (x[:, 1] > 0.5).float()
    return x


def build(seed: int = 0, **kwargs) -> ResNextPlus:
    torch.manual_seed(seed)
    return ResNextPlus(**kwargs)


def open_residual_branches(model: ResNextPlus) -> None:
    """Set the zero-initialised last BN weight of each block to one, so every branch passes gradient."""
    for module in model.modules():
        if isinstance(module, Bottleneck):
            torch.nn.init.ones_(module.bn3.weight)


def batch_norm_buffers(model: ResNextPlus) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.fixture(scope="module")
def eval_model() -> ResNextPlus:
    return build().eval()


@pytest.mark.parametrize(("batch", "slices", "size"), [(2, 1, 64), (2, 7, 64), (1, 50, 32)])
def test_output_shapes_and_attention_sum_to_one(eval_model, batch, slices, size):
    with torch.no_grad():
        logits, attention = eval_model.forward_with_attention(volumes(batch, slices, size))
        plain = eval_model(volumes(batch, slices, size))
    assert logits.shape == (batch, 2)
    assert attention.shape == (batch, slices)
    assert torch.all(attention > 0)
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(batch))
    torch.testing.assert_close(plain, logits)


def test_slice_encoder_follows_figure_1(eval_model):
    """CT conv + mask conv summed -> BN -> ReLU -> CBAM -> max-pool -> ResNeXt stages."""
    encoder, backbone = eval_model.encoder, eval_model.encoder.backbone
    slices = volumes(1, 3)[0].permute(3, 0, 1, 2).contiguous()
    with torch.no_grad():
        fused = backbone.conv1(slices[:, 0:1]) + encoder.mask_conv(slices[:, 1:2])
        refined = encoder.cbam(torch.relu(backbone.bn1(fused)))
        expected = backbone.forward_stages(backbone.maxpool(refined))
        actual = encoder(slices)
    assert encoder.mask_conv.weight.shape == backbone.conv1.weight.shape == (64, 1, 7, 7)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_volumes_in_a_batch_do_not_interact(eval_model):
    x = volumes(3, 3)
    with torch.no_grad():
        together = eval_model(x)
        alone = eval_model(x[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)


def test_batch_norm_statistics_span_the_volumes_of_a_batch_in_training_only():
    model = build()
    x = torch.cat([volumes(1, 3, seed=1), volumes(1, 3, seed=2) * 0.3], dim=0)
    with torch.no_grad():
        together, alone = model.train()(x), model(x[:1])
        assert not torch.allclose(together[:1], alone, rtol=1e-3, atol=1e-4)
        together, alone = model.eval()(x), model(x[:1])
    torch.testing.assert_close(together[:1], alone, rtol=1e-4, atol=1e-5)


def test_training_forward_on_a_single_slice():
    model = build().train()
    with torch.no_grad():
        logits, attention = model.forward_with_attention(volumes(1, 1))
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(attention, torch.ones(1, 1))


def test_without_slice_attention_attention_is_uniform_mean():
    model = build(use_slice_attention=False).eval()
    assert isinstance(model.slice_pooling, MeanSlicePooling)
    x = volumes(2, 3)
    with torch.no_grad():
        logits, attention = model.forward_with_attention(x)
        features = torch.stack([model.encode_slices(v.permute(3, 0, 1, 2)) for v in x.unbind(0)])
        expected = model.classifier(model.lstm(features)[0].mean(dim=1))
    torch.testing.assert_close(attention, torch.full((2, 3), 1 / 3))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("use_mask", "use_cbam", "use_slice_attention"),
    [(True, False, True), (True, True, False), (False, False, True), (False, True, True)],
    ids=["N-SCA", "N-SLA", "N-MSCA", "no-mask"],
)
def test_ablations_build_and_run(use_mask, use_cbam, use_slice_attention):
    model = build(use_mask=use_mask, use_cbam=use_cbam, use_slice_attention=use_slice_attention).eval()
    channels = 2 if use_mask else 1
    assert (model.encoder.mask_conv is not None) == use_mask
    assert (model.encoder.cbam is not None) == use_cbam
    assert isinstance(model.slice_pooling, SliceAttention) == use_slice_attention
    with torch.no_grad():
        logits, attention = model.forward_with_attention(volumes(1, 3, channels=channels))
    assert logits.shape == (1, 2) and attention.shape == (1, 3)
    with pytest.raises(ValueError, match=f"expected {channels} input channels"):
        model(volumes(1, 3, channels=3 - channels))


def test_every_parameter_gets_a_gradient():
    model = build(num_classes=3).train()
    open_residual_branches(model)
    logits = model(volumes(1, 3))
    cross_entropy(logits, torch.tensor([2])).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []
    assert model.encoder.mask_conv.weight.grad.abs().sum() > 0
    assert logits.shape == (1, 3)


def test_lstm_initialised_from_normal_with_std_0_1():
    model = build()
    weights = torch.cat([p.flatten() for n, p in model.lstm.named_parameters() if n.startswith("weight")])
    biases = [p for n, p in model.lstm.named_parameters() if n.startswith("bias")]
    assert abs(weights.std().item() - 0.1) < 0.002 and abs(weights.mean().item()) < 0.002
    assert all(torch.all(b == 0) for b in biases)
    assert model.lstm.bidirectional and model.lstm.hidden_size == 512


def test_chunked_equals_unchunked_in_eval(eval_model):
    chunked = build(slice_chunk=3)
    chunked.load_state_dict(eval_model.state_dict())
    chunked.eval()
    x = volumes(2, 7)
    with torch.no_grad():
        expected = eval_model.forward_with_attention(x)
        actual = chunked.forward_with_attention(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_chunked_forward_takes_a_collated_batch_of_meta_tensors(eval_model):
    chunked = build(slice_chunk=3)
    chunked.load_state_dict(eval_model.state_dict())
    chunked.eval()
    x = volumes(2, 7)
    items = [
        {"image": MetaTensor(volume, meta={"filename_or_obj": f"case{i}.nii"})} for i, volume in enumerate(x)
    ]
    batch = list_data_collate(items)["image"]
    assert isinstance(batch, MetaTensor) and batch.is_batch
    with torch.no_grad():
        expected = eval_model.forward_with_attention(x)
        actual = chunked.forward_with_attention(batch)
    torch.testing.assert_close(
        [t.as_subclass(torch.Tensor) for t in actual], list(expected), rtol=1e-4, atol=1e-5
    )


def test_checkpointed_training_step_equals_plain():
    plain = build(slice_chunk=2).train()
    open_residual_branches(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpoint_slices = True
    x, target = volumes(1, 3), torch.tensor([1])

    saved_bytes = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        sizes: list[int] = []

        def pack(tensor: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = cross_entropy(model(x), target)
        loss.backward()
        saved_bytes[name] = sum(sizes)

    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # the recomputation in backward must not update the running estimates a second time
    for key, value in batch_norm_buffers(plain).items():
        torch.testing.assert_close(checkpointed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert saved_bytes["checkpointed"] < saved_bytes["plain"] / 5


def test_torchscript_round_trip(tmp_path):
    model = build(slice_chunk=3, checkpoint_slices=True).eval()
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = torch.jit.load(str(path))
    x = volumes(2, 4)
    with torch.no_grad():
        expected_logits, expected_attention = model.forward_with_attention(x)
        logits, attention = loaded.forward_with_attention(x)
        plain = loaded(x)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(attention, expected_attention)
    torch.testing.assert_close(plain, expected_logits)
    with pytest.raises(torch.jit.Error, match="expected input of shape"):
        loaded(x[0])


def test_torchscript_without_slice_attention_and_mask():
    model = build(use_mask=False, use_cbam=False, use_slice_attention=False).eval()
    scripted = torch.jit.script(model)
    x = volumes(1, 3, channels=1)
    with torch.no_grad():
        torch.testing.assert_close(scripted.forward_with_attention(x), model.forward_with_attention(x))


@pytest.mark.parametrize("frozen", [True, False])
def test_freeze_bn_stats(frozen):
    model = build(freeze_bn_stats=frozen).train()
    bn_layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert model.training
    assert all(m.training != frozen for m in bn_layers)
    before = batch_norm_buffers(model)
    with torch.no_grad():
        model(volumes(1, 3))
    after = batch_norm_buffers(model)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    assert unchanged == frozen
    # only the statistics are frozen: the affine weights still train
    assert all(m.weight.requires_grad and m.bias.requires_grad for m in bn_layers)
    model.eval()
    assert not any(m.training for m in bn_layers)


def test_bn_stats_are_learned_by_default_without_pretrained_weights():
    assert not build().freeze_bn_stats


def test_invalid_arguments_and_inputs_raise(eval_model):
    with pytest.raises(ValueError, match="slice_chunk"):
        ResNextPlus(slice_chunk=0)
    with pytest.raises(ValueError, match="checkpoint_slices needs slice_chunk"):
        ResNextPlus(checkpoint_slices=True)
    with pytest.raises(ValueError, match=r"\(B, C, H, W, S\)"):
        eval_model(torch.rand(2, 64, 64, 4))
    with pytest.raises(ValueError, match="S >= 1"):
        eval_model(torch.rand(1, 2, 64, 64, 0))


def test_monai_verify_net_in_out(tmp_path):
    config = {"network_def": {"_target_": "networks.ResNextPlus", "slice_chunk": 4}}
    meta = {
        "network_data_format": {
            "inputs": {"image": {"num_channels": 2, "spatial_shape": [64, 64, 8], "dtype": "float32"}},
            "outputs": {"pred": {"num_channels": 2, "dtype": "float32"}},
        }
    }
    (tmp_path / "inference.json").write_text(json.dumps(config))
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(tmp_path / "metadata.json"),
        config_file=str(tmp_path / "inference.json"),
        device="cpu",
    )


def test_channels_last_gives_the_same_scores_and_gradients() -> None:
    x = volumes(1, 4, size=64)
    results = []
    for dtype, channels_last in ((torch.float64, False), (torch.float32, False), (torch.float32, True)):
        model = build(seed=3, channels_last=channels_last).to(dtype)
        open_residual_branches(model)
        logits, attention = model.forward_with_attention(x.to(dtype))
        logits[0, 1].backward()
        results.append((logits, attention, model.encoder.backbone.conv1.weight.grad))
    assert results[2][2].is_contiguous(memory_format=torch.channels_last)

    exact, standard, channels_last = ([t.detach().double() for t in result] for result in results)
    torch.testing.assert_close(channels_last[0], standard[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(channels_last[1], standard[1], rtol=1e-4, atol=1e-5)
    # the stem's gradient passes 50 layers of batch statistics over 4 slices: float32 rounding
    # shows at the percent level in either memory format, against the float64 gradient
    for result in (standard, channels_last):
        assert float((result[2] - exact[2]).norm() / exact[2].norm()) < 0.05


def test_compact_float16_input_is_cast_to_the_weights_dtype() -> None:
    model = build(seed=4, slice_chunk=3).eval()
    x = volumes(1, 5, size=64)

    with torch.no_grad():
        compact = model(x.half())
        full = model(x.half().float())

    assert compact.dtype == torch.float32
    torch.testing.assert_close(compact, full)


def test_slice_head_stays_float32_under_bfloat16_autocast() -> None:
    model = build(seed=5, lstm_hidden=16, fc_hidden=16).eval()
    x = volumes(1, 6, size=64)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, attention = model.forward_with_attention(x)
        cnn_features = model.encode_slices(x.permute(0, 4, 1, 2, 3).reshape(6, 2, 64, 64))
    with torch.no_grad():
        reference_logits, reference_attention = model.forward_with_attention(x)

    assert cnn_features.dtype == torch.bfloat16  # the CNN did run in reduced precision
    assert logits.dtype == attention.dtype == torch.float32
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(1))
    torch.testing.assert_close(logits.softmax(1), reference_logits.softmax(1), atol=0.02, rtol=0)
    torch.testing.assert_close(attention, reference_attention, atol=0.02, rtol=0)
