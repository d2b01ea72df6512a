"""engine/cuda_graphs.py TextEncoderGraphs: the text encoders' forwards captured as CUDA graphs under
`compile.cuda_graphs`. On the CPU: what it lets through to the plain forward, and what its signature sees (weights
moved or replaced, hooks, PEFT layers); on a GPU: replays equal to the eager encoders bit for bit, a capture per
signature, and the images of a graphed pipeline equal to diffusers'."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_call_kwargs
from diffusers import FluxPipeline

from engine.cuda_graphs import TextEncoderGraphs, apply_text_encoder_graphs, drop_captured_graphs, text_encoder_graphs


@pytest.fixture
def encoders(tiny_components):
    """Copies of the tiny pipeline's CLIP and T5 (the session's components are shared and read-only)."""
    return copy.deepcopy(tiny_components["text_encoder"]), copy.deepcopy(tiny_components["text_encoder_2"])


def token_ids(length: int, device="cpu") -> torch.Tensor:
    return torch.randint(0, 100, (1, length), generator=torch.Generator().manual_seed(length)).to(device)


def test_install_and_undo_on_a_pipeline(tiny_components, encoders):
    clip, t5 = encoders
    pipe = FluxPipeline(**{**tiny_components, "text_encoder": clip, "text_encoder_2": t5})
    undo = apply_text_encoder_graphs(pipe)
    assert [graphs.encoder for graphs in text_encoder_graphs(pipe)] == [clip, t5]
    assert apply_text_encoder_graphs(pipe) is None  # a forward already replaced is left alone
    undo()
    assert "forward" not in clip.__dict__ and "forward" not in t5.__dict__ and not text_encoder_graphs(pipe)


def test_cpu_calls_and_other_call_forms_run_the_plain_forward(encoders):
    clip, t5 = encoders
    ids = token_ids(7)
    with torch.no_grad():
        expected = t5(ids, output_hidden_states=False)[0]
        graphs = TextEncoderGraphs(t5)
        graphs.install()
        assert torch.equal(t5(ids, output_hidden_states=False)[0], expected)  # CPU tensors: no graph
        assert torch.equal(t5(ids)[0], expected)  # another call form
    assert graphs.captures == 0 and not graphs.graphs
    graphs.uninstall()


def test_the_signature_sees_the_weights_hooks_and_adapters(encoders):
    clip, _ = encoders
    graphs = TextEncoderGraphs(clip)
    ids = token_ids(5)
    key = graphs._signature(ids)
    assert key is not None and key == graphs._signature(ids.clone())
    assert graphs._signature(token_ids(6)) != key  # another length: another graph
    clip.final_layer_norm.weight.data = clip.final_layer_norm.weight.data.clone()
    assert graphs._signature(ids) != key  # a weight replaced: the old graph would read the old tensor
    handle = clip.encoder.layers[0].register_forward_hook(lambda *args: None)
    assert graphs._signature(ids) is None  # a hook: the plain forward
    handle.remove()
    assert graphs._signature(ids) is not None
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), clip)
    assert graphs._signature(ids) is None  # PEFT layers: their scales and switches are Python state


def test_drop_captured_graphs_forgets_the_text_encoders_graphs(tiny_components, encoders):
    clip, t5 = encoders
    pipe = FluxPipeline(**{**tiny_components, "text_encoder": clip, "text_encoder_2": t5})
    apply_text_encoder_graphs(pipe)
    graphs = text_encoder_graphs(pipe)
    for each in graphs:
        each.graphs[("a signature",)] = ("a graph",)
    drop_captured_graphs(pipe)
    assert all(not each.graphs for each in graphs)


@pytest.mark.gpu
def test_replays_equal_the_eager_encoders_and_capture_once_per_signature(encoders):
    clip, t5 = (encoder.to("cuda", torch.bfloat16) for encoder in encoders)
    for encoder in (clip, t5):
        ids = token_ids(77 if encoder is clip else 512, "cuda")
        with torch.no_grad():
            expected = encoder(ids, output_hidden_states=False)
            graphs = TextEncoderGraphs(encoder)
            graphs.install()
            first = encoder(ids, output_hidden_states=False)  # eager, then captured
            assert graphs.captures == 1 and graphs.failed is None
            for _ in range(2):
                replayed = encoder(ids, output_hidden_states=False)
                # the same kernels on the same inputs: the same bits
                assert torch.equal(replayed[0], expected[0]) and torch.equal(first[0], expected[0])
                if encoder is clip:
                    assert torch.equal(replayed.pooler_output, expected.pooler_output)
            other = token_ids(16, "cuda")
            assert torch.equal(encoder(other, output_hidden_states=False)[0],
                               graphs.forward(other, output_hidden_states=False)[0])  # fmt: skip
            assert graphs.captures == 2  # a new length: its own graph
            encoder.float()  # weights cast: new tensors, new signature
            assert torch.equal(encoder(ids, output_hidden_states=False)[0],
                               graphs.forward(ids, output_hidden_states=False)[0])  # fmt: skip
            assert graphs.captures == 3
        graphs.uninstall()


@pytest.mark.gpu
def test_a_graphed_pipeline_makes_diffusers_images(tiny_components):
    components = {name: copy.deepcopy(value) if isinstance(value, torch.nn.Module) else value
                  for name, value in tiny_components.items()}  # fmt: skip
    pipe = FluxPipeline(**components).to("cuda")
    expected = pipe(**tiny_call_kwargs()).images
    undo = apply_text_encoder_graphs(pipe)
    graphs = text_encoder_graphs(pipe)
    for _ in range(3):
        assert torch.equal(pipe(**tiny_call_kwargs()).images, expected)
    assert [each.captures for each in graphs] == [1, 1]
    undo()
