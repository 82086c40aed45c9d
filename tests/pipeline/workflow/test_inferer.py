"""The evaluation output contract: a real SupervisedEvaluator with the slice-attention inferer."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from torch import nn

from networks import ResNextPlus
from pipeline.workflow.inferer import SliceAttentionInferer, attention_postprocessing, unwrap_network


@pytest.fixture(scope="module")
def network() -> ResNextPlus:
    torch.manual_seed(0)
    return ResNextPlus(lstm_hidden=8, fc_hidden=16).eval()


def _case(index: int, slices: int) -> dict:
    generator = torch.Generator().manual_seed(index)
    image = torch.rand(2, 32, 32, slices, generator=generator)
    image[1] = (image[1] > 0.5).float()
    return {
        "image": MetaTensor(image, meta={"filename_or_obj": f"case_{index}.nii.gz"}),
        "label": index % 2,
        "slice_indices": torch.arange(slices - 1, -1, -1),
        "slice_labels": torch.tensor([1] + [0] * (slices - 1)),
    }


def test_inferer_returns_logits_and_attention(network: ResNextPlus) -> None:
    inputs = torch.rand(1, 2, 32, 32, 5)

    with torch.no_grad():
        out = SliceAttentionInferer()(inputs, network)
        expected_logits, _ = network.forward_with_attention(inputs)

    assert set(out) == {"logits", "attention"}
    assert torch.allclose(out["logits"], expected_logits) and out["logits"].shape == (1, 2)
    assert out["attention"].shape == (1, 5)
    assert torch.allclose(out["attention"].sum(dim=1), torch.ones(1))


def test_slice_chunk_applies_during_the_call_only(network: ResNextPlus) -> None:
    inputs = torch.rand(1, 2, 32, 32, 6)
    seen: list[int | None] = []
    hook = network.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            chunked = SliceAttentionInferer(slice_chunk=4)(inputs, network)
            whole = SliceAttentionInferer()(inputs, network)
    finally:
        hook.remove()

    assert seen == [4, 2, 6]  # two chunks, then the network's own setting (all slices at once)
    assert network.slice_chunk is None
    assert torch.allclose(chunked["logits"], whole["logits"], atol=1e-5)
    assert torch.allclose(chunked["attention"], whole["attention"], atol=1e-6)


def test_inferer_refuses_a_network_without_attention() -> None:
    with pytest.raises(TypeError, match="no forward_with_attention"):
        SliceAttentionInferer()(torch.rand(1, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="slice_chunk"):
        SliceAttentionInferer(slice_chunk=0)


def test_unwrap_network_removes_data_parallel(network: ResNextPlus) -> None:
    assert unwrap_network(nn.DataParallel(network)) is network
    assert unwrap_network(network) is network


def test_evaluator_output_follows_the_contract(network: ResNextPlus) -> None:
    cases = [_case(0, 4), _case(1, 7)]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(cases), batch_size=1),
        network=network,
        inferer=SliceAttentionInferer(slice_chunk=3),
        postprocessing=attention_postprocessing(),
    )
    seen: list[tuple[list[dict], list[dict]]] = []
    evaluator.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append((e.state.output, e.state.batch))
    )

    evaluator.run()

    assert len(seen) == 2
    for (output, batch), case in zip(seen, cases):
        slices = case["image"].shape[-1]
        (result,), (item,) = output, batch  # decollated: one dictionary per volume
        assert result["pred"].shape == (2,) and torch.allclose(result["pred"].sum(), torch.tensor(1.0))
        assert torch.allclose(result["pred"], torch.softmax(result["logits"], dim=0))
        assert result["attention"].shape == (slices,)
        assert torch.allclose(result["attention"].sum(), torch.tensor(1.0))
        assert int(result["label"]) == case["label"]
        assert item["image"].meta["filename_or_obj"] == case["image"].meta["filename_or_obj"]
        assert torch.equal(item["slice_indices"], case["slice_indices"])
        assert torch.equal(item["slice_labels"], case["slice_labels"])


def test_inferer_adds_the_pooled_layer_grad_cam_of_every_slice(network: ResNextPlus) -> None:
    inputs = torch.rand(1, 2, 64, 64, 5)

    with torch.no_grad():
        out = SliceAttentionInferer(slice_chunk=2, grad_cam_layer="encoder.backbone.layer4")(inputs, network)
        plain = SliceAttentionInferer()(inputs, network)
        other_layer = SliceAttentionInferer(grad_cam_layer="encoder.backbone.layer3")(inputs, network)

    assert out["cam"].shape == (1, 5, 2, 2)
    torch.testing.assert_close(out["logits"], plain["logits"])
    assert "cam" not in other_layer  # left to slice_grad_cam, which runs the CNN again


def test_cpu_bf16_keeps_probabilities_in_float32(network: ResNextPlus) -> None:
    inputs = torch.rand(1, 2, 64, 64, 5)

    with torch.no_grad():
        reduced = SliceAttentionInferer(cpu_bf16=True)(inputs, network)
        full = SliceAttentionInferer()(inputs, network)

    assert reduced["logits"].dtype == reduced["attention"].dtype == torch.float32
    torch.testing.assert_close(reduced["logits"].softmax(1), full["logits"].softmax(1), atol=0.02, rtol=0)
